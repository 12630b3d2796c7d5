"""Multi-vector (late-interaction) retrieval outside the train step: encoding texts into token
vectors, token pooling, and the indexes that search them by MaxSim.

    rep = representations.of_model(model)                      # a ColBERT / PyLate model
    docs = rep.encode(model, corpus, role="document")            # [n_i, D] per document
    index = ExactMaxSim(); index.index(docs)
    scores_QxK, ids_QxK = index.search(rep.encode(model, queries, role="query"), k=100)

Exact search scores every document in chunks of similar length (memory bounded by the chunk,
never a [queries, corpus tokens] matrix), with `losses.maxsim_matrix`, the function training
uses. `pool_factor` > 1 stores each document's tokens pooled by hierarchical clustering first
(PyLate's pool_embeddings_hierarchical), cutting the stored vectors by about that factor.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from embed_jax import losses

log = logging.getLogger(__name__)

QUERY_BLOCK = 128  # queries scored at once
DOC_BLOCK = 64  # documents scored at once (of similar length)


# ----------------------------------------------------------------------------------------------
# Encoding.
# ----------------------------------------------------------------------------------------------


def encode_tokens(model, rep, texts: Sequence[str], *, batch_size: int = 32,
                  show_progress=None, truncate_queries: bool | None = None) -> list[np.ndarray]:
  """The scored token vectors of each text ([n_i, D] float32, input order) of an
  embed_jax.Embedder holding a multi-vector model; `rep` is its MultiVector for the texts' role
  (queries or documents). Longest first, padded to bucketed lengths: each shape compiles once."""
  from tqdm.auto import tqdm

  from embed_jax.embedder import bucketed_batches
  from embed_jax.models import SentenceEncoder
  if isinstance(texts, str):
    raise TypeError("encode takes a list of texts; wrap a single text in a list")
  bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
  if bad:
    raise ValueError(f"{len(bad)} text(s) are empty or not strings (the first at position "
                     f"{bad[0]}): a multi-vector model needs some text to embed")
  token_ids = rep.tokenize(model.tokenizer, model.config, texts, rep.role,
                           truncate_queries=truncate_queries)
  li = rep.settings

  def forward(params, ids_BxL, mask_BxL):
    attend, keep = rep.masks(ids_BxL, mask_BxL)
    vecs = model.module.apply({"params": params}, ids_BxL, attend,
                              method=SentenceEncoder.token_vectors)
    return vecs, keep

  fn = jax.jit(forward)
  out: list[np.ndarray | None] = [None] * len(texts)
  bar = tqdm(total=len(texts), desc="encode", unit="text",
             disable=not (len(texts) >= 1000 if show_progress is None else show_progress))
  max_len = min(max(li.query_length, li.document_length), model.config.max_tokens)
  for idx, ids, mask in bucketed_batches(token_ids, batch_size, max_len, model.config.pad_token_id):
    vecs, keep = (np.asarray(x) for x in fn(model.params, ids, mask))
    for r, i in enumerate(idx):
      out[i] = np.ascontiguousarray(vecs[r][keep[r]], np.float32)
    bar.update(len(idx))
  bar.close()
  return out


# ----------------------------------------------------------------------------------------------
# Token pooling.
# ----------------------------------------------------------------------------------------------


def pool_tokens(doc_NxD: np.ndarray, pool_factor: int, protected: int = 1) -> np.ndarray:
  """A document's token vectors clustered into len / pool_factor groups (Ward linkage on the
  cosine distances, scipy), each replaced by its mean (not re-normalised); the first `protected`
  tokens ([CLS]) are kept as they are. As PyLate's pool_embeddings_hierarchical."""
  from scipy.cluster import hierarchy
  keep, rest = doc_NxD[:protected], doc_NxD[protected:]
  n = len(rest)
  clusters = max(n // pool_factor, 1)
  if clusters >= n:
    return doc_NxD
  dist = 1.0 - rest @ rest.T
  labels = hierarchy.fcluster(hierarchy.linkage(dist[np.triu_indices(n, k=1)], method="ward"),
                              t=clusters, criterion="maxclust") - 1
  sums = np.zeros((clusters, rest.shape[1]), np.float64)
  np.add.at(sums, labels, rest)
  counts = np.bincount(labels, minlength=clusters)
  pooled = (sums[counts > 0] / counts[counts > 0, None]).astype(np.float32)
  return np.concatenate([keep, pooled])


# ----------------------------------------------------------------------------------------------
# Exact MaxSim search.
# ----------------------------------------------------------------------------------------------


def _pad(vectors: Sequence[np.ndarray], length: int) -> dict:
  dims = vectors[0].shape[1]
  out = np.zeros((len(vectors), length, dims), np.float32)
  mask = np.zeros((len(vectors), length), np.float32)
  for i, v in enumerate(vectors):
    out[i, :len(v)], mask[i, :len(v)] = v, 1.0
  return {"vectors": out, "mask": mask}


_maxsim = jax.jit(losses.maxsim_matrix)


def _round_up(n: int, to: int = 32) -> int:
  return max(to, -(-n // to) * to)


class ExactMaxSim:
  """Every document scored by MaxSim (float32 token vectors, optionally pooled)."""

  def __init__(self, pool_factor: int = 1):
    self.pool_factor = pool_factor
    self.name = "multivector" if pool_factor == 1 else f"multivector+pool{pool_factor}"

  def index(self, docs: Sequence[np.ndarray]) -> None:
    if not len(docs):
      raise ValueError("no documents to index")
    if self.pool_factor > 1:
      docs = [pool_tokens(d, self.pool_factor) for d in docs]
    self.docs = list(docs)
    self.tokens = sum(len(d) for d in docs)
    # Chunks of documents of similar length, padded to a multiple of 32 tokens.
    self.order = np.argsort([len(d) for d in docs], kind="stable")
    self.chunks = []
    for start in range(0, len(docs), DOC_BLOCK):
      idx = self.order[start:start + DOC_BLOCK]
      self.chunks.append((idx, _pad([docs[i] for i in idx], _round_up(max(len(docs[i]) for i in idx)))))

  @property
  def bytes_per_doc(self) -> float:
    """The stored float32 token vectors per document (their real counts)."""
    return self.tokens * self.docs[0].shape[1] * 4 / len(self.docs)

  def score_all(self, queries: Sequence[np.ndarray]) -> np.ndarray:
    """[Q, N] MaxSim of every query with every document."""
    scores = np.zeros((len(queries), len(self.docs)), np.float32)
    q_len = _round_up(max(len(q) for q in queries), 8)
    for qs in range(0, len(queries), QUERY_BLOCK):
      q = _pad(queries[qs:qs + QUERY_BLOCK], q_len)
      for idx, chunk in self.chunks:
        scores[qs:qs + len(q["mask"]), idx] = np.asarray(_maxsim(q, chunk))
    return scores

  def search(self, queries: Sequence[np.ndarray], k: int):
    from embed_jax.evaluate import topk_search
    scores = self.score_all(queries)
    return topk_search(lambda a, b: scores[:, a:b], scores.shape[1], k)


# ----------------------------------------------------------------------------------------------
# PLAID's candidate generation, with FAISS for the clustering.
# ----------------------------------------------------------------------------------------------


class Plaid:
  """Candidate generation as PLAID does it (Santhanam et al., 2022), then exact MaxSim.

  Every document token is assigned to the nearest of K centroids (FAISS k-means over the
  corpus tokens, K = 2^floor(log2(16 sqrt(tokens))) as PLAID and fast-plaid choose it). A
  query's candidates are the documents with a token in one of each query token's `nprobe`
  best centroids; centroid interaction ranks them (each document token stands for its
  centroid), and the best `ncandidates` are re-ranked by exact MaxSim over the stored vectors.
  Stored: the float32 token vectors (for the re-ranking) and a 2-byte centroid id per token.
  Defaults: fast-plaid's `n_ivf_probe=8` and `kmeans_niters=4`; 1,024 candidates re-ranked
  (ColBERTv2's `ndocs` for k <= 100; fast-plaid's `n_full_scores=4096` is most of a small
  corpus). experiments/results/multivector/ measures recall against exact MaxSim for others.
  fast-plaid itself is built against one torch version (2.11 for 1.7.0) and crashes with this
  project's 2.13, so the clustering goes through FAISS and the pruning is written here.
  """

  def __init__(self, nprobe: int = 8, ncandidates: int = 1024, seed: int = 0, niter: int = 4):
    self.nprobe, self.ncandidates, self.seed, self.niter = nprobe, ncandidates, seed, niter
    self.name = "plaid"

  def index(self, docs: Sequence[np.ndarray]) -> None:
    import faiss
    tokens_TxD = np.ascontiguousarray(np.concatenate(docs), np.float32)
    self.offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    self.tokens_TxD, self.num_docs = tokens_TxD, len(docs)
    k = int(2 ** np.floor(np.log2(16 * np.sqrt(len(tokens_TxD)))))
    k = max(1, min(k, len(tokens_TxD) // 4 or 1, 65535))
    sample = np.random.default_rng(self.seed).permutation(len(tokens_TxD))[:max(256 * k, 1)]
    kmeans = faiss.Kmeans(tokens_TxD.shape[1], k, niter=self.niter, seed=self.seed, spherical=True,
                          max_points_per_centroid=256)
    kmeans.train(tokens_TxD[np.sort(sample)])
    self.centroids_KxD = kmeans.centroids.astype(np.float32)
    search = faiss.IndexFlatIP(tokens_TxD.shape[1])
    search.add(self.centroids_KxD)
    codes_T = search.search(tokens_TxD, 1)[1][:, 0].astype(np.uint16)
    doc_T = np.repeat(np.arange(len(docs)), np.diff(self.offsets))
    self.codes_T, self.doc_T = codes_T, doc_T
    # Inverted lists: centroid -> the documents with a token there (each once).
    pairs = np.unique(codes_T.astype(np.int64) * len(docs) + doc_T)
    self.list_docs = (pairs % len(docs)).astype(np.int32)
    self.list_starts = np.searchsorted(pairs // len(docs), np.arange(k + 1))
    log.info("plaid: %d tokens of %d documents in %d centroids", len(tokens_TxD), len(docs), k)

  @property
  def bytes_per_doc(self) -> float:
    return (self.tokens_TxD.nbytes + self.codes_T.nbytes) / self.num_docs

  ARRAYS = ("tokens_TxD", "offsets", "centroids_KxD", "codes_T", "list_docs", "list_starts")

  def save(self, folder, model_fingerprint: str, corpus_checksum: str = "") -> Path:
    """Writes the index into `folder` (atomically: a temporary folder renamed over it) with a
    manifest naming the model and corpus it was built from."""
    import json
    import shutil
    import tempfile
    folder = Path(folder).absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
      np.savez(tmp / "index.npz", **{k: getattr(self, k) for k in self.ARRAYS})
      manifest = {"kind": "plaid", "model_fingerprint": model_fingerprint,
                  "corpus_checksum": corpus_checksum, "num_docs": self.num_docs,
                  "dims": int(self.tokens_TxD.shape[1]), "nprobe": self.nprobe,
                  "ncandidates": self.ncandidates}
      (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
      if folder.exists():
        shutil.rmtree(folder)
      tmp.rename(folder)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    return folder

  @classmethod
  def load(cls, folder, model_fingerprint: str, corpus_checksum: str = "") -> "Plaid":
    """An index saved by `save`, refused (one line) when another model or corpus built it."""
    import json
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
      raise FileNotFoundError(f"{folder} is not a PLAID index (no manifest.json)")
    manifest = json.loads(manifest_path.read_text())
    if manifest["model_fingerprint"] != model_fingerprint:
      raise ValueError(f"{folder} was built by another model (fingerprint "
                       f"{manifest['model_fingerprint'][:12]}, this model's {model_fingerprint[:12]}): "
                       f"build the index again with this model")
    if corpus_checksum and manifest["corpus_checksum"] != corpus_checksum:
      raise ValueError(f"{folder} was built from another corpus: build the index again")
    index = cls(manifest["nprobe"], manifest["ncandidates"])
    with np.load(folder / "index.npz") as arrays:
      for k in cls.ARRAYS:
        setattr(index, k, arrays[k])
    index.num_docs = manifest["num_docs"]
    return index

  def _rows(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The corpus token rows of `docs`, concatenated, and where each document's rows start."""
    lengths = self.offsets[docs + 1] - self.offsets[docs]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    rows = np.repeat(self.offsets[docs] - starts, lengths) + np.arange(lengths.sum())
    return rows, starts

  def _candidates(self, q_LxD: np.ndarray) -> np.ndarray:
    scores_LxK = q_LxD @ self.centroids_KxD.T
    nprobe = min(self.nprobe, scores_LxK.shape[1])
    probe = np.unique(np.argpartition(-scores_LxK, nprobe - 1, axis=1)[:, :nprobe])
    cands = np.unique(np.concatenate([self.list_docs[self.list_starts[c]:self.list_starts[c + 1]]
                                      for c in probe]))
    if len(cands) > self.ncandidates:  # centroid interaction: each token is its centroid
      rows, starts = self._rows(cands)
      approx = np.maximum.reduceat(scores_LxK[:, self.codes_T[rows]], starts, axis=1).sum(0)
      cands = np.sort(cands[np.argpartition(-approx, self.ncandidates - 1)[:self.ncandidates]])
    return cands

  def search(self, queries: Sequence[np.ndarray], k: int):
    scores_QxK = np.full((len(queries), k), -np.inf, np.float32)
    ids_QxK = np.full((len(queries), k), -1, np.int64)
    for i, q in enumerate(queries):
      cands = self._candidates(q)
      rows, starts = self._rows(cands)
      exact = np.maximum.reduceat(q @ self.tokens_TxD[rows].T, starts, axis=1).sum(0)
      top = np.lexsort((cands, -exact))[:k]
      scores_QxK[i, :len(top)], ids_QxK[i, :len(top)] = exact[top], cands[top]
    return scores_QxK, ids_QxK


def indexes(pool_factors=(), plaid: bool = False) -> list:
  """The indexes an evaluation compares: exact MaxSim, pooled by each factor, and PLAID."""
  return ([ExactMaxSim()] + [ExactMaxSim(f) for f in pool_factors if f > 1]
          + ([Plaid()] if plaid else []))
