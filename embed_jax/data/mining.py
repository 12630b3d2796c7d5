"""Hard-negative mining on a BEIR split: retrieve with a model, keep hard documents that are not
(likely) positives.

    model, dataset = embed_jax.load("sentence-transformers/all-MiniLM-L6-v2"), load_beir("scifact")
    rows = mine_hard_negatives(model, dataset, "train", top_k=100, skip_top=3, num_negatives=5)
    write_negatives(rows, "neg/scifact.jsonl")  # and neg/scifact.jsonl.meta.json: rows.settings
    negatives = read_negatives("neg/scifact.jsonl", dataset)  # {query id: [doc id, ...]}

Per query, in this order: the top_k documents by cosine similarity (positives included); minus
its positives (relevance > 0 in the split's qrels) and the document with the query's own id;
minus the first `skip_top` of what remains (the likeliest unlabelled positives); minus, as a
false-negative guard, every candidate scoring >= (the query's lowest positive score - margin);
then `num_negatives` of the rest, the top ones or a uniform sample, listed best first.
CLI: `embed-jax mine` (add_mine_parser, cmd_mine).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Collection, IO, Mapping, Sequence

import numpy as np

from embed_jax import evaluate
from embed_jax.checkpoint import atomic_write
from embed_jax.data.beir import load_beir
from embed_jax.models.pooling import l2_normalize

log = logging.getLogger(__name__)

SAMPLING = ("random", "top")
META_SUFFIX = ".meta.json"


def _check_params(top_k: int, skip_top: int, margin: float | None, num_negatives: int,
                  sampling: str) -> None:
  if top_k < 1:
    raise ValueError(f"top_k must be >= 1, got {top_k}")
  if skip_top < 0:
    raise ValueError(f"skip_top must be >= 0, got {skip_top}")
  if num_negatives < 1:
    raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
  if sampling not in SAMPLING:
    raise ValueError(f"sampling={sampling!r}; expected one of {SAMPLING}")
  if margin is not None and not np.isfinite(margin):
    raise ValueError(f"margin must be a finite number or None (no guard), got {margin}")


# ----------------------------------------------------------------------------------------------
# ---- Selection over search results ----
# ----------------------------------------------------------------------------------------------


def select_negatives(scores_QxK: np.ndarray, indices_QxK: np.ndarray,
                     positives: Sequence[Collection[int]],
                     positive_scores: Sequence[Sequence[float]] | None = None, *,
                     skip_top: int = 0, margin: float | None = 0.0, num_negatives: int = 5,
                     sampling: str = "random",
                     seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
  """Negatives per query from top-k search results (rows sorted by score, best first).

  positives[q]: document indices never taken as negatives for query q.
  positive_scores[q]: its positives' scores; the guard drops candidates scoring >= min - margin
    (no guard when margin is None or q has no positive score).
  Returns, per query, (indices, scores) of at most num_negatives negatives, best first. With
  sampling="random" query q draws from np.random.default_rng((seed, q)), so its sample depends
  on (seed, q) only, not on the other queries.
  """
  _check_params(1, skip_top, margin, num_negatives, sampling)
  scores_QxK, indices_QxK = np.asarray(scores_QxK), np.asarray(indices_QxK)
  if scores_QxK.shape != indices_QxK.shape or scores_QxK.ndim != 2:
    raise ValueError(f"scores {scores_QxK.shape} and indices {indices_QxK.shape} must be the "
                     f"same [queries, k] shape")
  if len(positives) != len(scores_QxK):
    raise ValueError(f"{len(positives)} positive sets for {len(scores_QxK)} queries")
  if margin is not None and positive_scores is None:
    raise ValueError("the margin guard needs positive_scores (or margin=None: no guard)")
  out = []
  for q, (scores_K, indices_K) in enumerate(zip(scores_QxK, indices_QxK)):
    excluded = np.fromiter(positives[q], np.int64)
    keep_K = (indices_K >= 0) & ~np.isin(indices_K, excluded)  # -1: padding from the search
    scores_M, indices_M = scores_K[keep_K][skip_top:], indices_K[keep_K][skip_top:]
    if margin is not None and len(positive_scores[q]):
      below_M = scores_M < min(positive_scores[q]) - margin
      scores_M, indices_M = scores_M[below_M], indices_M[below_M]
    if len(indices_M) > num_negatives:
      if sampling == "top":
        pick = np.arange(num_negatives)
      else:
        # Sorted positions keep the sample in rank order (best first), as the top ones are.
        rng = np.random.default_rng((seed, q))
        pick = np.sort(rng.choice(len(indices_M), num_negatives, replace=False))
      scores_M, indices_M = scores_M[pick], indices_M[pick]
    out.append((indices_M, scores_M))
  return out


# ----------------------------------------------------------------------------------------------
# ---- Mining a BEIR split ----
# ----------------------------------------------------------------------------------------------


class MinedNegatives(list):
  """The rows of mine_hard_negatives (a list of dicts), with `.settings`: what produced them
  (model, dataset checksum, split, parameters), which write_negatives puts in the sidecar."""

  def __init__(self, rows=(), settings: Mapping | None = None):
    super().__init__(rows)
    self.settings = dict(settings or {})


def mine_hard_negatives(model, dataset, split: str = "train", *, top_k: int = 100,
                        skip_top: int = 0, margin: float | None = 0.0, num_negatives: int = 5,
                        sampling: str = "random", seed: int = 0, batch_size: int = 64,
                        show_progress: bool | None = None) -> MinedNegatives:
  """Hard negatives for the judged queries of `split` (see the module docstring for the rule).

  model: an Embedder, or anything with encode(texts, batch_size=, normalize=, show_progress=).
  Rows, in queries.jsonl order, for queries with at least one positive: {"query_id",
  "positives", "negatives", "negative_scores", "positive_scores"} (doc ids; cosine scores);
  `.settings` on the returned list records what produced them.
  """
  _check_params(top_k, skip_top, margin, num_negatives, sampling)
  qrels = dataset.qrels(split)  # a missing split raises, naming the ones there are
  queries = dataset.split_queries(split)
  doc_ids = dataset.corpus_ids
  row_of = {d: i for i, d in enumerate(doc_ids)}
  query_ids = [q for q in queries if any(r > 0 and d in row_of for d, r in qrels[q].items())]
  if len(query_ids) < len(queries):
    log.warning("%d of %d judged queries in %s %s have no positive (relevance > 0): no rows "
                "for them", len(queries) - len(query_ids), len(queries), dataset.name, split)
  if not query_ids:
    raise ValueError(f"no query in {dataset.name} {split} has a positive document")
  positive_rows = [[row_of[d] for d, r in qrels[q].items() if r > 0 and d in row_of]
                   for q in query_ids]

  docs_NxD = model.encode(dataset.corpus_texts(" "), batch_size=batch_size, normalize=False,
                          show_progress=show_progress)
  from embed_jax.embedder import role_prompt
  queries_QxD = model.encode([queries[q] for q in query_ids], batch_size=batch_size,
                             normalize=False, show_progress=show_progress,
                             **role_prompt(model, "query"))
  index = evaluate.Float32()
  index.index(docs_NxD)
  scores_QxK, indices_QxK = index.search(queries_QxD, top_k)
  q_unit_QxD = l2_normalize(queries_QxD).astype(np.float32)

  positive_scores = []
  for q, rows in enumerate(positive_rows):
    # A retrieved positive keeps its search score, so that an exact copy of it elsewhere in the
    # corpus scores the same to the bit and the guard (>=) drops it.
    retrieved = dict(zip(indices_QxK[q].tolist(), scores_QxK[q].tolist()))
    positive_scores.append([retrieved[r] if r in retrieved else
                            float(q_unit_QxD[q] @ index.docs_NxD[r]) for r in rows])
  # Never the query itself either: BEIR sets like Quora hold each query as a document (same id).
  excluded = [set(rows) | ({row_of[qid]} if qid in row_of else set())
              for qid, rows in zip(query_ids, positive_rows)]
  picked = select_negatives(scores_QxK, indices_QxK, excluded, positive_scores,
                            skip_top=skip_top, margin=margin, num_negatives=num_negatives,
                            sampling=sampling, seed=seed)

  out, short, empty = MinedNegatives(), 0, 0
  for qid, rows, pos_scores, (neg_rows, neg_scores) in zip(query_ids, positive_rows,
                                                           positive_scores, picked):
    short += len(neg_rows) < num_negatives
    empty += not len(neg_rows)
    out.append({"query_id": qid, "positives": [doc_ids[r] for r in rows],
                "negatives": [doc_ids[r] for r in neg_rows.tolist()],
                "negative_scores": [float(s) for s in neg_scores],
                "positive_scores": [float(s) for s in pos_scores]})
  if short:
    # With the guard on, a query whose positive ranks below the top_k keeps nothing at all.
    log.warning("%d of %d queries have fewer than %d negatives (%d have none) after dropping "
                "positives, skip_top=%d and the margin guard (margin=%s) from the top %d: they "
                "keep what they have (raise top_k, or lower skip_top or margin, for more)",
                short, len(out), num_negatives, empty, skip_top, margin, top_k)
  is_embedder = hasattr(model, "params") and hasattr(model, "config")
  out.settings = {
      "model": str(getattr(model, "source", None)),
      # The weights themselves: a folder or hub id can change under the same name.
      "model_fingerprint": evaluate.model_fingerprint(model) if is_embedder else None,
      "max_seq_length": model.config.max_seq_length if is_embedder else None,
      "dataset": dataset.name, "dataset_checksum": dataset.checksum, "split": split,
      "text": 'title + " " + text', "similarity": "cosine",
      "top_k": top_k, "skip_top": skip_top, "margin": margin, "num_negatives": num_negatives,
      "sampling": sampling, "seed": seed,
  }
  return out


# ----------------------------------------------------------------------------------------------
# ---- Negatives files: JSONL rows plus a <path>.meta.json sidecar ----
# ----------------------------------------------------------------------------------------------


def meta_path(path: str | os.PathLike) -> Path:
  path = Path(path)
  return path.with_name(path.name + META_SUFFIX)


def write_negatives(rows: Sequence[Mapping], path: str | os.PathLike,
                    settings: Mapping | None = None) -> Path:
  """Rows as JSONL at `path`, and at `<path>.meta.json` the settings (`rows.settings` from
  mine_hard_negatives, updated by `settings`), the row count and the file's sha256.

  Each file is written atomically; the data goes first, and the sidecar's sha256 ties it to
  this data, so a crash between the two is caught on reading rather than trusted.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  digest = hashlib.sha256()

  def write_rows(f: IO[bytes]) -> None:
    for row in rows:
      line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
      digest.update(line)
      f.write(line)

  atomic_write(path, write_rows)
  meta = {**getattr(rows, "settings", {}), **(settings or {}), "rows": len(rows),
          "sha256": digest.hexdigest()}
  atomic_write(meta_path(path), lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))
  return path


def read_meta(path: str | os.PathLike) -> dict | None:
  """The sidecar settings of a negatives file, or None when it has none."""
  mpath = meta_path(path)
  if not mpath.exists():
    return None
  try:
    meta = json.loads(mpath.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{mpath}: not valid JSON ({e})") from e
  if not isinstance(meta, dict):
    raise ValueError(f"{mpath}: expected a JSON object")
  return meta


def _file_sha256(path: Path) -> str:
  h = hashlib.sha256()
  with path.open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def read_negatives(path: str | os.PathLike, dataset=None) -> dict[str, list[str]]:
  """{query id: [negative doc ids]} from a negatives file, checked line by line.

  With a dataset: every query and document id must be in it, and the sidecar's dataset checksum
  must be the dataset's. Errors (ValueError) name the file and, for a row, the line.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"negatives file {path} does not exist")
  meta = read_meta(path)
  if meta is None:
    log.warning("%s has no %s sidecar: its settings and dataset cannot be checked", path,
                META_SUFFIX)
  else:
    if "sha256" in meta and meta["sha256"] != _file_sha256(path):
      raise ValueError(f"{meta_path(path)} describes another file than {path} (sha256 differs): "
                       f"the negatives were rewritten without it; mine them again")
    if dataset is not None and "dataset_checksum" not in meta:
      log.warning("%s names no dataset checksum: cannot check it was mined from %s",
                  meta_path(path), dataset.name)
    elif dataset is not None and meta["dataset_checksum"] != dataset.checksum:
      raise ValueError(
          f"{path} was mined from {meta.get('dataset')!r} (sha256 "
          f"{str(meta['dataset_checksum'])[:16]}...), not from this {dataset.name!r} "
          f"(sha256 {dataset.checksum[:16]}...)")
  query_ids = doc_ids = None
  if dataset is not None:
    query_ids, doc_ids = dataset.queries, set(dataset.corpus_ids)
  out: dict[str, list[str]] = {}
  first_line: dict[str, int] = {}
  with path.open(encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{n}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from e
      if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
      qid, negatives = row.get("query_id"), row.get("negatives")
      if not isinstance(qid, str):
        raise ValueError(f"{where}: 'query_id' must be a string, got {qid!r}")
      if not isinstance(negatives, list) or not all(isinstance(d, str) for d in negatives):
        raise ValueError(f"{where}: 'negatives' must be a list of document id strings")
      if qid in first_line:
        raise ValueError(f"{where}: query {qid!r} again (first on line {first_line[qid]})")
      if query_ids is not None and qid not in query_ids:
        raise ValueError(f"{where}: query id {qid!r} is not in {dataset.name}")
      if doc_ids is not None:
        unknown = [d for d in negatives if d not in doc_ids]
        if unknown:
          raise ValueError(f"{where}: document id {unknown[0]!r} is not in {dataset.name}'s "
                           f"corpus")
      first_line[qid] = n
      out[qid] = negatives
  return out


# ----------------------------------------------------------------------------------------------
# ---- CLI: embed-jax mine ----
# ----------------------------------------------------------------------------------------------


def cmd_mine(args: argparse.Namespace) -> None:
  """Mines, writes <out> and <out>.meta.json, prints a summary. Bad input raises ValueError or
  FileNotFoundError (the CLI prints those as one line)."""
  import embed_jax
  _check_params(args.top_k, args.skip_top, args.margin, args.num_negatives, args.sampling)
  if args.batch_size < 1:
    raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
  out = Path(args.out)
  if out.suffix != ".jsonl":
    raise ValueError(f"--out {out}: expected a .jsonl path")
  if out.is_dir():
    raise ValueError(f"--out {out} is a folder; give a .jsonl file path")
  # Everything cheap is checked before the model is loaded and the corpus encoded.
  dataset = load_beir(args.dataset, data_dir=args.data_dir)
  if args.split not in dataset.qrels_splits:
    raise ValueError(f"split {args.split!r} not in {dataset.name}; it has "
                     f"{', '.join(dataset.qrels_splits) or 'no qrels split'}")
  model = embed_jax.load(args.model)
  rows = mine_hard_negatives(model, dataset, args.split, top_k=args.top_k,
                             skip_top=args.skip_top, margin=args.margin,
                             num_negatives=args.num_negatives, sampling=args.sampling,
                             seed=args.seed, batch_size=args.batch_size, show_progress=True)
  write_negatives(rows, out)
  counts = np.array([len(r["negatives"]) for r in rows])
  print(f"wrote {out}: {len(rows)} queries of {dataset.name} {args.split}, "
        f"{counts.mean():.2f} negatives per query (min {counts.min()}, max {counts.max()}); "
        f"settings in {meta_path(out)}")
