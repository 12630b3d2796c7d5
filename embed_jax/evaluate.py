"""Evaluation: IR metrics with pytrec_eval semantics (as BEIR and MTEB use them).

    qrels = {"q1": {"d1": 1, "d7": 2}}                      # graded relevance; <= 0: not relevant
    run = run_from_topk(query_ids, doc_ids, scores_QxK, indices_QxK)
    ir_metrics(qrels, run)  # {"ndcg@10": ..., "map@100": ..., "recall@100": ..., "mrr@10": ...}
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Mapping, Sequence

import numpy as np

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
# ---- Representations: how documents are stored and searched ----
# ----------------------------------------------------------------------------------------------
#
# Each representation indexes the corpus embeddings, searches with the query embeddings, and
# reports its bytes per document. Exact search is a chunked product with a running top-k, so no
# [queries, corpus] matrix is held for a large corpus.

PRECISIONS = ("float32", "int8", "uint8", "binary")
DOC_CHUNK = 16384  # documents scored at once


def principal_axes(x_NxD: np.ndarray) -> np.ndarray:
  """[D, D]: the principal axes of the (centred) rows as columns, largest variance first. An
  orthogonal matrix: rotating embeddings by it keeps every cosine, and puts the most variance a
  linear map to d dims can keep into the first d."""
  centred_NxD = np.asarray(x_NxD, np.float64)
  centred_NxD = centred_NxD - centred_NxD.mean(0)
  _, axes_DxD = np.linalg.eigh(centred_NxD.T @ centred_NxD)  # ascending eigenvalues
  return axes_DxD[:, ::-1]


def unit(x_NxD: np.ndarray) -> np.ndarray:
  return x_NxD / np.maximum(np.linalg.norm(x_NxD, axis=1, keepdims=True), 1e-12)


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


def representation(precision: str, rescore: int = 0):
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


def evaluate_embeddings(queries_QxD: np.ndarray, query_ids: Sequence[str], docs_NxD: np.ndarray,
                        doc_ids: Sequence[str], qrels: Mapping[str, Mapping[str, int]], *,
                        dims: Sequence[int] | None = None, precisions: Sequence[str] = ("float32",),
                        rescore: int = 0, k_values: Sequence[int] = DEFAULT_K) -> list[dict]:
  """Every (dims, representation) over one set of embeddings: metrics, bytes, ms per query.

  Embeddings are the model's full-dimensional output; each d keeps the first d dims, re-normalised.
  """
  full = docs_NxD.shape[1]
  dims = sorted({int(d) for d in (dims or [full])}, reverse=True)
  if any(not 1 <= d <= full for d in dims):
    raise ValueError(f"dims {dims} must each be in 1..{full} (the model's dimension)")
  bad = [p for p in precisions if p not in PRECISIONS]
  if bad:
    raise ValueError(f"precision {bad} not supported; choose from {PRECISIONS}")
  k = max(k_values)
  results = []
  for d in dims:
    reps = [representation(p) for p in precisions]
    if rescore and "binary" in precisions:
      reps.append(Binary(rescore))
    for rep in reps:
      if isinstance(rep, Binary) and d % 8:
        log.warning("binary at %d dims: not a multiple of 8, the last byte is padded", d)
      rep.index(docs_NxD[:, :d])
      t = time.perf_counter()
      scores_QxK, idx_QxK = rep.search(queries_QxD[:, :d], k)
      ms = (time.perf_counter() - t) * 1e3 / max(len(query_ids), 1)
      run = run_from_topk(query_ids, doc_ids, scores_QxK, idx_QxK)
      results.append({"representation": rep.name, "dims": d,
                      "metrics": ir_metrics(qrels, run, k_values),
                      "bytes_per_doc": rep.bytes_per_doc, "ms_per_query": round(ms, 4)})
  return results


def model_fingerprint(model) -> str:
  """sha256 over the parameters in export order: identifies the weights, whatever the folder."""
  from embed_jax import hf
  h = hashlib.sha256()
  state = hf.params_to_state_dict(model.params, model.config)
  if model.config.dense_features:
    state.update({f"2_Dense/{k}": v for k, v in hf.dense_params_to_state(model.params, model.config).items()})
  for key, value in sorted(state.items()):
    h.update(key.encode())
    h.update(np.ascontiguousarray(value).tobytes())
  return h.hexdigest()


def evaluate_retrieval(model, dataset, split: str = "test", *, dims: Sequence[int] | None = None,
                       precisions: Sequence[str] = ("float32",), rescore: int = 0,
                       k_values: Sequence[int] = DEFAULT_K, batch_size: int = 32,
                       show_progress: bool | None = None,
                       qrels: Mapping[str, Mapping[str, int]] | None = None) -> dict:
  """Encodes a BEIR split's judged queries and the corpus once, then evaluates each representation.

  `qrels` overrides the split's (e.g. dev queries carved from train). Returns {"settings": {...},
  "results": [...]}: the settings name the model fingerprint, dataset checksum, max_seq_length and
  text joining, so that a number can be traced to what produced it.
  """
  qrels = dataset.qrels(split) if qrels is None else qrels
  query_ids = [q for q in dataset.queries if q in qrels]
  queries = dataset.queries
  doc_ids = dataset.corpus_ids
  t = time.perf_counter()
  docs_NxD = model.encode(dataset.corpus_texts(" "), batch_size=batch_size, normalize=False,
                          show_progress=show_progress)
  queries_QxD = model.encode([queries[q] for q in query_ids], batch_size=batch_size,
                             normalize=False, show_progress=show_progress)
  encode_s = time.perf_counter() - t
  results = evaluate_embeddings(queries_QxD, query_ids, docs_NxD, doc_ids, qrels, dims=dims,
                                precisions=precisions, rescore=rescore, k_values=k_values)
  settings = {
      "model": str(model.source), "model_fingerprint": model_fingerprint(model),
      "dataset": dataset.name, "dataset_checksum": dataset.checksum, "split": split,
      "num_queries": len(query_ids), "num_docs": len(doc_ids),
      "max_seq_length": model.config.max_seq_length, "text": 'title + " " + text',
      "similarity": "cosine", "k_values": list(k_values), "rescore": rescore,
      "encode_seconds": round(encode_s, 2),
  }
  return {"settings": settings, "results": results}


def format_table(results: Sequence[dict], metrics: Sequence[str] = ("ndcg@10", "recall@100",
                                                                     "mrr@10", "map@100")) -> str:
  """A markdown table, one row per (representation, dims), with % of float32 nDCG@10 at full dims."""
  ref = next((r["metrics"]["ndcg@10"] for r in results if r["representation"] == "float32"), None)
  head = ["representation", "dims", *metrics, "bytes/doc", "ms/query"]
  if ref:
    head.insert(2 + len(metrics), "% of float32")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in results:
    row = [r["representation"], str(r["dims"])] + [f"{r['metrics'][m]:.4f}" for m in metrics]
    if ref:
      row.append(f"{100 * r['metrics']['ndcg@10'] / ref:.1f}%")
    row += [f"{r['bytes_per_doc']:g}", f"{r['ms_per_query']:.3f}"]
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
