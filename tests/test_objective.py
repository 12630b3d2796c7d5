"""The objective as a list of terms: weighted sums, absent groups, Matryoshka metrics, views, and
a new representation plugged in as a head and a score function."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embed_jax import losses
from embed_jax.objective import Objective, Term, View, build_objective, main_terms, ranking_loss
from embed_jax.representations import Dense

RNG = np.random.default_rng(0)


def _emb(*shape):
  return jnp.asarray(RNG.normal(size=shape), jnp.float32)


def _mean_cos(a, b, *, inputs):
  return jnp.mean(losses.cosine_pairs(a, b)) * inputs["scale"]


def test_loss_is_the_weighted_sum_of_the_terms_whose_groups_are_present():
  out = {"a": _emb(4, 6), "b": _emb(4, 6), "c": _emb(4, 6)}
  inputs = {"x": {"scale": 2.0}, "y": {"scale": -1.0}}
  terms = (Term("ab", 0.5, ("a", "b"), "x", _mean_cos),
           Term("ac", 3.0, ("a", "c"), "y", _mean_cos),
           Term("ad", 7.0, ("a", "d"), "x", _mean_cos))  # no group d in the batch: left out
  objective = Objective(Dense(), terms)
  loss, aux = objective.loss(out, inputs)
  ab = 2.0 * np.mean(losses.cosine_pairs(out["a"], out["b"]))
  ac = -1.0 * np.mean(losses.cosine_pairs(out["a"], out["c"]))
  np.testing.assert_allclose(loss, 0.5 * ab + 3.0 * ac, rtol=1e-6)
  np.testing.assert_allclose(aux["ab_loss"], ab, rtol=1e-6)
  np.testing.assert_allclose(aux["ac_loss"], ac, rtol=1e-6)
  assert "ad_loss" not in aux
  # Proportional task sampling: the weights were the sampling shares, each term counts once.
  loss, _ = Objective(Dense(), terms, equal_weights=True).loss(out, inputs)
  np.testing.assert_allclose(loss, ab + ac, rtol=1e-6)


def test_a_matryoshka_term_logs_each_prefix_and_sums_them_weighted():
  q, p = _emb(6, 16), _emb(6, 16)
  valid = np.ones(6, bool)
  term = Term("pairs", 1.0, ("q", "p"), "pairs", ranking_loss("mnrl"), optional=("n",),
              dims=(16, 4), dim_weights=(1.0, 0.25), label="mnrl")
  loss, aux = Objective(Dense(), (term,)).loss({"q": q, "p": p}, {"pairs": {"valid_B": valid}})
  want = {d: losses.mnrl(q[:, :d], p[:, :d], valid_B=valid) for d in (16, 4)}
  np.testing.assert_allclose(aux["mnrl@16"], want[16], rtol=1e-6)
  np.testing.assert_allclose(aux["mnrl@4"], want[4], rtol=1e-6)
  np.testing.assert_allclose(loss, want[16] + 0.25 * want[4], rtol=1e-6)


def test_views_map_a_group_through_a_training_only_projection():
  objective = Objective(Dense(), (), views={"u_proj": View("u", "proj")})
  kernel = _emb(6, 3)
  out = {"u": _emb(4, 6)}
  out["u_proj"] = objective.views["u_proj"]({"proj": {"kernel": kernel}}, out["u"])
  np.testing.assert_allclose(out["u_proj"], out["u"] @ kernel, rtol=1e-6)


def test_main_terms_follow_the_config_and_drop_zero_weights():
  from configs import scifact_mnrl
  c = scifact_mnrl.get_config()
  assert [t.name for t in build_objective(c).terms] == ["pairs"]
  c.distill.store = "unused"
  c.distill.pair_scores, c.matryoshka.dims, c.matryoshka.layers = 0.5, (32, 8), (1, 2)
  c.matryoshka.layer_weight = 0.6
  terms = build_objective(c).terms
  assert [t.name for t in terms] == ["pairs", "pairs/layer1", "pairs/layer2", "distill_pair_scores"]
  assert [t.weight for t in terms] == [1.0, 0.3, 0.3, 0.5]
  assert all(t.dims == (32, 8) for t in terms)
  assert len(main_terms(c)) == 10  # every term, the weight-0 ones included (2 from score stores)


class DotProduct(Dense):
  """A representation that differs from Dense only in its score: the unnormalised dot product."""
  score = losses.Score(lambda x: x, losses.dot_matrix, losses.dot_pairs)


def test_a_new_representation_is_a_head_and_a_score_function():
  """A train step with another representation's score: the logged pairs loss is MNRL over dot
  products of the model's outputs, and it differs from the cosine one."""
  from configs import scifact_mnrl
  from embed_jax import train as T
  from embed_jax.models import SentenceEncoder
  from embed_jax.testing import init_params, tiny_config
  from tests.test_train import synthetic_batch
  cfg = tiny_config(hidden_dropout=0.0, attention_dropout=0.0)
  c = scifact_mnrl.get_config()
  c.dropout = False
  tx, schedule = T.make_optimizer(c.optim, 10)
  params = init_params(cfg)
  batch = synthetic_batch()
  module = SentenceEncoder(cfg)
  got = {}
  for rep in (Dense(), DotProduct()):
    objective = Objective(rep, tuple(main_terms(c, rep)[:1]))
    step = jax.jit(T.make_train_step(module, objective, c, tx, schedule))
    got[rep] = float(step(T.init_state(params, tx, 0), batch)[1]["pairs_loss"])
    out = objective.embed(module, params, batch["groups"], jax.random.key(0), train=False)
    pairs = batch["inputs"]["pairs"]
    want = losses.mnrl(out["q"], out["p"], out["n"], scale=c.loss.scale, score=rep.score,
                       valid_B=pairs["valid_B"], p_ids_B=pairs["p_ids_B"],
                       neg_ids_BxN=pairs["neg_ids_BxN"], q_ids_B=pairs["q_ids_B"])
    np.testing.assert_allclose(got[rep], want, rtol=1e-5)
  a, b = got.values()
  assert abs(a - b) > 1e-3


def test_merged_loaders_refuse_to_fill_the_same_group_twice():
  from embed_jax.data.pairs import MergedLoader, TupleLoader
  make = lambda source: TupleLoader({"x": [[2, 5, 3]] * 4}, source=source, batch_size=2,  # noqa: E731
                                    seed=0, max_len=8)
  b = make("one").batch(0)
  assert b["groups"]["x"]["ids"].shape == (2, 8) and b["inputs"]["one"]["valid_B"].all()
  with pytest.raises(ValueError, match=r"two loaders fill groups \['x'\]"):
    MergedLoader(make("one"), make("two")).batch(0)
