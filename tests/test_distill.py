"""Distillation: the losses against numpy, teacher stores (built, interrupted, resumed, imported,
refused), and training from a store under every runner."""

import json

import jax
import numpy as np
import pytest

from embed_jax import losses
from embed_jax import train as T
from embed_jax.models import heads
from embed_jax.data.teacher import (TeacherStore, TeacherStoreError, build_store, dataset_texts,
                                    import_store)

RNG = np.random.default_rng(0)


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---- losses ----

def test_embedding_distillation_matches_numpy():
  s, t = RNG.normal(size=(5, 6)), RNG.normal(size=(5, 6))
  mse = np.mean(np.sum((_unit(s) - _unit(t)) ** 2, -1))
  cos = np.mean(1 - np.sum(_unit(s) * _unit(t), -1))
  np.testing.assert_allclose(losses.embedding_distillation(s, t), mse, rtol=1e-5)
  np.testing.assert_allclose(losses.embedding_distillation(s, t, kind="cosine"), cos, rtol=1e-5)
  with pytest.raises(ValueError, match="student dims 6 != teacher dims 4"):
    losses.embedding_distillation(s, t[:, :4])


@pytest.mark.parametrize("exclude_self", [False, True])
def test_score_distillation_is_the_kl_of_in_batch_distributions(exclude_self):
  q, d = RNG.normal(size=(4, 6)), RNG.normal(size=(4, 6))
  tq, td = RNG.normal(size=(4, 10)), RNG.normal(size=(4, 10))  # other dims than the student's
  got = losses.score_distillation(q, d, teacher_q_BxT=tq, teacher_d_CxT=td, temperature=0.1,
                                  teacher_temperature=0.2, exclude_self=exclude_self)
  s, t = _unit(q) @ _unit(d).T / 0.1, _unit(tq) @ _unit(td).T / 0.2
  rows = []
  for i in range(4):
    keep = [j for j in range(4) if not (exclude_self and j == i)]
    ls, lt = _log_softmax(s[i, keep]), _log_softmax(t[i, keep])
    rows.append(np.sum(np.exp(lt) * (lt - ls)))
  np.testing.assert_allclose(got, np.mean(rows), rtol=1e-5)
  # The student equal to the teacher (same vectors, same temperature) gives 0.
  same = losses.score_distillation(q, d, teacher_q_BxT=q, teacher_d_CxT=d)
  assert abs(float(same)) < 1e-6


def test_margin_mse_matches_numpy():
  q, p, n = (RNG.normal(size=(5, 6)) for _ in range(3))
  tq, tp, tn = (RNG.normal(size=(5, 8)) for _ in range(3))
  cos = lambda a, b: np.sum(_unit(a) * _unit(b), -1)  # noqa: E731
  want = np.mean((cos(q, p) - cos(q, n) - (cos(tq, tp) - cos(tq, tn))) ** 2)
  got = losses.margin_mse(q, p, n, teacher_q_BxT=tq, teacher_p_BxT=tp, teacher_n_BxT=tn)
  np.testing.assert_allclose(got, want, rtol=1e-5)


# ---- teacher stores ----

@pytest.fixture
def tiny_dataset(tiny_beir):
  from embed_jax.data import load_beir
  return load_beir(str(tiny_beir))


@pytest.fixture
def teacher_dir(tmp_path):
  """A tiny random 'teacher' with 48 dims (the tiny student has 32)."""
  from embed_jax.testing import make_tiny_model
  return make_tiny_model(tmp_path / "teacher48", seed=1, hidden_size=48)


def test_store_built_interrupted_and_resumed_equals_one_shot(tiny_dataset, teacher_dir, tmp_path):
  import embed_jax
  teacher = embed_jax.load(teacher_dir)
  kinds = ("corpus", "queries")
  one = build_store(teacher, tiny_dataset, kinds, tmp_path / "one", name="tiny48", chunk=5)
  part = build_store(teacher, tiny_dataset, kinds, tmp_path / "part", name="tiny48", chunk=5,
                     stop_after_chunks=2)
  with pytest.raises(TeacherStoreError, match="incomplete: re-run"):
    TeacherStore(part)
  assert json.loads((part / "progress.json").read_text())["rows_done"] == 10
  build_store(teacher, tiny_dataset, kinds, part, name="tiny48", chunk=5)  # resumes at row 10
  a, b = TeacherStore(one), TeacherStore(part)
  np.testing.assert_array_equal(a.vectors, b.vectors)
  ids, texts = dataset_texts(tiny_dataset, kinds)
  assert a.ids == ids and a.dims == 48 and len(ids) == 20
  np.testing.assert_allclose(a.vectors, teacher.encode(texts, normalize=True), atol=1e-6)
  a.check(tiny_dataset, ids, texts, dims=48, teacher="tiny48")
  # Another teacher into the partial folder of this one is refused.
  other = build_store(teacher, tiny_dataset, kinds, tmp_path / "p2", name="tiny48", chunk=5,
                      stop_after_chunks=1)
  with pytest.raises(TeacherStoreError, match="another teacher"):
    build_store(teacher, tiny_dataset, kinds, other, name="someone-else", chunk=5)


def test_store_refuses_missing_ids_changed_texts_and_other_teachers(tiny_dataset, teacher_dir,
                                                                     tmp_path):
  import embed_jax
  store_dir = build_store(embed_jax.load(teacher_dir), tiny_dataset, ("corpus",), tmp_path / "s",
                          name="tiny48")
  store = TeacherStore(store_dir)
  ids, texts = dataset_texts(tiny_dataset, ("corpus", "queries"))
  with pytest.raises(TeacherStoreError, match=r"8 text id\(s\) are not in the teacher store"):
    store.check(tiny_dataset, ids, texts)
  ids, texts = dataset_texts(tiny_dataset, ("corpus",))
  changed = [texts[0] + " (edited)"] + texts[1:]
  with pytest.raises(TeacherStoreError, match=r"1 text\(s\) of .* differ .*corpus/d0"):
    store.check(tiny_dataset, ids, changed)
  with pytest.raises(TeacherStoreError, match="has 48 dims, the config expects 32"):
    store.check(tiny_dataset, ids, texts, dims=32)
  with pytest.raises(TeacherStoreError, match="built by tiny48, the config names mpnet"):
    store.check(tiny_dataset, ids, texts, teacher="mpnet")
  with pytest.raises(TeacherStoreError, match="not a teacher store"):
    TeacherStore(tmp_path)


def test_import_vectors_computed_elsewhere(tiny_dataset, tmp_path):
  ids, _ = dataset_texts(tiny_dataset, ("corpus",))
  vectors = RNG.normal(size=(len(ids), 7)).astype(np.float32)
  order = RNG.permutation(len(ids))  # any row order: matched by id
  out = import_store(vectors[order], [ids[i] for i in order], tiny_dataset, ("corpus",),
                     tmp_path / "imp", name="api-model")
  store = TeacherStore(out)
  np.testing.assert_allclose(store.vectors, _unit(vectors), atol=1e-6)
  with pytest.raises(TeacherStoreError, match="1 of the dataset's texts have no vector"):
    import_store(vectors[1:], ids[1:], tiny_dataset, ("corpus",), tmp_path / "imp2", name="x")


# ---- training from a store ----

def _distill_config(tiny_beir, store, **changes):
  from tests.test_train import smoke_config
  return smoke_config(tiny_beir, **{"distill.store": str(store), **changes})


def _first_step(c, workdir):
  """(outputs of step 0's batch under the starting params, its inputs, the first metrics line)
  of a finished run in `workdir` without dropout: the outputs recomputed outside the run."""
  from embed_jax.data import inputs
  from embed_jax.embedder import Embedder
  from embed_jax.models import SentenceEncoder
  from embed_jax.objective import build_objective
  model_config, params, tok, _ = heads.load_model(c, workdir)  # the run's tiny model
  start = Embedder(model_config, params, tok)
  data = inputs.build(c, model_config, tok, start, workdir, *inputs.check(c))
  module = SentenceEncoder(model_config)
  params = heads.add_training_heads(c, params, module, data, start, workdir)  # cached fits
  objective = build_objective(c, data.tasks, distill_projection=heads.DISTILL_PROJECTION in params)
  batch = data.loader.batch(0)
  outputs = objective.embed(module, params, batch["groups"], jax.random.key(0), train=False)
  first = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])
  return outputs, batch["inputs"], first


def test_unlabelled_distillation_trains_through_a_projection(tiny_beir, tiny_dataset,
                                                             teacher_dir, tmp_path):
  """Step 0's logged terms equal the losses of the starting student's outputs (through the
  lstsq projection) against the store's vectors of the same texts; the loss is their weighted
  sum; the projection is not exported."""
  import embed_jax
  from embed_jax import hf
  store = build_store(embed_jax.load(teacher_dir), tiny_dataset, ("corpus", "queries"),
                      tmp_path / "store", name="tiny48")
  c = _distill_config(tiny_beir, store, **{
      "loss.weight": 0.0, "distill.embedding": 1.0, "distill.scores": 0.5, "dropout": False,
      "unlabelled.texts": "corpus+queries", "unlabelled.batch_size": 8, "distill.teacher": "tiny48"})
  out = T.train(c, tmp_path / "run")
  outputs, inputs, m = _first_step(c, tmp_path / "run")
  u, teacher = outputs["u"], inputs["u"]["teacher_BxT"]
  # The batch's teacher rows are the store's vectors of its texts.
  assert {tuple(np.round(r, 5)) for r in teacher} <= {tuple(np.round(r, 5)) for r in
                                                       TeacherStore(store).vectors}
  kernel = np.load(tmp_path / "run" / "distill_projection.npy")
  want_emb = np.mean(np.sum((_unit(np.asarray(u) @ kernel) - _unit(teacher)) ** 2, -1))
  want_kl = losses.score_distillation(u, u, teacher_q_BxT=teacher, teacher_d_CxT=teacher,
                                      exclude_self=True)
  np.testing.assert_allclose(m["distill_embedding_loss"], want_emb, rtol=1e-4)
  np.testing.assert_allclose(m["distill_scores_loss"], want_kl, rtol=1e-4)
  np.testing.assert_allclose(m["loss"], want_emb + 0.5 * want_kl, rtol=1e-4)
  config, params = hf.load(out["export"])
  assert heads.DISTILL_PROJECTION not in params and config.embedding_dim == 32


def test_lstsq_projection_starts_at_the_best_linear_map_to_the_teacher(tiny_beir, tiny_dataset,
                                                                       tmp_path):
  """distill.projection_init='lstsq': with a teacher that is a linear map of the starting student
  (then normalised), the fitted projection recovers it; the fit is cached for a resumed run, and
  the first step's embedding loss is far below that of a random projection."""
  import embed_jax
  from embed_jax.testing import make_tiny_model
  student = embed_jax.load(make_tiny_model(tmp_path / "student"))  # the smoke run's tiny model
  ids, texts = dataset_texts(tiny_dataset, ("corpus", "queries"))
  s = student.encode(texts, normalize=True)
  m = RNG.normal(size=(32, 48))
  store = import_store(s @ m, ids, tiny_dataset, ("corpus", "queries"), tmp_path / "store",
                       name="linear")
  first_loss = {}
  for init in ("lstsq", "random"):
    c = _distill_config(tiny_beir, store, **{
        "loss.weight": 0.0, "distill.embedding": 1.0, "unlabelled.texts": "corpus+queries",
        "unlabelled.batch_size": 8, "distill.projection_init": init, "max_steps": 1})
    T.train(c, tmp_path / init)
    first = json.loads((tmp_path / init / "metrics.jsonl").read_text().splitlines()[0])
    first_loss[init] = first["loss"]  # the only term: the embedding loss
  kernel = np.load(tmp_path / "lstsq" / "distill_projection.npy")
  cos = np.sum(_unit(s @ kernel) * _unit(s @ m), -1)
  assert cos.min() > 0.99
  assert not (tmp_path / "random" / "distill_projection.npy").exists()
  assert first_loss["lstsq"] < 0.1 * first_loss["random"]
  # A resumed (or re-run) workdir reads the cached fit instead of encoding again (no student).
  from types import SimpleNamespace
  from embed_jax.models import SentenceEncoder
  from embed_jax.testing import init_params, tiny_config
  c.distill.projection_init = "lstsq"
  data = SimpleNamespace(tasks=[], store=TeacherStore(store), dataset=tiny_dataset)
  params = heads.add_training_heads(c, init_params(tiny_config()), SentenceEncoder(tiny_config()),
                                    data, None, tmp_path / "lstsq")
  np.testing.assert_array_equal(params[heads.DISTILL_PROJECTION]["kernel"], kernel)


def test_pair_distillation_with_labels(tiny_beir, tiny_dataset, teacher_dir, tmp_path):
  """Step 0's pair-score KL at each Matryoshka prefix equals the loss of the starting model's
  query and positive prefixes against the teacher's vectors of those texts; the term is their
  sum, and the loss adds the labelled MNRL."""
  import embed_jax
  store = build_store(embed_jax.load(teacher_dir), tiny_dataset, ("corpus", "queries"),
                      tmp_path / "store", name="tiny48")
  c = _distill_config(tiny_beir, store, **{"distill.pair_scores": 0.5, "matryoshka.dims": (32, 8),
                                           "dropout": False})
  T.train(c, tmp_path / "run")
  outputs, inputs, m = _first_step(c, tmp_path / "run")
  q, p, pairs = outputs["q"], outputs["p"], inputs["pairs"]
  teacher = TeacherStore(store)
  ok = pairs["valid_B"]
  rows = lambda kind, ids: teacher.vectors[teacher.rows(f"{kind}/{i}" for i in ids)]  # noqa: E731
  dataset_q = [q_id for q_id in tiny_dataset.queries if q_id in tiny_dataset.qrels("train")]
  tq = rows("queries", [dataset_q[i] for i in pairs["q_ids_B"][ok]])
  tp = rows("corpus", [tiny_dataset.corpus_ids[i] for i in pairs["p_ids_B"][ok]])
  for d in (32, 8):
    want = losses.score_distillation(np.asarray(q)[ok, :d], np.asarray(p)[ok, :d],
                                     teacher_q_BxT=tq, teacher_d_CxT=tp)
    np.testing.assert_allclose(m[f"distill_pair_scores@{d}"], want, rtol=1e-4)
  np.testing.assert_allclose(m["distill_pair_scores_loss"],
                             m["distill_pair_scores@32"] + m["distill_pair_scores@8"], rtol=1e-5)
  np.testing.assert_allclose(m["loss"], m["pairs_loss"] + 0.5 * m["distill_pair_scores_loss"],
                             rtol=1e-5)


@pytest.mark.parametrize("change, message", [
    ({"distill.scores": 1.0, "distill.store": ""}, r"the distill_scores term\(s\) need distill.store"),
    ({"distill.store": "/no/such/store"}, "distill.store='/no/such/store' does not exist"),
    ({"loss.weight": 0.0}, "nothing to train"),
    ({"distill.projection_init": "pca"}, "distill.projection_init='pca': choose lstsq or random"),
    ({"distill.margin_mse": 1.0, "distill.store": "."}, "margin_mse > 0 needs hard negatives"),
])
def test_bad_distillation_config_is_refused(change, message, tiny_beir):
  from tests.test_train import smoke_config
  with pytest.raises(ValueError, match=message):
    T.check_config(smoke_config(tiny_beir, **change), num_devices=8)


def test_store_of_other_texts_is_refused_before_training(tiny_beir, tiny_dataset, tmp_path):
  ids, _ = dataset_texts(tiny_dataset, ("corpus", "queries"))
  store = import_store(RNG.normal(size=(len(ids), 5)), ids, tiny_dataset, ("corpus", "queries"),
                       tmp_path / "store", name="x")
  rows = [json.loads(l) for l in (store / "texts.jsonl").read_text().splitlines()]
  rows[3]["sha1"] = "0" * 16  # as if built from another version of the text
  (store / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  c = _distill_config(tiny_beir, store, **{"distill.scores": 1.0})
  with pytest.raises(TeacherStoreError, match="differ from the ones the teacher store"):
    T.train(c, tmp_path / "run")
  assert not (tmp_path / "run" / "checkpoints").exists()


# ---- runners and gradient caching with every distillation term ----

from tests.test_train import _assert_same, batch_shards, needs_8, runner_model_config, synthetic_batch  # noqa: E402


def _run_distill(runner_name, devices, chunk=0, fsdp=1):
  from configs import scifact_mnrl
  from embed_jax.objective import build_objective
  from embed_jax.models import SentenceEncoder
  from embed_jax.testing import init_params
  c = scifact_mnrl.get_config()
  c.dropout = False
  c.train.grad_cache_chunk, c.train.runner = chunk, runner_name
  c.matryoshka.dims = (32, 16)
  c.distill.store = "unused"
  c.distill.embedding, c.distill.scores, c.distill.pair_scores, c.distill.margin_mse = 1.0, 0.5, 0.5, 2.0
  cfg = runner_model_config()
  params = heads.add_distill_projection(init_params(cfg), 32, 48, seed=0)
  tx, schedule = T.make_optimizer(c.optim, total_steps=10)
  axis = "batch" if runner_name == "pmap" else None
  objective = build_objective(c, distill_projection=True)
  step = T.make_train_step(SentenceEncoder(cfg), objective, c, tx, schedule, axis,
                           batch_shards(runner_name, devices))
  runner = T.make_runner(runner_name, step, devices, fsdp)
  state = runner.put_state(T.init_state(params, tx, seed=0))
  losses_ = []
  for s in range(2):
    batch = synthetic_batch(seed=s)
    r = np.random.default_rng(s + 50)
    ids = r.integers(5, 100, (16, 12)).astype(np.int32)
    batch["groups"]["u"] = {"ids": ids, "mask": np.ones_like(ids)}
    batch["inputs"]["u"] = {"valid_B": np.ones(16, bool),
                            "teacher_BxT": r.normal(size=(16, 48)).astype(np.float32)}
    batch["inputs"]["pairs"].update(q_teacher_BxT=r.normal(size=(16, 48)).astype(np.float32),
                                    p_teacher_BxT=r.normal(size=(16, 48)).astype(np.float32),
                                    n_teacher_BxNxT=r.normal(size=(16, 1, 48)).astype(np.float32))
    state, m = runner.step(state, batch)
    losses_.append(float(m["loss"]))
  params = jax.tree.map(np.asarray, runner.get_state(state).params)
  assert np.abs(params[heads.DISTILL_PROJECTION]["kernel"]
                - heads.add_distill_projection({}, 32, 48, 0)[heads.DISTILL_PROJECTION]["kernel"]).max() > 0
  return losses_, params


@needs_8
def test_distillation_agrees_across_runners_and_grad_cache():
  one = _run_distill("jit", jax.devices()[:1])
  _assert_same(one, _run_distill("pmap", jax.devices()[:8]))
  _assert_same(one, _run_distill("jit", jax.devices()[:1], chunk=4))


def test_teacher_cli_builds_imports_and_reports_errors(tiny_beir, teacher_dir, tmp_path, capsys):
  from embed_jax.cli import main
  out = tmp_path / "store"
  assert main(["teacher", "--model", str(teacher_dir), "--dataset", str(tiny_beir), "--out", str(out),
               "--texts", "corpus,queries", "--name", "tiny48"]) == 0
  assert "20 texts x 48 dims (tiny48, float32)" in capsys.readouterr().out
  ids = [json.loads(l)["id"] for l in (out / "texts.jsonl").read_text().splitlines()]
  np.save(tmp_path / "v.npy", np.load(out / "vectors.npy"))
  (tmp_path / "ids.txt").write_text("\n".join(ids))
  assert main(["teacher", "--dataset", str(tiny_beir), "--out", str(tmp_path / "imp"),
               "--import_vectors", str(tmp_path / "v.npy"), "--import_ids", str(tmp_path / "ids.txt"),
               "--name", "elsewhere"]) == 0
  assert main(["teacher", "--dataset", str(tiny_beir), "--out", str(tmp_path / "bad"),
               "--texts", "corpus,answers", "--model", str(teacher_dir)]) == 2
  assert "choose from corpus, queries" in capsys.readouterr().err
