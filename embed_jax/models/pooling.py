"""Pooling of token states into one vector, as sentence-transformers' Pooling module does."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def pool(hidden_BxLxD: jnp.ndarray, mask_BxL: jnp.ndarray, modes: tuple[str, ...]) -> jnp.ndarray:
  """Pools over real tokens only; several modes are concatenated in `POOLING_MODES` order."""
  hidden_BxLxD = hidden_BxLxD.astype(jnp.float32)  # accumulate in float32 whatever the compute dtype
  m_BxLx1 = mask_BxL[..., None].astype(jnp.float32)
  outputs = []
  for mode in modes:
    if mode == "cls":
      outputs.append(hidden_BxLxD[:, 0])
    elif mode == "max":
      outputs.append(jnp.max(jnp.where(m_BxLx1 > 0, hidden_BxLxD, -jnp.inf), axis=1))
    elif mode in ("mean", "mean_sqrt_len_tokens"):
      sum_BxD = jnp.sum(hidden_BxLxD * m_BxLx1, axis=1)
      count_Bx1 = jnp.maximum(jnp.sum(m_BxLx1, axis=1), 1e-9)
      outputs.append(sum_BxD / (count_Bx1 if mode == "mean" else jnp.sqrt(count_Bx1)))
    elif mode == "lasttoken":
      last_B = jnp.maximum(jnp.sum(mask_BxL, axis=1) - 1, 0)  # right padding
      outputs.append(jnp.take_along_axis(hidden_BxLxD, last_B[:, None, None], axis=1)[:, 0])
    else:
      raise ValueError(f"unknown pooling mode {mode!r}")
  return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=-1)


def l2_normalize(x_NxD, eps: float = 1e-12):
  """x / max(|x|, eps) over the last axis, as torch's F.normalize (sentence-transformers'
  Normalize module): the project's one L2 normaliser, for numpy and for JAX arrays.

  JAX arrays (in the model and the losses) are computed in float32 as x * rsqrt(max(|x|^2,
  eps^2)): differentiating |x| itself at a zero row gives NaN, this keeps the gradient finite
  (large, 1/eps, as torch's). numpy arrays (search, evaluation) are divided by the clamped norm
  in their own dtype.
  """
  if isinstance(x_NxD, np.ndarray):
    return x_NxD / np.maximum(np.linalg.norm(x_NxD, axis=-1, keepdims=True), eps)
  x_NxD = jnp.asarray(x_NxD, jnp.float32)
  sq_Nx1 = jnp.sum(x_NxD * x_NxD, axis=-1, keepdims=True)
  return x_NxD * jax.lax.rsqrt(jnp.maximum(sq_Nx1, eps * eps))


def splade_pool(logits_BxLxV: jnp.ndarray, mask_BxL: jnp.ndarray, activation: str = "relu",
                pooling: str = "max") -> jnp.ndarray:
  """SPLADE's sparse vector [B, V] from MLM logits: log(1 + ReLU(logit)) at each real token
  (log1p_relu: log1p once more), max- or sum-pooled over the tokens. Padding counts as a 0
  logit, as in sentence-transformers' SpladePooling (after the ReLU every value is >= 0, so it
  never wins a max)."""
  logits_BxLxV = logits_BxLxV * mask_BxL[..., None].astype(logits_BxLxV.dtype)
  act = lambda x: jnp.log1p(jax.nn.relu(x))  # noqa: E731
  if pooling == "max":  # the activation is monotone: take the max first, one V-vector per row
    out_BxV = act(jnp.max(logits_BxLxV, axis=1))
    return jnp.log1p(out_BxV) if activation == "log1p_relu" else out_BxV
  act_BxLxV = act(logits_BxLxV)
  if activation == "log1p_relu":
    act_BxLxV = jnp.log1p(act_BxLxV)
  return jnp.sum(act_BxLxV, axis=1)
