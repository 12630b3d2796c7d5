"""The attention core, softmax(q k^T + bias) v, with a hand-written backward pass.

Why not autodiff: on XLA:CPU the gradients dK = dS^T Q and dV = P^T dO contract over a non-minor
dimension, which YNNPACK does not take; XLA then falls back to its own, several times slower, dot
emitter. Here they are computed as dK^T = Q^T dS and dV^T = dO^T P from the small [B, N, L, D]
operands transposed explicitly (an optimisation barrier keeps XLA from folding the transposes back
into the dots), so every batched matmul runs in YNNPACK. With the separate Q/K/V projections in
`bert.SelfAttention` this made one MiniLM layer's forward + backward 1.35x faster
(benchmarks/train_step.py has the whole-step numbers). tests/test_models.py checks the gradients
against autodiff of the textbook form.

Shapes: q, k, v [B, N, L, D] (heads-major, q already scaled by 1/sqrt(D)); bias [B|1, 1|N, 1|L, L]
added to the logits (0 for real keys, a large negative for padding; MPNet adds its learned relative
position bias); dropout_keep [B, N, L, L] bool, False where an attention weight is dropped (the rest
are scaled by 1 / (1 - rate)), or None. The mask gets no gradient; the bias gets one only with
`bias_grad=True` (d logits summed to the bias's shape), so a padding-only bias costs nothing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _kept(weights_BxNxLxL, keep_BxNxLxL, rate: float):
  if keep_BxNxLxL is None:
    return weights_BxNxLxL
  return jnp.where(keep_BxNxLxL, weights_BxNxLxL * (1.0 / (1.0 - rate)), 0.0)


def _forward(q_BxNxLxD, k_BxNxLxD, v_BxNxLxD, bias, dropout_keep, rate):
  logits_BxNxLxL = jnp.matmul(q_BxNxLxD, k_BxNxLxD.swapaxes(-1, -2),
                              preferred_element_type=jnp.float32) + bias
  # The softmax is normalised after the value product: exp(s - max) @ v / sum(exp(s - max)), one
  # pass fewer over the [B, N, L, L] weights.
  max_BxNxLx1 = jnp.max(logits_BxNxLxL, axis=-1, keepdims=True)
  weights_BxNxLxL = jnp.exp(logits_BxNxLxL - max_BxNxLx1)
  denom_BxNxLx1 = jnp.sum(weights_BxNxLxL, axis=-1, keepdims=True)
  # Dropout on the normalised probabilities equals dropout on the unnormalised weights.
  kept_BxNxLxL = _kept(weights_BxNxLxL, dropout_keep, rate)
  ctx_BxNxLxD = jnp.matmul(kept_BxNxLxL.astype(v_BxNxLxD.dtype), v_BxNxLxD,
                           preferred_element_type=jnp.float32) / denom_BxNxLx1
  return ctx_BxNxLxD, (weights_BxNxLxL, denom_BxNxLx1, ctx_BxNxLxD)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def attention(q_BxNxLxD, k_BxNxLxD, v_BxNxLxD, bias, dropout_keep=None, rate: float = 0.0,
              bias_grad: bool = False):
  """dropout(softmax(q k^T + bias)) v -> float32 [B, N, L, D]."""
  return _forward(q_BxNxLxD, k_BxNxLxD, v_BxNxLxD, bias, dropout_keep, rate)[0]


def _attention_fwd(q, k, v, bias, dropout_keep, rate, bias_grad):
  ctx, (weights, denom, _) = _forward(q, k, v, bias, dropout_keep, rate)
  # The backward needs only the bias's shape and dtype; keeping the array adds no memory (the
  # caller holds it for the forward pass of every layer anyway).
  return ctx, (q, k, v, weights, denom, ctx, dropout_keep, bias if bias_grad else None)


def _sum_to_shape(x, shape: tuple[int, ...]):
  """x summed over the dimensions along which `shape` was broadcast to x.shape."""
  lead = x.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape)
                                    if n == 1 and x.shape[lead + i] != 1)
  return jnp.sum(x, axis=axes, keepdims=True).reshape(shape) if axes else x


def _attention_bwd(rate, bias_grad, res, g_BxNxLxD):
  q_BxNxLxD, k_BxNxLxD, v_BxNxLxD, weights_BxNxLxL, denom_BxNxLx1, ctx_BxNxLxD, keep, bias = res
  barrier = jax.lax.optimization_barrier
  f32 = jnp.float32
  g_BxNxLxD = g_BxNxLxD.astype(f32) / denom_BxNxLx1  # the gradient of (kept weights) @ v
  kept_BxNxLxL = _kept(weights_BxNxLxL, keep, rate)
  # dV^T = g^T @ kept; dK^T = q^T @ dS: the transposed operands are the small [B, N, D, L] ones.
  gT_BxNxDxL = barrier(g_BxNxLxD.swapaxes(-1, -2))
  dvT_BxNxDxL = jnp.matmul(gT_BxNxDxL, kept_BxNxLxL, preferred_element_type=f32)
  dkept_BxNxLxL = jnp.matmul(g_BxNxLxD, v_BxNxLxD.astype(f32).swapaxes(-1, -2),
                             preferred_element_type=f32)
  dweights_BxNxLxL = _kept(dkept_BxNxLxL, keep, rate)
  # The denominator's share: d ctx / d denom = -ctx / denom, summed over D (not over L).
  ddenom_BxNxLx1 = -jnp.sum(g_BxNxLxD * ctx_BxNxLxD, axis=-1, keepdims=True)
  # exp(s - max)' = exp(s - max); the max is a constant shift (its gradient cancels exactly).
  dlogits_BxNxLxL = (dweights_BxNxLxL + ddenom_BxNxLx1) * weights_BxNxLxL
  dq_BxNxLxD = jnp.matmul(dlogits_BxNxLxL, k_BxNxLxD.astype(f32), preferred_element_type=f32)
  qT_BxNxDxL = barrier(q_BxNxLxD.astype(f32).swapaxes(-1, -2))
  dkT_BxNxDxL = jnp.matmul(qT_BxNxDxL, dlogits_BxNxLxL, preferred_element_type=f32)
  dbias = None
  if bias_grad:  # logits = q k^T + bias, so d bias = d logits (summed where the bias broadcasts)
    dbias = _sum_to_shape(dlogits_BxNxLxL, jnp.shape(bias)).astype(jnp.result_type(bias))
  return (dq_BxNxLxD.astype(q_BxNxLxD.dtype), dkT_BxNxDxL.swapaxes(-1, -2).astype(k_BxNxLxD.dtype),
          dvT_BxNxDxL.swapaxes(-1, -2).astype(v_BxNxLxD.dtype), dbias, None)


attention.defvjp(_attention_fwd, _attention_bwd)
