"""LoRA adapters (embed_jax.lora): targets, initialisation, merging, and PEFT folders both ways,
checked against PEFT + sentence-transformers on a tiny BERT (and MPNet)."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from embed_jax import hf, lora
from embed_jax.checkpoint import export
from embed_jax.embedder import Embedder, load_tokenizer
from tests import test_mpnet
from tests.test_parity_minilm import varied_texts

tiny_mpnet_dir = test_mpnet.tiny_mpnet_dir  # the fixture, shared


def _model(folder):
  config, params = hf.load(folder)
  return config, params, load_tokenizer(folder)


def _adapted(folder):
  """(config, params, spec, trained-like rank-4 adapters on attention + FFN, ids, mask)."""
  import jax.numpy as jnp
  config, params, _ = _model(folder)
  spec = lora.LoraSpec(target="attention+ffn", r=4, alpha=8)
  adapters = _trained_like(lora.init_adapters(params, config, spec, jax.random.key(0)))
  ids = jnp.asarray(np.random.default_rng(0).integers(5, config.vocab_size, (3, 7)))
  return config, params, spec, adapters, ids, jnp.ones_like(ids)


def _trained_like(adapters, seed=1):
  """B moved off zero, as after training (so the adapter changes the outputs)."""
  rng = np.random.default_rng(seed)
  return {p: {"a": ab["a"], "b": ab["b"] + 0.2 * rng.standard_normal(ab["b"].shape).astype(np.float32)}
          for p, ab in adapters.items()}


def test_presets_select_the_architectures_dense_layers(tiny_model_dir):
  config, params, _ = _model(tiny_model_dir)
  att = lora.targets(params, config, "attention")
  assert att == [f"encoder/layer_{i}/attention/{p}" for i in range(2)
                 for p in ("self/query", "self/key", "self/value", "output/dense")]
  both = lora.targets(params, config, "attention+ffn")
  assert len(both) == 12 and "encoder/layer_1/intermediate/dense" in both
  assert "encoder/layer_1/output/dense" in both
  assert lora.targets(params, config, r"encoder/layer_\d+/attention/self/(query|value)") == [
      "encoder/layer_0/attention/self/query", "encoder/layer_0/attention/self/value",
      "encoder/layer_1/attention/self/query", "encoder/layer_1/attention/self/value"]


def test_bad_targets_and_ranks_are_refused_before_compute(tiny_model_dir):
  config, params, _ = _model(tiny_model_dir)
  with pytest.raises(lora.LoraError, match="matches no Dense layer"):
    lora.targets(params, config, "encoder/layer_9/.*")
  with pytest.raises(lora.LoraError, match="not a Dense layer"):
    lora.targets(params, config, "encoder/embeddings/LayerNorm")
  with pytest.raises(lora.LoraError, match="exceeds layer"):
    lora.init_adapters(params, config, lora.LoraSpec(r=33), jax.random.key(0))


def test_init_as_peft_starts_at_the_base_model(tiny_model_dir):
  config, params, _ = _model(tiny_model_dir)
  spec = lora.LoraSpec(target="attention+ffn", r=4, alpha=8)
  adapters = lora.init_adapters(params, config, spec, jax.random.key(0))
  a = np.asarray(adapters["encoder/layer_0/intermediate/dense"]["a"])
  assert a.shape == (32, 4) and np.abs(a).max() <= 1 / np.sqrt(32) and np.abs(a).std() > 0.05
  assert all(not np.asarray(ab["b"]).any() for ab in adapters.values())
  merged = lora.merge(params, adapters, spec)
  for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
    np.testing.assert_array_equal(x, y)
  assert lora.count(adapters) == 2 * (4 * 4 * (32 + 32) + 2 * 4 * (32 + 64))  # r (in + out) each
  assert spec.scale == 2.0 and lora.LoraSpec(r=4, alpha=8, rslora=True).scale == 4.0


@pytest.mark.parametrize("arch", ["bert", "mpnet"])
def test_applied_adapters_equal_merged_weights_in_value_and_adapter_gradient(arch, tiny_model_dir,
                                                                           tiny_mpnet_dir):
  """Training's unmerged branch (x W + s x A B) against the merged kernel W + s A B: the same
  embeddings and the same gradients w.r.t. A and B; dropout on the adapter input in training
  only."""
  from embed_jax.models import SentenceEncoder
  config, params, spec, adapters, ids, mask = _adapted(
      tiny_model_dir if arch == "bert" else tiny_mpnet_dir)
  module = SentenceEncoder(config)

  def merged(ad):
    return module.apply({"params": lora.merge(params, ad, spec)}, ids, mask).sum()

  def unmerged(ad, s=spec, train=False):
    with lora.applied(ad, s, train):
      kw = {"rngs": {"dropout": jax.random.key(1)}, "deterministic": False} if train else {}
      return module.apply({"params": params}, ids, mask, **kw)

  np.testing.assert_allclose(unmerged(adapters), module.apply(
      {"params": lora.merge(params, adapters, spec)}, ids, mask), atol=1e-5)
  g_merged = jax.grad(merged)(adapters)
  g_applied = jax.grad(lambda ad: unmerged(ad).sum())(adapters)
  for x, y in zip(jax.tree.leaves(g_applied), jax.tree.leaves(g_merged)):
    np.testing.assert_allclose(x, y, atol=1e-4, rtol=1e-4)
  assert np.abs(np.asarray(jax.tree.leaves(g_applied)[0])).max() > 0
  # adapter-input dropout: a different output in training, none at inference
  module = SentenceEncoder(dataclasses.replace(config, hidden_dropout=0.0, attention_dropout=0.0))
  dropped = lora.LoraSpec(target="attention+ffn", r=4, alpha=8, dropout=0.5)
  np.testing.assert_allclose(unmerged(adapters, spec, True), unmerged(adapters), atol=1e-6)
  assert np.abs(np.asarray(unmerged(adapters, dropped, True) - unmerged(adapters))).max() > 1e-3
  np.testing.assert_allclose(unmerged(adapters, dropped), unmerged(adapters), atol=1e-6)
  with pytest.raises(lora.LoraError, match="applied no adapter at 'encoder/nowhere'"):
    unmerged({**adapters, "encoder/nowhere": next(iter(adapters.values()))})


def test_merging_chosen_adapters_in_the_step_keeps_values_and_gradients(tiny_model_dir):
  """lora.trained with merge_in_step="ffn": the feed-forward adapters merged into their (frozen)
  kernels, the attention ones beside them; the same embeddings and A/B gradients as all beside,
  no gradient to the base; bad patterns and dropout refused."""
  import jax.numpy as jnp
  from embed_jax.models import SentenceEncoder
  config, params, spec, adapters, ids, mask = _adapted(tiny_model_dir)
  module = SentenceEncoder(config)
  frozen = jax.lax.stop_gradient

  def loss(p, ad, s):
    with lora.trained(jax.tree.map(frozen, p), ad, s) as base:
      out = module.apply({"params": base}, ids, mask)
    return (out * jnp.arange(out.shape[-1])).sum()

  merged_ffn = dataclasses.replace(spec, merge_in_step="ffn")
  assert sorted(merged_ffn.merged_in_step(adapters)) == sorted(
      p for p in adapters if "intermediate" in p or p.endswith("/output/dense")
      and "attention" not in p)
  assert len(merged_ffn.merged_in_step(adapters)) == 4
  with lora.trained(params, adapters, merged_ffn) as base:  # merged there, untouched elsewhere
    k = "encoder/layer_0/intermediate/dense/kernel"
    np.testing.assert_allclose(hf._get(base, k), hf._get(lora.merge(params, adapters, spec), k),
                               atol=1e-6)
    assert np.abs(hf._get(base, k) - hf._get(params, k)).max() > 1e-3
    q = "encoder/layer_0/attention/self/query/kernel"
    np.testing.assert_array_equal(hf._get(base, q), hf._get(params, q))
    module.apply({"params": base}, ids, mask)  # (an adapter left unapplied is an error)
  ref, (_, g_ref) = jax.value_and_grad(loss, argnums=(0, 1))(params, adapters, spec)
  val, (g_base, g) = jax.value_and_grad(loss, argnums=(0, 1))(params, adapters, merged_ffn)
  np.testing.assert_allclose(val, ref, rtol=1e-5)
  for path in adapters:
    for k in ("a", "b"):
      np.testing.assert_allclose(g[path][k], g_ref[path][k], atol=1e-4, rtol=1e-4)
  assert np.abs(np.asarray(g["encoder/layer_0/intermediate/dense"]["a"])).max() > 0
  assert not any(np.asarray(x).any() for x in jax.tree.leaves(g_base))
  with pytest.raises(lora.LoraError, match="matches no adapted layer"):
    dataclasses.replace(spec, merge_in_step="pooler/.*").merged_in_step(adapters)
  with pytest.raises(lora.LoraError, match="set lora.dropout=0"):
    dataclasses.replace(spec, merge_in_step="ffn", dropout=0.1).merged_in_step(adapters)


@pytest.mark.parametrize("arch", ["bert", "mpnet"])
def test_exported_adapter_loads_in_peft_and_embeds_as_embed_jax(arch, tiny_model_dir,
                                                               tiny_mpnet_dir, tmp_path):
  import torch
  from peft import PeftModel
  from sentence_transformers import SentenceTransformer
  folder = tiny_model_dir if arch == "bert" else tiny_mpnet_dir
  config, params, tok = _model(folder)
  spec = lora.LoraSpec(target="attention+ffn", r=4, alpha=8)
  adapters = _trained_like(lora.init_adapters(params, config, spec, jax.random.key(0)))
  merged = lora.merge(params, adapters, spec)
  texts = varied_texts()
  ours = Embedder(config, merged, tok).encode(texts, batch_size=16)
  out = lora.export_peft(adapters, config, spec, tmp_path / "adapter", base_model=str(folder),
                         fingerprint="fp")
  st = SentenceTransformer(str(folder), device="cpu")
  base = st.encode(texts, convert_to_numpy=True)
  assert np.abs(base - ours).max() > 1e-3  # the adapter changes the embeddings
  st[0].auto_model = PeftModel.from_pretrained(st[0].auto_model, str(out))
  with torch.no_grad():
    theirs = st.encode(texts, convert_to_numpy=True, batch_size=16)
  assert np.abs(theirs - ours).max() <= 1e-5
  # The merged export is a plain sentence-transformers folder that embeds the same.
  export(merged, config, tok, tmp_path / "merged")
  again = SentenceTransformer(str(tmp_path / "merged"), device="cpu").encode(texts, convert_to_numpy=True)
  assert np.abs(again - ours).max() <= 1e-5
  # And the adapter reads back into embed_jax unchanged.
  back, back_spec = lora.import_peft(out, config, fingerprint="fp")
  assert back_spec.r == 4 and back_spec.scale == spec.scale and set(back) == set(adapters)
  for p in adapters:
    np.testing.assert_array_equal(back[p]["b"], adapters[p]["b"])
  with pytest.raises(lora.LoraError, match="another base model"):
    lora.import_peft(out, config, fingerprint="other")


def test_a_peft_made_adapter_imports_into_embed_jax(tiny_model_dir, tmp_path):
  import torch
  from peft import LoraConfig, get_peft_model
  from sentence_transformers import SentenceTransformer
  config, params, tok = _model(tiny_model_dir)
  st = SentenceTransformer(str(tiny_model_dir), device="cpu")
  torch.manual_seed(0)
  peft_model = get_peft_model(st[0].auto_model, LoraConfig(r=2, lora_alpha=6,
                                                           target_modules=["query", "value", "dense"]))
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_B" in name:
        p.normal_(0, 0.3)
  peft_model.save_pretrained(str(tmp_path / "peft"))
  st[0].auto_model = peft_model
  texts = varied_texts()[:16]
  with torch.no_grad():
    theirs = st.encode(texts, convert_to_numpy=True)
  adapters, spec = lora.import_peft(tmp_path / "peft", config)
  assert len(adapters) >= 2 * (2 + 3)  # query, value and the three "dense" layers per layer
  ours = Embedder(config, lora.merge(params, adapters, spec), tok).encode(texts)
  assert np.abs(theirs - ours).max() <= 1e-5
  # A folder whose tensors name layers this model lacks is refused.
  cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert cfg["r"] == 2
  from safetensors.numpy import load_file, save_file
  state = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
  state = {k.replace("layer.1.", "layer.7."): v for k, v in state.items()}
  save_file(state, str(tmp_path / "peft" / "adapter_model.safetensors"))
  with pytest.raises(lora.LoraError, match="adapts no Dense layer"):
    lora.import_peft(tmp_path / "peft", config)


# ---- training ----


def _lora_run(runner_name, devices, chunk=0):
  """(losses, final params) of two MNRL steps with rank-4 adapters on attention + FFN."""
  from tests.test_train import batch_shards, runner_model_config, synthetic_batch
  from configs import scifact_mnrl
  from embed_jax import train as T
  from embed_jax.models import SentenceEncoder
  from embed_jax.objective import build_objective
  from embed_jax.testing import init_params
  cfg = runner_model_config()
  c = scifact_mnrl.get_config()
  c.dropout = False
  c.train.grad_cache_chunk = chunk
  c.lora.r, c.lora.target, c.optim.freeze, c.optim.lr = 4, "attention+ffn", "encoder/.*", 1e-2
  params = init_params(cfg)
  spec = lora.LoraSpec.from_config(c.lora)
  params = {**params, "lora": lora.nest(lora.init_adapters(params, cfg, spec, jax.random.key(1)))}
  start = jax.tree.map(np.array, params)  # a copy: the runner donates the state it is given
  tx, schedule = T.make_optimizer(c.optim, 10)
  step = T.make_train_step(SentenceEncoder(cfg), build_objective(c), c, tx, schedule,
                           "batch" if runner_name == "pmap" else None,
                           batch_shards(runner_name, devices))
  runner = T.make_runner(runner_name, step, devices)
  state = runner.put_state(T.init_state(params, tx, 0))
  losses = []
  for s in range(2):
    state, m = runner.step(state, synthetic_batch(seed=s))
    losses.append(float(m["loss"]))
  final = runner.get_state(state)
  assert not jax.tree.leaves(final.opt_state[1].inner_states["frozen"])  # no state for the base
  return losses, jax.tree.map(np.asarray, final.params), start


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_lora_training_moves_only_the_adapters_and_agrees_across_runners_and_grad_cache():
  from tests.test_train import _assert_same
  one = _lora_run("jit", jax.devices()[:1])
  losses, params, start = one
  jax.tree.map(np.testing.assert_array_equal, params["encoder"], start["encoder"])
  assert all(np.abs(ab["b"]).max() > 0 for ab in lora.flat(params["lora"]).values())
  for other in (_lora_run("jit", jax.devices()[:8]), _lora_run("pmap", jax.devices()[:8]),
                _lora_run("jit", jax.devices()[:1], chunk=4)):
    _assert_same(one[:2], other[:2])


def test_lora_smoke_run_checkpoints_adapters_only_resumes_and_exports_peft(tiny_beir, tmp_path):
  import torch
  from peft import PeftModel
  from sentence_transformers import SentenceTransformer
  from embed_jax import train as T
  from tests.test_train import smoke_config
  changes = {"lora.r": 4, "lora.target": "attention", "optim.lr": 1e-2}
  full = T.train(smoke_config(tiny_beir, **changes), tmp_path / "full")
  part = T.train(smoke_config(tiny_beir, **changes), tmp_path / "part", stop_after=3)
  assert part["steps"] == 3
  ckpt = tmp_path / "part" / "checkpoints"
  saved = " ".join(str(p) for p in ckpt.rglob("*"))
  assert "lora" in saved and "word_embeddings" not in saved  # the base is not in checkpoints
  resumed = T.train(smoke_config(tiny_beir, **changes), tmp_path / "part")
  assert resumed["test_ndcg@10"] == pytest.approx(full["test_ndcg@10"], abs=1e-6)
  _, a = hf.load(full["export"])
  _, b = hf.load(resumed["export"])
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a, b)
  # The PEFT folder on the base equals the merged export.
  texts = varied_texts()[:16]
  merged = SentenceTransformer(full["export"], device="cpu").encode(texts, convert_to_numpy=True)
  st = SentenceTransformer(str(tmp_path / "full" / "tiny-model"), device="cpu")
  st[0].auto_model = PeftModel.from_pretrained(st[0].auto_model, str(tmp_path / "full" / "adapter"))
  with torch.no_grad():
    peft_out = st.encode(texts, convert_to_numpy=True)
  assert np.abs(peft_out - merged).max() <= 1e-5
  base = SentenceTransformer(str(tmp_path / "full" / "tiny-model"), device="cpu").encode(texts)
  assert np.abs(base - merged).max() > 1e-4  # training moved the adapters


def test_real_minilm_adapter_in_peft_and_through_embed_jax_load(minilm_dir, tmp_path):
  """all-MiniLM-L6-v2 with a rank-8 adapter on attention + FFN: PEFT on sentence-transformers,
  embed_jax's merged weights and `embed_jax.load(adapter folder)` embed 64 texts alike."""
  import torch
  from peft import PeftModel
  from sentence_transformers import SentenceTransformer

  import embed_jax
  from embed_jax.evaluate import model_fingerprint
  base = embed_jax.load(minilm_dir)
  spec = lora.LoraSpec(target="attention+ffn", r=8, alpha=16)
  adapters = _trained_like(lora.init_adapters(base.params, base.config, spec, jax.random.key(3)),
                           seed=2)
  adapters = {p: {"a": ab["a"], "b": ab["b"] * 0.1} for p, ab in adapters.items()}
  texts = varied_texts()
  ours = Embedder(base.config, lora.merge(base.params, adapters, spec), base.tokenizer).encode(texts)
  out = lora.export_peft(adapters, base.config, spec, tmp_path / "adapter",
                         base_model=str(minilm_dir), fingerprint=model_fingerprint(base))
  loaded = embed_jax.load(out).encode(texts)
  np.testing.assert_allclose(loaded, ours, atol=1e-6)
  st = SentenceTransformer(str(minilm_dir), device="cpu")
  assert np.abs(st.encode(texts) - ours).max() > 1e-3
  st[0].auto_model = PeftModel.from_pretrained(st[0].auto_model, str(out))
  with torch.no_grad():
    theirs = st.encode(texts, convert_to_numpy=True)
  assert np.abs(theirs - ours).max() <= 1e-5
  other = json.loads((out / "embed_jax_adapter.json").read_text())
  other["base_fingerprint"] = "0" * 64
  (out / "embed_jax_adapter.json").write_text(json.dumps(other))
  with pytest.raises(lora.LoraError, match="another base model"):
    embed_jax.load(out)
