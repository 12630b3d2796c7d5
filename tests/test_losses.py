"""Losses against hand-written numpy and against sentence-transformers' PyTorch losses."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embed_jax import losses


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _lse(values):
  values = np.asarray(values, np.float64)
  return values.max() + np.log(np.exp(values - values.max()).sum())


def np_mnrl(q, p, neg=None, scale=20.0, symmetric=False, valid=None, p_ids=None, neg_ids=None,
            q_ids=None):
  """The loss written out candidate by candidate, in float64."""
  b = len(q)
  valid = np.ones(b, bool) if valid is None else np.asarray(valid)
  n = 0 if neg is None else neg.shape[1]
  q, p = _unit(q), _unit(p)
  neg = None if neg is None else _unit(neg)
  same = lambda ids, i, j: ids is not None and ids[i] >= 0 and ids[i] == ids[j]  # noqa: E731
  # Candidates: (vector, doc id, owner row, is that row's positive, usable)
  cands = [(p[j], None if p_ids is None else p_ids[j], j, True, valid[j]) for j in range(b)]
  for j in range(b):
    for k in range(n):
      nid = None if neg_ids is None else neg_ids[j][k]
      cands.append((neg[j, k], nid, j, False, valid[j] and (nid is None or nid >= 0)))
  losses_ = []
  for i in range(b):
    if not valid[i]:
      continue
    pid = None if p_ids is None else p_ids[i]
    logits = [scale * q[i] @ vec for c, (vec, cid, j, is_pos, ok) in enumerate(cands)
              if c == i or (ok and not (pid is not None and pid >= 0 and cid == pid)
                            and not (is_pos and same(q_ids, i, j)))]
    forward = _lse(logits) - scale * q[i] @ p[i]
    if symmetric:
      back = [scale * p[i] @ q[j] for j in range(b) if j == i or (
          valid[j] and not same(p_ids, i, j) and not same(q_ids, i, j))]
      forward = (forward + _lse(back) - scale * p[i] @ q[i]) / 2
    losses_.append(forward)
  return float(np.mean(losses_)) if losses_ else 0.0


def np_triplet(a, p, n, margin=0.5, distance="cosine"):
  a, p, n = _unit(a), _unit(p), _unit(n)
  if distance == "cosine":
    d = lambda x, y: 1 - (x * y).sum(-1)
  else:
    d = lambda x, y: np.linalg.norm(x - y, axis=-1)
  return float(np.maximum(d(a, p) - d(a, n) + margin, 0).mean())


def np_cosent(e1, e2, labels, scale=20.0):
  s = scale * (_unit(e1) * _unit(e2)).sum(-1)
  terms = [0.0] + [s[j] - s[i] for i in range(len(s)) for j in range(len(s))
                   if labels[i] > labels[j]]
  return float(_lse(terms))


# Jitted once per shape: op-by-op (eager) dispatch compiles every primitive and is ~10x slower.
# test_jit_and_grad_are_finite_and_match_eager checks that eager gives the same.
mnrl = jax.jit(losses.mnrl, static_argnames="symmetric")
triplet = jax.jit(losses.triplet, static_argnames="distance")
cosent = jax.jit(losses.cosent)
accuracy = jax.jit(losses.retrieval_accuracy)


def _rand(*shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---- against numpy ----


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("num_neg", [0, 3])
def test_mnrl_matches_numpy(symmetric, num_neg):
  q, p = _rand(6, 16, seed=1), _rand(6, 16, seed=2)
  neg = _rand(6, num_neg, 16, seed=3) if num_neg else None
  for scale in (1.0, 20.0, 50.0):
    got = mnrl(q, p, neg, scale=scale, symmetric=symmetric)
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(got, np_mnrl(q, p, neg, scale, symmetric), rtol=1e-5)


def test_mnrl_masks_match_numpy():
  """Invalid rows, padding negatives, duplicate documents and repeated queries together, against
  the written-out loss."""
  q, p, neg = _rand(6, 8, seed=4), _rand(6, 8, seed=5), _rand(6, 2, 8, seed=6)
  valid = np.array([1, 1, 0, 1, 1, 1], bool)
  p_ids = np.array([10, 11, 12, 10, -1, 13], np.int32)
  neg_ids = np.array([[20, 11], [10, -1], [21, 22], [23, 24], [-1, 11], [25, 26]], np.int32)
  q_ids = np.array([0, 1, 2, 3, 1, 0], np.int32)  # rows 0 and 5, 1 and 4: one query each
  q[5], q[4] = q[0], q[1]
  p[5], p[4] = q[0] + 0.3 * p[5], q[1] + 0.3 * p[4]  # close to the query: masking them matters
  assert float(mnrl(q, p, neg, q_ids_B=q_ids)) < float(mnrl(q, p, neg)) - 1.0
  for symmetric in (False, True):
    for qi in (None, q_ids):
      kw = dict(valid_B=valid, p_ids_B=p_ids, neg_ids_BxN=neg_ids, q_ids_B=qi, symmetric=symmetric)
      want = np_mnrl(q, p, neg, 20.0, symmetric, valid, p_ids.tolist(), neg_ids.tolist(),
                     None if qi is None else qi.tolist())
      np.testing.assert_allclose(mnrl(q, p, neg, **kw), want, rtol=1e-5)


def test_triplet_and_cosent_match_numpy():
  a, p, n = _rand(7, 12, seed=7), _rand(7, 12, seed=8), _rand(7, 12, seed=9)
  for distance in ("cosine", "euclidean"):
    for margin in (0.0, 0.5, 5.0):
      np.testing.assert_allclose(triplet(a, p, n, margin=margin, distance=distance),
                                 np_triplet(a, p, n, margin, distance), rtol=1e-5, atol=1e-7)
  labels = np.array([0.1, 0.9, 0.5, 0.5, 0.0, 1.0, 0.3], np.float32)  # with a tie
  for scale in (1.0, 20.0):
    np.testing.assert_allclose(cosent(a, p, labels, scale=scale),
                               np_cosent(a, p, labels, scale), rtol=1e-5)
  assert float(cosent(a, p, np.ones(7))) == 0.0  # no ordered pair: log(1)
  with pytest.raises(ValueError, match="distance"):
    triplet(a, p, n, distance="manhattan")


# ---- against sentence-transformers (PyTorch, float64) ----


@pytest.fixture(scope="module")
def st_losses():
  pytest.importorskip("torch")
  try:  # sentence-transformers >= 6
    from sentence_transformers.sentence_transformer import losses as st
  except ImportError:  # 5.x (the version PyLate needs)
    from sentence_transformers import losses as st
  return st


def _t(x):
  import torch
  return torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True)


def test_mnrl_matches_sentence_transformers(st_losses):
  # compute_loss_from_embeddings is each loss's forward after the model call: the model is unused.
  q, p, neg = _rand(8, 32, seed=10), _rand(8, 32, seed=11), _rand(8, 3, 32, seed=12)
  for scale in (20.0, 7.0):
    st_mnrl = st_losses.MultipleNegativesRankingLoss(None, scale=scale)
    ref = st_mnrl.compute_loss_from_embeddings([_t(q), _t(p)], None)
    np.testing.assert_allclose(mnrl(q, p, scale=scale), ref.item(), rtol=1e-5)
    # Hard negatives: one column of embeddings per negative, as the (a, p, n_1, ..., n_k) dataset.
    cols = [_t(q), _t(p)] + [_t(neg[:, k]) for k in range(3)]
    ref = st_mnrl.compute_loss_from_embeddings(cols, None)
    np.testing.assert_allclose(mnrl(q, p, neg, scale=scale), ref.item(), rtol=1e-5)
    # And the gradients with respect to every input.
    ref.backward()
    grads = jax.jit(jax.grad(lambda *x: mnrl(*x, scale=scale), argnums=(0, 1, 2)))(q, p, neg)
    np.testing.assert_allclose(grads[0], cols[0].grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads[1], cols[1].grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads[2], np.stack([c.grad.numpy() for c in cols[2:]], 1),
                               rtol=1e-4, atol=1e-6)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # merged into MNRL(directions=...) in v6
    sym = st_losses.MultipleNegativesSymmetricRankingLoss(None, scale=20.0)
  ref = sym.compute_loss_from_embeddings([_t(q), _t(p)], None)
  np.testing.assert_allclose(mnrl(q, p, symmetric=True), ref.item(), rtol=1e-5)


def test_triplet_and_cosent_match_sentence_transformers(st_losses):
  import torch
  a, p, n = _rand(8, 32, seed=13), _rand(8, 32, seed=14), _rand(8, 32, seed=15)
  metric = st_losses.TripletDistanceMetric
  for distance, fn, margin in (("cosine", metric.COSINE, 0.5), ("euclidean", metric.EUCLIDEAN, 1.0),
                               ("euclidean", metric.EUCLIDEAN, 5.0)):
    if float(fn(_t(_unit(a)), _t(_unit(p))).min()) < 0:
      # sentence-transformers 5.x's EUCLIDEAN is pairwise_euclidean_sim, minus the distance
      fn = (lambda f: lambda x, y: -f(x, y))(fn)
    loss = st_losses.TripletLoss(None, distance_metric=fn, triplet_margin=margin)
    # Ours normalises first; sentence-transformers' euclidean sees the model output as it is.
    ref = loss.compute_loss_from_embeddings([_t(_unit(x)) for x in (a, p, n)], None)
    np.testing.assert_allclose(triplet(a, p, n, margin=margin, distance=distance),
                               ref.item(), rtol=1e-5)
  labels = np.array([0.0, 0.2, 0.2, 1.0, 0.7, 0.5, 0.9, 0.1], np.float32)
  for scale in (20.0, 5.0):
    st_cosent = st_losses.CoSENTLoss(None, scale=scale)
    ref = st_cosent.compute_loss_from_embeddings([_t(a), _t(p)],
                                                 torch.tensor(labels, dtype=torch.float64))
    np.testing.assert_allclose(cosent(a, p, labels, scale=scale), ref.item(), rtol=1e-5)


# ---- masking ----


def test_a_repeated_positive_is_not_a_negative():
  """Rows 1 and 3 share a positive (same text, same id): for them the copy is no candidate."""
  q, p = _rand(5, 16, seed=16), _rand(5, 16, seed=17)
  p[3] = p[1]
  ids = np.array([0, 1, 2, 1, 4], np.int32)
  qu, pu = _unit(q), _unit(p)
  logits = 20.0 * qu @ pu.T
  keep = ~np.eye(5, dtype=bool) & (ids[:, None] == ids[None, :])  # the copies, off the target
  expected = np.mean([_lse(logits[i][~keep[i]]) - logits[i, i] for i in range(5)])
  np.testing.assert_allclose(mnrl(q, p, p_ids_B=ids), expected, rtol=1e-5)
  assert float(mnrl(q, p)) > float(expected)  # unmasked, the copy competes with the target
  # Symmetric: positive 1 ranks queries, and query 3 (whose positive is the same) is no negative.
  back = 20.0 * pu @ qu.T
  expected_b = np.mean([_lse(back[i][~keep[i]]) - back[i, i] for i in range(5)])
  np.testing.assert_allclose(mnrl(q, p, p_ids_B=ids, symmetric=True),
                             (expected + expected_b) / 2, rtol=1e-5)


def test_a_query_with_two_positives_does_not_rank_one_against_the_other():
  q, p = _rand(4, 16, seed=28), _rand(4, 16, seed=29)
  q[2] = q[0]  # rows 0 and 2: the same query, two positives
  q_ids = np.array([7, 8, 7, 9], np.int32)
  qu, pu = _unit(q), _unit(p)
  logits = 20.0 * qu @ pu.T
  other = ~np.eye(4, dtype=bool) & (q_ids[:, None] == q_ids[None, :])  # p_2 for row 0, p_0 for 2
  expected = np.mean([_lse(logits[i][~other[i]]) - logits[i, i] for i in range(4)])
  np.testing.assert_allclose(mnrl(q, p, q_ids_B=q_ids), expected, rtol=1e-5)
  back = 20.0 * pu @ qu.T  # backward: q_2 (= q_0) is no negative for p_0
  expected_b = np.mean([_lse(back[i][~other[i]]) - back[i, i] for i in range(4)])
  np.testing.assert_allclose(mnrl(q, p, q_ids_B=q_ids, symmetric=True),
                             (expected + expected_b) / 2, rtol=1e-5)
  # Both positives of the query near it, and the other rows' positives equal to their queries.
  p[0], p[2], p[1], p[3] = q[0] + 0.1, q[0] - 0.1, q[1], q[3]
  assert float(accuracy(q, p, q_ids_B=q_ids)) == 1.0
  assert float(accuracy(q, p)) == 0.75  # without the ids, one of the two loses


def test_a_hard_negative_equal_to_the_positive_is_dropped():
  q, p, neg = _rand(4, 16, seed=18), _rand(4, 16, seed=19), _rand(4, 2, 16, seed=20)
  p_ids = np.arange(4, dtype=np.int32)
  neg_ids = np.array([[10, 11], [12, 13], [14, 15], [16, 17]], np.int32)
  neg_dup, ids_dup = neg.copy(), neg_ids.copy()
  neg_dup[0, 1], ids_dup[0, 1] = p[0], 0   # row 0's negative is its own positive
  neg_dup[2, 0], ids_dup[2, 0] = p[1], 1   # row 2's negative is row 1's positive
  ids_pad = neg_ids.copy()
  ids_pad[0, 1] = -1  # as if row 0 had one negative fewer
  # Row 0 and row 1 see the duplicates masked; the others still rank them as negatives.
  got = mnrl(q, p, neg_dup, p_ids_B=p_ids, neg_ids_BxN=ids_dup)
  ref = np_mnrl(q, p, neg_dup, 20.0, False, None, p_ids.tolist(), ids_dup.tolist())
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  # For row 0, the masked copy of its positive is the same as no negative there at all.
  solo = functools.partial(mnrl, p_ids_B=p_ids[:1])
  np.testing.assert_allclose(solo(q[:1], p[:1], neg_dup[:1], neg_ids_BxN=ids_dup[:1]),
                             solo(q[:1], p[:1], neg[:1], neg_ids_BxN=ids_pad[:1]), rtol=1e-6)
  assert float(mnrl(q[:1], p[:1], neg_dup[:1])) > float(
      solo(q[:1], p[:1], neg_dup[:1], neg_ids_BxN=ids_dup[:1]))  # without ids it counts


def _padded(arrays, extra, seed):
  """Each array with `extra` garbage rows appended: huge values, zeros, inf and nan."""
  rng = np.random.default_rng(seed)
  out = []
  for x in arrays:
    pad = (rng.standard_normal((extra,) + x.shape[1:]) * 1e4).astype(x.dtype)
    pad[0] = 0
    if extra > 1:
      pad[1].flat[0], pad[-1].flat[-1] = np.inf, np.nan
    out.append(np.concatenate([x, pad]))
  return out


def test_padded_rows_change_nothing_values_or_gradients():
  b = 4
  q, p, neg = _rand(b, 16, seed=21), _rand(b, 16, seed=22), _rand(b, 2, 16, seed=23)
  labels = np.array([0.1, 0.8, 0.3, 0.5], np.float32)
  p_ids = np.array([0, 1, 0, 3], np.int32)
  neg_ids = np.array([[5, -1], [6, 7], [8, 9], [1, 10]], np.int32)
  q_ids = np.array([0, 1, 2, 1], np.int32)
  padded = _padded([q, p, neg, labels], 3, seed=24)
  valid = np.arange(b + 3) < b
  # The padded rows even share ids with real ones: being invalid must be enough.
  pad_ids = {"p_ids_B": np.r_[p_ids, [0, 1, 3]].astype(np.int32),
             "neg_ids_BxN": np.r_[neg_ids, [[5, 6], [1, 1], [0, 2]]].astype(np.int32),
             "q_ids_B": np.r_[q_ids, [1, 0, -1]].astype(np.int32)}
  ids = {"p_ids_B": p_ids, "neg_ids_BxN": neg_ids, "q_ids_B": q_ids}
  # Each case is f(q, p, neg, labels, valid_B, ids) for the unpadded and the padded batch.
  cases = {
      "mnrl": lambda x, y, z, lab, v, i: mnrl(x, y, z, symmetric=True, valid_B=v, **i),
      "accuracy": lambda x, y, z, lab, v, i: accuracy(x, y, z, valid_B=v, **i),
      "triplet": lambda x, y, z, lab, v, i: triplet(x, y, z[:, 0], distance="euclidean",
                                                    valid_B=v),
      "cosent": lambda x, y, z, lab, v, i: cosent(x, y, lab, valid_B=v),
  }
  for name, fn in cases.items():
    small = functools.partial(fn, v=None, i=ids)
    big = functools.partial(fn, v=valid, i=pad_ids)
    np.testing.assert_allclose(big(*padded), small(q, p, neg, labels), rtol=1e-6, err_msg=name)
    g_small = jax.jit(jax.grad(small, (0, 1, 2)))(q, p, neg, labels)
    g_big = jax.jit(jax.grad(big, (0, 1, 2)))(*padded)
    for gs, gb in zip(g_small, g_big):
      np.testing.assert_allclose(gb[:b], gs, rtol=1e-5, atol=1e-7, err_msg=name)
      assert (np.asarray(gb[b:]) == 0).all(), name  # no gradient reaches a padded row


def test_no_valid_row_gives_zero():
  q = _rand(3, 8)
  assert float(mnrl(q, q, valid_B=np.zeros(3, bool))) == 0.0
  assert float(triplet(q, q, q, valid_B=np.zeros(3, bool))) == 0.0


# ---- jit, grad, accuracy ----


def test_jit_and_grad_are_finite_and_match_eager():
  q, p, neg = _rand(6, 16, seed=25), _rand(6, 16, seed=26), _rand(6, 2, 16, seed=27)
  q[0] = 0.0  # a zero embedding: normalisation must not give NaN gradients
  p[1] = q[1]  # anchor == positive: the euclidean distance is 0 there
  valid = np.array([1, 1, 1, 1, 1, 0], bool)
  p_ids = np.array([0, 1, 2, 0, 4, 5], np.int32)
  neg_ids = np.array([[6, 7], [8, -1], [9, 10], [0, 11], [12, 13], [14, 15]], np.int32)
  labels = np.linspace(0, 1, 6).astype(np.float32)
  fns = [
      functools.partial(losses.mnrl, symmetric=True, valid_B=valid, p_ids_B=p_ids,
                        neg_ids_BxN=neg_ids),
      lambda x, y, z: losses.triplet(x, y, z[:, 0], distance="euclidean", valid_B=valid),
      lambda x, y, z: losses.triplet(x, y, z[:, 0], valid_B=valid),
      lambda x, y, z: losses.cosent(x, y, labels, valid_B=valid),
  ]
  for n, fn in enumerate(fns):
    value, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(q, p, neg)
    assert np.isfinite(value) and all(np.isfinite(g).all() for g in grads)
    if n == 0:  # eager (op by op) gives the same; it is slow to dispatch, so once is enough
      np.testing.assert_allclose(fn(q, p, neg), value, rtol=1e-6)
  # bfloat16 embeddings (a mixed-precision forward) are computed in float32.
  assert mnrl(q.astype(jnp.bfloat16), p.astype(jnp.bfloat16)).dtype == jnp.float32


def test_retrieval_accuracy_known_geometry():
  eye = np.eye(8, dtype=np.float32)
  q, p = eye[:4].copy(), eye[:4].copy()
  assert float(accuracy(q, p)) == 1.0
  p[2], p[3] = eye[3], eye[2]  # queries 2 and 3 now find each other's positive first
  assert float(accuracy(q, p)) == 0.5
  # A hard negative closer than the positive is a miss; padded out (-1) it is not.
  neg = np.stack([eye[[0]], eye[[1]], eye[[2]], eye[[3]]])  # each row's negative = its query
  p = eye[:4] + 0.5 * eye[4:]  # cos(q_i, p_i) = 0.89 < cos(q_i, neg_i) = 1
  assert float(accuracy(q, p, neg)) == 0.0
  ids = np.array([[-1], [-1], [7], [8]], np.int32)
  assert float(accuracy(q, p, neg, neg_ids_BxN=ids)) == 0.5
  assert float(accuracy(q, p, neg, neg_ids_BxN=ids, valid_B=np.array([1, 1, 0, 0], bool))) == 1.0
