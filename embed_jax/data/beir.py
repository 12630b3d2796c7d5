"""BEIR-format retrieval datasets through TFDS (array_record), with no TensorFlow.

    from embed_jax.data import load_beir
    ds = load_beir("scifact")            # $EMBED_JAX_DATA/beir/scifact[.zip], else BEIR's download
    ds.corpus_ids, ds.corpus_texts()     # title + " " + text, as MTEB joins them
    ds.queries["1"], ds.qrels("test")    # {qid: text}, {qid: {docid: relevance}}

A BEIR folder holds corpus.jsonl (`_id`, `title`, `text`), queries.jsonl (`_id`, `text`) and
qrels/{train,dev,test}.tsv (`query-id corpus-id score`, after a header line); a .zip may hold the
folder. BeirBuilder checks the files and writes them once per content checksum under a cache dir
(`data_dir`, else $EMBED_JAX_CACHE, else ~/.cache/embed_jax/tfds): a changed source gets a new
config name, so a stale cache is never read. Reading goes through `builder.as_data_source(split)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import urllib.request
import zipfile
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

log = logging.getLogger(__name__)

# The public BEIR sets (github.com/beir-cellar/beir); cqadupstack holds 12 sub-forums, named as
# "cqadupstack/android". Other names are found locally (EMBED_JAX_DATA) but never downloaded.
BEIR_DATASETS = ("msmarco", "trec-covid", "nfcorpus", "nq", "hotpotqa", "fiqa", "arguana",
                 "webis-touche2020", "cqadupstack", "quora", "dbpedia-entity", "scidocs", "fever",
                 "climate-fever", "scifact")
BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"
DOWNLOAD_TIMEOUT_S = 10  # connect and per read: fail fast when offline, not during a long transfer
QRELS_SPLITS = ("train", "dev", "test")
CORPUS, QUERIES = "corpus.jsonl", "queries.jsonl"
# The checksum covers the files in this order (the ones present).
SOURCE_FILES = (CORPUS, QUERIES) + tuple(f"qrels/{s}.tsv" for s in QRELS_SPLITS)


class BeirFormatError(ValueError):
  """A BEIR file that cannot be read: the message names the file and the line."""


# ----------------------------------------------------------------------------------------------
# Where the files are: a folder, or a folder inside a zip.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BeirSource:
  """A BEIR folder on disk (`inner` is None) or the folder `inner` inside the zip `path`."""
  path: Path
  inner: str | None = None

  def __str__(self) -> str:
    return str(self.path) if self.inner is None else f"{self.path}:{self.inner}"

  @property
  def name(self) -> str:
    """The dataset name: the folder's name (its parent's too for cqadupstack sub-forums)."""
    parts = Path(self.inner).parts if self.inner is not None else self.path.parts
    parts = parts or (self.path.stem,)  # a zip holding the files at its top level
    return "/".join(parts[-2:]) if len(parts) > 1 and parts[-2] == "cqadupstack" else parts[-1]

  def where(self, rel: str) -> str:
    """The file as a reader can find it, for messages."""
    if self.inner is None:
      return str(self.path / rel)
    return f"{self.path}:{_posix_join(self.inner, rel)}"

  def files(self) -> list[str]:
    """The BEIR files present, in checksum order."""
    if self.inner is None:
      return [rel for rel in SOURCE_FILES if (self.path / rel).is_file()]
    with zipfile.ZipFile(self.path) as zf:
      names = set(zf.namelist())
    return [rel for rel in SOURCE_FILES if _posix_join(self.inner, rel) in names]

  @contextlib.contextmanager
  def open(self, rel: str) -> Iterator[IO[bytes]]:
    if self.inner is None:
      with open(self.path / rel, "rb") as f:
        yield f
    else:
      with zipfile.ZipFile(self.path) as zf, zf.open(_posix_join(self.inner, rel)) as f:
        yield f

  @classmethod
  def from_path(cls, path: str | os.PathLike, inner: str | None = None) -> BeirSource:
    """The BEIR folder at `path`: the folder itself, its one sub-folder, or inside a zip."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
      roots = [path] if (path / CORPUS).is_file() else sorted(
          p.parent for p in path.glob(f"*/{CORPUS}"))
      found = [str(r.relative_to(path)) for r in roots]
      root = _pick_one(roots, found, path, inner)
      return cls(root)
    if not zipfile.is_zipfile(path):
      raise FileNotFoundError(f"{path} is neither a BEIR folder nor a .zip holding one")
    with zipfile.ZipFile(path) as zf:
      roots = sorted({n[:-len(CORPUS)].rstrip("/") for n in zf.namelist()
                      if n.rsplit("/", 1)[-1] == CORPUS and not n.startswith("__MACOSX/")},
                     key=lambda r: (r.count("/"), r))
    return cls(path, _pick_one(roots, roots, path, inner))


def _posix_join(inner: str, rel: str) -> str:
  return f"{inner}/{rel}" if inner else rel


def _pick_one(roots: list, names: list[str], path: Path, inner: str | None):
  if inner is not None:
    matches = [r for r, n in zip(roots, names) if n == inner or n.endswith("/" + inner)]
    if len(matches) != 1:
      raise FileNotFoundError(f"{path} holds no BEIR folder {inner!r}; it holds: "
                              f"{', '.join(names) or 'none'}")
    return matches[0]
  if not roots:
    raise FileNotFoundError(f"{path} holds no {CORPUS}: a BEIR folder has {CORPUS}, "
                            f"{QUERIES} and qrels/<split>.tsv")
  if len(roots) > 1:
    raise FileNotFoundError(f"{path} holds {len(roots)} BEIR folders ({', '.join(names)}); pass "
                            f"one of them (e.g. {path}/{names[0]})")
  return roots[0]


def _sha256(source: BeirSource, rel: str) -> str:
  h = hashlib.sha256()
  with source.open(rel) as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _manifest_checksum(file_sha256: dict[str, str]) -> str:
  """sha256 of a `sha256sum`-style manifest: one digest per file, in SOURCE_FILES order."""
  manifest = "".join(f"{file_sha256[rel]}  {rel}\n" for rel in SOURCE_FILES if rel in file_sha256)
  return hashlib.sha256(manifest.encode()).hexdigest()


def source_checksum(source: BeirSource) -> str:
  """The dataset checksum: over corpus, queries and qrels contents (see _manifest_checksum)."""
  return _manifest_checksum({rel: _sha256(source, rel) for rel in source.files()})


# ----------------------------------------------------------------------------------------------
# Reading and checking the files.
# ----------------------------------------------------------------------------------------------


def _lines(source: BeirSource, rel: str,
           hasher: Any = None) -> Iterator[tuple[int, bytes]]:
  """(line number from 1, raw line) for the non-blank lines; hashes every byte when asked."""
  with source.open(rel) as f:
    for n, raw in enumerate(f, 1):
      if hasher is not None:
        hasher.update(raw)
      if raw.strip():
        yield n, raw


def _record(raw: bytes, where: str, n: int, titled: bool) -> tuple[str, str, str]:
  """(_id, title, text) from one JSON line of corpus.jsonl or queries.jsonl."""
  try:
    obj = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BeirFormatError(f"{where}: line {n}: not valid JSON ({e})") from None
  if not isinstance(obj, dict):
    raise BeirFormatError(f"{where}: line {n}: expected a JSON object, got {type(obj).__name__}")
  _id = obj.get("_id")
  if isinstance(_id, int) and not isinstance(_id, bool):
    _id = str(_id)  # some exports write numeric ids; qrels name them as text
  if not isinstance(_id, str) or not _id:
    raise BeirFormatError(f"{where}: line {n}: `_id` is missing or not a non-empty string")
  title = obj.get("title") if titled else ""
  text = obj.get("text")
  if not isinstance(text, str) or not isinstance(title, (str, type(None))):
    raise BeirFormatError(f"{where}: line {n}: `text` (and `title`, if given) must be strings")
  return _id, title or "", text


def _qrel(raw: bytes, where: str, n: int, first: bool) -> tuple[str, str, int] | None:
  """(query-id, corpus-id, score) from one qrels line; None for the header line."""
  line = raw.decode("utf-8", "replace").rstrip("\r\n")
  fields = line.split("\t")
  if len(fields) != 3:
    raise BeirFormatError(f"{where}: line {n}: expected 3 tab-separated fields (query-id, "
                          f"corpus-id, score), found {len(fields)}: {line[:80]!r}")
  qid, did, score = (f.strip() for f in fields)
  try:
    return qid, did, int(score)
  except ValueError:
    if first:  # the header: BEIR's is `query-id corpus-id score`; accept any naming
      return None
    raise BeirFormatError(f"{where}: line {n}: score {score!r} is not an integer") from None


@dataclasses.dataclass
class _Scan:
  checksum: str
  qrels_skip: dict[str, set[int]]  # split -> line numbers naming an unknown query or document
  qrels_stats: dict[str, dict[str, int]]


def _scan_records(source: BeirSource, rel: str, titled: bool, hashes: dict) -> set[str]:
  where, h, ids = source.where(rel), hashlib.sha256(), set()
  for n, raw in _lines(source, rel, h):
    _id = _record(raw, where, n, titled)[0]
    if _id in ids:
      raise BeirFormatError(f"{where}: line {n}: duplicate _id {_id!r}")
    ids.add(_id)
  hashes[rel] = h.hexdigest()
  if not ids:
    raise BeirFormatError(f"{where} is empty: a BEIR dataset needs at least one record")
  return ids


def _scan(source: BeirSource) -> _Scan:
  """Checks every file and hashes it, before anything is written."""
  present, hashes = source.files(), {}
  for rel in (CORPUS, QUERIES):
    if rel not in present:
      raise FileNotFoundError(f"{source.where(rel)} is missing")
  corpus_ids = _scan_records(source, CORPUS, True, hashes)
  query_ids = _scan_records(source, QUERIES, False, hashes)
  skip, stats = {}, {}
  for split in QRELS_SPLITS:
    rel = f"qrels/{split}.tsv"
    if rel not in present:
      continue
    where, h = source.where(rel), hashlib.sha256()
    skip[split], total, bad_q, bad_d, first = set(), 0, 0, 0, True
    for n, raw in _lines(source, rel, h):
      row, first = _qrel(raw, where, n, first), False
      if row is None:
        continue
      total += 1
      bad_q += row[0] not in query_ids
      bad_d += row[1] not in corpus_ids
      if row[0] not in query_ids or row[1] not in corpus_ids:
        skip[split].add(n)
    hashes[rel] = h.hexdigest()
    stats[split] = {"pairs": total - len(skip[split]), "skipped": len(skip[split])}
    if skip[split]:
      log.warning("%s: skipped %d of %d qrels lines: %d name a query not in %s, %d a document "
                  "not in %s", where, len(skip[split]), total, bad_q, QUERIES, bad_d, CORPUS)
  return _Scan(_manifest_checksum(hashes), skip, stats)


def _utf8(s: str) -> bytes:
  try:
    return s.encode("utf-8")
  except UnicodeEncodeError:  # a lone surrogate from a JSON \ud800 escape: not valid UTF-8
    return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in s).encode("utf-8")


# ----------------------------------------------------------------------------------------------
# The TFDS builder.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class BeirConfig(tfds.core.BuilderConfig):
  """One BEIR source at one content checksum; the config name carries the checksum."""
  source: str = ""  # folder or zip path
  inner: str | None = None  # the folder inside the zip
  checksum: str = ""  # source_checksum(...)


class BeirBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Splits `corpus`, `queries` and one per qrels file (`train`, `dev`, `test`).

  TFDS gives one feature dict to all splits of a builder, so every example has every field and
  the unused ones are empty: corpus (_id, title, text), queries (_id, text), qrels (query_id,
  corpus_id, score). Examples keep the file order (disable_shuffling).
  """
  name = "embed_jax_beir"  # tfds registers its own `beir`; ours is not registered at all
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "corpus, queries and qrels splits from a BEIR folder or zip."}
  # tfds finds a builder's file through the `importlib_resources` backport, which neither tfds
  # nor etils installs; this is the path its own fallback would give (it has no checksums.tsv).
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"BEIR-format retrieval dataset from {self.builder_config.source}"
                    f"{':' + self.builder_config.inner if self.builder_config.inner else ''}, "
                    f"sha256 {self.builder_config.checksum}.",
        features=tfds.features.FeaturesDict({
            "_id": text, "title": text, "text": text,
            "query_id": text, "corpus_id": text, "score": np.int32}),
        disable_shuffling=True,
        homepage="https://github.com/beir-cellar/beir",
        metadata=tfds.core.MetadataDict(),
    )

  def _source(self) -> BeirSource:
    return BeirSource(Path(self.builder_config.source), self.builder_config.inner)

  def _split_generators(self, dl_manager):
    del dl_manager  # the source is local by now (load_beir downloads with a short timeout)
    source = self._source()
    scan = _scan(source)
    if scan.checksum != self.builder_config.checksum:
      raise RuntimeError(f"{source} changed while it was read (sha256 {scan.checksum}, expected "
                         f"{self.builder_config.checksum}); load it again")
    self.info.metadata["checksum"] = scan.checksum
    self.info.metadata["qrels"] = scan.qrels_stats
    splits = {"corpus": self._generate_examples(source, CORPUS),
              "queries": self._generate_examples(source, QUERIES)}
    for split, skip in scan.qrels_skip.items():
      if not scan.qrels_stats[split]["pairs"]:  # tfds cannot write a split without examples
        log.warning("%s has no usable pair: no %r split", source.where(f"qrels/{split}.tsv"),
                    split)
        continue
      splits[split] = self._generate_examples(source, f"qrels/{split}.tsv", skip)
    return splits

  def _generate_examples(self, source: BeirSource, rel: str, skip: set[int] | None = None):
    where, empty = source.where(rel), b""
    if rel.endswith(".jsonl"):
      for n, raw in _lines(source, rel):
        _id, title, text = _record(raw, where, n, rel == CORPUS)
        yield n, {"_id": _utf8(_id), "title": _utf8(title), "text": _utf8(text),
                  "query_id": empty, "corpus_id": empty, "score": 0}
      return
    first = True
    for n, raw in _lines(source, rel):
      row, first = _qrel(raw, where, n, first), False
      if row is not None and n not in skip:
        yield n, {"_id": empty, "title": empty, "text": empty,
                  "query_id": _utf8(row[0]), "corpus_id": _utf8(row[1]), "score": row[2]}


class _DropCustomConfigWarning(logging.Filter):
  """tfds warns on every config not listed in the class; ours are all made per source."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Using custom data configuration")


def beir_config(source: BeirSource) -> BeirConfig:
  """The builder config for `source`: named by its checksum, so a changed source gets a new one."""
  checksum = source_checksum(source)
  slug = re.sub(r"[^a-z0-9]+", "_", source.name.lower()).strip("_") or "beir"
  return BeirConfig(name=f"{slug}-{checksum[:16]}", version=BeirBuilder.VERSION,
                    source=str(source.path), inner=source.inner, checksum=checksum)


def quiet_builder(builder_cls, config, data_dir: str | os.PathLike | None = None):
  """builder_cls(config) writing array_record under the cache dir, without tfds' warning about
  a config made at run time."""
  absl_log, quiet = logging.getLogger("absl"), _DropCustomConfigWarning()
  absl_log.addFilter(quiet)
  try:
    return builder_cls(config=config, data_dir=str(cache_dir(data_dir)), file_format="array_record")
  finally:
    absl_log.removeFilter(quiet)


def prepare_quietly(builder_cls, config, data_dir, what: str):
  """quiet_builder(builder_cls, config, data_dir), prepared once per source and cache dir, with
  one log line instead of TFDS' own output (its "Downloading and preparing dataset Unknown size
  ..." for a local folder, and nested progress bars that leave escape codes in logs). Processes
  sharing a cache dir (test workers, the hosts of one run, two experiments) prepare one after the
  other: the first writes, the others wait on a lock file beside the folder, then read it."""
  builder = quiet_builder(builder_cls, config, data_dir)
  if not epath.Path(builder.data_dir).joinpath("dataset_info.json").exists():
    with _exclusive(Path(builder.data_dir).parent / f".{Path(builder.data_dir).name}.lock"):
      builder = quiet_builder(builder_cls, config, data_dir)  # another may have prepared it
      if not epath.Path(builder.data_dir).joinpath("dataset_info.json").exists():
        _prepare(builder, what)
        return builder
  # Made again from the prepared folder: a builder made while another process was still
  # preparing it holds the code's info (no checksum), which load_beir would refuse.
  builder = quiet_builder(builder_cls, config, data_dir)
  builder.download_and_prepare()  # already prepared: a quick check
  return builder


@contextlib.contextmanager
def _exclusive(lock_path: Path):
  """An exclusive advisory lock (flock) on `lock_path` while the block runs; none where the
  platform has no fcntl."""
  try:
    import fcntl
  except ImportError:
    yield
    return
  lock_path.parent.mkdir(parents=True, exist_ok=True)
  with open(lock_path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _prepare(builder, what: str) -> None:
  import io
  from tensorflow_datasets.core.utils import tqdm_utils
  log.info("preparing %s once, into %s", what, builder.data_dir)
  shown = tqdm_utils._active
  tfds.display_progress_bar(False)
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.WARNING)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare()
  finally:
    absl_log.setLevel(level)
    tfds.display_progress_bar(shown)


# ----------------------------------------------------------------------------------------------
# Where a dataset comes from.
# ----------------------------------------------------------------------------------------------


def cache_dir(data_dir: str | os.PathLike | None = None) -> Path:
  """Where the TFDS files go: data_dir, else $EMBED_JAX_CACHE, else ~/.cache/embed_jax/tfds."""
  return Path(data_dir or os.environ.get("EMBED_JAX_CACHE") or "~/.cache/embed_jax/tfds"
              ).expanduser()


def _offline() -> bool:
  return any(os.environ.get(v, "0").strip().lower() in ("1", "true", "yes", "on")
             for v in ("EMBED_JAX_OFFLINE", "HF_HUB_OFFLINE"))


def _download(name: str, dest: Path) -> None:
  """BEIR's zip to `dest`, atomically: a failed transfer leaves nothing behind."""
  url = BEIR_URL.format(name=name)
  dest.parent.mkdir(parents=True, exist_ok=True)
  partial = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
  log.info("downloading %s to %s", url, dest)
  try:
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, \
        open(partial, "wb") as f:
      shutil.copyfileobj(response, f, 1 << 20)
    if not zipfile.is_zipfile(partial):
      raise OSError(f"{url} did not return a zip file")
    os.replace(partial, dest)
  finally:
    partial.unlink(missing_ok=True)


def resolve_beir(name_or_path: str | os.PathLike,
                 data_dir: str | os.PathLike | None = None) -> BeirSource:
  """The BEIR source for a path (folder or zip) or a name.

  A name ("scifact", "cqadupstack/android") is looked up as a folder or `<name>.zip` under
  $EMBED_JAX_DATA/beir and $EMBED_JAX_DATA, then among earlier downloads in the cache dir, then
  (for the public BEIR sets, unless EMBED_JAX_OFFLINE or HF_HUB_OFFLINE is set) downloaded.
  """
  path = Path(name_or_path).expanduser()
  if path.exists():
    return BeirSource.from_path(path)
  name = str(name_or_path).strip("/")
  top, _, sub = name.partition("/")
  if not name or name.startswith((".", "~")) or name.count("/") > 1 or os.path.isabs(name):
    raise FileNotFoundError(f"BEIR folder or zip {str(name_or_path)!r} does not exist")
  roots = []
  if os.environ.get("EMBED_JAX_DATA"):
    data = Path(os.environ["EMBED_JAX_DATA"]).expanduser()
    roots = [data / "beir", data]
  zipped = cache_dir(data_dir) / "downloads" / "beir" / f"{top}.zip"  # an earlier download
  candidates = [c for root in roots for c in ((root / name, False), (root / f"{top}.zip", True))]
  for candidate, is_zip in candidates + [(zipped, True)]:
    if is_zip and candidate.is_file():
      return BeirSource.from_path(candidate, inner=sub or None)
    if not is_zip and candidate.is_dir():
      return BeirSource.from_path(candidate)
  looked = ", ".join(str(c) for c, _ in candidates + [(zipped, True)])

  if top not in BEIR_DATASETS:
    reason = f"{top!r} is not a public BEIR dataset ({', '.join(BEIR_DATASETS)})"
  elif _offline():
    reason = "EMBED_JAX_OFFLINE / HF_HUB_OFFLINE is set, so it was not downloaded"
  else:
    try:
      _download(top, zipped)
      return BeirSource.from_path(zipped, inner=sub or None)
    except (OSError, http.client.HTTPException, ValueError) as e:  # one advice for all
      reason = f"downloading {BEIR_URL.format(name=top)} failed ({type(e).__name__}: {e})"
  env = (f"EMBED_JAX_DATA={os.environ['EMBED_JAX_DATA']}" if roots else "EMBED_JAX_DATA is unset")
  raise FileNotFoundError(
      f"BEIR dataset {name!r} not found ({env}); looked for {looked}; and "
      f"{reason}. Point EMBED_JAX_DATA at a folder holding beir/{top}/ (or beir/{top}.zip), or "
      f"pass the path of the folder or zip itself.")


# ----------------------------------------------------------------------------------------------
# In-memory access for evaluation.
# ----------------------------------------------------------------------------------------------


class BeirDataset:
  """A prepared BEIR dataset: TFDS data sources, plus corpus, queries and qrels in memory."""

  def __init__(self, builder: BeirBuilder):
    self.builder = builder
    self.checksum: str = builder.builder_config.checksum
    self.source = BeirSource(Path(builder.builder_config.source), builder.builder_config.inner)
    self.name = self.source.name
    self._qrels: dict[str, dict[str, dict[str, int]]] = {}

  def __repr__(self) -> str:
    return (f"BeirDataset({self.name!r}, splits={self.splits}, source={str(self.source)!r}, "
            f"sha256={self.checksum[:16]}...)")

  @property
  def splits(self) -> tuple[str, ...]:
    """corpus, queries, then the qrels splits present, in train, dev, test order."""
    present = set(self.builder.info.splits)
    return tuple(s for s in ("corpus", "queries") + QRELS_SPLITS if s in present)

  @property
  def qrels_splits(self) -> tuple[str, ...]:
    return tuple(s for s in self.splits if s in QRELS_SPLITS)

  def _check_split(self, split: str, qrels: bool = False) -> None:
    valid = self.qrels_splits if qrels else self.splits
    if split not in valid:
      kind = "qrels split" if qrels else "split"
      raise ValueError(f"{self.name} has no {kind} {split!r}; it has: {', '.join(valid) or 'none'}")

  def data_source(self, split: str):
    """The TFDS random-access data source for a split (examples are dicts of numpy values)."""
    self._check_split(split)
    return self.builder.as_data_source(split)

  def _columns(self, split: str, fields: Sequence[str], chunk: int = 4096) -> list[list]:
    source = self.data_source(split)
    columns = [[] for _ in fields]
    for start in range(0, len(source), chunk):
      # __getitems__ is the data sources' batched read (one call per chunk, not per record).
      for ex in source.__getitems__(range(start, min(start + chunk, len(source)))):
        for col, field in zip(columns, fields):
          value = ex[field]
          col.append(value.decode("utf-8") if isinstance(value, bytes) else int(value))
    return columns

  @functools.cached_property
  def _corpus(self) -> tuple[list[str], list[str], list[str]]:
    return tuple(self._columns("corpus", ("_id", "title", "text")))

  @property
  def corpus_ids(self) -> list[str]:
    """Document ids, in corpus.jsonl order (the order of corpus_texts)."""
    return self._corpus[0]

  def corpus_texts(self, join: str | None = " ") -> list[str]:
    """`title + join + text`, stripped (MTEB); the text alone when the title is empty or join
    is None. Whitespace inside is kept as it is."""
    _, titles, texts = self._corpus
    if join is None:
      return [t.strip() for t in texts]
    return [(ti + join + t).strip() if ti else t.strip() for ti, t in zip(titles, texts)]

  @functools.cached_property
  def queries(self) -> dict[str, str]:
    """{query id: text}, every query in queries.jsonl, in file order."""
    ids, texts = self._columns("queries", ("_id", "text"))
    return dict(zip(ids, texts))

  def qrels(self, split: str) -> dict[str, dict[str, int]]:
    """{query id: {doc id: relevance}} for a qrels split; a repeated pair keeps its last score."""
    self._check_split(split, qrels=True)
    if split not in self._qrels:
      qrels: dict[str, dict[str, int]] = {}
      for qid, did, score in zip(*self._columns(split, ("query_id", "corpus_id", "score"))):
        qrels.setdefault(qid, {})[did] = score
      self._qrels[split] = qrels
    return self._qrels[split]

  def split_queries(self, split: str) -> dict[str, str]:
    """The queries judged in a qrels split (BEIR evaluates these), in queries.jsonl order."""
    judged = self.qrels(split)
    return {qid: text for qid, text in self.queries.items() if qid in judged}


def load_beir(name_or_path: str | os.PathLike,
              data_dir: str | os.PathLike | None = None) -> BeirDataset:
  """A BEIR dataset by name or path (see resolve_beir), prepared once under the cache dir."""
  source = resolve_beir(name_or_path, data_dir)
  builder = prepare_quietly(BeirBuilder, beir_config(source), data_dir,
                            f"BEIR {source.name} from {source}")  # reuses a prepared dir
  # The config name holds 64 bits of the checksum; the full one is in the metadata.
  if builder.info.metadata.get("checksum") != builder.builder_config.checksum:
    raise RuntimeError(f"{builder.data_dir} was written from other files than "
                       f"{builder.builder_config.source}; delete it and load again")
  return BeirDataset(builder)
