"""Teacher score stores: a teacher's score of each training query's candidates (its positives and
mined hard negatives), computed once and read by the student's objective.

    embed-jax teacher --scores --model runs/reranker/minilm/export --dataset scifact \
        --negatives runs/negatives/scifact_train_minilm_ce.jsonl --out runs/teachers/ce_scores

A store is a folder:
  scores.npy        float32 [P]: the teacher's score of every (query, candidate) pair, query by
                    query (a cross-encoder's logit; a bi-encoder's cosine of its embeddings)
  candidates.jsonl  one {"query_id", "sha1", "offset", "doc_ids", "doc_sha1"} per query: its
                    candidates (positives first) and the checksums of the exact texts scored
  manifest.json     the teacher (name, weights fingerprint, kind), the dataset (name, checksum),
                    the split, the negatives file's sha256, the counts, and `complete`
  progress.json     while building: queries done (building is resumable chunk by chunk)

Training refuses a store built from other data (dataset checksum, split, negatives file, a text
checksum) or by another teacher than the config names, before any compute (`ScoreStore.check`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from embed_jax.data.mining import _file_sha256
from embed_jax.data.teacher import (TeacherStoreError, _write_json, fill_in_chunks, start_store,
                                    text_checksum)

log = logging.getLogger(__name__)


def candidate_lists(dataset, split: str, negatives: dict[str, list[str]]) -> dict[str, list[str]]:
  """{query id: [positives (qrels > 0), then its mined negatives]} for the split's queries, in
  the dataset's order, each document once."""
  qrels = dataset.qrels(split)
  corpus = set(dataset.corpus_ids)
  out = {}
  for q in dataset.queries:
    if q not in qrels:
      continue
    pos = [d for d, rel in qrels[q].items() if rel > 0 and d in corpus]
    seen = set(pos)
    out[q] = pos + [d for d in negatives.get(q, []) if not (d in seen or seen.add(d))]
  return out


def teacher_kind(model) -> str:
  from embed_jax.rerank import CrossEncoder
  return "cross-encoder" if isinstance(model, CrossEncoder) else "bi-encoder"


def _score_chunk(model, queries: list[str], lists: list[list[str]], batch_size: int) -> np.ndarray:
  """The teacher's scores of each query's candidate texts, concatenated."""
  if teacher_kind(model) == "cross-encoder":
    pairs = [(q, d) for q, docs in zip(queries, lists) for d in docs]
    return model.predict(pairs, batch_size=batch_size, activation=False).reshape(len(pairs), -1)[:, -1]
  from embed_jax.embedder import role_prompt
  q_QxD = model.encode(queries, batch_size=batch_size, normalize=True, **role_prompt(model, "query"))
  flat = [d for docs in lists for d in docs]
  d_NxD = model.encode(flat, batch_size=batch_size, normalize=True)
  owner = np.repeat(np.arange(len(queries)), [len(docs) for docs in lists])
  return np.sum(q_QxD[owner] * d_NxD, axis=1)


def build_score_store(model, dataset, split: str, negatives_path: str | os.PathLike,
                      out: str | os.PathLike, *, name: str, batch_size: int = 32,
                      chunk: int = 64, stop_after_chunks: int | None = None) -> Path:
  """Scores every training query's candidates once into a store at `out`. Resumable: re-running
  with the same teacher and data continues after the last finished chunk of queries; a partial
  store of another teacher or data is refused."""
  from embed_jax.data.mining import read_negatives
  from embed_jax.evaluate import model_fingerprint
  out, negatives_path = Path(out), Path(negatives_path)
  lists = candidate_lists(dataset, split, read_negatives(negatives_path, dataset))
  query_ids = list(lists)
  texts = dict(zip(dataset.corpus_ids, dataset.corpus_texts(" ")))
  offsets = np.concatenate([[0], np.cumsum([len(lists[q]) for q in query_ids])]).astype(int)
  manifest = {"teacher": {"name": name, "fingerprint": model_fingerprint(model),
                          "kind": teacher_kind(model),
                          "score": "logit" if teacher_kind(model) == "cross-encoder" else "cosine"},
              "dataset": {"name": dataset.name, "checksum": dataset.checksum}, "split": split,
              "negatives": {"file": negatives_path.name, "sha256": _file_sha256(negatives_path)},
              "queries": len(query_ids), "pairs": int(offsets[-1]), "complete": False}
  state = start_store(out, manifest, ("teacher", "dataset", "split", "negatives", "queries",
                                       "pairs"), "scores of another teacher or data", "score store")
  if state == "complete":
    return out
  if state == "new":
    rows = [json.dumps({"query_id": q, "sha1": text_checksum(dataset.queries[q]),
                        "offset": int(o), "doc_ids": lists[q],
                        "doc_sha1": [text_checksum(texts[d]) for d in lists[q]]}) + "\n"
            for q, o in zip(query_ids, offsets)]
    from embed_jax.checkpoint import atomic_write
    atomic_write(out / "candidates.jsonl", lambda f: f.writelines(rows), "w")
    np.lib.format.open_memmap(out / "scores.npy", mode="w+", dtype=np.float32,
                              shape=(int(offsets[-1]),)).flush()
    _write_json(out / "progress.json", {"queries_done": 0})
    _write_json(out / "manifest.json", manifest)

  def fill(start: int, end: int):
    qs = query_ids[start:end]
    return slice(offsets[start], offsets[end]), _score_chunk(
        model, [dataset.queries[q] for q in qs], [[texts[d] for d in lists[q]] for q in qs],
        batch_size)

  fill_in_chunks(out, out / "scores.npy", len(query_ids), fill, manifest, key="queries_done",
                 chunk=chunk, desc="teacher scores", unit="query",
                 stop_after_chunks=stop_after_chunks)
  return out


class ScoreStore:
  """A complete score store, opened read-only: `query_scores(query id)` -> {doc id: score}."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    if not (self.path / "manifest.json").exists():
      raise TeacherStoreError(f"{self.path} is not a score store (no manifest.json): build one with "
                              f"`embed-jax teacher --scores --model M --negatives F --out {self.path}`")
    self.manifest = json.loads((self.path / "manifest.json").read_text())
    if not self.manifest.get("complete"):
      raise TeacherStoreError(f"{self.path} is incomplete: re-run the `embed-jax teacher --scores` "
                              f"command that built it to finish it")
    self.scores = np.load(self.path / "scores.npy")
    self.rows = {}
    for line in (self.path / "candidates.jsonl").open(encoding="utf-8"):
      r = json.loads(line)
      self.rows[r["query_id"]] = r

  def check(self, dataset, split: str, negatives_path: str | os.PathLike | None,
            query_ids, *, teacher: str | None = None) -> None:
    """Refuses a store that does not fit the run: another dataset, split or negatives file,
    changed texts, a training query it lacks, or another teacher than the config names."""
    m = self.manifest
    if m["dataset"]["checksum"] != dataset.checksum or m["split"] != split:
      raise TeacherStoreError(f"the score store {self.path} was built on {m['dataset']['name']} "
                              f"{m['split']}, not on this {dataset.name} {split}: rebuild it")
    if negatives_path and m["negatives"]["sha256"] != _file_sha256(Path(negatives_path)):
      raise TeacherStoreError(f"the score store {self.path} scored the candidates of another "
                              f"negatives file than {negatives_path}: rebuild it from that file")
    if teacher and teacher not in (m["teacher"]["name"], m["teacher"]["fingerprint"]):
      raise TeacherStoreError(f"the score store {self.path} was built by {m['teacher']['name']}, "
                              f"the config names {teacher}")
    missing = [q for q in query_ids if q not in self.rows]
    if missing:
      raise TeacherStoreError(f"{len(missing)} training queries have no scores in {self.path}, "
                              f"e.g. {missing[:3]}")
    texts = dict(zip(dataset.corpus_ids, dataset.corpus_texts(" ")))
    for q in query_ids:
      r = self.rows[q]
      if r["sha1"] != text_checksum(dataset.queries[q]) or any(
          s != text_checksum(texts[d]) for d, s in zip(r["doc_ids"], r["doc_sha1"])):
        raise TeacherStoreError(f"query {q} or its candidates differ from the texts the score "
                                f"store {self.path} scored: rebuild it from this dataset")

  def query_scores(self, query_id: str) -> dict[str, float]:
    r = self.rows[query_id]
    values = self.scores[r["offset"]:r["offset"] + len(r["doc_ids"])]
    return dict(zip(r["doc_ids"], map(float, values)))
