"""BERT-family encoder in Flax linen (BERT, MiniLM, BGE, E5, GTE checkpoints of `model_type` bert).

Submodule names mirror the Hugging Face module tree, so the name table in `embed_jax.hf` stays a
plain list. Compute runs in `config.dtype`, parameters are stored in `config.param_dtype`;
LayerNorm statistics and the softmax are computed in float32 either way.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from embed_jax.models.config import ModelConfig


def activation(name: str):
  return {
      "gelu": functools.partial(nn.gelu, approximate=False),
      "gelu_new": functools.partial(nn.gelu, approximate=True),
      "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
      "gelu_fast": functools.partial(nn.gelu, approximate=True),
      "relu": nn.relu,
      "silu": nn.silu,
      "swish": nn.silu,
      "tanh": jnp.tanh,
  }[name]


def _dense(cfg: ModelConfig, features: int, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  kernel_init=nn.initializers.normal(0.02), name=name)


def _layer_norm(cfg: ModelConfig, name: str = "LayerNorm") -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32, param_dtype=cfg.param_dtype,
                      name=name)


class DenseLayerNorm(nn.Module):
  """`dense -> dropout -> LayerNorm(x + residual)`: BertSelfOutput and BertOutput."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, residual, deterministic: bool):
    cfg = self.config
    x = _dense(cfg, cfg.hidden_size, "dense")(x)
    x = nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
    return _layer_norm(cfg)(x + residual).astype(cfg.dtype)


class DenseParams(nn.Module):
  """The kernel and bias of a Dense layer, returned rather than applied (for fused projections)."""
  config: ModelConfig
  features: int

  @nn.compact
  def __call__(self, in_features: int):
    cfg = self.config
    kernel = self.param("kernel", nn.initializers.normal(0.02), (in_features, self.features),
                        cfg.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), cfg.param_dtype)
    return kernel, bias


class SelfAttention(nn.Module):
  """Multi-head self-attention with Hugging Face's query/key/value parameters.

  Speed on CPU (benchmarks/encode.py): one fused QKV matmul, heads-major [B, N, L, D] layout for
  the batched matmuls, and the softmax normalised after the value product (one pass fewer over
  the [B, N, L, L] scores) were together 3.5x faster than the textbook einsum form.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxH, bias_Bx1x1xL, deterministic: bool):
    cfg = self.config
    b, l, h = x_BxLxH.shape
    n, d = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    (wq, bq), (wk, bk), (wv, bv) = (DenseParams(cfg, cfg.hidden_size, name=p)(h)
                                    for p in ("query", "key", "value"))
    scale = d ** -0.5  # folded into the query projection
    w_Hx3H = jnp.concatenate([wq * scale, wk, wv], axis=1).astype(cfg.dtype)
    b_3H = jnp.concatenate([bq * scale, bk, bv]).astype(cfg.dtype)
    qkv = (jnp.dot(x_BxLxH.astype(cfg.dtype), w_Hx3H) + b_3H).reshape(b, l, 3, n, d)
    q_BxNxLxD, k_BxNxLxD, v_BxNxLxD = qkv.transpose(2, 0, 3, 1, 4)
    logits_BxNxLxL = jnp.matmul(q_BxNxLxD, k_BxNxLxD.swapaxes(-1, -2),
                                preferred_element_type=jnp.float32) + bias_Bx1x1xL
    # Softmax with the division after the value product: exp(s - max) @ v / sum(exp(s - max)).
    max_BxNxLx1 = jax.lax.stop_gradient(jnp.max(logits_BxNxLxL, axis=-1, keepdims=True))
    weights_BxNxLxL = jnp.exp(logits_BxNxLxL - max_BxNxLx1)
    denom_BxNxLx1 = jnp.sum(weights_BxNxLxL, axis=-1, keepdims=True)
    if not deterministic and cfg.attention_dropout > 0:
      # Dropout on the normalised probabilities equals dropout on the unnormalised weights here.
      weights_BxNxLxL = nn.Dropout(cfg.attention_dropout)(weights_BxNxLxL, deterministic=False)
    ctx_BxNxLxD = jnp.matmul(weights_BxNxLxL.astype(cfg.dtype), v_BxNxLxD,
                             preferred_element_type=jnp.float32) / denom_BxNxLx1
    return ctx_BxNxLxD.astype(cfg.dtype).transpose(0, 2, 1, 3).reshape(b, l, n * d)


class Attention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x, bias, deterministic: bool):
    ctx = SelfAttention(self.config, name="self")(x, bias, deterministic)
    return DenseLayerNorm(self.config, name="output")(ctx, x, deterministic)


class Layer(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x, bias, deterministic: bool):
    cfg = self.config
    x = Attention(cfg, name="attention")(x, bias, deterministic)
    inter = activation(cfg.hidden_act)(IntermediateDense(cfg, name="intermediate")(x))
    return DenseLayerNorm(cfg, name="output")(inter, x, deterministic)


class IntermediateDense(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    return _dense(self.config, self.config.intermediate_size, "dense")(x)


class Embeddings(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, ids_BxL, type_ids_BxL, deterministic: bool):
    cfg = self.config
    embed = lambda n, name: nn.Embed(n, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                     embedding_init=nn.initializers.normal(0.02), name=name)
    pos_L = jnp.arange(ids_BxL.shape[1])
    x = (embed(cfg.vocab_size, "word_embeddings")(ids_BxL)
         + embed(cfg.max_position_embeddings, "position_embeddings")(pos_L)[None]
         + embed(cfg.type_vocab_size, "token_type_embeddings")(type_ids_BxL))
    x = _layer_norm(cfg)(x).astype(cfg.dtype)
    return nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)


class BertModel(nn.Module):
  """Returns token states [B, L, H] (and, with `all_layers`, the list after each layer)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, ids_BxL, mask_BxL, type_ids_BxL=None, *, deterministic: bool = True,
               all_layers: bool = False):
    cfg = self.config
    if type_ids_BxL is None:
      type_ids_BxL = jnp.zeros_like(ids_BxL)
    # Padding keys get the most negative finite value, as transformers does.
    bias_Bx1x1xL = jnp.where(mask_BxL[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
    x = Embeddings(cfg, name="embeddings")(ids_BxL, type_ids_BxL, deterministic)
    states = [x]
    for i in range(cfg.num_layers):
      x = Layer(cfg, name=f"layer_{i}")(x, bias_Bx1x1xL, deterministic)
      states.append(x)
    if cfg.add_pooler and self.is_initializing():
      # The [CLS] pooler (dense + tanh) is not used by sentence embeddings; it is created so that a
      # checkpoint's pooler weights are kept and exported unchanged.
      jnp.tanh(_dense(cfg, cfg.hidden_size, "pooler")(x[:, 0]))
    return states if all_layers else x
