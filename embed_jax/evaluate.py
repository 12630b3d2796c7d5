"""Evaluation: IR metrics with pytrec_eval semantics (as BEIR and MTEB use them), the indexes
that store and search a representation's corpus, the retrieval and STS evaluators, and the
evaluators a training config declares (`config.evals.<name>`, built by `build_evaluators`).

    qrels = {"q1": {"d1": 1, "d7": 2}}                      # graded relevance; <= 0: not relevant
    run = run_from_topk(query_ids, doc_ids, scores_QxK, indices_QxK)
    ir_metrics(qrels, run)  # {"ndcg@10": ..., "map@100": ..., "recall@100": ..., "mrr@10": ...}
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Mapping, Sequence

import ml_collections
import numpy as np

from embed_jax import distributed, search
from embed_jax.models.pooling import l2_normalize as unit

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# ---- IR metrics ----
# ----------------------------------------------------------------------------------------------
#
# Semantics are trec_eval's, as pytrec_eval computes them and BEIR's EvaluateRetrieval.evaluate
# averages them (`ndcg_cut`, `map_cut`, `recall`, `P`), checked against pytrec_eval in
# tests/test_metrics.py:
# - Ranking: by score descending, the score rounded to float32 (trec_eval keeps it as a C float,
#   so scores closer than float32 resolution tie), ties broken by docid in descending order.
# - A document is relevant when its relevance is >= 1. nDCG uses gain = relevance (negative
#   relevance counts as 0) and discount log2(rank + 1); the ideal ranking comes from the qrels.
# - precision@k divides by k; recall@k and map@k divide by the number of relevant documents.
# - mrr@k: 1 / rank of the first relevant document within the top k, else 0 (BEIR's `mrr`).
# - Which queries are averaged: see `average_over` in ir_metrics.

METRICS = ("ndcg", "map", "recall", "precision", "mrr")
AVERAGE_OVER = ("run", "relevant")


def _ranked_docs(scores: Mapping[str, float]) -> list[str]:
  """Doc ids in trec_eval order: float32 score descending, then docid descending."""
  if not scores:
    return []
  docs_N = np.array(list(scores.keys()))
  scores_N = np.array(list(scores.values()), np.float32)
  # lexsort is ascending by (score, docid); reversed it is descending in both, as trec_eval sorts.
  return docs_N[np.lexsort((docs_N, scores_N))[::-1]].tolist()


def _per_query_metrics(rels_QxK: np.ndarray, ideal_QxI: np.ndarray, num_rel_Q: np.ndarray,
                 k_values: Sequence[int]) -> dict[str, np.ndarray]:
  """All metrics for every query from the gains of the ranked and of the ideal lists."""
  num_q, depth = rels_QxK.shape
  hit_QxK = rels_QxK >= 1
  hits_cum_QxK = np.cumsum(hit_QxK, axis=1)
  rank_K = np.arange(1, depth + 1)
  dcg_cum_QxK = np.cumsum(np.maximum(rels_QxK, 0) / np.log2(rank_K + 1), axis=1)
  ideal_rank_I = np.arange(1, ideal_QxI.shape[1] + 1)
  idcg_cum_QxI = np.cumsum(ideal_QxI / np.log2(ideal_rank_I + 1), axis=1)
  ap_cum_QxK = np.cumsum(np.where(hit_QxK, hits_cum_QxK / rank_K, 0.0), axis=1)
  first_hit_Q = np.full(num_q, np.inf)  # no relevant document retrieved: past every k
  if depth:
    first_hit_Q = np.where(hit_QxK.any(axis=1), hit_QxK.argmax(axis=1) + 1, first_hit_Q)
  safe_rel_Q = np.maximum(num_rel_Q, 1)  # queries without relevant documents score 0 throughout

  def at(cum_QxK: np.ndarray, k: int) -> np.ndarray:
    # Past the end of the list nothing more is retrieved: the value stays at the last rank.
    if cum_QxK.shape[1] == 0:
      return np.zeros(num_q)
    return cum_QxK[:, min(k, cum_QxK.shape[1]) - 1]

  out = {}
  for k in k_values:
    idcg_Q = at(idcg_cum_QxI, k)
    out[f"ndcg@{k}"] = np.where(idcg_Q > 0, at(dcg_cum_QxK, k) / np.where(idcg_Q > 0, idcg_Q, 1),
                                0.0)
    out[f"map@{k}"] = at(ap_cum_QxK, k) / safe_rel_Q
    out[f"recall@{k}"] = at(hits_cum_QxK, k) / safe_rel_Q
    out[f"precision@{k}"] = at(hits_cum_QxK, k) / k
    out[f"mrr@{k}"] = np.where(first_hit_Q <= k, 1.0 / first_hit_Q, 0.0)
  return out


def ir_metrics(
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Mapping[str, float]],
    k_values: Sequence[int] = (1, 3, 5, 10, 100, 1000),
    *,
    per_query: bool = False,
    average_over: str = "run",
    ignore_identical_ids: bool = False,
) -> dict[str, float] | dict[str, dict[str, float]]:
  """nDCG, MAP, recall, precision and MRR at each k, averaged over queries.

  Keys are `ndcg@10`, `map@100`, `recall@100`, `precision@10`, `mrr@10`, ... Which queries count:
  - average_over="run" (default, BEIR's behaviour): queries in both qrels and run, as pytrec_eval
    evaluates them and BEIR averages them. A query whose qrels hold no relevant document (all
    relevances <= 0) is kept and scores 0; a qrels query missing from the run is left out (a
    warning gives the count), so a retriever that drops queries looks better than it is.
  - average_over="relevant": queries in qrels with at least one relevant document; those missing
    from the run score 0 (trec_eval -c over queries that can be answered).
  ignore_identical_ids drops a document whose id equals the query id, as BEIR does by default
  (ArguAna, Quora). per_query=True returns {qid: {metric: value}} for the queries that count.
  """
  if average_over not in AVERAGE_OVER:
    raise ValueError(f"average_over={average_over!r}; expected one of {AVERAGE_OVER}")
  k_values = sorted({int(k) for k in k_values})
  if not k_values or k_values[0] < 1:
    raise ValueError(f"k_values must be positive integers, got {k_values}")
  num_rel = {qid: sum(1 for r in docs.values() if r >= 1) for qid, docs in qrels.items()}
  if average_over == "run":
    qids = [qid for qid in run if qid in qrels]
    missing = sum(1 for qid, n in num_rel.items() if n > 0 and qid not in run)
    if missing:
      log.warning("%d of %d queries with relevant documents are not in the run and are left out "
                  "of the averages (average_over='relevant' counts them as 0)", missing,
                  sum(1 for n in num_rel.values() if n > 0))
  else:
    qids = [qid for qid, n in num_rel.items() if n > 0]

  # Only the top max(k) count; a shorter run needs no padding up to max(k).
  depth = min(k_values[-1], max([len(run.get(q, ())) for q in qids], default=0))
  rels_QxK = np.zeros((len(qids), depth), np.float64)
  ideal_width = max([min(k_values[-1], len(qrels[q])) for q in qids], default=0)
  ideal_QxI = np.zeros((len(qids), ideal_width), np.float64)
  for i, qid in enumerate(qids):
    judged = qrels[qid]
    scores = run.get(qid, {})
    if ignore_identical_ids and qid in scores:
      scores = {d: s for d, s in scores.items() if d != qid}
    ranked = _ranked_docs(scores)[:depth]
    rels_QxK[i, :len(ranked)] = [judged.get(doc, 0) for doc in ranked]
    gains = sorted((r for r in judged.values() if r > 0), reverse=True)[:ideal_width]
    ideal_QxI[i, :len(gains)] = gains
  num_rel_Q = np.array([num_rel[q] for q in qids], np.float64)
  values = _per_query_metrics(rels_QxK, ideal_QxI, num_rel_Q, k_values)
  names = [f"{m}@{k}" for m in METRICS for k in k_values]
  if per_query:
    return {qid: {name: float(values[name][i]) for name in names} for i, qid in enumerate(qids)}
  if not qids:
    raise ValueError("no query to evaluate: the run and the qrels share no query id"
                     if average_over == "run" else "no query in qrels has a relevant document")
  return {name: float(values[name].mean()) for name in names}


def run_from_topk(query_ids: Sequence[str], doc_ids: Sequence[str], scores_QxK: np.ndarray,
                  indices_QxK: np.ndarray) -> dict[str, dict[str, float]]:
  """A run {qid: {docid: score}} from top-k search output; negative indices (padding) skipped."""
  scores_QxK, indices_QxK = np.asarray(scores_QxK), np.asarray(indices_QxK)
  if scores_QxK.shape != indices_QxK.shape or scores_QxK.ndim != 2:
    raise ValueError(f"scores {scores_QxK.shape} and indices {indices_QxK.shape} must be the "
                     f"same [queries, k] shape")
  if len(query_ids) != scores_QxK.shape[0]:
    raise ValueError(f"{len(query_ids)} query ids for {scores_QxK.shape[0]} rows of scores")
  if indices_QxK.size and indices_QxK.max() >= len(doc_ids):
    raise ValueError(f"index {indices_QxK.max()} out of range for {len(doc_ids)} doc ids")
  run = {}
  for qid, scores_K, indices_K in zip(query_ids, scores_QxK.tolist(), indices_QxK.tolist()):
    hits = {}
    for score, index in zip(scores_K, indices_K):
      if index >= 0:
        hits.setdefault(doc_ids[index], float(score))  # first (best) score wins on repeats
    run[qid] = hits
  return run


# ----------------------------------------------------------------------------------------------
# ---- Indexes: how a dense representation's documents are stored and searched ----
# ----------------------------------------------------------------------------------------------
#
# Each index holds the corpus embeddings at one precision, searches with the query embeddings,
# and reports its bytes per document (the "representation" field of a result row). Exact search
# is a chunked product with a running top-k, so no [queries, corpus] matrix is held for a large
# corpus. embed_jax.representations.Dense.indexes picks them.

PRECISIONS = ("float32", "int8", "uint8", "binary")
DOC_CHUNK = 16384  # documents scored at once


def topk_search(score_chunk, num_docs: int, k: int, chunk: int = DOC_CHUNK):
  """Top-k over `score_chunk(start, stop) -> scores_QxC` for doc ranges; (scores_QxK, idx_QxK).

  Ties keep the lower document index first (a stable order; metrics re-sort by score and id).
  """
  k = min(k, num_docs)
  best_s = best_i = None
  for start in range(0, num_docs, chunk):
    s_QxC = score_chunk(start, min(start + chunk, num_docs))
    i_QxC = np.broadcast_to(np.arange(start, start + s_QxC.shape[1]), s_QxC.shape)
    if best_s is not None:
      s_QxC = np.concatenate([best_s, s_QxC], axis=1)
      i_QxC = np.concatenate([best_i, i_QxC], axis=1)
    if s_QxC.shape[1] > k:
      part_QxK = np.argpartition(-s_QxC, k - 1, axis=1)[:, :k]
      # argpartition may keep any of the documents tied at the k-th score: rows with such ties
      # are selected again by (score, index), so the lower indices are kept.
      kth_Q = np.take_along_axis(s_QxC, part_QxK, 1).min(axis=1)
      tied = np.flatnonzero((s_QxC >= kth_Q[:, None]).sum(axis=1) > k)
      if len(tied):
        part_QxK[tied] = np.lexsort((i_QxC[tied], -s_QxC[tied]), axis=1)[:, :k]
      s_QxC = np.take_along_axis(s_QxC, part_QxK, axis=1)
      i_QxC = np.take_along_axis(i_QxC, part_QxK, axis=1)
    best_s, best_i = s_QxC, i_QxC
  order_QxK = np.lexsort((best_i, -best_s), axis=1)
  return np.take_along_axis(best_s, order_QxK, 1), np.take_along_axis(best_i, order_QxK, 1)


class Float32:
  """Exact cosine search over unit vectors (after Matryoshka truncation, re-normalised)."""
  name = "float32"

  def index(self, docs_NxD: np.ndarray) -> None:
    self.docs_NxD = np.ascontiguousarray(unit(docs_NxD), np.float32)

  @property
  def bytes_per_doc(self) -> float:
    return self.docs_NxD.shape[1] * 4

  def search(self, queries_QxD: np.ndarray, k: int):
    q_QxD = unit(queries_QxD).astype(np.float32)
    return topk_search(lambda a, b: q_QxD @ self.docs_NxD[a:b].T, len(self.docs_NxD), k)


class Scalar:
  """int8 / uint8 scalar quantisation, per-dimension ranges calibrated on the corpus.

  As sentence-transformers' `quantize_embeddings`: 256 steps between each dimension's corpus
  minimum and maximum (int8 codes are shifted by 128). int8 quantises the queries with the same
  ranges and scores by the dot product of the codes, as an int8 vector index does. A dot product
  of unsigned codes is dominated by the per-dimension offsets, so uint8 is scored as uint8 stores
  are used: the float query against the de-quantised documents.
  """

  def __init__(self, precision: str):
    assert precision in ("int8", "uint8")
    self.name = precision

  def quantize(self, x_NxD: np.ndarray) -> np.ndarray:
    codes = np.clip(np.floor((x_NxD - self.low_D) / self.step_D), 0, 255)
    return (codes - 128).astype(np.int8) if self.name == "int8" else codes.astype(np.uint8)

  def index(self, docs_NxD: np.ndarray) -> None:
    docs_NxD = unit(docs_NxD)
    self.low_D = docs_NxD.min(axis=0)
    self.step_D = np.maximum(docs_NxD.max(axis=0) - self.low_D, 1e-12) / 255
    self.codes_NxD = self.quantize(docs_NxD)
    # float32 holds every int8 code product sum exactly (< 2^24 for D <= 1024).
    self._docs_f = self.codes_NxD.astype(np.float32)

  @property
  def bytes_per_doc(self) -> float:
    return self.codes_NxD.shape[1]

  def search(self, queries_QxD: np.ndarray, k: int):
    q_QxD = unit(queries_QxD)
    if self.name == "int8":
      q_QxD = self.quantize(q_QxD).astype(np.float32)
      return topk_search(lambda a, b: q_QxD @ self._docs_f[a:b].T, len(self.codes_NxD), k)
    # q . (low + (code + 0.5) * step) ranks as (q * step) . code: the rest is constant per query.
    qs_QxD = (q_QxD * self.step_D).astype(np.float32)
    return topk_search(lambda a, b: qs_QxD @ self._docs_f[a:b].T, len(self.codes_NxD), k)


class Binary:
  """Sign bits packed 8 per byte; Hamming search (scores are minus the Hamming distance).

  With `rescore` = N > 0, the top N Hamming candidates of each query are re-ranked by the float
  query times the unpacked +-1 document bits (documents stay binary in memory).
  """

  def __init__(self, rescore: int = 0):
    self.rescore = rescore
    self.name = "binary+rescore" if rescore else "binary"

  def index(self, docs_NxD: np.ndarray) -> None:
    self.dims = docs_NxD.shape[1]
    self.bits_NxB = np.packbits(docs_NxD > 0, axis=1)

  @property
  def bytes_per_doc(self) -> float:
    return self.bits_NxB.shape[1]

  def search(self, queries_QxD: np.ndarray, k: int):
    q_bits_QxB = np.packbits(queries_QxD > 0, axis=1)

    def hamming(a, b):
      xor_QxCxB = np.bitwise_xor(q_bits_QxB[:, None, :], self.bits_NxB[None, a:b, :])
      return -np.bitwise_count(xor_QxCxB).sum(axis=2, dtype=np.int32)

    n = len(self.bits_NxB)
    if not self.rescore:
      return topk_search(hamming, n, k, chunk=1024)
    _, cand_QxR = topk_search(hamming, n, max(self.rescore, k), chunk=1024)
    signs_QxRxD = np.unpackbits(self.bits_NxB[cand_QxR], axis=2, count=self.dims).astype(np.float32) * 2 - 1
    scores_QxR = np.einsum("qd,qrd->qr", unit(queries_QxD).astype(np.float32), signs_QxRxD)
    order_QxR = np.lexsort((cand_QxR, -scores_QxR), axis=1)[:, :k]
    return np.take_along_axis(scores_QxR, order_QxR, 1), np.take_along_axis(cand_QxR, order_QxR, 1)


def dense_index(precision: str, rescore: int = 0):
  """An empty index of dense vectors at `precision` (float32 | int8 | uint8 | binary)."""
  if precision == "float32":
    return Float32()
  if precision in ("int8", "uint8"):
    return Scalar(precision)
  if precision == "binary":
    return Binary(rescore)
  raise ValueError(f"precision {precision!r} not supported; choose from {PRECISIONS}")


# ----------------------------------------------------------------------------------------------
# ---- The retrieval evaluator ----
# ----------------------------------------------------------------------------------------------

DEFAULT_K = (1, 3, 5, 10, 100, 1000)


def evaluate_embeddings(queries_QxD, query_ids: Sequence[str], docs_NxD,
                        doc_ids: Sequence[str], qrels: Mapping[str, Mapping[str, int]], *,
                        dims: Sequence[int] | None = None, precisions: Sequence[str] = ("float32",),
                        rescore: int = 0, k_values: Sequence[int] = DEFAULT_K,
                        representation=None, pool_factors: Sequence[int] = (),
                        plaid: bool = False, keep_runs: bool = False,
                        device_search: str = "auto") -> list[dict]:
  """Every index of a representation's outputs: metrics, bytes per document, ms per query.

  Dense (default): each d in `dims` keeps the first d dims (re-normalised), at each precision.
  Multi-vector (lists of token vectors): exact MaxSim, pooled by each of `pool_factors`, and
  through PLAID's candidate generation (`plaid`). Sparse (scipy CSR): the inverted index; BM25
  (texts): bm25s. An index with `stats()` adds them to its row (non-zeros per query and
  document, FLOPS per query, all-zero vectors). `keep_runs` adds each row's run ("run").
  `device_search` ("auto" | "on" | "off"; auto: more than one accelerator) runs the float32
  dense search on the devices (embed_jax.search.ShardedFloat32; the row's "search_devices").
  """
  on_devices = search.use_devices(device_search)
  if representation is None:
    from embed_jax.representations import Dense
    representation = Dense()
  k = max(k_values)
  results = []
  for index, d in representation.search_plan(docs_NxD, dims=dims, precisions=precisions,
                                             rescore=rescore, pool_factors=pool_factors,
                                             plaid=plaid):
    if on_devices and type(index) is Float32:  # dense float32 only: the same search, sharded
      index = search.ShardedFloat32()
    cut = (lambda x: x) if d is None else (lambda x: representation.prefix(x, d))  # noqa: E731
    index.index(cut(docs_NxD))
    t = time.perf_counter()
    scores_QxK, idx_QxK = index.search(cut(queries_QxD), k)
    ms = (time.perf_counter() - t) * 1e3 / max(len(query_ids), 1)
    run = run_from_topk(query_ids, doc_ids, scores_QxK, idx_QxK)
    results.append({"representation": index.name, "dims": d or representation.dims_of(docs_NxD),
                    "metrics": ir_metrics(qrels, run, k_values),
                    "bytes_per_doc": index.bytes_per_doc, "ms_per_query": round(ms, 4),
                    **(index.stats() if hasattr(index, "stats") else {}),
                    **({"run": run} if keep_runs else {})})
  return results


def model_fingerprint(model) -> str:
  """sha256 over the parameters in export order: identifies the weights, whatever the folder
  (a model without weights, BM25, names its settings' fingerprint)."""
  if getattr(model, "fingerprint", None):
    return model.fingerprint
  from embed_jax import hf
  h = hashlib.sha256()
  for key, value in sorted(hf.model_state(model.params, model.config).items()):
    h.update(key.encode())
    h.update(np.ascontiguousarray(value).tobytes())
  return h.hexdigest()


def evaluate_retrieval(model, dataset, split: str = "test", *, dims: Sequence[int] | None = None,
                       precisions: Sequence[str] = ("float32",), rescore: int = 0,
                       k_values: Sequence[int] = DEFAULT_K, batch_size: int = 32,
                       show_progress: bool | None = None,
                       qrels: Mapping[str, Mapping[str, int]] | None = None,
                       representation=None, pool_factors: Sequence[int] = (),
                       plaid: bool = False, keep_runs: bool = False,
                       device_search: str = "auto") -> dict:
  """Encodes a BEIR split's judged queries and the corpus once, then evaluates each index.

  `qrels` overrides the split's (e.g. dev queries carved from train); `representation` (default
  dense) encodes and searches. Returns {"settings": {...}, "results": [...]}: the settings name
  the model fingerprint, dataset checksum, max_seq_length and text joining, so that a number can
  be traced to what produced it. `device_search`: as evaluate_embeddings; settings record
  whether it was on.
  """
  on_devices = search.use_devices(device_search)  # a bad value fails before the encoding
  if representation is None:
    from embed_jax.representations import of_model
    representation = of_model(model)
  qrels = dataset.qrels(split) if qrels is None else qrels
  query_ids = [q for q in dataset.queries if q in qrels]
  queries = dataset.queries
  doc_ids = dataset.corpus_ids
  t = time.perf_counter()
  # In a multi-process run every process encodes its share of the corpus and gets them all.
  docs_NxD, per_process = distributed.split_map(
      lambda texts: representation.encode(model, texts, batch_size=batch_size,
                                          show_progress=show_progress, role="document"),
      dataset.corpus_texts(" "))
  queries_QxD = representation.encode(model, [queries[q] for q in query_ids],
                                      batch_size=batch_size, show_progress=show_progress,
                                      role="query")
  encode_s = time.perf_counter() - t
  results = evaluate_embeddings(queries_QxD, query_ids, docs_NxD, doc_ids, qrels, dims=dims,
                                precisions=precisions, rescore=rescore, k_values=k_values,
                                representation=representation, pool_factors=pool_factors,
                                plaid=plaid, keep_runs=keep_runs,
                                device_search="on" if on_devices else "off")
  settings = {
      "model": str(model.source), "model_fingerprint": model_fingerprint(model),
      "dataset": dataset.name, "dataset_checksum": dataset.checksum, "split": split,
      "num_queries": len(query_ids), "num_docs": len(doc_ids),
      "max_seq_length": model.config.max_seq_length if hasattr(model, "config") else None,
      "text": 'title + " " + text',
      "similarity": representation.similarity, "k_values": list(k_values), "rescore": rescore,
      "encode_seconds": round(encode_s, 2), "documents_encoded_per_process": per_process,
      "device_search": on_devices,
  }
  return {"settings": settings, "results": results}


def format_table(results: Sequence[dict], metrics: Sequence[str] = ("ndcg@10", "recall@100",
                                                                     "mrr@10", "map@100")) -> str:
  """A markdown table, one row per (representation, dims), with % of float32 nDCG@10 at full dims."""
  ref = next((r["metrics"]["ndcg@10"] for r in results if r["representation"] == "float32"), None)
  sparse = any("nnz_per_doc" in r for r in results)  # sparse and BM25 rows: their work too
  head = ["representation", "dims", *metrics, "bytes/doc", "ms/query"]
  if ref:
    head.insert(2 + len(metrics), "% of float32")
  if sparse:
    head += ["nnz/query", "nnz/doc", "FLOPS/query"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in results:
    row = [r["representation"], str(r["dims"])] + [f"{r['metrics'][m]:.4f}" for m in metrics]
    if ref:
      row.append(f"{100 * r['metrics']['ndcg@10'] / ref:.1f}%")
    row += ["" if r["bytes_per_doc"] is None else f"{r['bytes_per_doc']:g}",
            f"{r['ms_per_query']:.3f}"]
    if sparse:
      row += [f"{r[k]:,.0f}" if k in r else "" for k in ("nnz_per_query", "nnz_per_doc",
                                                         "flops_per_query")]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# ---- Semantic textual similarity (STS) ----
# ----------------------------------------------------------------------------------------------


def _ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks, ties given their average rank (as scipy.stats.rankdata)."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="stable")
  sorted_x = x[order]
  starts = np.r_[0, np.flatnonzero(np.diff(sorted_x)) + 1]
  ends = np.r_[starts[1:], len(x)]
  ranks = np.empty(len(x), np.float64)
  for s, e in zip(starts, ends):
    ranks[order[s:e]] = (s + e + 1) / 2.0
  return ranks


def pearson(x, y) -> float:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  x, y = x - x.mean(), y - y.mean()
  return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def spearman(x, y) -> float:
  return pearson(_ranks(x), _ranks(y))


def evaluate_sts(model, dataset, split: str = "test", *, batch_size: int = 64,
                 truncate_dim: int | None = None) -> dict:
  """Spearman and Pearson correlation (x 100, as MTEB reports) of the cosine similarity of each
  sentence pair with the gold scores; each distinct sentence is encoded once."""
  a, b, gold = dataset.split(split)
  unique = sorted(set(a) | set(b))
  row = {s: i for i, s in enumerate(unique)}
  emb = model.encode(unique, batch_size=batch_size, normalize=True, truncate_dim=truncate_dim)
  cos = np.sum(emb[[row[s] for s in a]] * emb[[row[s] for s in b]], axis=1)
  return {"dataset": dataset.name, "split": split, "pairs": len(gold),
          "dims": int(emb.shape[1]), "model": str(model.source),
          "cosine_spearman": 100 * spearman(cos, gold), "cosine_pearson": 100 * pearson(cos, gold)}


# ----------------------------------------------------------------------------------------------
# ---- Evaluators declared in a training config ----
# ----------------------------------------------------------------------------------------------
#
#   c.evals.test = evaluator("retrieval", split="test", at_end=True, output="results")
#   c.evals.dev = evaluator("retrieval", split="dev", every=20, all_dims=False, k_values=(10,))
#
# Each runs on the starting model (`at_start`: <workdir>/<output>_before.json), every `every`
# training steps (0: never; its headline metric goes to metrics.jsonl as <name>_<metric>) and on
# the final model (`at_end`: <output>.json). The run's summary holds each headline as
# <name>_<metric> (and <name>_<metric>_before); export="best" keeps the model of the best `dev`
# headline. A new kind of evaluator is a class with `defaults`, `metric`, `__call__(params) ->
# result` and `headline(result)`, registered in EVALUATORS.


class Retrieval:
  """BEIR retrieval on a split's judged queries (split "dev": the run's dev queries, from
  data.dev_split or carved from train by data.dev_fraction); float32 nDCG@10 is the headline."""
  defaults = dict(split="test", all_dims=True, precisions=("float32",), k_values=DEFAULT_K)
  metric = "ndcg@10"

  def __init__(self, spec, run):
    self.spec, self.run = spec, run

  def active(self) -> bool:
    return True

  def problems(self) -> list[str]:
    if self.spec.split == "dev" and not self.run.dev_qrels and (
        self.spec.every or self.spec.at_start or self.spec.at_end):
      return [f"evals.{self.spec.name} reads the dev queries, but there are none: set "
              f"data.dev_split or data.dev_fraction"]
    return []

  def __call__(self, params) -> dict:
    c, s = self.run.config, self.spec
    split, qrels = s.split, None
    if split == "dev":
      split, qrels = c.data.dev_split or c.data.train_split, self.run.dev_qrels
    model = self.run.embedder(params)
    if self.run.representation.name == "cross":
      return self.rerank(model, split, qrels)
    dense = self.run.representation.name == "dense"
    dims = sorted({model.dim, *c.matryoshka.dims}, reverse=True) if s.all_dims and dense else None
    out = evaluate_retrieval(model, self.run.dataset, split, qrels=qrels, dims=dims,
                             precisions=tuple(s.precisions), k_values=tuple(s.k_values),
                             batch_size=c.encode_batch_size, representation=self.run.representation)
    out["settings"]["config"] = json.loads(c.to_json_best_effort())
    return out

  def rerank(self, model, split: str, qrels) -> dict:
    """A cross-encoder's evaluation: config.rerank.first_stage's top documents (its run cached
    in the workdir) re-ranked; rows: the re-ranked list (the headline), then the first stage."""
    from embed_jax.rerank import CrossEncoder, evaluate_reranking, first_stage
    c, s = self.run.config, self.spec
    rr = c.rerank
    qrels = self.run.dataset.qrels(split) if qrels is None else qrels
    run, first = first_stage(rr.first_stage, self.run.dataset, split, qrels, top=rr.top,
                             batch_size=c.encode_batch_size,
                             cache=Path(self.run.workdir) / f"first_stage_{s.name}.json")
    model = CrossEncoder(model.config, model.params, model.tokenizer, model.source)
    row = evaluate_reranking(model, self.run.dataset, split, run, qrels=qrels, top=rr.top,
                             batch_size=c.encode_batch_size, k_values=tuple(s.k_values),
                             label=f"reranked top {rr.top}")
    settings = {"model": str(model.source), "model_fingerprint": model_fingerprint(model),
                "dataset": self.run.dataset.name, "dataset_checksum": self.run.dataset.checksum,
                "split": split, "num_queries": len(qrels), "first_stage": rr.first_stage,
                "rerank_top": rr.top, "max_seq_length": model.config.max_seq_length,
                "similarity": "cross-encoder", "config": json.loads(c.to_json_best_effort())}
    return {"settings": settings, "results": [row, first]}

  def headline(self, result: dict) -> float:
    return result["results"][0]["metrics"][self.metric]

  def describe(self) -> str:
    d, s = self.run.dataset, self.spec
    if self.run.representation.name == "cross":
      rr = self.run.config.rerank
      return (f"{d.name} {s.split}: re-ranking the top {rr.top} of {rr.first_stage}")
    queries = len(self.run.dev_qrels or {}) if s.split == "dev" else len(d.qrels(s.split))
    return (f"{d.name} {s.split} retrieval, {len(d.corpus_ids):,} documents and {queries:,} "
            f"queries to encode")


class Sts:
  """Spearman correlation of the cosine similarities with an STS dataset's gold scores."""
  defaults = dict(dataset="stsb", split="test")
  metric = "spearman"

  def __init__(self, spec, run):
    self.spec, self.run = spec, run

  def active(self) -> bool:
    return True

  def problems(self) -> list[str]:
    return []

  def __call__(self, params) -> dict:
    from embed_jax.data.sentences import load_sts
    return evaluate_sts(self.run.embedder(params), load_sts(self.spec.dataset), self.spec.split,
                        batch_size=self.run.config.encode_batch_size)

  def headline(self, result: dict) -> float:
    return result["cosine_spearman"]

  def describe(self) -> str:
    return f"{self.spec.dataset} {self.spec.split} similarity"


class MLMHeldout:
  """Masked-token accuracy and perplexity of each MLM task on its held-out documents (the same
  masks every time); a no-op without MLM tasks."""
  defaults = dict()
  metric = "perplexity"

  def __init__(self, spec, run):
    self.spec, self.run = spec, run
    self.tasks = [t for t in run.tasks if t.heldout is not None]

  def active(self) -> bool:
    return bool(self.tasks)

  def problems(self) -> list[str]:
    return []

  def __call__(self, params) -> dict:
    from embed_jax.tasks import mlm_evaluate
    out = {t.name: mlm_evaluate(self.run.module, params, t, self.run.config.seed)
           for t in self.tasks}
    for name, m in out.items():
      log.info("%s: held-out masked-token accuracy %.4f, perplexity %.2f", name,
               m["mlm_heldout_accuracy"], m["mlm_heldout_perplexity"])
    return out

  def headline(self, result: dict) -> float:
    return next(iter(result.values()))["mlm_heldout_perplexity"]

  def describe(self) -> str:
    return f"masked-token perplexity of {', '.join(t.name for t in self.tasks)} on held-out texts"


EVALUATORS = {"retrieval": Retrieval, "sts": Sts, "mlm_heldout": MLMHeldout}


def evaluator(type: str, **fields) -> ml_collections.ConfigDict:
  """An evaluator's config with its defaults (see the section comment above)."""
  if type not in EVALUATORS:
    raise ValueError(f"evaluator type {type!r}: choose from {', '.join(EVALUATORS)}")
  c = ml_collections.ConfigDict()
  c.type = type
  c.every = 0  # steps between runs during training; 0 = never
  c.at_start = False  # the starting model -> <workdir>/<output>_before.json
  c.at_end = False  # the final model -> <workdir>/<output>.json
  c.output = ""  # file name stem; "" = the evaluator's name
  c.update(EVALUATORS[type].defaults)
  c.update(fields)
  return c


class Evaluators:
  """The evaluators of `config.evals`, built lazily: nothing is loaded or encoded until one
  runs. `run` is what they may read of the training run: config, workdir, dataset, dev_qrels,
  embedder (params -> Embedder), representation, module and tasks."""

  def __init__(self, config, run):
    self.run, self.workdir = run, Path(run.workdir)
    self.items = {}
    for name in sorted(config.evals.keys()):
      spec = ml_collections.ConfigDict(config.evals[name].to_dict())
      spec.name = name
      self.items[name] = EVALUATORS[spec.type](spec, run)

  def problems(self) -> list[str]:
    return [p for e in self.items.values() for p in e.problems()]

  def _path(self, name: str, when: str) -> Path:
    stem = self.items[name].spec.output or name
    return self.workdir / (f"{stem}_before.json" if when == "before" else f"{stem}.json")

  def _write(self, name: str, when: str, params) -> None:
    from embed_jax.checkpoint import atomic_write
    log.info("evaluating the %s model: %s", "starting" if when == "before" else "final",
             self.items[name].describe())
    result = self.items[name](params)
    if distributed.is_main():
      atomic_write(self._path(name, when), lambda f: f.write(json.dumps(result, indent=2) + "\n"),
                   "w")
    log.info("%s (%s): %s %.4f", name, when, self.items[name].metric,
             self.items[name].headline(result))

  def at_start(self, params) -> None:
    """The evaluators with at_start, on the starting model (once: a resumed run keeps its file)."""
    for name, e in self.items.items():
      if e.spec.at_start and e.active() and distributed.agreed(
          not self._path(name, "before").exists()):
        self._write(name, "before", params)

  def key(self, name: str) -> str | None:
    """The name of an evaluator's headline in metrics and summaries: <name>_<metric>."""
    return f"{name}_{self.items[name].metric}" if name in self.items else None

  def _due(self, done: int, total: int) -> list[str]:
    return [n for n, e in self.items.items()
            if e.spec.every and e.active() and (done % e.spec.every == 0 or done == total)]

  def due(self, done: int, total: int) -> bool:
    """Whether an evaluator runs after `done` of `total` steps."""
    return bool(self._due(done, total))

  def every(self, done: int, total: int, params) -> dict[str, float]:
    """{<name>_<metric>: value} of the evaluators due after `done` of `total` steps."""
    out = {}
    for name in self._due(done, total):
      e = self.items[name]
      out[self.key(name)] = e.headline(e(params))
      log.info("step %d: %s %s %.4f", done, name, e.metric, out[self.key(name)])
    return out

  def at_end(self, params) -> None:
    for name, e in self.items.items():
      if e.spec.at_end and e.active():
        self._write(name, "after", params)

  def written(self) -> bool:
    """Whether every at_end file exists (a finished run need not evaluate again)."""
    return all(self._path(n, "after").exists() for n, e in self.items.items()
               if e.spec.at_end and e.active())

  def summary(self) -> dict[str, float]:
    """{<name>_<metric>[_before]: value} from the files written so far."""
    out = {}
    for name, e in self.items.items():
      for when, suffix in (("after", ""), ("before", "_before")):
        path = self._path(name, when)
        if path.exists():
          out[self.key(name) + suffix] = e.headline(json.loads(path.read_text()))
    return out


def qrels_splits_read(config) -> list[tuple[str, str]]:
  """(config key, split) of each qrels split the config's evaluators will read ("dev" is the
  run's dev queries, checked with the data)."""
  return [(f"evals.{name}.split", spec.split) for name, spec in config.evals.items()
          if spec.get("type") == "retrieval" and spec.split != "dev"
          and (spec.every or spec.at_start or spec.at_end)]


def evaluator_problems(config) -> list[str]:
  """Evaluator specs that cannot run (checked before any compute)."""
  problems = []
  for name in sorted(config.evals.keys()):
    spec = config.evals[name]
    if not isinstance(spec, ml_collections.ConfigDict) or spec.get("type") not in EVALUATORS:
      problems.append(f"evals.{name} must be evaluate.evaluator(type, ...) with type one of "
                      f"{', '.join(EVALUATORS)}")
      continue
    if spec.every < 0:
      problems.append(f"evals.{name}.every={spec.every} must be >= 0 (0: never during training)")
    if spec.type == "retrieval":
      bad = [p for p in spec.precisions if p not in PRECISIONS]
      if bad:
        problems.append(f"evals.{name}.precisions {bad}: choose from {', '.join(PRECISIONS)}")
  if config.export == "best" and not ("dev" in config.evals and config.evals.dev.get("every", 0)):
    problems.append("export='best' needs evals.dev.every > 0 (and a dev split)")
  return problems
