"""Masked language modelling: BERT's prediction head and the masking, both inside the jitted step.

The head is BertLMPredictionHead: dense -> activation -> LayerNorm -> decoder tied to the word
embeddings, plus a bias. `mask_tokens` chooses round(rate * n) of each row's n maskable tokens
(never special tokens or padding) from a folded-in rng, so the data stay static and the masks
differ per step; of the chosen, 80% become [MASK], 10% a random token, 10% stay. With whole-word
masking every piece of a word shares one random score, so a word is chosen whole (the last word
may be cut at the row's budget). `mlm_rows` returns per-row sums (cross-entropy, masked count,
correct count): the train step treats them like a text group's embeddings, so gradient caching
and both runners work unchanged.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from embed_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
  """Static masking settings (hashable: part of the compiled step)."""
  mask_token_id: int
  special_ids: tuple[int, ...]
  vocab_size: int
  rate: float = 0.15
  whole_word: bool = False


class MLMHead(nn.Module):
  """BertLMPredictionHead; `embedding_VxH` is the (tied) word-embedding table."""
  config: ModelConfig

  @nn.compact
  def __call__(self, h_BxKxH, embedding_VxH):
    from embed_jax.models.bert import activation
    cfg = self.config
    x = nn.Dense(cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                 kernel_init=nn.initializers.normal(0.02), name="dense")(h_BxKxH)
    x = activation(cfg.hidden_act)(x)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32, param_dtype=cfg.param_dtype,
                     name="LayerNorm")(x)
    bias_V = self.param("bias", nn.initializers.zeros, (cfg.vocab_size,), cfg.param_dtype)
    return jnp.matmul(x.astype(cfg.dtype), embedding_VxH.astype(cfg.dtype).T,
                      preferred_element_type=jnp.float32) + bias_V


def budget(length: int, rate: float) -> int:
  """Positions predicted per row of `length` tokens (static): enough for round(rate * length)."""
  return max(1, int(round(rate * length)) + 1)


def mask_tokens(rng, ids_BxL, mask_BxL, spec: MaskingSpec, words_BxL=None, rows_B=None):
  """-> (masked ids [B, L], positions [B, K], labels [B, K], chosen [B, K] bool).

  Row r draws from fold_in(rng, rows_B[r]) (default r): pass each row's index in the global batch
  and the masks are the same whether the batch runs whole, sharded over devices or in gradient-caching
  chunks. words_BxL: for whole-word masking, each token's word index within its row (pieces of one
  word share it); None masks tokens independently.
  """
  b, l = ids_BxL.shape
  k = budget(l, spec.rate)
  rows_B = jnp.arange(b) if rows_B is None else rows_B
  keys_B = jax.vmap(lambda r: jax.random.fold_in(rng, r))(rows_B)
  draws = jax.vmap(lambda key: tuple(jax.random.split(key, 3)))(keys_B)
  k_score, k_kind, k_random = draws
  special_BxL = jnp.isin(ids_BxL, jnp.asarray(spec.special_ids, ids_BxL.dtype))
  maskable_BxL = (mask_BxL > 0) & ~special_BxL
  score_BxL = jax.vmap(lambda key: jax.random.uniform(key, (l,)))(k_score)
  if spec.whole_word and words_BxL is not None:
    score_BxL = jnp.take_along_axis(score_BxL, jnp.clip(words_BxL, 0, l - 1), axis=1)
    score_BxL = score_BxL + 1e-6 * jnp.arange(l) / l  # a word's pieces stay together, in order
  score_BxL = jnp.where(maskable_BxL, score_BxL, -1.0)
  _, positions_BxK = jax.lax.top_k(score_BxL, k)
  n_B = jnp.round(spec.rate * jnp.sum(maskable_BxL, axis=1)).astype(jnp.int32)
  chosen_BxK = (jnp.arange(k)[None, :] < n_B[:, None]) & jnp.take_along_axis(
      maskable_BxL, positions_BxK, axis=1)
  labels_BxK = jnp.take_along_axis(ids_BxL, positions_BxK, axis=1)
  kind_BxK = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(k_kind)
  random_BxK = jax.vmap(lambda key: jax.random.randint(key, (k,), 0, spec.vocab_size,
                                                      ids_BxL.dtype))(k_random)
  new_BxK = jnp.where(kind_BxK < 0.8, jnp.asarray(spec.mask_token_id, ids_BxL.dtype),
                      jnp.where(kind_BxK < 0.9, random_BxK, labels_BxK))
  new_BxK = jnp.where(chosen_BxK, new_BxK, labels_BxK)
  rows_BxK = jnp.broadcast_to(jnp.arange(b)[:, None], (b, k))
  masked_BxL = ids_BxL.at[rows_BxK, positions_BxK].set(new_BxK)
  return masked_BxL, positions_BxK, labels_BxK, chosen_BxK


def mlm_rows(module, params, ids_BxL, mask_BxL, rng, spec: MaskingSpec, *, deterministic: bool,
             dropout_rng=None, words_BxL=None, rows_B=None):
  """Per row: [cross-entropy summed over the masked positions, masked count, correct count]."""
  from embed_jax.models import SentenceEncoder
  masked_BxL, positions_BxK, labels_BxK, chosen_BxK = mask_tokens(rng, ids_BxL, mask_BxL, spec,
                                                                  words_BxL, rows_B)
  kw = {} if deterministic else {"rngs": {"dropout": dropout_rng}}
  logits_BxKxV = module.apply({"params": params}, masked_BxL, mask_BxL, positions_BxK,
                              deterministic=deterministic, method=SentenceEncoder.mlm_logits, **kw)
  logp_BxKxV = jax.nn.log_softmax(logits_BxKxV, axis=-1)
  ce_BxK = -jnp.take_along_axis(logp_BxKxV, labels_BxK[..., None], axis=-1)[..., 0]
  correct_BxK = jnp.argmax(logits_BxKxV, axis=-1) == labels_BxK
  chosen = chosen_BxK.astype(jnp.float32)
  return jnp.stack([jnp.sum(ce_BxK * chosen, 1), jnp.sum(chosen, 1),
                    jnp.sum(correct_BxK * chosen, 1)], axis=1)


class MaskedLM:
  """The head of an MLM task's text group (embed_jax.objective): masks the texts in the step and
  returns `mlm_rows`' per-row sums, which gradient caching and both runners treat like a
  representation's outputs."""

  def __init__(self, spec: MaskingSpec):
    self.spec = spec

  def embed(self, module, params, group: dict, *, train: bool, dropout_rng, mask_rng,
            rows=None):
    """[B, 3] rows of a group {"ids", "mask"[, "words"]}; row r's masks come from
    fold_in(mask_rng, rows[r]), its global index, so any split of the batch masks alike."""
    return mlm_rows(module, params, group["ids"], group["mask"], mask_rng, self.spec,
                    deterministic=not train, dropout_rng=dropout_rng,
                    words_BxL=group.get("words"), rows_B=rows)

  def at_layer(self, rows_Bx3, index: int):
    return rows_Bx3  # no layer axis
