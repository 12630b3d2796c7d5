"""Sparse (vocabulary-weight) retrieval outside the train step: encoding texts into sparse
vectors, the inverted index that searches them, BM25 (bm25s) as the lexical reference, and the
fusion of two runs (hybrid retrieval).

    rep = representations.of_model(model)                 # a SPLADE or lexical-weight model
    docs_NxV = rep.encode(model, corpus, role="document")   # scipy.sparse CSR, float32
    index = InvertedIndex(); index.index(docs_NxV)
    scores_QxK, ids_QxK = index.search(rep.encode(model, queries, role="query"), k=100)
    index.stats()  # non-zeros per query and document, FLOPS per query, all-zero vectors

The index is scipy.sparse: the corpus transposed into posting lists (term -> documents and
weights), and a query block's scores are the sparse product of its vectors with those lists, so
a query touches only the postings of its own terms (its FLOPS: the summed lengths of those
lists). That is exact and enough for 5k-500k documents; at MS MARCO scale (8.8M passages) one
would use a dynamic-pruning impact index (block-max WAND / MaxScore in PISA or Lucene, or
Seismic's approximate blocks), with quantised weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

log = logging.getLogger(__name__)

QUERY_BLOCK = 256  # queries scored at once: a [block, corpus] dense score matrix


# ----------------------------------------------------------------------------------------------
# Encoding.
# ----------------------------------------------------------------------------------------------


def check_texts(texts) -> None:
  """Refuses a bare string, non-strings and empty texts (one line naming the first)."""
  if isinstance(texts, str):
    raise TypeError("encode takes a list of texts; wrap a single text in a list")
  bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
  if bad:
    raise ValueError(f"{len(bad)} text(s) are empty or not strings (the first at position "
                     f"{bad[0]}): a sparse model needs some text to weigh; drop them or give "
                     f"them text")


def to_csr(dense_BxV: np.ndarray):
  """scipy CSR float32 of the non-zero entries of a dense [B, V] block."""
  import scipy.sparse as sp
  return sp.csr_matrix(np.asarray(dense_BxV, np.float32))


def encode_sparse(model, rep, texts: Sequence[str], *, batch_size: int = 32, max_len: int,
                  show_progress=None):
  """scipy CSR [n, V] float32 of an embed_jax.Embedder holding a sparse model; `rep` is its
  Sparse representation for the texts' role. Longest first, padded to bucketed lengths: each
  shape compiles once."""
  import scipy.sparse as sp
  from tqdm.auto import tqdm

  from embed_jax.embedder import bucketed_batches
  check_texts(texts)
  token_ids = rep.tokenize(model.tokenizer, model.config, texts, rep.role, max_len)
  fn = jax.jit(lambda params, ids, mask: rep.vectors(model.module, params, ids, mask))
  blocks, order = [], []
  bar = tqdm(total=len(texts), desc="encode", unit="text",
             disable=not (len(texts) >= 1000 if show_progress is None else show_progress))
  pending = None  # fetch one batch late so the host converts while the next batch computes
  for idx, ids, mask in bucketed_batches(token_ids, batch_size, max_len, model.config.pad_token_id):
    out = fn(model.params, ids, mask)
    if pending is not None:
      blocks.append(to_csr(np.asarray(pending[1])[:len(pending[0])]))
      bar.update(len(pending[0]))
    order.extend(idx)
    pending = (idx, out)
  if pending is not None:
    blocks.append(to_csr(np.asarray(pending[1])[:len(pending[0])]))
    bar.update(len(pending[0]))
  bar.close()
  if not blocks:
    return sp.csr_matrix((0, model.config.vocab_size), dtype=np.float32)
  stacked = sp.vstack(blocks, format="csr", dtype=np.float32)  # rows in batch order
  return stacked[np.argsort(np.asarray(order))]  # input order


def prune(x_NxV, k: int):
  """Each row's k largest weights (0: all), as SPLADE's top-k pruning at inference."""
  import scipy.sparse as sp
  x = sp.csr_matrix(x_NxV, dtype=np.float32)
  if k <= 0 or not x.nnz or np.diff(x.indptr).max() <= k:
    return x
  data, indices, indptr = [], [], [0]
  for r in range(x.shape[0]):
    lo, hi = x.indptr[r], x.indptr[r + 1]
    d, j = x.data[lo:hi], x.indices[lo:hi]
    if hi - lo > k:
      keep = np.sort(np.argpartition(-d, k - 1)[:k])
      d, j = d[keep], j[keep]
    data.append(d)
    indices.append(j)
    indptr.append(indptr[-1] + len(d))
  return sp.csr_matrix((np.concatenate(data), np.concatenate(indices), np.array(indptr)),
                       shape=x.shape, dtype=np.float32)


def corpus_idf(tokenizer, model_config, texts: Sequence[str], vocab_size: int) -> np.ndarray:
  """float32 [V]: BM25's (Lucene's) idf, log(1 + (N - df + 0.5) / (df + 0.5)), of each
  vocabulary term over a corpus as the model's tokenizer splits it (special tokens not counted;
  a term in no document gets the largest value). Multiplying the query vectors by it (or a power
  of it: InvertedIndex(term_weights=...)) is the IDF weighting of Iida & Okazaki (2022) for
  SPLADE in a new domain: terms rare in the target corpus weigh more than the training corpus
  taught."""
  from embed_jax.embedder import tokenize_texts
  check_texts(texts)
  df_V = np.zeros(vocab_size, np.int64)
  for start in range(0, len(texts), 1024):
    for ids in tokenize_texts(tokenizer, model_config, list(texts[start:start + 1024]), 0,
                              special=False):
      df_V[np.unique(np.asarray(ids, np.int64))] += 1
  n = len(texts)
  return np.log1p((n - df_V + 0.5) / (df_V + 0.5)).astype(np.float32)


def vocab_fingerprint(tokenizer) -> str:
  """sha256 of a tokenizer's vocabulary (token -> id): which vocabulary a sparse vector's
  columns mean."""
  vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
  return hashlib.sha256("\n".join(f"{i}\t{t}" for t, i in vocab).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# The inverted index.
# ----------------------------------------------------------------------------------------------


class InvertedIndex:
  """Exact sparse dot-product search over posting lists (scipy.sparse), with optional top-k
  pruning of the query and document vectors. Bytes per document: a 4-byte document id and a
  4-byte float32 weight per posting."""

  def __init__(self, query_top_k: int = 0, document_top_k: int = 0, vocab: str = "",
               term_weights=None):
    self.query_top_k, self.document_top_k, self.vocab = query_top_k, document_top_k, vocab
    # [V] multiplying each query's weights after pruning (corpus_idf(...) ** alpha): None, none.
    self.term_weights = None if term_weights is None else np.asarray(term_weights, np.float32)
    self.name = "sparse" + (f"+top{query_top_k}/{document_top_k}"
                            if query_top_k or document_top_k else "") + (
                                "+weighted" if term_weights is not None else "")
    self.query_stats: dict = {}

  def index(self, docs_NxV) -> None:
    docs = prune(docs_NxV, self.document_top_k)
    if not docs.shape[0]:
      raise ValueError("no documents to index")
    docs.eliminate_zeros()
    self.num_docs, self.vocab_size = docs.shape
    self.postings_VxN = docs.T.tocsr()  # term -> (document ids, weights)
    self.doc_nnz_N = np.diff(docs.indptr)
    self.df_V = np.diff(self.postings_VxN.indptr)
    if (self.doc_nnz_N == 0).any():
      log.warning("%d of %d documents have an all-zero sparse vector: no query can find them",
                  int((self.doc_nnz_N == 0).sum()), self.num_docs)

  @property
  def bytes_per_doc(self) -> float:
    return float(self.doc_nnz_N.sum()) * 8 / self.num_docs

  def search(self, queries_QxV, k: int):
    from embed_jax.evaluate import topk_search
    if queries_QxV.shape[1] != self.vocab_size:
      raise ValueError(f"the queries have {queries_QxV.shape[1]} vocabulary columns but the index "
                       f"was built over {self.vocab_size}: encode queries and documents with the "
                       f"same model (tokenizer)")
    q = prune(queries_QxV, self.query_top_k)
    if self.term_weights is not None:
      if self.term_weights.shape != (self.vocab_size,):
        raise ValueError(f"term_weights has shape {self.term_weights.shape} but the index has "
                         f"{self.vocab_size} vocabulary columns: compute them with the same "
                         f"tokenizer (corpus_idf)")
      q = q.multiply(self.term_weights[None, :]).tocsr().astype(np.float32)
    q.eliminate_zeros()
    q_nnz_Q = np.diff(q.indptr)
    zero = int((q_nnz_Q == 0).sum())
    if zero:
      log.warning("%d of %d queries have an all-zero sparse vector: every document scores 0 "
                  "for them", zero, q.shape[0])
    # FLOPS per query: one multiply-add per posting of each of its terms.
    flops_Q = np.asarray(q.astype(bool).astype(np.float64) @ self.df_V.astype(np.float64)).ravel()
    self.query_stats = {"nnz_per_query": float(q_nnz_Q.mean()) if len(q_nnz_Q) else 0.0,
                        "flops_per_query": float(flops_Q.mean()) if len(flops_Q) else 0.0,
                        "zero_queries": zero}
    scores_parts, ids_parts = [], []
    for start in range(0, q.shape[0], QUERY_BLOCK):
      block_QxN = (q[start:start + QUERY_BLOCK] @ self.postings_VxN).toarray()
      s, i = topk_search(lambda a, b: block_QxN[:, a:b], self.num_docs, k)
      scores_parts.append(s)
      ids_parts.append(i)
    if not scores_parts:
      return np.zeros((0, min(k, self.num_docs)), np.float32), np.zeros((0, min(k, self.num_docs)), np.int64)
    return np.concatenate(scores_parts), np.concatenate(ids_parts)

  def stats(self) -> dict:
    return {"nnz_per_doc": float(self.doc_nnz_N.mean()),
            "zero_docs": int((self.doc_nnz_N == 0).sum()), **self.query_stats}

  def save(self, folder, corpus_checksum: str = "") -> Path:
    """Writes the posting lists and a manifest naming the vocabulary (`vocab`: the model's
    tokenizer fingerprint) and corpus, atomically (a temporary folder renamed over `folder`)."""
    import scipy.sparse as sp

    from embed_jax.checkpoint import _atomic_folder
    if not self.vocab:
      raise ValueError("this index does not know its vocabulary: build it through the model's "
                       "representation (representations.of_model(model).search_plan)")

    def fill(tmp: Path) -> None:
      sp.save_npz(tmp / "postings.npz", self.postings_VxN)
      manifest = {"kind": "sparse", "vocab": self.vocab, "vocab_size": self.vocab_size,
                  "num_docs": self.num_docs, "corpus_checksum": corpus_checksum,
                  "query_top_k": self.query_top_k, "document_top_k": self.document_top_k}
      (tmp / "config.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return _atomic_folder(Path(folder), fill)

  @classmethod
  def load(cls, folder, vocab: str, corpus_checksum: str = "") -> "InvertedIndex":
    """An index saved by `save`, refused (one line) when it was built over another vocabulary
    (another tokenizer: its columns would mean other tokens) or another corpus."""
    import scipy.sparse as sp
    folder = Path(folder)
    if not (folder / "config.json").exists() or not (folder / "postings.npz").exists():
      raise FileNotFoundError(f"{folder} is not a sparse index (config.json and postings.npz)")
    manifest = json.loads((folder / "config.json").read_text())
    if manifest["vocab"] != vocab:
      raise ValueError(f"{folder} was built over another vocabulary (tokenizer {manifest['vocab'][:12]}, "
                       f"this model's {vocab[:12]}): build the index again with this model")
    if corpus_checksum and manifest["corpus_checksum"] != corpus_checksum:
      raise ValueError(f"{folder} was built from another corpus: build the index again")
    index = cls(manifest["query_top_k"], manifest["document_top_k"], vocab)
    index.postings_VxN = sp.load_npz(folder / "postings.npz").tocsr()
    index.vocab_size, index.num_docs = index.postings_VxN.shape
    index.df_V = np.diff(index.postings_VxN.indptr)
    index.doc_nnz_N = np.bincount(index.postings_VxN.indices, minlength=index.num_docs)
    return index


# ----------------------------------------------------------------------------------------------
# BM25 (bm25s): the lexical reference.
# ----------------------------------------------------------------------------------------------


class BM25Model:
  """BM25 as a 'model' `evaluate_retrieval` takes (`embed_jax.load("bm25")`): no weights; its
  settings are its fingerprint. Lucene's BM25 (bm25s method "lucene") with Elasticsearch's
  defaults k1 = 1.2, b = 0.75, English stopwords and the Snowball stemmer, as the BM25 of the
  BEIR paper (Elasticsearch's English analyser)."""

  def __init__(self, k1: float = 1.2, b: float = 0.75, method: str = "lucene",
               stopwords: str = "en", stemmer: str = "english"):
    self.settings = dict(k1=k1, b=b, method=method, stopwords=stopwords, stemmer=stemmer)
    self.source = "bm25"
    self.fingerprint = hashlib.sha256(repr(sorted(self.settings.items())).encode()).hexdigest()

  def tokenize(self, texts: Sequence[str]):
    import bm25s
    stemmer = None
    if self.settings["stemmer"]:
      try:
        import Stemmer
      except ImportError:
        raise ImportError("BM25's stemmer needs PyStemmer: pip install PyStemmer") from None
      stemmer = Stemmer.Stemmer(self.settings["stemmer"])
    return bm25s.tokenize(list(texts), stopwords=self.settings["stopwords"], stemmer=stemmer,
                          return_ids=False, show_progress=False)


class BM25Index:
  """A bm25s index over the corpus texts; queries are texts. Bytes per document: the index's
  score matrix (float32 scores, int32 ids) over the corpus."""
  name = "bm25"

  def __init__(self, model: BM25Model):
    self.model = model
    self.query_stats: dict = {}

  def index(self, texts: Sequence[str]) -> None:
    import bm25s
    s = self.model.settings
    tokens = self.model.tokenize(texts)
    self.num_docs = len(texts)
    self.retriever = bm25s.BM25(k1=s["k1"], b=s["b"], method=s["method"])
    self.retriever.index(tokens, show_progress=False)
    self.doc_nnz_N = np.array([len(set(t)) for t in tokens])
    self.vocab = set(self.retriever.vocab_dict)

  @property
  def bytes_per_doc(self) -> float:
    m = self.retriever.scores
    return float(m["data"].nbytes + m["indices"].nbytes + m["indptr"].nbytes) / self.num_docs

  def search(self, texts: Sequence[str], k: int):
    tokens = [[t for t in q if t in self.vocab] for q in self.model.tokenize(texts)]
    k = min(k, self.num_docs)
    scores_QxK = np.zeros((len(tokens), k), np.float32)
    ids_QxK = np.full((len(tokens), k), -1, np.int64)
    asked = [i for i, t in enumerate(tokens) if t]  # a query with no indexed term finds nothing
    if asked:
      ids, scores = self.retriever.retrieve([tokens[i] for i in asked], k=k, show_progress=False,
                                            n_threads=1)
      ids_QxK[asked], scores_QxK[asked] = ids, scores
    nnz_Q = np.array([len(set(t)) for t in tokens])
    df = np.diff(self.retriever.scores["indptr"])
    vocab_ids = self.retriever.vocab_dict
    flops_Q = np.array([sum(df[vocab_ids[t]] for t in set(q)) for q in tokens], np.float64)
    self.query_stats = {"nnz_per_query": float(nnz_Q.mean()) if len(nnz_Q) else 0.0,
                        "flops_per_query": float(flops_Q.mean()) if len(flops_Q) else 0.0,
                        "zero_queries": int(len(tokens) - len(asked))}
    if len(tokens) > len(asked):
      log.warning("%d of %d queries have no term in the BM25 index: they find nothing",
                  len(tokens) - len(asked), len(tokens))
    return scores_QxK, ids_QxK

  def stats(self) -> dict:
    return {"nnz_per_doc": float(self.doc_nnz_N.mean()),
            "zero_docs": int((self.doc_nnz_N == 0).sum()), **self.query_stats}


# ----------------------------------------------------------------------------------------------
# Hybrid retrieval: fusing two runs.
# ----------------------------------------------------------------------------------------------


def rrf(runs: Sequence[dict], k: int = 60) -> dict:
  """Reciprocal rank fusion (Cormack et al. 2009): a document's score is the sum over runs of
  1 / (k + its rank there); k = 60 as in the paper."""
  from embed_jax.evaluate import _ranked_docs
  fused: dict[str, dict[str, float]] = {}
  for run in runs:
    for qid, scores in run.items():
      out = fused.setdefault(qid, {})
      for rank, doc in enumerate(_ranked_docs(scores), 1):
        out[doc] = out.get(doc, 0.0) + 1.0 / (k + rank)
  return fused


def _minmax(scores: dict) -> dict:
  if not scores:
    return {}
  values = np.array(list(scores.values()), np.float64)
  low, span = values.min(), values.max() - values.min()
  return {d: (float(s) - low) / span if span > 0 else 1.0 for d, s in scores.items()}


def convex(run_a: dict, run_b: dict, weight: float) -> dict:
  """weight * a + (1 - weight) * b of each query's scores, each run min-max normalised over its
  own list first (a document missing from a list scores that list's minimum, 0)."""
  fused = {}
  for qid in run_a.keys() | run_b.keys():
    a, b = _minmax(run_a.get(qid, {})), _minmax(run_b.get(qid, {}))
    fused[qid] = {d: weight * a.get(d, 0.0) + (1 - weight) * b.get(d, 0.0) for d in a.keys() | b.keys()}
  return fused


def tune_convex(run_a: dict, run_b: dict, qrels: dict, grid=None, metric: str = "ndcg@10"):
  """(the weight of `convex` with the best `metric` on `qrels`, {weight: metric}): tuned on dev
  queries, never the test queries."""
  from embed_jax.evaluate import ir_metrics
  grid = np.round(np.linspace(0, 1, 21), 2) if grid is None else grid
  k = int(metric.split("@")[1])
  a = {q: s for q, s in run_a.items() if q in qrels}
  b = {q: s for q, s in run_b.items() if q in qrels}
  if not a or not b:
    raise ValueError("no dev query is in both runs: tune on queries both models searched")
  table = {float(w): ir_metrics(qrels, convex(a, b, float(w)), (k,))[metric] for w in grid}
  best = max(table, key=lambda w: (table[w], -abs(w - 0.5)))  # ties: the more even mix
  return best, table

