"""Pure loss functions over representations: jit- and grad-friendly.

    loss = mnrl(q_BxD, p_BxD, neg_BxNxD, scale=20.0, valid_B=valid_B, p_ids_B=p_ids_B)

A loss reads the raw outputs of the model for its text groups and scores them with `score`, the
representation's similarity (`Score`: an all-pairs matrix and its aligned diagonal). The default
is cosine over dense vectors (each vector L2-normalised inside the score), so every loss here takes
raw embeddings; a new kind of embedding (token vectors and MaxSim, vocabulary weights and a sparse
dot product) passes its own `Score` and reuses the losses unchanged. Every loss returns a float32
scalar, the mean over valid rows (CoSENT: one term over the pairs of valid rows). `valid_B` marks
the real rows of a batch: a final partial batch is padded to the static batch shape and masked,
and a padded row contributes nothing (no loss, no candidate, no gradient), so a padded batch gives
the same value and gradients as the unpadded one. Each loss matches its sentence-transformers
counterpart (MultipleNegatives[Symmetric]RankingLoss, TripletLoss, CoSENTLoss) on the same
embeddings; tests/test_losses.py checks it.

Combinators: `matryoshka(loss, dims, weights)` (the loss on each prefix of one forward pass) and
`weighted_sum` (the objective's terms, embed_jax.objective).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from embed_jax.models.pooling import l2_normalize as unit

Array = jax.Array

# The similarity matrices are small next to the encoder, so they run at full float32 precision
# (the TPU default for float32 matmuls is one bfloat16 pass: ~1e-3 error in cos, x scale in logits).
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# Scores: how two outputs of a representation compare.
# ----------------------------------------------------------------------------------------------


def dot_matrix(q_BxD: Array, d_CxD: Array) -> Array:
  """[B, C] dot products of every query row with every document row."""
  return jnp.matmul(q_BxD, d_CxD.T, precision=_HIGHEST)


def dot_pairs(a_BxD: Array, b_BxD: Array) -> Array:
  """[B] dot product of each row of a with the same row of b."""
  return jnp.sum(a_BxD * b_BxD, axis=-1)


def cosine_matrix(q_BxD: Array, d_CxD: Array | None) -> Array:
  """[B, C] cosine similarities of every query row with every document row; d None: the rows
  of q with each other (a Gram matrix, q normalised once)."""
  q_BxD = unit(q_BxD)
  return dot_matrix(q_BxD, q_BxD if d_CxD is None else unit(d_CxD))


def cosine_pairs(a_BxD: Array, b_BxD: Array) -> Array:
  """[B] cosine similarity of each row of a with the same row of b."""
  return dot_pairs(unit(a_BxD), unit(b_BxD))


class Score(NamedTuple):
  """A representation's similarity, in two stages: `prepare(x)` once per output (cosine:
  L2-normalise), then `matrix(q [B, ...], d [C, ...]) -> [B, C]` scores every pair of prepared
  outputs and `pairs(a [B, ...], b [B, ...]) -> [B]` row i of a with row i of b (the diagonal,
  computed directly). Outputs are pytrees whose leaves have the rows on axis 0."""
  prepare: Callable
  matrix: Callable
  pairs: Callable


COSINE = Score(unit, dot_matrix, dot_pairs)


def _token_sims(q_vecs, d_vecs, d_mask, q_mask, pattern: str) -> Array:
  """Per query token, the best similarity over the document's kept tokens (-inf masked; a
  document with no kept token gives 0), summed over the query's kept tokens."""
  sims = jnp.einsum(pattern, q_vecs, d_vecs, precision=_HIGHEST)
  best = jnp.max(jnp.where(d_mask, sims, -jnp.inf), axis=-1)
  best = jnp.where(jnp.isfinite(best), best, 0.0)
  return jnp.sum(jnp.where(q_mask, best, 0.0), axis=-1)


def maxsim_matrix(q, d) -> Array:
  """[B, C] late-interaction (ColBERT) scores of token vectors: for each query token, the
  highest dot product with any of the document's tokens, summed over the query's tokens. q and
  d are {"vectors": [B or C, L, D], "mask": [B or C, L]}; masked tokens (padding, the document
  skiplist) take no part. PyLate's colbert_scores for unit token vectors."""
  return _token_sims(q["vectors"], d["vectors"], d["mask"][None, :, None, :] > 0,
                     q["mask"][:, None, :] > 0, "bid,cjd->bcij")


def maxsim_pairs(a, b) -> Array:
  """[B] MaxSim of row i of a (queries) with row i of b (documents)."""
  return _token_sims(a["vectors"], b["vectors"], b["mask"][:, None, :] > 0, a["mask"] > 0,
                     "bid,bjd->bij")


MAXSIM = Score(lambda x: x, maxsim_matrix, maxsim_pairs)  # token vectors are unit already
# Sparse vocabulary weights (SPLADE, lexical weights): the plain dot product, as an inverted
# index scores them (sentence-transformers' SparseEncoder similarity "dot").
DOT = Score(lambda x: x, dot_matrix, dot_pairs)


def flops(w_BxV: Array, valid_B: Array | None = None) -> Array:
  """The FLOPS regulariser (Paria et al. 2020; SPLADE): sum over the vocabulary of the squared
  mean weight over the batch's valid rows, a smooth stand-in for the expected multiply-adds of a
  query against a document. sentence-transformers' FlopsLoss."""
  w_BxV = w_BxV.reshape(-1, w_BxV.shape[-1])
  ok_B = _rows_valid(None if valid_B is None else jnp.reshape(valid_B, (-1,)), w_BxV.shape[0])
  w_BxV = _zero_invalid(w_BxV, ok_B)
  mean_V = jnp.sum(w_BxV, axis=0) / jnp.maximum(jnp.sum(ok_B), 1)
  return jnp.sum(mean_V ** 2).astype(jnp.float32)


def l1(w_BxV: Array, valid_B: Array | None = None) -> Array:
  """The L1 regulariser: each valid row's summed |weight|, averaged over the rows."""
  w_BxV = w_BxV.reshape(-1, w_BxV.shape[-1])
  ok_B = _rows_valid(None if valid_B is None else jnp.reshape(valid_B, (-1,)), w_BxV.shape[0])
  return _mean_over(jnp.sum(jnp.abs(_zero_invalid(w_BxV, ok_B)), axis=-1), ok_B)


REGULARIZERS = {"flops": flops, "l1": l1}


def _rows_valid(valid_B: Array | None, batch: int) -> Array:
  return jnp.ones((batch,), bool) if valid_B is None else jnp.asarray(valid_B, bool)


def _zero_invalid(x_Bx, ok_B: Array):
  """Replaces masked rows by zeros before any arithmetic, so that garbage (even inf or NaN) in a
  padded row cannot leak into the loss or its gradients through 0 * nan. `x` is an array or a
  pytree of arrays whose leading axes are those of ok_B."""
  def zero(x):
    ok = ok_B.reshape(ok_B.shape + (1,) * (x.ndim - ok_B.ndim))
    return jnp.where(ok, x, jnp.zeros_like(x))
  return jax.tree.map(zero, x_Bx)


def _rows(fn, *trees):
  """fn applied leaf by leaf: the row operations (reshape, concatenate) of any representation."""
  return jax.tree.map(fn, *trees)


def _mean_over(loss_B: Array, valid_B: Array) -> Array:
  """Mean over valid rows (0 when there are none)."""
  total = jnp.sum(jnp.where(valid_B, loss_B, 0.0))
  return (total / jnp.maximum(jnp.sum(valid_B), 1)).astype(jnp.float32)


def _masked_logsumexp(logits_BxC: Array, allowed_BxC: Array) -> Array:
  # Every row keeps at least its target column, so no row is all -inf.
  return jax.nn.logsumexp(jnp.where(allowed_BxC, logits_BxC, -jnp.inf), axis=1)


def _same_id(ids_B: Array, ids_C: Array) -> Array:
  """[B, C] True where a row's id (>= 0; -1 is no id) equals a candidate's id."""
  return (ids_B[:, None] == ids_C[None, :]) & (ids_B[:, None] >= 0)


def _forward_logits(q_BxD, p_BxD, neg_BxNxD, scale, valid_B, p_ids_B, neg_ids_BxN, q_ids_B,
                    score: Score):
  """Query-to-document logits over candidates [positives (B), hard negatives (B*N, row-major)],
  which candidates each query may see, and the prepared inputs. The target of row i is column i."""
  batch = jax.tree.leaves(q_BxD)[0].shape[0]
  valid_B = _rows_valid(valid_B, batch)
  q_BxD = score.prepare(_zero_invalid(q_BxD, valid_B))
  p_BxD = score.prepare(_zero_invalid(p_BxD, valid_B))
  docs_CxD, doc_ok_C = p_BxD, valid_B
  doc_ids_C = None if p_ids_B is None else jnp.asarray(p_ids_B, jnp.int32)
  if neg_BxNxD is not None:
    num_neg = jax.tree.leaves(neg_BxNxD)[0].shape[1]
    neg_ok_BxN = jnp.broadcast_to(valid_B[:, None], (batch, num_neg))
    if neg_ids_BxN is not None:
      neg_ids_BxN = jnp.asarray(neg_ids_BxN, jnp.int32)
      neg_ok_BxN = neg_ok_BxN & (neg_ids_BxN >= 0)  # -1: a padding negative
    neg_BxNxD = score.prepare(_zero_invalid(neg_BxNxD, neg_ok_BxN))
    docs_CxD = _rows(lambda p, n: jnp.concatenate([p, n.reshape(batch * num_neg, *n.shape[2:])]),
                     p_BxD, neg_BxNxD)
    doc_ok_C = jnp.concatenate([valid_B, neg_ok_BxN.reshape(-1)])
    if doc_ids_C is not None:
      # Negatives without ids (-1) are never taken for a duplicate of the positive.
      neg_ids_C = (jnp.full((batch * num_neg,), -1, jnp.int32) if neg_ids_BxN is None
                   else neg_ids_BxN.reshape(-1))
      doc_ids_C = jnp.concatenate([doc_ids_C, neg_ids_C])
  logits_BxC = scale * score.matrix(q_BxD, docs_CxD)
  num_docs = doc_ok_C.shape[0]
  target_BxC = jnp.arange(num_docs)[None, :] == jnp.arange(batch)[:, None]
  allowed_BxC = doc_ok_C[None, :]
  if doc_ids_C is not None:
    # The same document elsewhere in the batch (a repeated positive, or a hard negative that is
    # the positive) is not a negative for this row.
    allowed_BxC = allowed_BxC & ~_same_id(doc_ids_C[:batch], doc_ids_C)
  if q_ids_B is not None:
    # Another row of the same query (a query with several positives) holds one of its positives.
    q_ids_B = jnp.asarray(q_ids_B, jnp.int32)
    same_q_BxB = _same_id(q_ids_B, q_ids_B)
    pad_BxM = jnp.zeros((batch, num_docs - batch), bool)  # its hard negatives stay
    allowed_BxC = allowed_BxC & ~jnp.concatenate([same_q_BxB, pad_BxM], axis=1)
  return logits_BxC, allowed_BxC | target_BxC, valid_B, q_BxD, p_BxD


def mnrl(q_BxD: Array, p_BxD: Array, neg_BxNxD: Array | None = None, *, scale: float = 20.0,
         symmetric: bool = False, valid_B: Array | None = None, p_ids_B: Array | None = None,
         neg_ids_BxN: Array | None = None, q_ids_B: Array | None = None,
         score: Score = COSINE) -> Array:
  """Multiple-negatives ranking loss (InfoNCE with in-batch negatives), logits = score x scale.

  Query i ranks every positive in the batch and every hard negative of every row; its target is
  positive i. As sentence-transformers' MultipleNegativesRankingLoss, or with symmetric=True its
  MultipleNegativesSymmetricRankingLoss: (forward + backward) / 2, where backward has positive i
  rank the batch's queries.

  valid_B: bool, real rows; padded rows give no loss and are no one's candidates.
  p_ids_B, neg_ids_BxN: int32 document ids (-1: no id). A candidate with row i's positive id is
    masked for row i (except its own target), and in the backward direction a query whose positive
    has that id is masked too. A hard negative with id -1 is padding: never a candidate.
  q_ids_B: int32 query ids (-1: no id). Rows of the same query (one query, several positives)
    do not rank each other's positives (or, backward, each other's queries) as negatives; their
    hard negatives stay candidates.
  score: the representation's similarity (cosine over dense vectors by default).
  """
  logits_BxC, allowed_BxC, valid_B, q_BxD, p_BxD = _forward_logits(
      q_BxD, p_BxD, neg_BxNxD, scale, valid_B, p_ids_B, neg_ids_BxN, q_ids_B, score)
  rows_B = jnp.arange(valid_B.shape[0])
  loss_B = _masked_logsumexp(logits_BxC, allowed_BxC) - logits_BxC[rows_B, rows_B]
  if symmetric:
    logits_BxB = scale * score.matrix(p_BxD, q_BxD)  # positive i -> queries
    allowed_BxB = valid_B[None, :]
    # A query whose positive is this same document, or that is this row's query, matches it too.
    for ids_B in (p_ids_B, q_ids_B):
      if ids_B is not None:
        ids_B = jnp.asarray(ids_B, jnp.int32)
        allowed_BxB = allowed_BxB & ~_same_id(ids_B, ids_B)
    allowed_BxB = allowed_BxB | (rows_B[:, None] == rows_B[None, :])
    backward_B = _masked_logsumexp(logits_BxB, allowed_BxB) - logits_BxB[rows_B, rows_B]
    loss_B = (loss_B + backward_B) / 2
  return _mean_over(loss_B, valid_B)


def retrieval_accuracy(q_BxD: Array, p_BxD: Array, neg_BxNxD: Array | None = None, *,
                       valid_B: Array | None = None, p_ids_B: Array | None = None,
                       neg_ids_BxN: Array | None = None, q_ids_B: Array | None = None,
                       score: Score = COSINE) -> Array:
  """In-batch top-1 accuracy: the fraction of valid queries whose best candidate (same candidates
  and masks as `mnrl`) is their own positive. Ties go to the lower column (positives first)."""
  logits_BxC, allowed_BxC, valid_B, _, _ = _forward_logits(
      q_BxD, p_BxD, neg_BxNxD, 1.0, valid_B, p_ids_B, neg_ids_BxN, q_ids_B, score)
  best_B = jnp.argmax(jnp.where(allowed_BxC, logits_BxC, -jnp.inf), axis=1)
  return _mean_over((best_B == jnp.arange(valid_B.shape[0])).astype(jnp.float32), valid_B)


def triplet(a_BxD: Array, p_BxD: Array, n_BxD: Array, *, margin: float = 0.5,
            distance: str = "cosine", valid_B: Array | None = None,
            score: Score = COSINE) -> Array:
  """relu(d(a, p) - d(a, n) + margin), as sentence-transformers' TripletLoss.

  distance: "cosine", 1 - score (1 - cos for dense vectors), or "euclidean" (dense vectors
  only): the distance of the prepared (unit) vectors, sqrt(2 - 2 cos) in [0, 2], unlike
  sentence-transformers, whose euclidean distance sees the model's output as it is (unit vectors
  only for models ending in Normalize).
  """
  valid_B = _rows_valid(valid_B, jax.tree.leaves(a_BxD)[0].shape[0])
  a_BxD, p_BxD, n_BxD = (score.prepare(_zero_invalid(x, valid_B)) for x in (a_BxD, p_BxD, n_BxD))
  if distance == "cosine":
    dist = lambda x, y: 1.0 - score.pairs(x, y)  # noqa: E731
  elif distance == "euclidean":
    def dist(x, y):
      sq_B = jnp.sum(jnp.square(x - y), axis=-1)
      # sqrt has an infinite slope at 0 (an anchor equal to its positive): take 0 there instead.
      positive_B = sq_B > 0
      return jnp.where(positive_B, jnp.sqrt(jnp.where(positive_B, sq_B, 1.0)), 0.0)
  else:
    raise ValueError(f"distance={distance!r}; expected 'cosine' or 'euclidean'")
  loss_B = jax.nn.relu(dist(a_BxD, p_BxD) - dist(a_BxD, n_BxD) + margin)
  return _mean_over(loss_B, valid_B)


def cosent(e1_BxD: Array, e2_BxD: Array, labels_B: Array, *, scale: float = 20.0,
           valid_B: Array | None = None, score: Score = COSINE) -> Array:
  """CoSENT, as sentence-transformers' CoSENTLoss: with s = scale * score(e1, e2) per pair,
  log(1 + sum over (i, j) with label_i > label_j of exp(s_j - s_i)).

  One term over all pairs of valid rows (not a mean over rows): a batch with no ordered pair
  (all labels equal) gives log(1) = 0.
  """
  valid_B = _rows_valid(valid_B, jax.tree.leaves(e1_BxD)[0].shape[0])
  s_B = scale * score.pairs(score.prepare(_zero_invalid(e1_BxD, valid_B)),
                            score.prepare(_zero_invalid(e2_BxD, valid_B)))
  labels_B = jnp.asarray(labels_B, jnp.float32)
  diff_BxB = s_B[None, :] - s_B[:, None]  # [i, j] = s_j - s_i
  ordered_BxB = (labels_B[:, None] > labels_B[None, :]) & valid_B[:, None] & valid_B[None, :]
  terms = jnp.where(ordered_BxB, diff_BxB, -jnp.inf).reshape(-1)
  # The leading 0 is the 1 in log(1 + ...); it also keeps the sum finite when no pair is ordered.
  terms = jnp.concatenate([jnp.zeros((1,), jnp.float32), terms])
  return jax.nn.logsumexp(terms).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Matryoshka: one forward pass, the loss on each prefix of the embeddings.
# ----------------------------------------------------------------------------------------------


def check_matryoshka_dims(dims, model_dim: int, weights=()) -> tuple[int, ...]:
  """Validated Matryoshka dims (any order; returned largest first) or a ValueError naming the
  problem: each an integer in 1..model_dim, no repeats, and one weight per dim if weights given."""
  dims = tuple(dims)
  bad = [d for d in dims if not isinstance(d, int) or isinstance(d, bool) or not 1 <= d <= model_dim]
  if bad:
    raise ValueError(f"matryoshka dims {list(bad)} are not integers in 1..{model_dim} (the "
                     f"model's embedding dimension)")
  if len(set(dims)) != len(dims):
    raise ValueError(f"matryoshka dims {list(dims)} repeat a value")
  if weights and len(weights) != len(dims):
    raise ValueError(f"{len(weights)} matryoshka weights for {len(dims)} dims: give one per dim "
                     f"(or none for all 1)")
  return dims


def truncate(x_BxD: Array, d: int) -> Array:
  """A dense vector's Matryoshka prefix: its first d dims (scores re-normalise it)."""
  return x_BxD[..., :d]


def matryoshka(loss: Callable, dims, weights=(), *, prefix: Callable = truncate) -> Callable:
  """Wraps a loss: wrapped(*embs, **kwargs) -> (sum over d in dims of weight_d * loss at d,
  {d: loss at d}), from one forward pass (as sentence-transformers' MatryoshkaLoss, whose weights
  default to 1; the per-dim values are for logging). Positional arguments are the outputs the
  loss reads, each cut by `prefix(x, d)` (None stays None); keyword arguments pass through. The
  losses here score with cosine, so each prefix is re-normalised as a truncated embedding is."""
  dims = tuple(dims)
  weights = tuple(weights) or (1.0,) * len(dims)
  check_matryoshka_dims(dims, max(dims), weights)

  def wrapped(*embs, **kwargs):
    full = next(jax.tree.leaves(e)[0].shape[-1] for e in embs if e is not None)
    check_matryoshka_dims(dims, full)
    values = [loss(*(None if e is None else prefix(e, d) for e in embs), **kwargs) for d in dims]
    return weighted_sum(zip(weights, values)), dict(zip(dims, values))

  return wrapped


def weighted_sum(parts) -> Array:
  """sum of weight * value over (weight, value) pairs, in order: Matryoshka prefixes, and the
  objective's terms (embed_jax.objective)."""
  return sum(w * value for w, value in parts)


def prefix_self_distillation(e_BxD: Array, dims, *, target_BxD: Array | None = None,
                             pairwise: float = 1.0, topk: float = 1.0, k: int = 8,
                             valid_B: Array | None = None) -> Array:
  """Matryoshka self-distillation on unlabelled texts (after Matryoshka-Adaptor, Yoon et al.
  2024): for each prefix d, the cosine similarities among the batch's texts at d dims are pulled
  toward those of the full embedding. No labels are needed.

  target_BxD: the full embeddings to match (a frozen model's, precomputed); None uses the
    current full embedding under stop_gradient.
  pairwise: weight of the mean |S_d - S| over all pairs of distinct valid texts.
  topk: weight of the same over each text's k nearest neighbours under the target (the pairs a
    search ranks first).
  Returns the sum over dims of the weighted terms (a prefix equal to the target contributes 0).
  """
  batch = e_BxD.shape[0]
  valid_B = _rows_valid(valid_B, batch)
  e_BxD = _zero_invalid(e_BxD, valid_B)
  target_BxD = jax.lax.stop_gradient(e_BxD if target_BxD is None else
                                     _zero_invalid(jnp.asarray(target_BxD, jnp.float32), valid_B))
  target_BxB = cosine_matrix(target_BxD, None)
  pair_ok_BxB = valid_B[:, None] & valid_B[None, :] & ~jnp.eye(batch, dtype=bool)
  # Each row's k nearest valid neighbours under the target (k is capped by the batch).
  k = min(k, batch - 1)
  ranked_BxB = jnp.where(pair_ok_BxB, target_BxB, -jnp.inf)
  kth_Bx1 = jax.lax.top_k(ranked_BxB, k)[0][:, -1:] if k > 0 else jnp.full((batch, 1), jnp.inf)
  near_BxB = pair_ok_BxB & (ranked_BxB >= kth_Bx1)
  total = jnp.zeros((), jnp.float32)
  for d in check_matryoshka_dims(dims, e_BxD.shape[-1]):
    gap_BxB = jnp.abs(cosine_matrix(e_BxD[:, :d], None) - target_BxB)
    for weight, ok_BxB in ((pairwise, pair_ok_BxB), (topk, near_BxB)):
      if weight:
        total += weight * jnp.sum(jnp.where(ok_BxB, gap_BxB, 0.0)) / jnp.maximum(jnp.sum(ok_BxB), 1)
  return total


# ----------------------------------------------------------------------------------------------
# Distillation from a teacher's (precomputed) embeddings.
# ----------------------------------------------------------------------------------------------


def embedding_distillation(student_BxD: Array, teacher_BxD: Array, *, kind: str = "mse",
                           valid_B: Array | None = None) -> Array:
  """The student's embedding against the teacher's, both L2-normalised; the student is already
  in the teacher's space (same dims, or through a learned projection).

  kind: "mse", the mean over rows of |s - t|^2 (= 2 - 2 cos; sentence-transformers' MSELoss
  averages over the D dims as well, i.e. this / D); "cosine", the mean of 1 - cos.
  """
  if student_BxD.shape[-1] != teacher_BxD.shape[-1]:
    raise ValueError(f"student dims {student_BxD.shape[-1]} != teacher dims "
                     f"{teacher_BxD.shape[-1]}: project the student first")
  valid_B = _rows_valid(valid_B, student_BxD.shape[0])
  s_BxD = unit(_zero_invalid(student_BxD, valid_B))
  t_BxD = unit(_zero_invalid(jnp.asarray(teacher_BxD, jnp.float32), valid_B))
  if kind == "mse":
    loss_B = jnp.sum(jnp.square(s_BxD - t_BxD), axis=-1)
  elif kind == "cosine":
    loss_B = 1.0 - jnp.sum(s_BxD * t_BxD, axis=-1)
  else:
    raise ValueError(f"kind={kind!r}: choose mse or cosine")
  return _mean_over(loss_B, valid_B)


def score_distillation(q_BxD: Array, d_CxD: Array, *, teacher_q_BxT: Array, teacher_d_CxT: Array,
                       temperature: float = 0.05, teacher_temperature: float = 0.05,
                       valid_B: Array | None = None, valid_C: Array | None = None,
                       exclude_self: bool = False, score: Score = COSINE) -> Array:
  """KL(teacher || student) between the in-batch similarity distributions: for each query row,
  softmax over the candidates of score / temperature, the teacher's the cosine of its stored
  vectors.

  Student and teacher may have different dims (only similarities are compared), so it also
  distils into Matryoshka prefixes of the student (the teacher's vectors are never cut).
  exclude_self: queries and candidates are the same texts (unlabelled batches); a text is not
  its own candidate.
  """
  valid_B = _rows_valid(valid_B, jax.tree.leaves(q_BxD)[0].shape[0])
  valid_C = _rows_valid(valid_C, jax.tree.leaves(d_CxD)[0].shape[0])
  student_BxC = score.matrix(score.prepare(_zero_invalid(q_BxD, valid_B)),
                             score.prepare(_zero_invalid(d_CxD, valid_C))) / temperature
  teacher_BxC = cosine_matrix(
      _zero_invalid(jnp.asarray(teacher_q_BxT, jnp.float32), valid_B),
      _zero_invalid(jnp.asarray(teacher_d_CxT, jnp.float32), valid_C)) / teacher_temperature
  ok_BxC = jnp.broadcast_to(valid_C[None, :], student_BxC.shape)
  if exclude_self:
    ok_BxC = ok_BxC & ~jnp.eye(*student_BxC.shape, dtype=bool)
  log_p_student = jax.nn.log_softmax(jnp.where(ok_BxC, student_BxC, -jnp.inf), axis=-1)
  log_p_teacher = jax.nn.log_softmax(jnp.where(ok_BxC, teacher_BxC, -jnp.inf), axis=-1)
  kl_BxC = jnp.where(ok_BxC, jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), 0.0)
  return _mean_over(jnp.sum(kl_BxC, axis=-1), valid_B)


def margin_mse(q_BxD: Array, p_BxD: Array, n_BxD: Array, *, teacher_q_BxT: Array,
               teacher_p_BxT: Array, teacher_n_BxT: Array, valid_B: Array | None = None,
               score: Score = COSINE) -> Array:
  """Margin-MSE (Hofstätter et al., 2020): (s(q, p) - s(q, n) - [t(q, p) - t(q, n)])^2, mean over
  valid rows; the teacher's scores are the cosines of its stored vectors."""
  valid_B = _rows_valid(valid_B, jax.tree.leaves(q_BxD)[0].shape[0])
  ok = lambda x: _zero_invalid(x, valid_B)  # noqa: E731
  f32 = lambda x: ok(jnp.asarray(x, jnp.float32))  # noqa: E731
  s = lambda a, b: score.pairs(score.prepare(ok(a)), score.prepare(ok(b)))  # noqa: E731
  student_B = s(q_BxD, p_BxD) - s(q_BxD, n_BxD)
  teacher_B = (cosine_pairs(f32(teacher_q_BxT), f32(teacher_p_BxT))
               - cosine_pairs(f32(teacher_q_BxT), f32(teacher_n_BxT)))
  return _mean_over(jnp.square(student_B - teacher_B), valid_B)


# ---- Candidate groups: a query's positive (column 0) and its hard negatives, each scored ----


def group_allowed(neg_ids_BxN: Array | None, n: int, batch: int) -> Array:
  """[B, 1 + N]: the positive and each real negative (doc id >= 0; -1 is padding)."""
  neg = jnp.ones((batch, n), bool) if neg_ids_BxN is None else jnp.asarray(neg_ids_BxN) >= 0
  return jnp.concatenate([jnp.ones((batch, 1), bool), neg], axis=1)


def listwise_ce(scores_BxC: Array, allowed_BxC: Array, valid_B: Array | None = None, *,
                temperature: float = 1.0) -> Array:
  """Cross-entropy of the positive (column 0) against the query's candidates: FlagEmbedding's
  reranker loss over a group of 1 positive + N negatives, sentence-transformers' CrossEncoder
  CrossEntropyLoss. Mean over valid rows."""
  valid_B = _rows_valid(valid_B, scores_BxC.shape[0])
  logits = _zero_invalid(jnp.asarray(scores_BxC, jnp.float32), valid_B) / temperature
  return _mean_over(_masked_logsumexp(logits, allowed_BxC) - logits[:, 0], valid_B)


def pointwise_bce(scores_BxC: Array, allowed_BxC: Array, valid_B: Array | None = None, *,
                  pos_weight: float = 1.0) -> Array:
  """Binary cross-entropy of each candidate's logit, the positive (column 0) labelled 1 and the
  negatives 0 (sentence-transformers' BinaryCrossEntropyLoss); mean over the real candidates
  of valid rows."""
  valid_B = _rows_valid(valid_B, scores_BxC.shape[0])
  logits = _zero_invalid(jnp.asarray(scores_BxC, jnp.float32), valid_B)
  labels = jnp.zeros_like(logits).at[:, 0].set(1.0)
  per = pos_weight * labels * jax.nn.softplus(-logits) + (1 - labels) * jax.nn.softplus(logits)
  keep = allowed_BxC & valid_B[:, None]
  return (jnp.sum(jnp.where(keep, per, 0.0)) / jnp.maximum(jnp.sum(keep), 1)).astype(jnp.float32)


def listwise_kl(student_BxC: Array, teacher_BxC: Array, allowed_BxC: Array,
                valid_B: Array | None = None, *, temperature: float = 1.0,
                teacher_temperature: float = 1.0) -> Array:
  """KL(teacher || student) of the softmax over each query's candidates (RocketQAv2, ColBERTv2
  distillation): the student learns the teacher's distribution over its list. Mean over valid
  rows."""
  valid_B = _rows_valid(valid_B, student_BxC.shape[0])
  s = _zero_invalid(jnp.asarray(student_BxC, jnp.float32), valid_B) / temperature
  t = _zero_invalid(jnp.asarray(teacher_BxC, jnp.float32), valid_B) / teacher_temperature
  log_s = s - _masked_logsumexp(s, allowed_BxC)[:, None]
  log_t = t - _masked_logsumexp(t, allowed_BxC)[:, None]
  kl = jnp.where(allowed_BxC, jnp.exp(log_t) * (log_t - log_s), 0.0).sum(axis=1)
  return _mean_over(kl, valid_B)


def group_margin_mse(student_BxC: Array, teacher_BxC: Array, allowed_BxC: Array,
                     valid_B: Array | None = None) -> Array:
  """Margin-MSE (Hofstätter et al., 2020) over each (positive, negative) pair of the group:
  ((s_p - s_n) - (t_p - t_n))^2, mean over the real negatives of valid rows."""
  valid_B = _rows_valid(valid_B, student_BxC.shape[0])
  s = _zero_invalid(jnp.asarray(student_BxC, jnp.float32), valid_B)
  t = _zero_invalid(jnp.asarray(teacher_BxC, jnp.float32), valid_B)
  err = jnp.square((s[:, :1] - s[:, 1:]) - (t[:, :1] - t[:, 1:]))
  keep = allowed_BxC[:, 1:] & valid_B[:, None]
  return (jnp.sum(jnp.where(keep, err, 0.0)) / jnp.maximum(jnp.sum(keep), 1)).astype(jnp.float32)
