"""IR metrics: parity with pytrec_eval (as BEIR uses it) on random runs, and hand-computed cases."""

import math

import numpy as np
import pytest

from embed_jax.evaluate import ir_metrics, run_from_topk

pytrec_eval = pytest.importorskip("pytrec_eval")

K_VALUES = (1, 3, 5, 10, 20)
# Our name -> pytrec_eval measure prefix (mrr is compared separately: pytrec_eval has no cutoff).
TREC_NAMES = {"ndcg": "ndcg_cut", "map": "map_cut", "recall": "recall", "precision": "P"}


def _pytrec(qrels, run, k_values=K_VALUES):
  ks = ",".join(map(str, k_values))
  measures = {f"{m}.{ks}" for m in TREC_NAMES.values()}
  return pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)


def _reference_mrr(qrels, run, k):
  """BEIR's mrr@k per query, ranking as trec_eval does (float32 score desc, then docid desc)."""
  out = {}
  for qid, scores in run.items():
    if qid not in qrels:
      continue
    ranked = sorted(scores, key=lambda d: (np.float32(scores[d]), d), reverse=True)[:k]
    relevant = {d for d, r in qrels[qid].items() if r > 0}
    out[qid] = next((1.0 / (i + 1) for i, d in enumerate(ranked) if d in relevant), 0.0)
  return out


def _random_case(seed: int):
  """Graded qrels 0-2, ties, near-ties below float32 resolution, every awkward query kind."""
  rng = np.random.default_rng(seed)
  docs = [f"d{i}" for i in range(40)] + ["9", "10", "100", "é1", "Z"]  # lexicographic tie order
  qrels, run = {}, {}
  for q in range(60):
    qid = f"q{q}"
    judged = rng.choice(docs, size=rng.integers(1, 12), replace=False)
    rels = rng.integers(0, 3, size=len(judged))
    if q % 7 == 0:
      rels[:] = 0  # a query with judged documents but none relevant
    qrels[qid] = {str(d): int(r) for d, r in zip(judged, rels)}
    if q % 11 == 5:
      continue  # a qrels query missing from the run
    retrieved = rng.choice(docs, size=rng.integers(0, 30), replace=False)  # incl. unjudged docs
    scores = np.round(rng.normal(size=len(retrieved)), 1)  # coarse: many exact ties
    if q % 5 == 0 and len(scores) > 1:
      scores[1] = scores[0] + 1e-10  # a tie only at float32 precision
    run[qid] = {str(d): float(s) for d, s in zip(retrieved, scores)}
  run["only_in_run"] = {"d1": 1.0}
  return qrels, run


@pytest.mark.parametrize("seed", range(100))  # 100 random runs of 60 queries each
def test_matches_pytrec_eval_per_query_and_mean(seed):
  qrels, run = _random_case(seed)
  ref = _pytrec(qrels, run)
  ours = ir_metrics(qrels, run, K_VALUES, per_query=True)
  assert set(ours) == set(ref)  # the same queries: those in both qrels and run
  for qid, values in ref.items():
    for ours_name, trec_name in TREC_NAMES.items():
      for k in K_VALUES:
        assert ours[qid][f"{ours_name}@{k}"] == pytest.approx(values[f"{trec_name}_{k}"],
                                                              abs=1e-6), (qid, ours_name, k)
  for k in K_VALUES:
    mrr = _reference_mrr(qrels, run, k)
    for qid in ref:
      assert ours[qid][f"mrr@{k}"] == pytest.approx(mrr[qid], abs=1e-12), (qid, k)

  # BEIR's EvaluateRetrieval.evaluate: the mean over the queries pytrec_eval returns.
  mean = ir_metrics(qrels, run, K_VALUES)
  for ours_name, trec_name in TREC_NAMES.items():
    for k in K_VALUES:
      expected = np.mean([v[f"{trec_name}_{k}"] for v in ref.values()])
      assert mean[f"{ours_name}@{k}"] == pytest.approx(expected, abs=1e-6)
  assert mean["mrr@10"] == pytest.approx(np.mean(list(_reference_mrr(qrels, run, 10).values())))


def test_pytrec_eval_recip_rank_equals_mrr_at_depth():
  qrels, run = _random_case(11)
  ref = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run)
  ours = ir_metrics(qrels, run, (1000,), per_query=True)
  for qid, values in ref.items():
    assert ours[qid]["mrr@1000"] == pytest.approx(values["recip_rank"], abs=1e-12)


def test_average_over_relevant_counts_missing_as_zero_and_skips_unanswerable():
  qrels = {"a": {"d1": 1}, "b": {"d2": 1}, "none": {"d3": 0}}
  run = {"a": {"d1": 1.0}, "none": {"d3": 1.0}}
  beir = ir_metrics(qrels, run, (10,))
  assert beir["ndcg@10"] == pytest.approx(0.5)  # over a (1) and none (0); b is left out
  relevant = ir_metrics(qrels, run, (10,), average_over="relevant")
  assert relevant["ndcg@10"] == pytest.approx(0.5)  # over a (1) and b (missing: 0)
  assert set(ir_metrics(qrels, run, (10,), per_query=True, average_over="relevant")) == {"a", "b"}


def test_hand_computed_graded():
  qrels = {"q": {"a": 2, "b": 1, "c": 0}}
  run = {"q": {"a": 0.1, "b": 0.9, "c": 0.5, "x": 0.3}}  # ranking b, c, x, a
  m = ir_metrics(qrels, run, (1, 3, 5))
  idcg = 2 + 1 / math.log2(3)
  assert m["precision@1"] == 1.0
  assert m["precision@3"] == pytest.approx(1 / 3)
  assert m["precision@5"] == pytest.approx(2 / 5)  # divides by k though only 4 are retrieved
  assert m["recall@3"] == 0.5 and m["recall@5"] == 1.0
  assert m["map@3"] == pytest.approx(0.5)
  assert m["map@5"] == pytest.approx((1 / 1 + 2 / 4) / 2)
  assert m["mrr@1"] == 1.0
  assert m["ndcg@1"] == pytest.approx(1 / 2)  # gain 1 where the ideal has gain 2
  assert m["ndcg@3"] == pytest.approx(1 / idcg)
  assert m["ndcg@5"] == pytest.approx((1 + 2 / math.log2(5)) / idcg)


def test_negative_relevance_is_not_relevant_and_adds_no_gain():
  m = ir_metrics({"q": {"a": -1, "b": 2}}, {"q": {"a": 3.0, "b": 1.0}}, (1, 3))
  assert m["ndcg@1"] == 0.0 and m["mrr@3"] == 0.5
  assert m["ndcg@3"] == pytest.approx((2 / math.log2(3)) / 2)


@pytest.mark.parametrize("scores, relevant, rr", [
    ({"a": 1.0, "b": 1.0}, "a", 0.5),             # tie: docid descending, so b first
    ({"9": 1.0, "10": 1.0}, "10", 0.5),           # lexicographic, not numeric: "9" > "10"
    ({"a": 1.0 + 1e-9, "b": 1.0}, "a", 0.5),      # equal in float32: still a tie
    ({"a": 1.0 + 1e-6, "b": 1.0}, "a", 1.0),      # distinct in float32
])
def test_ties_follow_trec_eval(scores, relevant, rr):
  qrels = {"q": {relevant: 1}}
  assert ir_metrics(qrels, {"q": scores}, (10,))["mrr@10"] == rr
  ref = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate({"q": scores})
  assert ref["q"]["recip_rank"] == rr


def test_empty_run_for_a_query_scores_zero():
  m = ir_metrics({"q": {"a": 1}, "r": {"a": 1}}, {"q": {}, "r": {"a": 1.0}}, (1, 10))
  assert m["ndcg@10"] == 0.5 and m["recall@10"] == 0.5 and m["mrr@1"] == 0.5


def test_ignore_identical_ids():
  qrels = {"q": {"d": 1}}
  run = {"q": {"q": 2.0, "d": 1.0}}
  assert ir_metrics(qrels, run, (1,))["mrr@1"] == 0.0
  assert ir_metrics(qrels, run, (1,), ignore_identical_ids=True)["mrr@1"] == 1.0


def test_errors():
  with pytest.raises(ValueError, match="share no query"):
    ir_metrics({"q": {"d": 1}}, {"other": {"d": 1.0}})
  with pytest.raises(ValueError, match="average_over"):
    ir_metrics({"q": {"d": 1}}, {"q": {"d": 1.0}}, average_over="all")
  with pytest.raises(ValueError, match="k_values"):
    ir_metrics({"q": {"d": 1}}, {"q": {"d": 1.0}}, k_values=(0,))


def test_run_from_topk():
  scores_QxK = np.array([[0.9, 0.5, 0.1], [0.8, 0.0, 0.0]], np.float32)
  indices_QxK = np.array([[2, 0, 1], [1, -1, -1]])  # -1: fewer than k hits
  run = run_from_topk(["q1", "q2"], ["d0", "d1", "d2"], scores_QxK, indices_QxK)
  assert run == {"q1": {"d2": pytest.approx(0.9), "d0": 0.5, "d1": pytest.approx(0.1)},
                 "q2": {"d1": pytest.approx(0.8)}}
  with pytest.raises(ValueError, match="out of range"):
    run_from_topk(["q1"], ["d0"], scores_QxK[:1], indices_QxK[:1])
  with pytest.raises(ValueError, match="query ids"):
    run_from_topk(["q1"], ["d0", "d1", "d2"], scores_QxK, indices_QxK)
