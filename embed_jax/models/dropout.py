"""Dropout masks from half the random bits: two 16-bit draws from each 32-bit threefry word.

`jax.random.bernoulli` spends a full 32-bit threefry output on every element; on a 2-core CPU the
masks of one MiniLM training step (attention weights and hidden states, ~120M elements at batch
32, length 128) then cost more than a second. A 16-bit uniform draw keeps each element with
probability round(keep * 65536) / 65536, within 8e-6 of `keep`, for half the work. The key stays
threefry, so masks are the same on any number of devices (`jax_threefry_partitionable`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def keep_mask(rng, keep_prob: float, shape: tuple[int, ...]) -> jax.Array:
  """bool `shape`: True with probability `keep_prob` (to 1/65536), independently per element."""
  if keep_prob >= 1:
    return jnp.ones(shape, bool)
  n = math.prod(shape)
  words = jax.random.bits(rng, ((n + 1) // 2,), jnp.uint32)
  halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:n]
  return (halves < jnp.uint16(round(keep_prob * 65536))).reshape(shape)


def dropout(x, rate: float, rng) -> jax.Array:
  """Inverted dropout: zero with probability `rate`, scale the rest by 1 / (1 - rate)."""
  if rate <= 0:
    return x
  keep = keep_mask(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))
