"""Causal-decoder encoders in Flax linen: the Qwen2 / Qwen3 family (Qwen3-Embedding, gte-Qwen2).

Pre-norm layers: RMSNorm -> self-attention (rotary position embeddings, grouped-query attention:
fewer key/value heads than query heads, each shared by a group; Qwen2's query/key/value biases,
Qwen3's RMSNorm of each query and key head) -> residual -> RMSNorm -> SwiGLU feed-forward ->
residual; a final RMSNorm. Attention is causal and skips padding. Submodule names mirror the
Hugging Face module tree (`embed_tokens`, `layers_<i>/self_attn/q_proj`, ...), so the name table
in `embed_jax.hf` stays a plain list.

Positions count from 0 at the first token of each (right-padded) row. transformers counts from 0
at the first position of a left-padded batch instead; rotary embeddings make attention depend on
position differences only, so the two agree. Compute runs in `config.dtype`, parameters are
stored in `config.param_dtype`; RMSNorm statistics, rotary angles and the softmax are float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from embed_jax.models.attention import attention
from embed_jax.models.config import ModelConfig
from embed_jax.models.dropout import keep_mask


class RMSNorm(nn.Module):
  """x / sqrt(mean(x^2) + eps) * weight, the statistics in float32 (transformers' Qwen3RMSNorm)."""
  eps: float
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return weight.astype(jnp.float32) * normed.astype(x.dtype).astype(jnp.float32)


def rotary(x_BxNxLxD, positions_L, theta: float):
  """Rotary position embedding of the query or key heads (rotate_half layout, as transformers)."""
  d = x_BxNxLxD.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  freqs_LxD2 = positions_L.astype(jnp.float32)[:, None] * inv_freq[None]
  angles_LxD = jnp.concatenate([freqs_LxD2, freqs_LxD2], axis=-1)
  cos, sin = jnp.cos(angles_LxD).astype(x_BxNxLxD.dtype), jnp.sin(angles_LxD).astype(x_BxNxLxD.dtype)
  half = d // 2
  rotated = jnp.concatenate([-x_BxNxLxD[..., half:], x_BxNxLxD[..., :half]], axis=-1)
  return x_BxNxLxD * cos + rotated * sin


class SelfAttention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxH, bias_Bx1xLxL, deterministic: bool):
    cfg, dec = self.config, self.config.decoder
    b, l, _ = x_BxLxH.shape
    n, kv, d = cfg.num_heads, dec.num_kv_heads, dec.head_dim
    dense = lambda f, name, bias: nn.Dense(  # noqa: E731
        f, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=nn.initializers.normal(0.02), name=name)
    x_BxLxH = x_BxLxH.astype(cfg.dtype)

    def heads(name: str, count: int):
      y = dense(count * d, name, dec.qkv_bias)(x_BxLxH).reshape(b, l, count, d)
      if dec.qk_norm and name != "v_proj":  # Qwen3: RMSNorm of each query and key head
        y = RMSNorm(cfg.layer_norm_eps, cfg.param_dtype, name=f"{name[0]}_norm")(y).astype(cfg.dtype)
      return y.transpose(0, 2, 1, 3)

    positions_L = jnp.arange(l)
    q_BxNxLxD = rotary(heads("q_proj", n), positions_L, dec.rope_theta) * (d ** -0.5)
    k_BxKxLxD = rotary(heads("k_proj", kv), positions_L, dec.rope_theta)
    v_BxKxLxD = heads("v_proj", kv)
    if kv != n:  # grouped-query attention: each key/value head serves n / kv query heads
      k_BxKxLxD = jnp.repeat(k_BxKxLxD, n // kv, axis=1)
      v_BxKxLxD = jnp.repeat(v_BxKxLxD, n // kv, axis=1)
    keep, rate = None, 0.0
    if not deterministic and cfg.attention_dropout > 0:
      rate = cfg.attention_dropout
      keep = keep_mask(self.make_rng("dropout"), 1.0 - rate, (b, n, l, l))
    ctx_BxNxLxD = attention(q_BxNxLxD, k_BxKxLxD, v_BxKxLxD, bias_Bx1xLxL, keep, rate)
    ctx_BxLxND = ctx_BxNxLxD.astype(cfg.dtype).transpose(0, 2, 1, 3).reshape(b, l, n * d)
    return dense(cfg.hidden_size, "o_proj", dec.o_bias)(ctx_BxLxND)


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dense = lambda f, name: nn.Dense(f, use_bias=False, dtype=cfg.dtype,  # noqa: E731
                                     param_dtype=cfg.param_dtype,
                                     kernel_init=nn.initializers.normal(0.02), name=name)
    x = x.astype(cfg.dtype)
    return dense(cfg.hidden_size, "down_proj")(
        nn.silu(dense(cfg.intermediate_size, "gate_proj")(x)) * dense(cfg.intermediate_size, "up_proj")(x))


class Layer(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x, bias, deterministic: bool):
    cfg = self.config
    norm = lambda name: RMSNorm(cfg.layer_norm_eps, cfg.param_dtype, name=name)  # noqa: E731
    x = x + SelfAttention(cfg, name="self_attn")(norm("input_layernorm")(x).astype(cfg.dtype),
                                                 bias, deterministic).astype(jnp.float32)
    return x + MLP(cfg, name="mlp")(norm("post_attention_layernorm")(x)).astype(jnp.float32)


class DecoderModel(nn.Module):
  """Returns the final-normed token states [B, L, H] (and, with `all_layers`, the list after each
  layer, the last one normed). The residual stream is kept in float32."""
  config: ModelConfig

  @nn.compact
  def __call__(self, ids_BxL, mask_BxL, type_ids_BxL=None, *, deterministic: bool = True,
               all_layers: bool = False):
    cfg = self.config
    l = ids_BxL.shape[1]
    x = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                 embedding_init=nn.initializers.normal(0.02), name="embed_tokens")(ids_BxL)
    x = x.astype(jnp.float32)
    # Causal and padding: a query attends to real keys at or before its position.
    allowed_BxLxL = (jnp.tril(jnp.ones((l, l), bool))[None]) & (mask_BxL[:, None, :] > 0)
    bias_Bx1xLxL = jnp.where(allowed_BxLxL, 0.0, jnp.finfo(jnp.float32).min)[:, None]
    states = [x]
    for i in range(cfg.num_layers):
      x = Layer(cfg, name=f"layers_{i}")(x, bias_Bx1xLxL, deterministic)
      states.append(x)
    x = RMSNorm(cfg.layer_norm_eps, cfg.param_dtype, name="norm")(x)
    states[-1] = x
    return states if all_layers else x
