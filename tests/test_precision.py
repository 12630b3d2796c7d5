"""Mixed precision: parameters and optimiser state in float32, compute in bfloat16, embeddings,
similarity logits and losses in float32; the bfloat16 step stays close to the float32 one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from embed_jax import train as T
from embed_jax.models import SentenceEncoder
from embed_jax.objective import build_objective
from embed_jax.testing import init_params
from tests.test_train import runner_model_config, synthetic_batch


def _loss_and_grads(dtype: str):
  from configs import scifact_mnrl
  c = scifact_mnrl.get_config()
  c.dropout = False
  cfg = runner_model_config().replace(dtype=dtype)
  params = init_params(runner_model_config(), seed=1)
  objective = build_objective(c)
  module = SentenceEncoder(cfg)
  batch = synthetic_batch(b=8, n=1)

  def loss(p):
    out = objective.embed(module, p, batch["groups"], jax.random.key(0), False)
    return objective.loss(out, batch["inputs"])[0], out

  (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return value, out, grads, (c, module, objective, params, batch)


def test_bfloat16_compute_keeps_float32_params_outputs_and_loss_close_to_float32():
  l32, o32, g32, _ = _loss_and_grads("float32")
  l16, o16, g16, (c, module, objective, params, batch) = _loss_and_grads("bfloat16")
  assert o16["q"].dtype == jnp.float32 and l16.dtype == jnp.float32  # outputs and loss in f32
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))  # gradients of f32 params
  assert abs(float(l16) - float(l32)) <= 0.02 * abs(float(l32))
  flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])  # noqa: E731
  a, b = flat(g32), flat(g16)
  cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
  assert cos > 0.99, cos
  emb_cos = np.sum(np.asarray(o16["q"]) * np.asarray(o32["q"]), -1) / (
      np.linalg.norm(o16["q"], axis=-1) * np.linalg.norm(o32["q"], axis=-1))
  assert emb_cos.min() > 0.995, emb_cos.min()
  # The step keeps the parameters and the optimiser state in float32.
  tx, schedule = T.make_optimizer(c.optim, 10)
  state, _ = jax.jit(T.make_train_step(module, objective, c, tx, schedule))(
      T.init_state(params, tx, 0), batch)
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim} == {jnp.dtype(jnp.float32)}
