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

from embed_jax.models.attention import attention
from embed_jax.models.config import ModelConfig
from embed_jax.models.dropout import dropout, keep_mask


@jax.custom_jvp
def gelu_exact(x):
  """Exact GELU, x * Phi(x), as nn.gelu(approximate=False), with a hand-written derivative.

  Autodiff of nn.gelu differentiates XLA:CPU's erfc expansion (an exp and two selects, kept as
  residuals); the derivative Phi(x) + x * phi(x) through erf is one polynomial and one exp. The
  primal stays nn.gelu: with erf there, XLA fuses the whole feed-forward block into one slower
  YNNPACK call.
  """
  return nn.gelu(x, approximate=False)


@gelu_exact.defjvp
def _gelu_exact_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  cdf = 0.5 * (1.0 + jax.lax.erf(x * 0.7071067811865476))
  pdf = 0.3989422804014327 * jnp.exp(-0.5 * x * x)
  return gelu_exact(x), (cdf + x * pdf) * dx


def activation(name: str):
  return {
      "gelu": gelu_exact,
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


def _dropout(module: nn.Module, x, rate: float, deterministic: bool):
  """Hidden-state dropout from the module's "dropout" rng stream (`dropout.keep_mask`)."""
  if deterministic or rate <= 0:
    return x
  return dropout(x, rate, module.make_rng("dropout"))


class DenseLayerNorm(nn.Module):
  """`dense -> dropout -> LayerNorm(x + residual)`: BertSelfOutput and BertOutput."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, residual, deterministic: bool):
    cfg = self.config
    x = _dense(cfg, cfg.hidden_size, "dense")(x)
    x = _dropout(self, x, cfg.hidden_dropout, deterministic)
    return _layer_norm(cfg)(x + residual).astype(cfg.dtype)


class Projection(nn.Module):
  """A Dense layer's kernel and bias applied with a scale folded into them: (x W + b) * scale,
  scale being the attention's 1/sqrt(d) for the (small) query weights. A module of its own so
  that LoRA (embed_jax.lora.applied) can add its branch to it as to an nn.Dense."""
  config: ModelConfig
  features: int

  @nn.compact
  def __call__(self, x, scale: float = 1.0):
    cfg = self.config
    kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features),
                        cfg.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), cfg.param_dtype)
    if scale != 1.0:
      kernel, bias = kernel * scale, bias * scale
    return jnp.dot(x, kernel.astype(cfg.dtype)) + bias.astype(cfg.dtype)


class SelfAttention(nn.Module):
  """Multi-head self-attention with Hugging Face's query/key/value parameters.

  Speed on CPU (benchmarks/encode.py, benchmarks/train_step.py): three separate projections, each
  written heads-major [B, N, L, D] (fewer and cheaper layout copies than one fused QKV matmul,
  above all in the backward pass), the softmax normalised after the value product, and the
  attention core's hand-written backward (`embed_jax.models.attention`), which keeps every
  batched matmul in YNNPACK.

  MPNet reuses it with its own parameter names, its output projection inside (`out_name`), and a
  learned bias that needs a gradient (`bias_grad`).
  """
  config: ModelConfig
  names: tuple[str, str, str] = ("query", "key", "value")
  out_name: str | None = None  # a Dense applied to the context under this name (MPNet's "o")
  bias_grad: bool = False  # the bias gets a gradient (False: it is only the padding mask)

  @nn.compact
  def __call__(self, x_BxLxH, bias, deterministic: bool):
    """bias: added to the logits, broadcastable to [B, N, L, L] (BERT: [B, 1, 1, L])."""
    cfg = self.config
    b, l, h = x_BxLxH.shape
    n, d = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    x_BxLxH = x_BxLxH.astype(cfg.dtype)

    def heads(name: str, scale: float = 1.0):
      y_BxLxH = Projection(cfg, cfg.hidden_size, name=name)(x_BxLxH, scale)
      return y_BxLxH.reshape(b, l, n, d).transpose(0, 2, 1, 3)

    q_name, k_name, v_name = self.names
    q_BxNxLxD, k_BxNxLxD, v_BxNxLxD = heads(q_name, d ** -0.5), heads(k_name), heads(v_name)
    keep, rate = None, 0.0
    if not deterministic and cfg.attention_dropout > 0:
      rate = cfg.attention_dropout
      keep = keep_mask(self.make_rng("dropout"), 1.0 - rate, (b, n, l, l))
    ctx_BxNxLxD = attention(q_BxNxLxD, k_BxNxLxD, v_BxNxLxD, bias, keep, rate, self.bias_grad)
    ctx_BxLxH = ctx_BxNxLxD.astype(cfg.dtype).transpose(0, 2, 1, 3).reshape(b, l, n * d)
    if self.out_name is None:
      return ctx_BxLxH
    return _dense(cfg, cfg.hidden_size, self.out_name)(ctx_BxLxH)


class Attention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x, bias, deterministic: bool):
    ctx = SelfAttention(self.config, name="self")(x, bias, deterministic)
    return DenseLayerNorm(self.config, name="output")(ctx, x, deterministic)


class Layer(nn.Module):
  """Attention, then the feed-forward block; `attention` is the architecture's attention module
  (MPNet passes its own)."""
  config: ModelConfig
  attention: type = None  # None: BERT's Attention

  @nn.compact
  def __call__(self, x, bias, deterministic: bool):
    cfg = self.config
    x = (self.attention or Attention)(cfg, name="attention")(x, bias, deterministic)
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
    return _dropout(self, x, cfg.hidden_dropout, deterministic)


class BertModel(nn.Module):
  """Returns token states [B, L, H] (and, with `all_layers`, the list after each layer)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, ids_BxL, mask_BxL, type_ids_BxL=None, *, deterministic: bool = True,
               all_layers: bool = False, pooled: bool = False):
    """pooled: also the [CLS] pooler's output [B, H] (a cross-encoder's): (states, pooled)."""
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
    out = states if all_layers else x
    if cfg.add_pooler and (self.is_initializing() or pooled):
      # The [CLS] pooler (dense + tanh) is not used by sentence embeddings; it is created so that a
      # checkpoint's pooler weights are kept and exported unchanged. A cross-encoder reads it.
      pooled_BxH = jnp.tanh(_dense(cfg, cfg.hidden_size, "pooler")(x[:, 0]))
      if pooled:
        return out, pooled_BxH
    return out
