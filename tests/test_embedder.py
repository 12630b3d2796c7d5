"""encode(): order, empty input, truncation, bucketed shapes; and `embed-jax encode`."""

import json

import numpy as np
import pytest

import embed_jax
from embed_jax.cli import main
from embed_jax.embedder import length_buckets

TEXTS = ["hello world", "", "the cells of the mouse " * 30, "protein", "hello world", "Größe café",
         "a", "study of cancer risk in patients"]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
  return embed_jax.load(tiny_model_dir)


def test_input_order_and_batching_do_not_change_vectors(model):
  full = model.encode(TEXTS, batch_size=3)
  one_by_one = np.concatenate([model.encode([t]) for t in TEXTS])
  np.testing.assert_allclose(full, one_by_one, atol=1e-5)
  np.testing.assert_array_equal(full[0], full[4])  # repeated text, same vector
  assert np.isfinite(full).all()
  assert full.shape == (len(TEXTS), model.dim) and full.dtype == np.float32


def test_empty_inputs(model):
  assert model.encode([]).shape == (0, model.dim)
  assert model.encode([], truncate_dim=8).shape == (0, 8)
  v = model.encode([""])
  assert np.isfinite(v).all() and np.isclose(np.linalg.norm(v), 1.0)


def test_truncate_and_normalize(model):
  full = model.encode(TEXTS, normalize=False)
  small = model.encode(TEXTS, truncate_dim=8)
  ref = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
  np.testing.assert_allclose(small, ref, atol=1e-6)
  with pytest.raises(ValueError, match="truncate_dim"):
    model.encode(TEXTS, truncate_dim=model.dim + 1)
  with pytest.raises(TypeError, match="list of texts"):
    model.encode("a single string")
  with pytest.raises(TypeError, match=r"texts\[1\] is int"):
    model.encode(["a", 3])


def test_shapes_compile_once(model):
  model._forward.clear_cache()
  texts = [("the cell " * n).strip() for n in range(1, 40)] * 3
  model.encode(texts, batch_size=16)
  first = model._forward._cache_size()
  assert first <= len(length_buckets(model.config.max_seq_length))
  model.encode(list(reversed(texts)), batch_size=16)
  assert model._forward._cache_size() == first  # same lengths, no new compilation


def test_cli_encode(tiny_model_dir, tmp_path, capsys):
  src = tmp_path / "texts.jsonl"
  src.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n")
  out = tmp_path / "emb.npy"
  assert main(["encode", "--model", str(tiny_model_dir), "--input", str(src), "--output", str(out)]) == 0
  np.testing.assert_allclose(np.load(out), embed_jax.load(tiny_model_dir).encode(TEXTS), atol=1e-6)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n{not json}\n')
  assert main(["encode", "--model", str(tiny_model_dir), "--input", str(bad), "--output",
               str(tmp_path / "x.npy")]) == 2
  assert "bad.jsonl:2" in capsys.readouterr().err
  assert not (tmp_path / "x.npy").exists()
  assert main(["encode", "--model", str(tmp_path / "missing"), "--input", str(src), "--output",
               str(tmp_path / "y.npy")]) == 2


def test_tokenizer_larger_than_the_vocabulary_is_refused(tiny_model_dir):
  from embed_jax import hf
  from embed_jax.embedder import Embedder, load_tokenizer
  config, params = hf.load(tiny_model_dir)
  with pytest.raises(hf.ModelFormatError, match="vocab_size"):
    Embedder(config.replace(vocab_size=10), params, load_tokenizer(tiny_model_dir))
