"""The Flax encoder on a tiny random config: shapes, masking, pooling, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embed_jax.models import ModelConfig, SentenceEncoder, abstract_params, pool
from embed_jax.testing import init_params, tiny_config


def _batch(lengths, pad_to, vocab=100, seed=0):
  rng = np.random.default_rng(seed)
  ids = np.zeros((len(lengths), pad_to), np.int32)
  mask = np.zeros_like(ids)
  for i, n in enumerate(lengths):
    ids[i, :n] = rng.integers(5, vocab, n)
    mask[i, :n] = 1
  return ids, mask


def test_forward_shapes_and_padding_invariance():
  cfg = tiny_config()
  params = init_params(cfg)
  model = SentenceEncoder(cfg)
  ids, mask = _batch([3, 7, 1], 8)
  emb_short = model.apply({"params": params}, ids, mask)
  assert emb_short.shape == (3, cfg.embedding_dim)
  np.testing.assert_allclose(np.linalg.norm(emb_short, axis=1), 1.0, rtol=1e-6)
  # Extra padding, with junk token ids under the mask, changes nothing.
  ids_long = np.pad(ids, ((0, 0), (0, 24)), constant_values=7)
  mask_long = np.pad(mask, ((0, 0), (0, 24)))
  emb_long = model.apply({"params": params}, ids_long, mask_long)
  np.testing.assert_allclose(emb_short, emb_long, atol=1e-6)


def test_pooling_modes_match_numpy():
  rng = np.random.default_rng(1)
  h = rng.normal(size=(2, 5, 4)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  m = mask[..., None]
  mean = (h * m).sum(1) / m.sum(1)
  expected = {
      "cls": h[:, 0],
      "mean": mean,
      "max": np.where(m > 0, h, -np.inf).max(1),
      "mean_sqrt_len_tokens": (h * m).sum(1) / np.sqrt(m.sum(1)),
      "lasttoken": h[[0, 1], [2, 4]],
  }
  for mode, want in expected.items():
    np.testing.assert_allclose(pool(jnp.asarray(h), jnp.asarray(mask), (mode,)), want, rtol=1e-6)
  both = pool(jnp.asarray(h), jnp.asarray(mask), ("cls", "mean"))
  np.testing.assert_allclose(both, np.concatenate([h[:, 0], mean], -1), rtol=1e-6)


def test_dropout_only_in_training():
  cfg = tiny_config()
  params = init_params(cfg)
  model = SentenceEncoder(cfg)
  ids, mask = _batch([6, 6], 8)
  a = model.apply({"params": params}, ids, mask, deterministic=False, rngs={"dropout": jax.random.key(1)})
  b = model.apply({"params": params}, ids, mask, deterministic=False, rngs={"dropout": jax.random.key(2)})
  c = model.apply({"params": params}, ids, mask)
  assert not np.allclose(a, b)
  np.testing.assert_allclose(c, model.apply({"params": params}, ids, mask))


def test_compute_and_param_dtypes_are_separate():
  cfg32 = tiny_config()
  params = init_params(cfg32)
  ids, mask = _batch([5, 8], 8)
  ref = SentenceEncoder(cfg32).apply({"params": params}, ids, mask)
  cfg_bf16 = cfg32.replace(dtype="bfloat16")  # bf16 compute, f32 params (mixed precision)
  out = SentenceEncoder(cfg_bf16).apply({"params": params}, ids, mask)
  assert out.dtype == jnp.float32  # pooled in float32
  np.testing.assert_allclose(out, ref, atol=5e-2)
  shapes = abstract_params(cfg32.replace(param_dtype="bfloat16"))
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype("bfloat16")}


@pytest.mark.parametrize("bad", [dict(hidden_size=30), dict(pooling=("weird",)),
                                 dict(hidden_act="nope"), dict(max_seq_length=1000),
                                 dict(dtype="float33")])
def test_bad_config_values_are_named(bad):
  with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
    ModelConfig(**bad)


def _textbook_attention(q, k, v, bias, keep, rate):
  p = jax.nn.softmax(jnp.matmul(q, k.swapaxes(-1, -2)) + bias, axis=-1)
  return jnp.matmul(p if keep is None else jnp.where(keep, p / (1 - rate), 0.0), v)


@pytest.mark.parametrize("dropout", [False, True])
def test_attention_backward_matches_autodiff(dropout):
  """The hand-written attention backward equals autodiff of softmax(q k^T + bias) v, with
  padded keys and with a dropout mask."""
  from embed_jax.models.attention import attention
  rng = np.random.default_rng(0)
  b, n, l, d = 3, 2, 7, 4
  q, k, v = (jnp.asarray(rng.normal(size=(b, n, l, d)), jnp.float32) for _ in range(3))
  mask = np.ones((b, l), bool)
  mask[1, 4:] = False
  bias = jnp.where(jnp.asarray(mask)[:, None, None, :], 0.0, jnp.finfo(jnp.float32).min)
  keep, rate = (jnp.asarray(rng.random((b, n, l, l)) > 0.3), 0.3) if dropout else (None, 0.0)
  g = jnp.asarray(rng.normal(size=(b, n, l, d)), jnp.float32)
  out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, bias, keep, rate), q, k, v)
  ref, ref_vjp = jax.vjp(lambda q, k, v: _textbook_attention(q, k, v, bias, keep, rate), q, k, v)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  for got, want in zip(vjp(g), ref_vjp(g)):
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_gelu_derivative_matches_autodiff():
  from embed_jax.models.bert import gelu_exact
  import flax.linen as nn
  x = jnp.linspace(-9.0, 9.0, 2001)
  np.testing.assert_allclose(gelu_exact(x), nn.gelu(x, approximate=False), atol=1e-7)
  ours = jax.vmap(jax.grad(gelu_exact))(x)
  ref = jax.vmap(jax.grad(lambda t: nn.gelu(t, approximate=False)))(x)
  np.testing.assert_allclose(ours, ref, atol=2e-6)


def test_dropout_keep_rate_and_independence():
  from embed_jax.models.dropout import dropout, keep_mask
  m = np.asarray(keep_mask(jax.random.key(3), 0.9, (999, 1001)))  # odd size: the last half-word
  assert abs(m.mean() - 0.9) < 1e-3
  assert abs(np.mean(m[:, 1:] & m[:, :-1]) - 0.81) < 1e-3  # neighbours (one 32-bit word) independent
  assert keep_mask(jax.random.key(0), 1.0, (3, 4)).all()
  x = jnp.ones((4000,))
  y = dropout(x, 0.25, jax.random.key(1))
  np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 1 / 0.75], rtol=1e-6)
  assert abs(float(y.mean()) - 1.0) < 0.05
