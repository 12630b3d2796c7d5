"""MPNet encoder in Flax linen (sentence-transformers/all-mpnet-base-v2: `model_type` mpnet).

Three differences from BERT: position ids are made from the token ids (real tokens count up from
padding_idx + 1 = 2, padding gets padding_idx); there are no token types; and one learned relative
position bias, shared by all layers, is added to every layer's attention logits. The blocks are
BERT's (`embed_jax.models.bert`) under MPNet's Hugging Face names, so the name table in
`embed_jax.hf` stays a plain list. transformers' `modeling_mpnet.py` is the reference.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from embed_jax.models.bert import Layer, SelfAttention, _dense, _dropout, _layer_norm
from embed_jax.models.config import MPNET_BUCKETS, ModelConfig

PADDING_IDX = 1  # transformers' MPNetEmbeddings fixes it to 1, whatever config.pad_token_id says
MAX_DISTANCE = 128  # relative distances from here on share the last bucket of their direction


def relative_position_buckets(length: int, num_buckets: int = MPNET_BUCKETS,
                              max_distance: int = MAX_DISTANCE) -> np.ndarray:
  """int32 [L, L]: the bias bucket of key j as seen from query i (T5-style, bidirectional).

  Half the buckets are for keys to the left, half for keys to the right; within a half, distances
  below a quarter of the buckets have a bucket each, longer ones share log-spaced buckets up to
  `max_distance`. It depends only on the (static) length, so it is a numpy constant at trace time;
  float32 as in transformers, so that distances on a bucket boundary round the same way.
  """
  dist_LxL = np.arange(length)[:, None] - np.arange(length)[None, :]  # query - key
  half = num_buckets // 2
  exact = half // 2
  side_LxL = np.where(dist_LxL < 0, half, 0)  # keys right of the query use the upper half
  n_LxL = np.abs(dist_LxL)
  # max(n, 1): no log(0) where the exact branch is taken anyway.
  log_ratio = np.log(np.maximum(n_LxL, 1).astype(np.float32) / np.float32(exact))
  far_LxL = exact + (log_ratio / np.float32(math.log(max_distance / exact))
                     * np.float32(half - exact)).astype(np.int64)
  far_LxL = np.minimum(far_LxL, half - 1)
  return (side_LxL + np.where(n_LxL < exact, n_LxL, far_LxL)).astype(np.int32)


def _embed(cfg: ModelConfig, num: int, features: int, name: str, dtype=None) -> nn.Embed:
  return nn.Embed(num, features, dtype=dtype or cfg.dtype, param_dtype=cfg.param_dtype,
                  embedding_init=nn.initializers.normal(0.02), name=name)


class Embeddings(nn.Module):
  """Word + position embeddings -> LayerNorm -> dropout (MPNetEmbeddings)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, ids_BxL, deterministic: bool):
    cfg = self.config
    # Positions count real tokens from PADDING_IDX + 1; padding (by id, not by mask) gets
    # PADDING_IDX. Right padding leaves the real tokens at 2, 3, ..., as in transformers.
    real_BxL = (ids_BxL != PADDING_IDX).astype(jnp.int32)
    pos_BxL = jnp.cumsum(real_BxL, axis=1) * real_BxL + PADDING_IDX
    x = (_embed(cfg, cfg.vocab_size, cfg.hidden_size, "word_embeddings")(ids_BxL)
         + _embed(cfg, cfg.max_position_embeddings, cfg.hidden_size, "position_embeddings")(pos_BxL))
    x = _layer_norm(cfg)(x).astype(cfg.dtype)
    return _dropout(self, x, cfg.hidden_dropout, deterministic)


class Attention(nn.Module):
  """`attn` (q, k, v and the output projection o) -> dropout -> LayerNorm(x + residual)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, bias_BxNxLxL, deterministic: bool):
    cfg = self.config
    # bias_grad: the bias carries the learned relative positions, which must be trained.
    y = SelfAttention(cfg, names=("q", "k", "v"), out_name="o", bias_grad=True,
                      name="attn")(x, bias_BxNxLxL, deterministic)
    y = _dropout(self, y, cfg.hidden_dropout, deterministic)
    return _layer_norm(cfg)(y + x).astype(cfg.dtype)


class MPNetModel(nn.Module):
  """Returns token states [B, L, H] (and, with `all_layers`, the list after each layer)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, ids_BxL, mask_BxL, *, deterministic: bool = True, all_layers: bool = False):
    cfg = self.config
    l = ids_BxL.shape[1]
    x = Embeddings(cfg, name="embeddings")(ids_BxL, deterministic)
    # One [B, N, L, L] bias for all layers: the padding mask (the most negative finite value, as
    # transformers) plus the relative position bias, looked up once. Its gradient reaches the
    # table through the attention core (bias_grad) and this lookup.
    table = _embed(cfg, cfg.relative_attention_num_buckets, cfg.num_heads, "relative_attention_bias",
                   dtype=jnp.float32)
    rel_1xNxLxL = table(relative_position_buckets(l)).transpose(2, 0, 1)[None]
    mask_Bx1x1xL = jnp.where(mask_BxL[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
    bias_BxNxLxL = mask_Bx1x1xL + rel_1xNxLxL
    states = [x]
    for i in range(cfg.num_layers):
      x = Layer(cfg, attention=Attention, name=f"layer_{i}")(x, bias_BxNxLxL, deterministic)
      states.append(x)
    if cfg.add_pooler and self.is_initializing():
      # The [CLS] pooler (dense + tanh) is not used by sentence embeddings; it is created so that a
      # checkpoint's pooler weights are kept and exported unchanged.
      jnp.tanh(_dense(cfg, cfg.hidden_size, "pooler")(x[:, 0]))
    return states if all_layers else x
