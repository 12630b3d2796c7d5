"""Teacher score stores (a teacher's scores of each training query's candidates) and the student
objectives that read them: listwise KL and Margin-MSE over the candidate group, false-negative
removal."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import embed_jax
from tests.conftest import slow_variant
from tests.test_train import _assert_same, runner_model_config, synthetic_batch

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


@pytest.fixture
def tiny_dataset(tiny_beir):
  from embed_jax.data import load_beir
  return load_beir(str(tiny_beir))


@pytest.fixture
def negatives(tiny_dataset, tmp_path):
  """Negatives mined by a tiny random bi-encoder: 4 per train query."""
  from embed_jax.data.mining import mine_hard_negatives, write_negatives
  from embed_jax.testing import make_tiny_model
  model = embed_jax.load(make_tiny_model(tmp_path / "miner", seed=2))
  rows = mine_hard_negatives(model, tiny_dataset, "train", top_k=10, num_negatives=4, margin=None)
  return write_negatives(rows, tmp_path / "negatives.jsonl")


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
  from tests.test_rerank import _write_st_cross_encoder
  return embed_jax.load(_write_st_cross_encoder(tmp_path_factory.mktemp("ce"), "bert"))


def test_score_store_holds_the_teachers_scores_resumes_and_refuses_other_data(
    tiny_dataset, negatives, cross_encoder, tmp_path):
  from embed_jax.data.mining import read_negatives
  from embed_jax.data.scores import ScoreStore, build_score_store, candidate_lists
  from embed_jax.data.teacher import TeacherStoreError
  whole = ScoreStore(build_score_store(cross_encoder, tiny_dataset, "train", negatives,
                                       tmp_path / "whole", name="ce", chunk=2))
  part = tmp_path / "part"
  build_score_store(cross_encoder, tiny_dataset, "train", negatives, part, name="ce", chunk=2,
                    stop_after_chunks=1)
  with pytest.raises(TeacherStoreError, match="incomplete"):
    ScoreStore(part)
  resumed = ScoreStore(build_score_store(cross_encoder, tiny_dataset, "train", negatives, part,
                                         name="ce", chunk=2))
  assert np.array_equal(whole.scores, resumed.scores)
  # Each score is the cross-encoder's logit of (query, candidate); positives come first.
  lists = candidate_lists(tiny_dataset, "train", read_negatives(negatives, tiny_dataset))
  texts = dict(zip(tiny_dataset.corpus_ids, tiny_dataset.corpus_texts(" ")))
  q = "q0"
  assert lists[q][:2] == ["d0", "d7"] and len(lists[q]) > 2
  want = cross_encoder.predict([(tiny_dataset.queries[q], texts[d]) for d in lists[q]],
                               activation=False)
  np.testing.assert_allclose(list(whole.query_scores(q).values()), want, atol=1e-6)
  assert whole.manifest["teacher"]["kind"] == "cross-encoder"
  queries = list(lists)
  whole.check(tiny_dataset, "train", negatives, queries, teacher="ce")
  with pytest.raises(TeacherStoreError, match="built by ce"):
    whole.check(tiny_dataset, "train", negatives, queries, teacher="another")
  with pytest.raises(TeacherStoreError, match="not on this"):
    whole.check(tiny_dataset, "test", negatives, queries)
  other = tmp_path / "other.jsonl"
  other.write_text(negatives.read_text().replace("\n", "\n", 1) + "\n")
  with pytest.raises(TeacherStoreError, match="another negatives file"):
    whole.check(tiny_dataset, "train", other, queries)
  with pytest.raises(TeacherStoreError, match="another teacher or data"):
    build_score_store(cross_encoder, tiny_dataset, "train", negatives, tmp_path / "whole", name="x")


def test_a_bi_encoder_teachers_scores_are_its_cosines(tiny_dataset, negatives, tmp_path):
  from embed_jax.data.scores import ScoreStore, build_score_store
  from embed_jax.testing import make_tiny_model
  teacher = embed_jax.load(make_tiny_model(tmp_path / "t", seed=4, hidden_size=48))
  store = ScoreStore(build_score_store(teacher, tiny_dataset, "train", negatives, tmp_path / "s",
                                       name="bi"))
  texts = dict(zip(tiny_dataset.corpus_ids, tiny_dataset.corpus_texts(" ")))
  scores = store.query_scores("q4")
  q = teacher.encode([tiny_dataset.queries["q4"]], normalize=True)[0]
  d = teacher.encode([texts[i] for i in scores], normalize=True)
  np.testing.assert_allclose(list(scores.values()), d @ q, atol=1e-5)
  assert store.manifest["teacher"]["score"] == "cosine"


def test_false_negatives_the_teacher_ranks_near_the_positive_are_dropped():
  from embed_jax.data.inputs import drop_false_negatives

  class Store:
    rows = {"q": None, "r": None}

    def query_scores(self, q):
      return {"q": {"p": 2.0, "p2": 5.0, "a": 1.9, "b": 0.5, "c": 3.0},
              "r": {"p": -1.0, "a": -3.0}}[q]

  qrels = {"q": {"p": 1, "p2": 1}, "r": {"p": 1}}
  out = drop_false_negatives({"q": ["a", "b", "c"], "r": ["a"]}, qrels, Store(), margin=0.0)
  assert out == {"q": ["a", "b"], "r": ["a"]}  # c scores above the lowest positive (2.0)
  out = drop_false_negatives({"q": ["a", "b", "c"], "r": ["a"]}, qrels, Store(), margin=0.5)
  assert out == {"q": ["b"], "r": ["a"]}


def test_student_distils_from_the_score_store_with_labels(tiny_beir, tiny_dataset, negatives,
                                                          cross_encoder, tmp_path):
  from configs import scifact_mnrl
  from embed_jax import train as T
  from embed_jax.data.scores import build_score_store
  from embed_jax.data.teacher import TeacherStoreError
  store = build_score_store(cross_encoder, tiny_dataset, "train", negatives, tmp_path / "scores",
                            name="ce")
  c = scifact_mnrl.get_config("smoke")
  c.data.dataset, c.data.negatives, c.data.num_negatives = str(tiny_beir), str(negatives), 2
  c.distill.score_store, c.distill.teacher = str(store), "ce"
  c.distill.candidate_kl, c.distill.candidate_margin_mse = 1.0, 0.1
  c.distill.temperature, c.distill.teacher_temperature = 0.05, 1.0
  c.distill.drop_false_negatives = True
  c.max_steps, c.evals.test.at_end = 2, False
  T.train(c, tmp_path / "run")
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
  assert rows[0]["distill_candidate_kl_loss"] > 0 and rows[0]["distill_candidate_margin_mse_loss"] > 0
  c.distill.teacher = "another"
  with pytest.raises(TeacherStoreError, match="built by ce"):
    T.train(c, tmp_path / "refused")
  assert not (tmp_path / "refused").exists()  # refused before the workdir exists


def _group_inputs(batch, seed):
  r = np.random.default_rng(seed + 70)
  pairs = batch["inputs"]["pairs"]
  b, n = pairs["neg_ids_BxN"].shape
  pairs["teacher_p_B"] = r.normal(2.0, 1.0, b).astype(np.float32)
  pairs["teacher_n_BxN"] = r.normal(0.0, 1.0, (b, n)).astype(np.float32)
  return batch


def _run_students(runner_name, devices, chunk=0, student="dense"):
  from configs import scifact_mnrl
  from embed_jax.testing import init_params
  from tests.test_rerank import _cross_config, _cross_model, cross_batch
  from tests.test_train import run_objective
  if student == "dense":
    c = scifact_mnrl.get_config()
    c.dropout = False
    cfg, params = runner_model_config(), init_params(runner_model_config())
    from embed_jax.representations import Dense
    rep, batches = Dense(), [_group_inputs(synthetic_batch(n=3, seed=s), s) for s in range(3)]
    for b_ in batches:  # a padding negative in every other row
      b_["inputs"]["pairs"]["neg_ids_BxN"][::2, 2] = -1
  else:
    # BCE beside the shift-invariant group losses: the classifier's bias gets a real gradient
    # (under listwise losses alone it is float noise, which Adam scales up to a full step).
    c = _cross_config(loss="bce")
    cfg, params, tok, rep = _cross_model()
    batches = [_group_inputs(cross_batch(tok, s), s) for s in range(3)]
  c.train.grad_cache_chunk, c.train.runner = chunk, runner_name
  c.distill.score_store = "unused"
  c.distill.candidate_kl, c.distill.candidate_margin_mse = 1.0, 0.5
  # A cosine student's scores / 0.05; a cross-encoder student's logits as they are.
  c.distill.temperature, c.distill.teacher_temperature = (0.05 if student == "dense" else 1.0), 1.0
  return run_objective(c, cfg, params, rep, batches, runner_name, devices)


@needs_8
@pytest.mark.parametrize("student", ["dense", pytest.param("cross", marks=slow_variant)])
def test_candidate_distillation_agrees_across_runners_and_grad_cache(student):
  one = _run_students("jit", jax.devices()[:1], student=student)
  _assert_same(one, _run_students("jit", jax.devices()[:8], student=student))
  _assert_same(one, _run_students("pmap", jax.devices()[:8], student=student))
  _assert_same(one, _run_students("jit", jax.devices()[:1], chunk=4, student=student))


def test_the_candidate_terms_are_the_group_losses_of_student_and_teacher_scores():
  from configs import scifact_mnrl
  from embed_jax import losses
  from embed_jax.models import SentenceEncoder
  from embed_jax.objective import build_objective
  from embed_jax.testing import init_params
  c = scifact_mnrl.get_config()
  c.loss.weight = 0.0
  c.distill.score_store = "unused"
  c.distill.candidate_kl, c.distill.temperature, c.distill.teacher_temperature = 1.0, 0.05, 2.0
  cfg = runner_model_config()
  params = init_params(cfg)
  batch = _group_inputs(synthetic_batch(n=3), 0)
  objective = build_objective(c)
  out = objective.embed(SentenceEncoder(cfg), params, batch["groups"], jax.random.key(0), False)
  unit = lambda x: np.asarray(x) / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  q, p, n = unit(out["q"]), unit(out["p"]), unit(out["n"])
  s = np.concatenate([np.sum(q * p, -1)[:, None], np.einsum("bd,bnd->bn", q, n)], 1)
  pairs = batch["inputs"]["pairs"]
  t = np.concatenate([pairs["teacher_p_B"][:, None], pairs["teacher_n_BxN"]], 1)
  allowed = np.ones_like(s, bool)
  want = losses.listwise_kl(s / 0.05, t / 2.0, allowed, pairs["valid_B"])
  loss, aux = objective.loss(out, batch["inputs"])
  np.testing.assert_allclose(aux["distill_candidate_kl_loss"], want, rtol=1e-5)
  np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_teacher_scores_cli(tiny_beir, negatives, tmp_path, capsys):
  from embed_jax.cli import main
  from tests.test_rerank import _write_st_cross_encoder
  folder = _write_st_cross_encoder(tmp_path / "ce", "bert")
  out = tmp_path / "scores"
  args = ["teacher", "--scores", "--model", str(folder), "--dataset", str(tiny_beir),
          "--negatives", str(negatives), "--out", str(out), "--name", "tiny-ce"]
  assert main(args) == 0
  assert "(query, candidate) scores of 7 train queries (tiny-ce, cross-encoder: logit)" in \
      capsys.readouterr().out
  assert main(args[:4] + ["--dataset", str(tiny_beir), "--out", str(tmp_path / "x")]) != 0
  assert "give --negatives FILE" in capsys.readouterr().err
