"""Vector indexes to ship: FAISS flat, HNSW, int8 scalar, binary and binary HNSW, at a Matryoshka
prefix, with float re-scoring of the top candidates and funnel (adaptive) retrieval.

An index is one folder, written atomically (a crash while building leaves nothing under the
final name):

  index.json     kind, dims (indexed prefix) and full dims, metric, the model's fingerprint, the
                 corpus checksum and size, build settings and time, each file's size and sha256
  index.faiss    the FAISS index over the first `dims` dims of the unit vectors (re-normalised)
  vectors.npy    the full-dims unit vectors, float32, memory-mapped at search time: re-scoring
                 and funnel stages read only the candidates' rows
  doc_ids.json   row -> document id

Opening an index checks every file's size and sha256 (a corrupt or truncated file is refused),
and refuses another model's fingerprint or other dims than the caller expects.

FAISS, not usearch: exact binary search (IndexBinaryFlat, SIMD popcount), a trained scalar
quantiser, HNSW over floats and bits, and IVF/PQ for larger corpora all behind one read/write
format, and it is already the project's k-means for PLAID. usearch keeps f32/f16/i8/b1 HNSW in
one file, but has no exact binary flat search and no IVF/PQ.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

KINDS = ("flat", "hnsw", "int8", "binary", "binary_hnsw")
FORMAT = 1
CHUNK = 65536  # rows normalised, added or hashed at once: bounds the build's extra memory


class VectorIndexError(ValueError):
  """An index that cannot be built, opened or searched as asked; the message says why."""


def _faiss():
  try:
    import faiss
  except ImportError:
    raise VectorIndexError("vector indexes need faiss: pip install faiss-cpu "
                           "(or embed_jax[index])") from None
  return faiss


def unit_prefix(x_NxD: np.ndarray, dims: int | None = None) -> np.ndarray:
  """float32 rows cut to the first `dims` dims and scaled to unit length (zero rows stay zero)."""
  x = np.asarray(x_NxD[:, :dims] if dims else x_NxD, np.float32)
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.maximum(norms, 1e-12)


def _sha256(path: Path) -> str:
  from embed_jax.data.mining import _file_sha256
  return _file_sha256(path)


def _empty_index(kind: str, dims: int, hnsw_m: int, ef_construction: int):
  faiss = _faiss()
  if kind == "flat":
    return faiss.IndexFlatIP(dims)
  if kind == "hnsw":
    index = faiss.IndexHNSWFlat(dims, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    return index
  if kind == "int8":
    return faiss.IndexScalarQuantizer(dims, faiss.ScalarQuantizer.QT_8bit,
                                      faiss.METRIC_INNER_PRODUCT)
  if kind == "binary":
    return faiss.IndexBinaryFlat(dims)
  index = faiss.IndexBinaryHNSW(dims, hnsw_m)
  index.hnsw.efConstruction = ef_construction
  return index


def _codes(kind: str, unit_NxD: np.ndarray) -> np.ndarray:
  """What the FAISS index takes: floats, or sign bits packed 8 per byte for binary kinds."""
  return np.packbits(unit_NxD > 0, axis=1) if kind.startswith("binary") else unit_NxD


def check_vectors(x_NxD: np.ndarray, what: str) -> None:
  if x_NxD.ndim != 2:
    raise VectorIndexError(f"{what}: expected a 2-D array [n, dims], got shape {x_NxD.shape}")
  bad = 0
  for start in range(0, len(x_NxD), CHUNK):
    bad += int((~np.isfinite(np.asarray(x_NxD[start:start + CHUNK]))).any(axis=1).sum())
  if bad:
    raise VectorIndexError(f"{what}: {bad} row(s) hold NaN or inf; fix the embeddings (or drop "
                           f"those rows) and retry")


def build_index(vectors_NxD: np.ndarray, doc_ids: Sequence[str], out: str | os.PathLike, *,
                kind: str = "flat", dims: int | None = None, fingerprint: str,
                corpus_checksum: str, model: str = "", hnsw_m: int = 32,
                ef_construction: int = 80, threads: int | None = None) -> Path:
  """Writes an index folder at `out` from corpus vectors (any [N, D] array; a memory map is read
  in chunks, so the build holds the FAISS index plus one chunk). `dims` indexes the first d dims
  (Matryoshka); the stored vectors keep all D for re-scoring. Atomic: the folder appears
  complete or not at all."""
  from embed_jax.checkpoint import _atomic_folder
  faiss = _faiss()
  if kind not in KINDS:
    raise VectorIndexError(f"index kind {kind!r} unknown; choose from {', '.join(KINDS)}")
  if len(vectors_NxD) == 0:
    raise VectorIndexError("the corpus is empty: an index needs at least one document")
  if np.ndim(vectors_NxD) != 2:
    raise VectorIndexError(f"corpus vectors: expected [n, dims], got shape {np.shape(vectors_NxD)}")
  n, full = vectors_NxD.shape
  if len(doc_ids) != n:
    raise VectorIndexError(f"{len(doc_ids)} document ids for {n} vectors; give one id a row")
  if len(set(doc_ids)) != n:
    raise VectorIndexError("document ids repeat; each row needs its own id")
  dims = int(dims or full)
  if not 1 <= dims <= full:
    raise VectorIndexError(f"dims {dims} must be in 1..{full} (the vectors' dimension)")
  if kind.startswith("binary") and dims % 8:
    raise VectorIndexError(f"binary indexes need dims divisible by 8 (packed bytes); got {dims}")
  check_vectors(vectors_NxD, "corpus vectors")
  if threads:
    faiss.omp_set_num_threads(threads)

  def fill(tmp: Path) -> None:
    t = time.perf_counter()
    stored = np.lib.format.open_memmap(tmp / "vectors.npy", mode="w+", dtype=np.float32,
                                       shape=(n, full))
    index = _empty_index(kind, dims, hnsw_m, ef_construction)
    if kind == "int8":  # the quantiser's per-dimension ranges, from up to 100k rows
      sample = np.random.default_rng(0).choice(n, min(n, 100_000), replace=False)
      index.train(unit_prefix(np.asarray(vectors_NxD[np.sort(sample)]), dims))
    for start in range(0, n, CHUNK):
      block = unit_prefix(np.asarray(vectors_NxD[start:start + CHUNK]))
      stored[start:start + len(block)] = block
      index.add(_codes(kind, unit_prefix(block, dims)))
    stored.flush()
    del stored
    (faiss.write_index_binary if kind.startswith("binary") else faiss.write_index)(
        index, str(tmp / "index.faiss"))
    (tmp / "doc_ids.json").write_text(json.dumps(list(doc_ids)) + "\n", encoding="utf-8")
    files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
             for name in ("index.faiss", "vectors.npy", "doc_ids.json")}
    meta = {"format": FORMAT, "kind": kind, "dims": dims, "full_dims": full, "num_docs": n,
            "metric": "hamming" if kind.startswith("binary") else "inner_product (unit vectors)",
            "model": model, "model_fingerprint": fingerprint, "corpus_checksum": corpus_checksum,
            "hnsw_m": hnsw_m if "hnsw" in kind else None,
            "ef_construction": ef_construction if "hnsw" in kind else None,
            "build_seconds": round(time.perf_counter() - t, 3), "faiss": faiss.__version__,
            "files": files}
    (tmp / "index.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

  return _atomic_folder(Path(out), fill, marker="index.json", what="index")


class VectorIndex:
  """An index folder, checked and opened for search."""

  def __init__(self, path: str | os.PathLike, *, fingerprint: str | None = None,
               dims: int | None = None, verify: bool = True):
    self.path = Path(path)
    meta_path = self.path / "index.json"
    if not meta_path.is_file():
      raise VectorIndexError(f"{self.path} is not an index folder (no index.json); build one with "
                             f"`embed-jax index build`")
    try:
      self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
      files = self.meta["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
      raise VectorIndexError(f"{meta_path} is corrupt; rebuild the index") from None
    if self.meta.get("format") != FORMAT:
      raise VectorIndexError(f"{self.path}: index format {self.meta.get('format')}, this embed_jax "
                             f"reads format {FORMAT}; rebuild the index")
    for name, want in files.items():
      f = self.path / name
      if not f.is_file() or f.stat().st_size != want["bytes"]:
        got = f.stat().st_size if f.is_file() else "missing"
        raise VectorIndexError(f"{f} is truncated or missing ({got} bytes, index.json records "
                               f"{want['bytes']}); rebuild the index")
      if verify and _sha256(f) != want["sha256"]:
        raise VectorIndexError(f"{f} is corrupt (its sha256 differs from index.json's); rebuild "
                               f"the index")
    if fingerprint and fingerprint != self.meta["model_fingerprint"]:
      raise VectorIndexError(f"{self.path} was built with another model "
                             f"({self.meta.get('model') or 'fingerprint'} "
                             f"{self.meta['model_fingerprint'][:12]}, this one {fingerprint[:12]}); "
                             f"rebuild it with this model or search with that one")
    if dims and dims != self.meta["dims"]:
      raise VectorIndexError(f"{self.path} indexes {self.meta['dims']} dims, not {dims}; build an "
                             f"index at {dims} dims or search at {self.meta['dims']}")
    faiss = _faiss()
    read = faiss.read_index_binary if self.kind.startswith("binary") else faiss.read_index
    self.index = read(str(self.path / "index.faiss"))
    self.vectors = np.load(self.path / "vectors.npy", mmap_mode="r")
    self.doc_ids = json.loads((self.path / "doc_ids.json").read_text(encoding="utf-8"))

  kind = property(lambda self: self.meta["kind"])
  dims = property(lambda self: self.meta["dims"])
  full_dims = property(lambda self: self.meta["full_dims"])
  num_docs = property(lambda self: self.meta["num_docs"])

  @property
  def bytes_per_doc(self) -> float:
    """The searched structure's bytes per document (FAISS file; the stored float vectors for
    re-scoring are counted apart, as they can stay on disk)."""
    return self.meta["files"]["index.faiss"]["bytes"] / self.num_docs

  def set_ef_search(self, ef: int) -> None:
    """HNSW's search breadth (recall against speed); ignored by flat kinds."""
    if "hnsw" in self.kind:
      self.index.hnsw.efSearch = int(ef)

  def search(self, queries_QxD: np.ndarray, k: int, *, rescore: int = 0,
             chain: Sequence[tuple[int, int]] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(scores_QxK, rows_QxK) of the top k documents of each query (full-dims query vectors).

    The index ranks by the first `dims` dims (binary: minus the Hamming distance). With `rescore`
    = R > 0 it shortlists R candidates, re-ranked through each (d, keep) stage of `chain` (cosine
    over the first d dims of the stored vectors, keeping the best `keep`) and finally by the
    full-dims cosine: the funnel of adaptive retrieval."""
    q = np.asarray(queries_QxD, np.float32)
    if q.ndim != 2 or q.shape[1] != self.full_dims:
      raise VectorIndexError(f"queries: expected [n, {self.full_dims}] (the model's dims), got "
                             f"shape {q.shape}")
    check_vectors(q, "query batch")
    if not 1 <= k <= self.num_docs:
      raise VectorIndexError(f"k={k} but the index holds {self.num_docs} documents; ask for "
                             f"1..{self.num_docs}")
    if chain and not rescore:
      raise VectorIndexError("funnel stages re-rank a shortlist: give rescore=K (the shortlist)")
    for d, keep in chain:
      if not (1 <= d <= self.full_dims and keep >= k):
        raise VectorIndexError(f"funnel stage ({d}, {keep}): dims must be in 1..{self.full_dims} "
                               f"and keep at least k={k}")
    shortlist = min(max(rescore, k), self.num_docs) if rescore else k
    if "hnsw" in self.kind and self.index.hnsw.efSearch < shortlist:
      self.index.hnsw.efSearch = shortlist  # HNSW returns at most efSearch results
    scores, rows = self.index.search(_codes(self.kind, unit_prefix(q, self.dims)), shortlist)
    scores = -scores.astype(np.float32) if self.kind.startswith("binary") else scores
    if not rescore:
      return scores, rows
    for d, keep in list(chain) + [(self.full_dims, k)]:
      scores, rows = self._rescore(q, rows, d, min(keep, rows.shape[1]))
    return scores, rows

  def _rescore(self, q_QxD: np.ndarray, rows_QxR: np.ndarray, d: int, keep: int):
    """Candidates re-scored by the cosine over the first d dims of the stored vectors (64
    queries at a time: the gathered candidates are [64, R, d] floats)."""
    if len(q_QxD) > 64:
      parts = [self._rescore(q_QxD[a:a + 64], rows_QxR[a:a + 64], d, keep)
               for a in range(0, len(q_QxD), 64)]
      return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    valid = rows_QxR >= 0  # HNSW may return fewer than asked (-1)
    safe = np.where(valid, rows_QxR, 0)
    uniq, inverse = np.unique(safe, return_inverse=True)
    docs_UxD = unit_prefix(np.asarray(self.vectors[uniq]), d)  # sorted rows: sequential reads
    q = unit_prefix(q_QxD, d)
    scores = np.einsum("qd,qrd->qr", q, docs_UxD[inverse.reshape(safe.shape)])
    scores = np.where(valid, scores, -np.inf).astype(np.float32)
    order = np.lexsort((safe, -scores), axis=1)[:, :keep]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows_QxR, order, 1)

  def ids(self, rows_QxK: np.ndarray) -> list[list[str]]:
    return [[self.doc_ids[r] for r in row if r >= 0] for row in rows_QxK]
