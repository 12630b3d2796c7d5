"""Teacher stores: a teacher's embeddings of a dataset's texts, computed once, read by id.

    embed-jax teacher --model sentence-transformers/all-mpnet-base-v2 --dataset scifact \
        --texts corpus,queries --out runs/teachers/scifact_mpnet

A store is a folder:
  vectors.npy    float32 or float16 [N, D], row i is the teacher's embedding of text i
  texts.jsonl    one {"id": "corpus/<doc id>" | "queries/<query id>", "sha1": ...} per row; the
                 checksum is of the exact text encoded (corpus: title + " " + text, as evaluation)
  manifest.json  the teacher (name, weights fingerprint, dims, normalisation, max_seq_length),
                 the dataset (name, checksum), the dtype, and `complete`
  progress.json  while building: rows done (building is resumable chunk by chunk)

Training looks vectors up by text id and refuses a store whose checksums, dims or teacher do not
match what the config expects, before any compute (`TeacherStore.check`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

KINDS = ("corpus", "queries", "train_queries")  # train_queries: those of the train split only


class TeacherStoreError(ValueError):
  """A store that is missing, incomplete, or does not match the data or the config."""


def text_checksum(text: str) -> str:
  return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def dataset_texts(dataset, kinds: Sequence[str]) -> tuple[list[str], list[str]]:
  """(ids, texts) of a BEIR dataset: corpus then queries, in the dataset's order."""
  bad = [k for k in kinds if k not in KINDS]
  if bad or not kinds:
    raise TeacherStoreError(f"texts {list(kinds)}: choose from {', '.join(KINDS)}")
  ids, texts = [], []
  if "corpus" in kinds:
    ids += [f"corpus/{d}" for d in dataset.corpus_ids]
    texts += dataset.corpus_texts(" ")
  if "queries" in kinds or "train_queries" in kinds:
    train = dataset.qrels("train") if "queries" not in kinds else None
    chosen = [q for q in dataset.queries if train is None or q in train]
    ids += [f"queries/{q}" for q in chosen]
    texts += [dataset.queries[q] for q in chosen]
  return ids, texts


def _write_json(path: Path, obj) -> None:
  from embed_jax.checkpoint import atomic_write
  atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"), "w")


def teacher_info(model, name: str) -> dict:
  from embed_jax.evaluate import model_fingerprint
  cfg = model.config
  return {"name": name, "fingerprint": model_fingerprint(model), "dims": model.dim,
          "normalize": True, "max_seq_length": cfg.max_seq_length, "pooling": list(cfg.pooling),
          "architecture": cfg.architecture}


def build_store(model, dataset, kinds: Sequence[str], out: str | os.PathLike, *, name: str,
                dtype: str = "float32", batch_size: int = 32, chunk: int = 512,
                stop_after_chunks: int | None = None, role: str | None = None) -> Path:
  """Encodes every text once into a store at `out` (unit vectors). Resumable: re-running with the
  same teacher continues after the last finished chunk; a partial store of another teacher or
  dataset is refused. `stop_after_chunks` stops early (tests of interruption). `role` ("query" |
  "document") encodes with the model's prompt of that name, when it has one (recorded)."""
  from embed_jax.embedder import role_prompt
  out = Path(out)
  ids, texts = dataset_texts(dataset, kinds)
  if dtype not in ("float32", "float16"):
    raise TeacherStoreError(f"dtype {dtype!r}: choose float32 or float16")
  teacher = teacher_info(model, name)
  prompt = role_prompt(model, role) if role else {}
  if prompt:
    teacher["prompt"] = prompt["prompt_name"]
  manifest = {"teacher": teacher, "dataset": {"name": dataset.name, "checksum": dataset.checksum},
              "texts": list(kinds), "count": len(ids), "dtype": dtype, "complete": False}
  vectors_path = out / "vectors.npy"
  state = start_store(out, manifest, ("teacher", "dataset", "texts", "count", "dtype"),
                      "a store of another teacher, dataset or dtype", "teacher store")
  if state == "complete":
    return out
  if state == "new":
    rows = [json.dumps({"id": i, "sha1": text_checksum(t)}) + "\n" for i, t in zip(ids, texts)]
    from embed_jax.checkpoint import atomic_write
    atomic_write(out / "texts.jsonl", lambda f: f.writelines(rows), "w")
    np.lib.format.open_memmap(vectors_path, mode="w+", dtype=dtype,
                              shape=(len(ids), model.dim)).flush()
    _write_json(out / "progress.json", {"rows_done": 0})
    _write_json(out / "manifest.json", manifest)
  fill_in_chunks(out, vectors_path, len(ids), lambda a, b: (slice(a, b), model.encode(
      texts[a:b], batch_size=batch_size, normalize=True, **prompt)), manifest, key="rows_done", chunk=chunk,
      desc="teacher", unit="text", stop_after_chunks=stop_after_chunks)
  return out


def start_store(out: Path, manifest: dict, keys: Sequence[str], other: str, kind: str) -> str:
  """Where a resumable store at `out` stands: "complete", "resume" (a partial store whose
  manifest agrees with `manifest` on `keys`), or "new" (an empty or missing folder, created).
  A store of something else (`other`) or a non-empty folder that is no store is refused."""
  if (out / "manifest.json").exists():
    old = json.loads((out / "manifest.json").read_text())
    if {k: old.get(k) for k in keys} != {k: manifest[k] for k in keys}:
      raise TeacherStoreError(f"{out} holds {other} ({old['teacher']['name']}, "
                              f"{old['dataset']['name']}); delete it or choose another --out")
    if old.get("complete"):
      log.info("%s is complete; nothing to do", out)
      return "complete"
    return "resume"
  if out.exists() and any(out.iterdir()):
    raise TeacherStoreError(f"{out} exists and is not a {kind}; choose an empty folder")
  out.mkdir(parents=True, exist_ok=True)
  return "new"


def fill_in_chunks(out: Path, array_path: Path, total: int, fill, manifest: dict, *, key: str,
                   chunk: int, desc: str, unit: str, stop_after_chunks: int | None = None) -> None:
  """Fills the .npy at `array_path` (memory-mapped) `chunk` items at a time from the count in
  out/progress.json[key]: `fill(start, end) -> (array slice, values)`. Each chunk is flushed to
  disk before progress says so; when all `total` are done the manifest is marked complete and
  progress.json removed. `stop_after_chunks` stops early (tests of interruption)."""
  done = json.loads((out / "progress.json").read_text())[key]
  array = np.load(array_path, mmap_mode="r+")
  from tqdm.auto import tqdm
  bar = tqdm(total=total, initial=done, desc=desc, unit=unit)
  chunks = 0
  while done < total:
    end = min(done + chunk, total)
    where, values = fill(done, end)
    array[where] = values
    array.flush()  # the values are on disk before progress says so
    _write_json(out / "progress.json", {key: end})
    bar.update(end - done)
    done, chunks = end, chunks + 1
    if stop_after_chunks is not None and chunks >= stop_after_chunks and done < total:
      bar.close()
      return
  bar.close()
  del array
  _write_json(out / "manifest.json", {**manifest, "complete": True})
  (out / "progress.json").unlink(missing_ok=True)


def import_store(vectors_NxD: np.ndarray, ids: Sequence[str], dataset, kinds: Sequence[str],
                 out: str | os.PathLike, *, name: str, normalize: bool = True) -> Path:
  """A store from vectors computed elsewhere (e.g. an API): `ids` name the rows as text ids of
  `dataset` ("corpus/<id>", "queries/<id>"); every text of `kinds` must be present."""
  out = Path(out)
  want_ids, texts = dataset_texts(dataset, kinds)
  if len(ids) != len(vectors_NxD):
    raise TeacherStoreError(f"{len(ids)} ids for {len(vectors_NxD)} vectors")
  row_of = {i: r for r, i in enumerate(ids)}
  missing = [i for i in want_ids if i not in row_of]
  if missing:
    raise TeacherStoreError(f"{len(missing)} of the dataset's texts have no vector, e.g. "
                            f"{missing[:3]}; ids look like 'corpus/<doc id>' or 'queries/<query id>'")
  vectors = np.asarray(vectors_NxD, np.float32)[[row_of[i] for i in want_ids]]
  if not np.isfinite(vectors).all():
    raise TeacherStoreError("the vectors have NaN or inf values")
  if normalize:
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
  if out.exists() and any(out.iterdir()):
    raise TeacherStoreError(f"{out} exists and is not empty; choose an empty folder")
  out.mkdir(parents=True, exist_ok=True)
  np.save(out / "vectors.npy", vectors)
  rows = [json.dumps({"id": i, "sha1": text_checksum(t)}) + "\n" for i, t in zip(want_ids, texts)]
  (out / "texts.jsonl").write_text("".join(rows), encoding="utf-8")
  digest = hashlib.sha256(vectors.tobytes()).hexdigest()
  _write_json(out / "manifest.json", {
      "teacher": {"name": name, "fingerprint": f"imported:{digest}", "dims": vectors.shape[1],
                  "normalize": normalize, "max_seq_length": None, "pooling": None,
                  "architecture": "imported"},
      "dataset": {"name": dataset.name, "checksum": dataset.checksum}, "texts": list(kinds),
      "count": len(want_ids), "dtype": "float32", "complete": True})
  return out


class TeacherStore:
  """A complete store, opened read-only (vectors memory-mapped)."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    manifest = self.path / "manifest.json"
    if not manifest.exists():
      raise TeacherStoreError(f"{self.path} is not a teacher store (no manifest.json): build one "
                              f"with `embed-jax teacher --model M --dataset D --out {self.path}`")
    self.manifest = json.loads(manifest.read_text())
    if not self.manifest.get("complete"):
      raise TeacherStoreError(f"{self.path} is incomplete: re-run the `embed-jax teacher` command "
                              f"that built it to finish it")
    self.vectors = np.load(self.path / "vectors.npy", mmap_mode="r")
    rows = [json.loads(line) for line in (self.path / "texts.jsonl").open(encoding="utf-8")]
    self.ids = [r["id"] for r in rows]
    self.checksums = [r["sha1"] for r in rows]
    self.row_of = {i: r for r, i in enumerate(self.ids)}

  @property
  def dims(self) -> int:
    return int(self.vectors.shape[1])

  def rows(self, ids: Iterable[str]) -> np.ndarray:
    """Row indices of `ids`; a missing id is an error that names it."""
    ids = list(ids)
    missing = [i for i in ids if i not in self.row_of]
    if missing:
      raise TeacherStoreError(f"{len(missing)} text id(s) are not in the teacher store "
                              f"{self.path}, e.g. {missing[:3]}; rebuild it with --texts covering them")
    return np.array([self.row_of[i] for i in ids], np.int64)

  def check(self, dataset, ids: Sequence[str], texts: Sequence[str], *, dims: int | None = None,
            teacher: str | None = None) -> None:
    """Refuses a store that does not fit: ids missing, texts changed since the store was built
    (checksums), other dims or another teacher than the config names."""
    rows = self.rows(ids)
    changed = [i for i, r, t in zip(ids, rows, texts) if self.checksums[r] != text_checksum(t)]
    if changed:
      raise TeacherStoreError(f"{len(changed)} text(s) of {dataset.name} differ from the ones the "
                              f"teacher store {self.path} was built from, e.g. {changed[:3]}: "
                              f"rebuild the store from this dataset")
    if dims is not None and dims != self.dims:
      raise TeacherStoreError(f"the teacher store {self.path} has {self.dims} dims, the config "
                              f"expects {dims}")
    if teacher and teacher not in (self.manifest["teacher"]["name"],
                                   self.manifest["teacher"]["fingerprint"]):
      raise TeacherStoreError(f"the teacher store {self.path} was built by "
                              f"{self.manifest['teacher']['name']}, the config names {teacher}")
