"""Sentence-level datasets through TFDS (array_record, no TensorFlow): STS pairs with gold scores
and NLI triplets, for multi-task training and the STS evaluator.

    from embed_jax.data.sentences import load_sts, load_triplets
    sts = load_sts("stsb")        # $EMBED_JAX_DATA/sts/stsb/sts-{train,dev,test}.csv
    a, b, score = sts.split("test")
    nli = load_triplets("snli")   # $EMBED_JAX_DATA/nli/snli/snli_{dev,test}_triplets.tsv
    anchor, positive, negative = nli.split("dev")

STS files are the STS Benchmark's: tab-separated, no header, columns genre, file, year, id,
score (0-5), sentence1, sentence2 [, source1, source2]; split on tabs only (the sentences
contain quotes). Triplet files have the header `anchor positive negative`. Like the BEIR builder,
the files are checked, written once per content checksum under the cache dir, and read back with
`as_data_source`; a bad line is an error naming file:line.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import re
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from embed_jax.data.beir import prepare_quietly

log = logging.getLogger(__name__)

KINDS = {"sts": (r"sts-(\w+)\.csv", "sts"), "triplets": (r"\w+_(\w+)_triplets\.tsv", "nli")}


class SentenceFormatError(ValueError):
  """A malformed line: the message names the file and the line."""


def data_root() -> Path:
  return Path(os.environ.get("EMBED_JAX_DATA", Path.cwd() / "data"))


def _split_files(folder: Path, kind: str) -> dict[str, Path]:
  pattern = re.compile(KINDS[kind][0])
  files = {m.group(1): p for p in sorted(folder.iterdir()) if (m := pattern.fullmatch(p.name))}
  if not files:
    raise FileNotFoundError(f"{folder} has no {kind} files (expected names like "
                            f"{KINDS[kind][0].replace(chr(92) + 'w+', 'test')})")
  return files


def _checksum(files: dict[str, Path]) -> str:
  h = hashlib.sha256()
  for split, path in sorted(files.items()):
    h.update(split.encode())
    h.update(hashlib.sha256(path.read_bytes()).hexdigest().encode())
  return h.hexdigest()


def parse_line(kind: str, line: str, where: str) -> tuple[str, str, str, float] | None:
  """(text1, text2, text3, score) of one line; None for a triplet file's header."""
  cols = line.rstrip("\r\n").split("\t")
  if kind == "sts":
    if len(cols) < 7:
      raise SentenceFormatError(f"{where}: expected >= 7 tab-separated columns (genre, file, "
                                f"year, id, score, sentence1, sentence2), got {len(cols)}")
    try:
      score = float(cols[4])
    except ValueError:
      raise SentenceFormatError(f"{where}: score {cols[4]!r} is not a number") from None
    if not 0.0 <= score <= 5.0:
      raise SentenceFormatError(f"{where}: score {score} is outside 0..5")
    return cols[5], cols[6], "", score
  if cols == ["anchor", "positive", "negative"]:
    return None
  if len(cols) != 3 or not all(c.strip() for c in cols):
    raise SentenceFormatError(f"{where}: expected 3 non-empty tab-separated texts (anchor, "
                              f"positive, negative), got {len(cols)} columns")
  return cols[0], cols[1], cols[2], 0.0


@dataclasses.dataclass(eq=False)
class SentencesConfig(tfds.core.BuilderConfig):
  kind: str = "sts"  # sts | triplets
  folder: str = ""
  checksum: str = ""


class SentencesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """One split per file; examples keep the file order (text3 is empty for STS pairs)."""
  name = "embed_jax_sentences"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "STS pairs with scores, NLI triplets."}
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(
        builder=self, description=f"{self.builder_config.kind} from {self.builder_config.folder}",
        features=tfds.features.FeaturesDict({"text1": text, "text2": text, "text3": text,
                                             "score": np.float32}),
        disable_shuffling=True, metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    files = _split_files(Path(cfg.folder), cfg.kind)
    if _checksum(files) != cfg.checksum:
      raise RuntimeError(f"{cfg.folder} changed while it was read; load it again")
    self.info.metadata["checksum"] = cfg.checksum
    return {split: self._generate_examples(path) for split, path in files.items()}

  def _generate_examples(self, path: Path):
    with path.open(encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        row = parse_line(self.builder_config.kind, line, f"{path}:{n}")
        if row is not None:
          yield n, {"text1": row[0], "text2": row[1], "text3": row[2], "score": row[3]}


class SentenceDataset:
  """A prepared sentence dataset: split(name) -> columns (text1, text2[, text3], score)."""

  def __init__(self, builder: SentencesBuilder):
    self.builder, self.kind = builder, builder.builder_config.kind
    self.name = Path(builder.builder_config.folder).name
    self.checksum = builder.builder_config.checksum

  @property
  def splits(self) -> tuple[str, ...]:
    return tuple(sorted(self.builder.info.splits))

  @functools.lru_cache(maxsize=None)
  def split(self, name: str) -> tuple:
    """STS: (sentences1, sentences2, scores float32); triplets: (anchors, positives, negatives)."""
    if name not in self.splits:
      raise ValueError(f"{self.name} has no split {name!r}; it has: {', '.join(self.splits)}")
    source = self.builder.as_data_source(name)
    rows = source.__getitems__(range(len(source)))
    col = lambda k: [r[k].decode("utf-8") if isinstance(r[k], bytes) else r[k] for r in rows]  # noqa: E731
    if self.kind == "sts":
      return col("text1"), col("text2"), np.array(col("score"), np.float32)
    return col("text1"), col("text2"), col("text3")


def _load(kind: str, name_or_path: str | os.PathLike, data_dir=None) -> SentenceDataset:
  folder = Path(name_or_path)
  if not folder.is_dir():
    folder = data_root() / KINDS[kind][1] / str(name_or_path)
  if not folder.is_dir():
    raise FileNotFoundError(f"{kind} dataset {name_or_path!r}: no folder {folder}; set "
                            f"EMBED_JAX_DATA to the folder holding {KINDS[kind][1]}/<name>/")
  checksum = _checksum(_split_files(folder, kind))
  config = SentencesConfig(name=f"{kind}-{re.sub(r'[^a-z0-9]+', '_', folder.name.lower())}-"
                                f"{checksum[:16]}", version=SentencesBuilder.VERSION, kind=kind,
                           folder=str(folder.resolve()), checksum=checksum)
  builder = prepare_quietly(SentencesBuilder, config, data_dir,
                            f"{kind} {folder.name} from {folder}")
  return SentenceDataset(builder)


def load_sts(name_or_path: str | os.PathLike = "stsb", data_dir=None) -> SentenceDataset:
  return _load("sts", name_or_path, data_dir)


def load_triplets(name_or_path: str | os.PathLike = "snli", data_dir=None) -> SentenceDataset:
  return _load("triplets", name_or_path, data_dir)
