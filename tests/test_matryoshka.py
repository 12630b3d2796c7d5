"""Matryoshka losses: the wrapper equals the hand-computed weighted sum, gradients reach every
prefix, dims are validated, and the prefix self-distillation loss matches numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embed_jax import losses
from tests.test_losses import np_mnrl

RNG = np.random.default_rng(0)


def _emb(*shape):
  return jnp.asarray(RNG.normal(size=shape), jnp.float32)


def test_matryoshka_mnrl_equals_the_weighted_sum_of_prefix_losses():
  q, p, n = _emb(6, 16), _emb(6, 16), _emb(6, 2, 16)
  dims, weights = (4, 16, 8), (0.5, 1.0, 2.0)  # any order
  got, per_dim = losses.matryoshka(losses.mnrl, dims, weights)(q, p, n, scale=20.0)
  each = {d: np_mnrl(np.asarray(q)[:, :d], np.asarray(p)[:, :d], np.asarray(n)[..., :d])
          for d in dims}
  np.testing.assert_allclose(got, sum(w * each[d] for d, w in zip(dims, weights)), rtol=1e-5)
  assert sorted(per_dim) == sorted(dims)
  for d in dims:
    np.testing.assert_allclose(per_dim[d], each[d], rtol=1e-5)


@pytest.mark.parametrize("loss, args", [
    (losses.triplet, lambda: (_emb(5, 8), _emb(5, 8), _emb(5, 8))),
    (losses.cosent, lambda: (_emb(5, 8), _emb(5, 8))),
])
def test_matryoshka_wraps_any_embedding_loss(loss, args):
  embs = args()
  kw = {"labels_B": jnp.arange(5.0)} if loss is losses.cosent else {}
  got, _ = losses.matryoshka(loss, (8, 2))(*embs, **kw)
  want = loss(*(e[:, :8] for e in embs), **kw) + loss(*(e[:, :2] for e in embs), **kw)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_gradients_reach_every_prefix():
  q, p = _emb(6, 16), _emb(6, 16)
  dims = (2, 4, 16)
  g_q = jax.grad(lambda q: losses.matryoshka(losses.mnrl, dims)(q, p)[0])(q)
  for lo, hi in ((0, 2), (2, 4), (4, 16)):
    assert float(jnp.abs(g_q[:, lo:hi]).sum()) > 0, (lo, hi)
  # Only the prefix up to 4: dims 4..16 get no gradient.
  g_small = jax.grad(lambda q: losses.matryoshka(losses.mnrl, (2, 4))(q, p)[0])(q)
  assert float(jnp.abs(g_small[:, 4:]).sum()) == 0


@pytest.mark.parametrize("dims, weights, message", [
    ((64, 0), (), r"\[0\] are not integers in 1..64"),
    ((64, 128), (), r"\[128\] are not integers in 1..64"),
    ((64, 32, 64), (), "repeat a value"),
    ((64, 32), (1.0,), "1 matryoshka weights for 2 dims"),
    ((64, 32.0), (), "not integers"),
])
def test_bad_dims_are_refused(dims, weights, message):
  with pytest.raises(ValueError, match=message):
    losses.check_matryoshka_dims(dims, 64, weights)


def _np_self_distill(e, dims, target, pairwise, topk, k):
  b = len(e)
  cos = lambda x: (lambda u: u @ u.T)(x / np.linalg.norm(x, axis=1, keepdims=True))  # noqa: E731
  t = cos(target)
  off = ~np.eye(b, dtype=bool)
  near = np.zeros((b, b), bool)
  for i in range(b):
    order = [j for j in np.argsort(-t[i], kind="stable") if j != i][:k]
    near[i, order] = True
  total = 0.0
  for d in dims:
    gap = np.abs(cos(e[:, :d]) - t)
    total += pairwise * gap[off].mean() + topk * gap[near].mean()
  return total


@pytest.mark.parametrize("with_target", [False, True])
def test_prefix_self_distillation_matches_numpy(with_target):
  e = RNG.normal(size=(7, 12)).astype(np.float32)
  target = RNG.normal(size=(7, 12)).astype(np.float32) if with_target else None
  got = losses.prefix_self_distillation(jnp.asarray(e), (3, 6, 12), target_BxD=target,
                                        pairwise=0.5, topk=2.0, k=3)
  want = _np_self_distill(e, (3, 6, 12), e if target is None else target, 0.5, 2.0, 3)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_prefix_self_distillation_is_zero_when_prefixes_carry_everything_and_masks_padding():
  e = np.zeros((6, 8), np.float32)
  e[:, :3] = RNG.normal(size=(6, 3))
  assert float(losses.prefix_self_distillation(jnp.asarray(e), (3, 5, 8))) < 1e-6
  # A padded row (garbage, even NaN) changes nothing.
  x = RNG.normal(size=(6, 8)).astype(np.float32)
  padded = np.concatenate([x, np.full((1, 8), np.nan, np.float32)])
  valid = np.arange(7) < 6
  a = losses.prefix_self_distillation(jnp.asarray(x), (2, 4), k=2)
  b = losses.prefix_self_distillation(jnp.asarray(padded), (2, 4), k=2, valid_B=valid)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  g = jax.grad(lambda e: losses.prefix_self_distillation(e, (2, 4), k=2, valid_B=valid))(padded)
  assert np.isfinite(np.asarray(g)).all()


# ---- in the train step: runners and gradient caching agree, per-dim metrics ----

from embed_jax import train as T  # noqa: E402
from embed_jax.testing import init_params, tiny_config  # noqa: E402
from embed_jax.models import heads  # noqa: E402
from tests.test_train import _assert_same, batch_shards, make_step, needs_8, smoke_config, synthetic_batch  # noqa: E402


def _mrl_config(chunk=0, runner="jit"):
  from configs import scifact_mnrl
  c = scifact_mnrl.get_config()
  c.dropout = False
  c.matryoshka.dims = (32, 8, 16)
  c.matryoshka.weights = (1.0, 2.0, 0.5)
  c.matryoshka.layers = (1,)
  c.matryoshka.layer_weight = 0.5
  c.matryoshka.self_distill.weight = 0.5
  c.matryoshka.self_distill.k = 3
  c.train.grad_cache_chunk = chunk
  c.train.runner = runner
  return c


def _mrl_batch(seed):
  batch = synthetic_batch(seed=seed)
  rng = np.random.default_rng(seed + 100)
  ids = rng.integers(5, 100, (16, 12)).astype(np.int32)
  lengths = rng.integers(2, 13, 16)
  mask = (np.arange(12) < lengths[:, None]).astype(np.int32)
  batch["groups"]["u"] = {"ids": ids * mask, "mask": mask}
  batch["inputs"]["u"] = {"valid_B": np.ones(16, bool)}
  return batch


def _mrl_run(runner_name, devices, chunk=0, steps=2, fsdp=1):
  c = _mrl_config(chunk, runner_name)
  cfg = tiny_config(hidden_dropout=0.0, attention_dropout=0.0)
  tx, schedule = T.make_optimizer(c.optim, total_steps=10)
  axis = "batch" if runner_name == "pmap" else None
  runner = T.make_runner(runner_name, make_step(cfg, c, tx, schedule, axis,
                                                shards=batch_shards(runner_name, devices)),
                         devices, fsdp)
  state = runner.put_state(T.init_state(init_params(cfg), tx, seed=0))
  losses_, metrics = [], None
  for s in range(steps):
    state, metrics = runner.step(state, _mrl_batch(s))
    losses_.append(float(metrics["loss"]))
  return (losses_, jax.tree.map(np.asarray, runner.get_state(state).params)), metrics


@needs_8
def test_mrl_2d_and_self_distillation_agree_across_runners_and_grad_cache():
  one, m = _mrl_run("jit", jax.devices()[:1])
  assert {"mnrl@8", "mnrl@16", "mnrl@32", "mnrl/layer1@8", "self_distill_loss"} <= set(m)
  total = (float(m["mnrl@32"]) + 2 * float(m["mnrl@8"]) + 0.5 * float(m["mnrl@16"])
           + 0.5 * (float(m["mnrl/layer1@32"]) + 2 * float(m["mnrl/layer1@8"])
                    + 0.5 * float(m["mnrl/layer1@16"]))
           + 0.5 * float(m["self_distill_loss"]))
  np.testing.assert_allclose(float(m["loss"]), total, rtol=1e-5)
  _assert_same(one, _mrl_run("pmap", jax.devices()[:8])[0])
  _assert_same(one, _mrl_run("jit", jax.devices()[:1], chunk=4)[0])
  _assert_same(one, _mrl_run("pmap", jax.devices()[:8], chunk=1)[0])


def test_mrl_smoke_run_exports_dims_and_evaluates_each(tiny_beir, tmp_path):
  import json
  c = smoke_config(tiny_beir, **{"matryoshka.dims": (32, 16, 8),
                                 "matryoshka.self_distill.weight": 1.0,
                                 "unlabelled.batch_size": 8,
                                 "matryoshka.self_distill.target": "initial",
                                 "matryoshka.self_distill.k": 2})
  out = T.train(c, tmp_path / "run")
  export = tmp_path / "run" / "export"
  st_cfg = json.loads((export / "config_sentence_transformers.json").read_text())
  assert st_cfg["embed_jax"]["matryoshka_dims"] == [32, 16, 8]
  assert "Matryoshka dimensions trained: 32, 16, 8" in (export / "README.md").read_text()
  rows = json.loads((tmp_path / "run" / "results.json").read_text())["results"]
  assert [r["dims"] for r in rows] == [32, 16, 8]
  assert (tmp_path / "run" / "self_distill_targets.npy").exists()
  lines = (tmp_path / "run" / "metrics.jsonl").read_text()
  assert "self_distill_loss" in lines and "mnrl@8" in lines
  assert 0 <= out["test_ndcg@10"] <= 1


def test_projection_smoke_run_exports_a_dense_head(tiny_beir, tmp_path):
  from embed_jax import hf
  out = T.train(smoke_config(tiny_beir, **{"projection.dim": 8}), tmp_path / "ff")
  config, params = hf.load(out["export"])
  assert config.dense_features == 8 and params["dense"]["kernel"].shape == (32, 8)


@pytest.mark.parametrize("change, message", [
    ({"matryoshka.dims": (16, 64)}, r"\[64\] are not integers in 1..32"),
    ({"matryoshka.dims": (16, 8), "matryoshka.weights": (1.0,)}, "weights has 1 values for 2 dims"),
    ({"matryoshka.self_distill.weight": 1.0}, "self_distill.weight > 0 needs matryoshka.dims"),
    ({"matryoshka.dims": (16,), "matryoshka.self_distill.weight": 1.0,
      "matryoshka.self_distill.target": "teacher"}, "target='teacher'"),
    ({"matryoshka.dims": (16,), "matryoshka.layers": (2,)}, r"layers \[2\] must be < the model's 2"),
    ({"projection.init": "svd"}, "projection.init='svd'"),
    ({"projection.dim": 32, "projection.init": "pca", "projection.pca_texts": 1}, "pca_texts=1"),
])
def test_bad_matryoshka_config_is_refused_before_training(change, message, tiny_beir, tmp_path):
  with pytest.raises(ValueError, match=message):
    T.train(smoke_config(tiny_beir, **change), tmp_path / "bad")
  assert not (tmp_path / "bad" / "checkpoints").exists()


def test_pca_projection_is_a_rotation_that_keeps_full_dim_scores(tiny_beir, tmp_path):
  from embed_jax.embedder import Embedder
  c = smoke_config(tiny_beir, **{"projection.dim": 32, "projection.init": "pca"})
  cfg, params, tok, _ = heads.load_model(c, tmp_path)
  kernel = params["dense"]["kernel"]
  np.testing.assert_allclose(kernel.T @ kernel, np.eye(32), atol=1e-5)
  assert (tmp_path / "pca_projection.npy").exists()
  texts = ["a short one", "another text about cells", "proteins and genes", "x"]
  rotated = Embedder(cfg, params, tok).encode(texts)
  plain_params = {k: v for k, v in params.items() if k != "dense"}
  plain = Embedder(cfg.replace(dense_features=0), plain_params, tok).encode(texts)
  np.testing.assert_allclose(rotated @ rotated.T, plain @ plain.T, atol=1e-5)
  # The leading axes carry the most variance of the corpus embeddings.
  from embed_jax.data import load_beir
  docs = Embedder(cfg, params, tok).encode(load_beir(str(tiny_beir)).corpus_texts(" "))
  var = docs.var(0)
  assert var[:4].sum() >= var[-4:].sum()
  # A resumed run reads the fitted kernel instead of encoding again.
  np.save(tmp_path / "pca_projection.npy", np.eye(32, dtype=np.float32)[:, ::-1].copy())
  _, again, _, _ = heads.load_model(c, tmp_path)
  np.testing.assert_array_equal(again["dense"]["kernel"], np.eye(32)[:, ::-1])
  # Smaller than the model: the leading principal axes only.
  small = smoke_config(tiny_beir, **{"projection.dim": 8, "projection.init": "pca"})
  cfg8, params8, _, _ = heads.load_model(small, tmp_path / "small")
  assert cfg8.embedding_dim == 8
  np.testing.assert_allclose(params8["dense"]["kernel"], kernel[:, :8], atol=1e-5)


def test_scifact_mrl_config_variants():
  from configs import scifact_mrl
  best, nopca = scifact_mrl.get_config(), scifact_mrl.get_config("nopca")
  assert tuple(best.matryoshka.dims) == (384, 256, 128, 64, 32)
  assert (best.projection.dim, best.projection.init) == (384, "pca")
  assert nopca.projection.dim == 0 and nopca.matryoshka.self_distill.weight == 0
  sd = scifact_mrl.get_config("nopca,sd,smoke")
  assert sd.matryoshka.self_distill.weight == 1.0 and sd.smoke and sd.projection.dim == 0
  assert scifact_mrl.get_config("smoke").projection.dim == 32
  with pytest.raises(ValueError, match=r"unknown variant \['pairs'\]"):
    scifact_mrl.get_config("pairs")
