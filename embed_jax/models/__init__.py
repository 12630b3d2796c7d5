"""Flax text encoders and the sentence-embedding pipeline around them."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from embed_jax.models.bert import BertModel
from embed_jax.models.config import ModelConfig
from embed_jax.models.decoder import DecoderModel
from embed_jax.models.mlm import MLMHead
from embed_jax.models.mpnet import MPNetModel
from embed_jax.models.pooling import l2_normalize, pool, splade_pool

# config.json `model_type` -> encoder module
ENCODERS = {"bert": BertModel, "mpnet": MPNetModel, "qwen2": DecoderModel, "qwen3": DecoderModel}


def supported_architectures() -> tuple[str, ...]:
  return tuple(sorted(ENCODERS))


class SentenceEncoder(nn.Module):
  """Transformer -> Pooling -> [Dense] -> [Normalize], the sentence-transformers pipeline.

  `__call__` returns the sentence embedding [B, E]; `encode_tokens` returns token states;
  `token_vectors` a multi-vector model's per-token vectors.
  """
  config: ModelConfig

  def setup(self):
    if self.config.architecture not in ENCODERS:
      raise ValueError(f"architecture {self.config.architecture!r} is not supported; "
                       f"supported: {', '.join(supported_architectures())}")
    self.encoder = ENCODERS[self.config.architecture](self.config)
    cfg = self.config
    # The MLM head's params exist only where `mlm_logits` is used (MLM training, or a checkpoint
    # that has `cls.predictions.*`): sentence embeddings never touch it.
    self.mlm_head = MLMHead(cfg)
    if cfg.dense_features:
      self.dense = nn.Dense(cfg.dense_features, use_bias=cfg.dense_bias, dtype=jnp.float32,
                            param_dtype=cfg.param_dtype)
    if cfg.late_interaction is not None:  # a multi-vector model's token projection
      li = cfg.late_interaction
      self.token_dense = nn.Dense(li.dims, use_bias=li.bias, dtype=jnp.float32,
                                  param_dtype=cfg.param_dtype)
    if cfg.sparse is not None and cfg.sparse.kind == "lexical":  # BGE-M3's sparse_linear
      self.lexical = nn.Dense(1, dtype=jnp.float32, param_dtype=cfg.param_dtype)
    if cfg.classifier is not None:  # a cross-encoder's head (*ForSequenceClassification)
      init = dict(dtype=jnp.float32, param_dtype=cfg.param_dtype,
                  kernel_init=nn.initializers.normal(0.02))  # transformers' initializer_range
      if cfg.architecture == "mpnet":  # MPNetClassificationHead: dense + tanh, then out_proj
        self.classifier_dense = nn.Dense(cfg.hidden_size, **init)
      self.classifier = nn.Dense(cfg.classifier.num_labels, **init)

  def encode_tokens(self, ids_BxL, mask_BxL, *, deterministic: bool = True, all_layers: bool = False):
    return self.encoder(ids_BxL, mask_BxL, deterministic=deterministic, all_layers=all_layers)

  def head(self, pooled_BxP: jnp.ndarray) -> jnp.ndarray:
    """The modules after pooling, before Normalize: the Dense head when the model has one."""
    if not self.config.dense_features:
      return pooled_BxP
    out_BxE = self.dense(pooled_BxP)
    return jnp.tanh(out_BxE) if self.config.dense_activation == "tanh" else out_BxE

  def __call__(self, ids_BxL, mask_BxL, *, deterministic: bool = True,
               normalize: bool | None = None) -> jnp.ndarray:
    """normalize: None follows the model's modules.json; False gives the raw (pooled, Dense)
    vector."""
    hidden_BxLxH = self.encode_tokens(ids_BxL, mask_BxL, deterministic=deterministic)
    emb_BxE = self.head(pool(hidden_BxLxH, mask_BxL, self.config.pooling))
    unit = self.config.normalize if normalize is None else normalize
    return l2_normalize(emb_BxE) if unit else emb_BxE


  def pair_logits(self, ids_BxL, mask_BxL, type_ids_BxL=None, *,
                  deterministic: bool = True) -> jnp.ndarray:
    """A cross-encoder's logits [B, num_labels] float32 of joined (query, document) pairs, as
    transformers' BertForSequenceClassification (the [CLS] pooler, dropout, classifier; token
    type 1 marks the document) or MPNetForSequenceClassification (<s> through dense + tanh and
    out_proj, dropout before each)."""
    from embed_jax.models.bert import _dropout
    cfg = self.config
    rate = cfg.hidden_dropout
    if cfg.architecture == "bert":
      _, pooled_BxH = self.encoder(ids_BxL, mask_BxL, type_ids_BxL, deterministic=deterministic,
                                   pooled=True)
      return self.classifier(_dropout(self, pooled_BxH.astype(jnp.float32), rate, deterministic))
    hidden_BxLxH = self.encoder(ids_BxL, mask_BxL, deterministic=deterministic)
    x_BxH = _dropout(self, hidden_BxLxH[:, 0].astype(jnp.float32), rate, deterministic)
    x_BxH = jnp.tanh(self.classifier_dense(x_BxH))
    return self.classifier(_dropout(self, x_BxH, rate, deterministic))

  def token_vectors(self, ids_BxL, mask_BxL, *, deterministic: bool = True) -> jnp.ndarray:
    """A multi-vector model's output: every token's state through the token projection,
    L2-normalised, [B, L, D] float32 (PyLate's ColBERT). `mask_BxL` is the attention mask."""
    hidden_BxLxH = self.encode_tokens(ids_BxL, mask_BxL, deterministic=deterministic)
    return l2_normalize(self.token_dense(hidden_BxLxH.astype(jnp.float32)))

  def splade_vectors(self, ids_BxL, mask_BxL, *, deterministic: bool = True) -> jnp.ndarray:
    """A SPLADE model's output [B, V] float32: the MLM logits at every real token, through
    log(1 + ReLU(.)) (twice log1p for log1p_relu), max- or sum-pooled over the tokens;
    sentence-transformers' SpladePooling (padding counts as a 0 logit, as there)."""
    head = self.config.sparse
    return splade_pool(self.token_logits(ids_BxL, mask_BxL, deterministic=deterministic),
                       mask_BxL, head.activation, head.pooling)

  def token_logits(self, ids_BxL, mask_BxL, *, deterministic: bool = True) -> jnp.ndarray:
    """The MLM head's vocabulary logits at every token, [B, L, V] float32."""
    hidden_BxLxH = self.encode_tokens(ids_BxL, mask_BxL, deterministic=deterministic)
    table_VxH = self.encoder.variables["params"]["embeddings"]["word_embeddings"]["embedding"]
    return self.mlm_head(hidden_BxLxH, table_VxH)

  def splade_max_logits(self, ids_BxL, mask_BxL) -> jnp.ndarray:
    """[B, V]: each vocabulary entry's highest MLM logit over the real tokens (padding counts as
    0, as in splade_vectors): what SPLADE's max pooling keeps, before the activation."""
    logits_BxLxV = self.token_logits(ids_BxL, mask_BxL)
    return jnp.max(logits_BxLxV * mask_BxL[..., None].astype(logits_BxLxV.dtype), axis=1)

  def lexical_vectors(self, ids_BxL, mask_BxL, special_ids: tuple[int, ...] = (), *,
                      deterministic: bool = True) -> jnp.ndarray:
    """A lexical-weight model's output [B, V] float32 (BGE-M3): ReLU(linear(token state)) per
    token, each vocabulary entry the max weight of its occurrences; padding and `special_ids`
    ([CLS], [SEP], [UNK], [PAD]) weigh nothing."""
    hidden_BxLxH = self.encode_tokens(ids_BxL, mask_BxL, deterministic=deterministic)
    w_BxL = jax.nn.relu(self.lexical(hidden_BxLxH.astype(jnp.float32))[..., 0])
    keep_BxL = (mask_BxL > 0) & ~jnp.isin(ids_BxL, jnp.asarray(special_ids, ids_BxL.dtype))
    w_BxL = jnp.where(keep_BxL, w_BxL, 0.0)
    rows_BxL = jnp.broadcast_to(jnp.arange(ids_BxL.shape[0])[:, None], ids_BxL.shape)
    return jnp.zeros((ids_BxL.shape[0], self.config.vocab_size), jnp.float32).at[
        rows_BxL, ids_BxL].max(w_BxL)

  def mlm_logits(self, ids_BxL, mask_BxL, positions_BxK, *, deterministic: bool = True):
    """Vocabulary logits [B, K, V] at `positions` (the masked tokens), decoder tied to the word
    embeddings (BERT family)."""
    hidden_BxLxH = self.encode_tokens(ids_BxL, mask_BxL, deterministic=deterministic)
    h_BxKxH = jnp.take_along_axis(hidden_BxLxH, positions_BxK[..., None], axis=1)
    table_VxH = self.encoder.variables["params"]["embeddings"]["word_embeddings"]["embedding"]
    return self.mlm_head(h_BxKxH, table_VxH)

  def embed_layers(self, ids_BxL, mask_BxL, layers: tuple[int, ...], *,
                   deterministic: bool = True) -> jnp.ndarray:
    """Raw (unnormalised) embeddings [B, 1 + K, E]: after the last layer (index 0), then after
    each of `layers` (1-based layer counts), each pooled and through the Dense head. One forward
    pass; 2D Matryoshka (sentence-transformers' Matryoshka2dLoss) trains on all of them."""
    states = self.encode_tokens(ids_BxL, mask_BxL, deterministic=deterministic, all_layers=True)
    picks = [states[-1]] + [states[i] for i in layers]
    return jnp.stack([self.head(pool(h, mask_BxL, self.config.pooling)) for h in picks], axis=1)


def abstract_params(config: ModelConfig) -> dict:
  """The params pytree of `config` as ShapeDtypeStructs, without allocating anything."""
  ids_1x8 = jnp.zeros((1, 8), jnp.int32)
  return jax.eval_shape(SentenceEncoder(config).init, jax.random.key(0), ids_1x8, ids_1x8)["params"]


__all__ = ["ModelConfig", "SentenceEncoder", "BertModel", "MPNetModel", "pool", "l2_normalize",
           "supported_architectures", "abstract_params"]
