"""STS data through TFDS and the STS evaluator: correlations against scipy, a tiny STS folder,
bad lines named, and all-MiniLM-L6-v2 on STS-B test against MTEB's published value."""

import numpy as np
import pytest

from embed_jax import evaluate
from embed_jax.data.sentences import SentenceFormatError, load_sts, load_triplets
from tests.conftest import data_root


def test_correlations_match_scipy():
  stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(0)
  for _ in range(20):
    x = rng.normal(size=50)
    y = np.round(x + rng.normal(size=50), 1)  # ties in y
    x[::7] = x[0]  # and in x
    assert evaluate.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert evaluate.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)


def _write_sts(folder, rows):
  folder.mkdir(parents=True)
  for split in ("train", "test"):
    (folder / f"sts-{split}.csv").write_text(
        "".join(f"g\tf\t2012\t{i:04d}\t{s}\t{a}\t{b}\n" for i, (s, a, b) in enumerate(rows)))
  return folder


def test_tiny_sts_folder_and_evaluator(tmp_path, tiny_model_dir, monkeypatch):
  import embed_jax
  monkeypatch.setenv("EMBED_JAX_CACHE", str(tmp_path / "cache"))
  rows = [(5.0, "a cat sits", "a cat sits"), (0.0, "a cat sits", 'the "stock" fell'),
          (2.5, "blood cells", "cells in blood"), (1.0, "x", "y z")]
  ds = load_sts(_write_sts(tmp_path / "tiny", rows))
  a, b, gold = ds.split("test")
  assert a[1] == "a cat sits" and b[1] == 'the "stock" fell' and list(gold) == [5.0, 0.0, 2.5, 1.0]
  out = evaluate.evaluate_sts(embed_jax.load(tiny_model_dir), ds, "test")
  assert out["pairs"] == 4 and -100 <= out["cosine_spearman"] <= 100
  with pytest.raises(ValueError, match="no split 'dev'"):
    ds.split("dev")


@pytest.mark.parametrize("line, message", [
    ("g\tf\t2012\t0001\tfive\ta\tb\n", r"sts-test.csv:1: score 'five' is not a number"),
    ("g\tf\t2012\t0001\t7.5\ta\tb\n", "outside 0..5"),
    ("g\tf\t2012\t0001\t3.0\ta\n", "expected >= 7 tab-separated columns"),
])
def test_bad_sts_lines_are_named(tmp_path, monkeypatch, line, message):
  monkeypatch.setenv("EMBED_JAX_CACHE", str(tmp_path / "cache"))
  folder = tmp_path / "bad"
  folder.mkdir()
  (folder / "sts-test.csv").write_text(line)
  with pytest.raises(SentenceFormatError, match=message):
    load_sts(folder)


def test_shared_stsb_and_snli_counts():
  root = data_root()
  if root is None or not (root / "sts" / "stsb").exists():
    pytest.skip("no ../shared/data")
  sts = load_sts(root / "sts" / "stsb")
  assert [len(sts.split(s)[0]) for s in ("train", "dev", "test")] == [5749, 1500, 1379]
  nli = load_triplets(root / "nli" / "snli")
  assert [len(nli.split(s)[0]) for s in ("dev", "test")] == [2943, 2921]


def test_minilm_on_stsb_test_matches_mteb(minilm_dir):
  """MTEB publishes STSBenchmark cosine Spearman 82.03 for all-MiniLM-L6-v2."""
  root = data_root()
  if root is None or not (root / "sts" / "stsb").exists():
    pytest.skip("no ../shared/data")
  import embed_jax
  out = evaluate.evaluate_sts(embed_jax.load(minilm_dir), load_sts(root / "sts" / "stsb"), "test")
  assert out["cosine_spearman"] == pytest.approx(82.03, abs=0.01)
