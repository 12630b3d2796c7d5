"""Cross-encoders: one score per joined (query, document) pair, for re-ranking a first stage.

    model = embed_jax.load("runs/reranker/export")         # a CrossEncoder folder
    scores = model.predict([("a query", "a document"), ...])  # sigmoid of the logit, as ST
    run = rerank(model, first_stage_run, queries, docs, top=100)

A pair is tokenised as transformers tokenises a text pair ([CLS] q [SEP] d [SEP], token type 1
on the document for BERT; <s> q </s></s> d </s> for MPNet), truncated longest-first to the
model's max_seq_length: what sentence-transformers' CrossEncoder.predict feeds the same model.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from embed_jax.embedder import Embedder, bucketed_batches
from embed_jax.models import SentenceEncoder

log = logging.getLogger(__name__)


def tokenize_pairs(tokenizer, max_len: int, queries: Sequence[str],
                   docs: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
  """(token ids, token type ids) of each (query, document) pair, truncated longest-first to
  `max_len` tokens, special tokens included (types all 0 where the tokenizer has none)."""
  if len(queries) != len(docs):
    raise ValueError(f"{len(queries)} queries for {len(docs)} documents: pairs need one of each")
  enc = tokenizer(list(queries), list(docs), truncation="longest_first", max_length=max_len,
                  return_token_type_ids=True)
  ids = enc["input_ids"]
  types = enc.get("token_type_ids") or [[0] * len(r) for r in ids]
  return ids, types


def pair_batches(ids: list[list[int]], types: list[list[int]], batch_size: int, max_len: int,
                 pad_id: int):
  """Yields (positions, ids_BxL, mask_BxL, types_BxL): longest first, padded to bucketed
  shapes (embed_jax.embedder.bucketed_batches), token types beside."""
  for idx, ids_BxL, mask_BxL in bucketed_batches(ids, batch_size, max_len, pad_id):
    types_BxL = np.zeros_like(ids_BxL)
    for r, i in enumerate(idx):
      types_BxL[r, :len(types[i])] = types[i]
    yield idx, ids_BxL, mask_BxL, types_BxL


class CrossEncoder(Embedder):
  """A cross-encoder (config.classifier): `predict` scores pairs, `rank` orders documents for
  a query. It gives no text embeddings (`encode` refuses)."""

  def __init__(self, config, params, tokenizer, source: str | None = None):
    if config.classifier is None:
      raise ValueError("this model has no classifier head: it is a bi-encoder (embed_jax.load "
                       "gives an Embedder); a cross-encoder is a *ForSequenceClassification folder")
    super().__init__(config, params, tokenizer, source)
    self._logits = jax.jit(self._pair_logits)

  def _pair_logits(self, params, ids_BxL, mask_BxL, types_BxL):
    return self.module.apply({"params": params}, ids_BxL, mask_BxL, types_BxL,
                             method=SentenceEncoder.pair_logits).astype(jnp.float32)

  def encode(self, *args, **kwargs):
    raise ValueError("this is a cross-encoder: it scores (query, document) pairs and gives no "
                     "embeddings; use model.predict(pairs) or model.rank(query, documents)")

  def tokenize_pairs(self, queries: Sequence[str], docs: Sequence[str]):
    return tokenize_pairs(self.tokenizer, self.config.max_seq_length, queries, docs)

  def predict(self, pairs: Sequence[tuple[str, str]], batch_size: int = 32,
              activation: bool = True, show_progress: bool | None = None) -> np.ndarray:
    """Scores [n] (one label) or [n, num_labels] of (query, document) pairs, in input order:
    through the model's activation (sigmoid for one label, as CrossEncoder.predict), or the raw
    logits with activation=False."""
    if isinstance(pairs, tuple) and len(pairs) == 2 and isinstance(pairs[0], str):
      raise TypeError("predict takes a list of (query, document) pairs; wrap one pair in a list")
    bad = [i for i, p in enumerate(pairs) if len(p) != 2 or not all(isinstance(t, str) for t in p)]
    if bad:
      raise TypeError(f"pairs[{bad[0]}] is not a (query, document) pair of strings")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    labels = self.config.classifier.num_labels
    out = np.zeros((len(pairs), labels), np.float32)
    if len(pairs):
      ids, types = self.tokenize_pairs([p[0] for p in pairs], [p[1] for p in pairs])
      cut = sum(len(r) >= self.config.max_seq_length for r in ids)
      if cut:
        log.info("%d of %d pairs reach max_seq_length=%d tokens: the longer text of each is cut "
                 "first (longest-first truncation, as CrossEncoder)", cut, len(pairs),
                 self.config.max_seq_length)
      if show_progress is None:
        show_progress = len(pairs) >= 5000
      from tqdm.auto import tqdm
      bar = tqdm(total=len(pairs), desc="rerank", unit="pair", disable=not show_progress)
      pending = None  # fetch one batch late so the host copies while the next one computes
      for idx, b_ids, b_mask, b_types in pair_batches(ids, types, batch_size,
                                                      self.config.max_seq_length,
                                                      self.config.pad_token_id):
        logits = self._logits(self.params, b_ids, b_mask, b_types)
        if pending is not None:
          out[pending[0]] = np.asarray(pending[1])[:len(pending[0])]
          bar.update(len(pending[0]))
        pending = (idx, logits)
      out[pending[0]] = np.asarray(pending[1])[:len(pending[0])]
      bar.update(len(pending[0]))
      bar.close()
    if activation and self.config.classifier.activation == "sigmoid":
      out = 1.0 / (1.0 + np.exp(-out))
    return out[:, 0] if labels == 1 else out

  def rank(self, query: str, documents: Sequence[str], top_k: int | None = None,
           batch_size: int = 32) -> list[dict]:
    """[{"corpus_id": i, "score": s}] best first (sentence-transformers' CrossEncoder.rank)."""
    if self.config.classifier.num_labels != 1:
      raise ValueError("rank needs a one-label cross-encoder (a relevance score per pair)")
    scores = self.predict([(query, d) for d in documents], batch_size=batch_size)
    order = np.argsort(-scores, kind="stable")[:top_k]
    return [{"corpus_id": int(i), "score": float(scores[i])} for i in order]


def rerank(model: CrossEncoder, run: Mapping[str, Mapping[str, float]],
           queries: Mapping[str, str], docs: Mapping[str, str], *, top: int = 100,
           batch_size: int = 32, show_progress: bool | None = None) -> tuple[dict, dict]:
  """(run, timing): each query's `top` first-stage documents re-scored by the cross-encoder
  (its raw logit); documents below `top` are dropped (a re-ranked list is `top` long). Timing
  gives the pairs scored, seconds and ms per query."""
  if top < 1:
    raise ValueError(f"rerank top={top} must be >= 1")
  pairs, owners = [], []
  for q, scores in run.items():
    for d in sorted(scores, key=lambda d: (-scores[d], d))[:top]:
      pairs.append((queries[q], docs[d]))
      owners.append((q, d))
  t = time.perf_counter()
  logits = model.predict(pairs, batch_size=batch_size, activation=False,
                         show_progress=show_progress)
  seconds = time.perf_counter() - t
  logits = logits if logits.ndim == 1 else logits[:, -1]
  out: dict[str, dict[str, float]] = {q: {} for q in run}
  for (q, d), s in zip(owners, logits):
    out[q][d] = float(s)
  timing = {"pairs": len(pairs), "rerank_seconds": round(seconds, 2),
            "ms_per_query": round(1000 * seconds / max(len(run), 1), 2)}
  return out, timing


def first_stage(name: str, dataset, split: str, qrels, *, top: int, batch_size: int = 32,
                cache: Path | None = None) -> tuple[dict, dict]:
  """(run, row) of a first-stage retriever (a model folder, hub id or "bm25") on the judged
  queries of `qrels`: its `top` documents per query and its result row (metrics, bytes/doc,
  ms/query). Cached in `cache` (JSON), keyed by the model's fingerprint, the dataset's checksum
  and the queries, so that a training run's evaluations encode the corpus once."""
  import embed_jax
  from embed_jax import evaluate
  from embed_jax.representations import of_model
  model = embed_jax.load(name)
  key = {"model": str(name), "fingerprint": evaluate.model_fingerprint(model),
         "dataset_checksum": dataset.checksum, "split": split, "queries": sorted(qrels), "top": top}
  if cache is not None and cache.exists():
    stored = json.loads(cache.read_text(encoding="utf-8"))
    if stored.get("key") == key:
      return stored["run"], stored["row"]
  out = evaluate.evaluate_retrieval(model, dataset, split, qrels=qrels, batch_size=batch_size,
                                    representation=of_model(model), keep_runs=True)
  row = out["results"][0]
  run = {q: dict(sorted(r.items(), key=lambda x: -x[1])[:top]) for q, r in row.pop("run").items()}
  row["representation"] = f"{row['representation']} ({name})"
  if cache is not None:
    from embed_jax.checkpoint import atomic_write
    atomic_write(cache, lambda f: f.write(json.dumps({"key": key, "run": run, "row": row})), "w")
  return run, row


def evaluate_reranking(model: CrossEncoder, dataset, split: str, run: Mapping, *,
                       qrels: Mapping | None = None, top: int = 100, batch_size: int = 32,
                       k_values: Sequence[int] | None = None, label: str = "reranked",
                       keep_run: bool = False) -> dict:
  """The cross-encoder re-ranking `run`'s top documents per query: a result row (metrics, ms per
  query of the re-ranking alone, pairs scored) as evaluate_retrieval gives; with keep_run, also
  the re-ranked run (its logits) under "run"."""
  from embed_jax import evaluate
  qrels = dataset.qrels(split) if qrels is None else qrels
  queries = {q: dataset.queries[q] for q in run}
  docs = dict(zip(dataset.corpus_ids, dataset.corpus_texts(" ")))
  reranked, timing = rerank(model, {q: run[q] for q in run if q in qrels}, queries, docs,
                            top=top, batch_size=batch_size)
  k_values = tuple(k_values or evaluate.DEFAULT_K)
  row = {"representation": label, "dims": "",
         "metrics": evaluate.ir_metrics(qrels, reranked, k_values), "bytes_per_doc": None, "ms_per_query": timing["ms_per_query"], "rerank_top": top,
         "pairs": timing["pairs"], "rerank_seconds": timing["rerank_seconds"]}
  return {**row, "run": reranked} if keep_run else row
