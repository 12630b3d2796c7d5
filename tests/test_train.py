"""Training: runners agree, gradient caching is exact, resume is exact, bad configs are refused."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embed_jax import optim as O
from embed_jax import train as T
from embed_jax.checkpoint import checkpoint_manager, params_are_finite, restore_checkpoint
from embed_jax.models import SentenceEncoder
from embed_jax.objective import build_objective
from embed_jax.testing import init_params, tiny_config
from tests.conftest import slow_variant

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs import scifact_mnrl  # noqa: E402

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def set_fields(c, changes: dict):
  """Sets dotted config fields: {"optim.lr": 1e-3} -> c.optim.lr = 1e-3."""
  for key, value in changes.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def smoke_config(dataset, **changes):
  c = scifact_mnrl.get_config("smoke")
  c.data.dataset = str(dataset)
  c.evals.test.at_end = True
  return set_fields(c, changes)


def text_group(rng, *shape, vocab=100):
  """{"ids", "mask"} of random texts of random lengths (>= 2 tokens)."""
  ids = rng.integers(5, vocab, shape).astype(np.int32)
  lengths = rng.integers(2, shape[-1] + 1, shape[:-1])
  mask = (np.arange(shape[-1]) < lengths[..., None]).astype(np.int32)
  return {"ids": ids * mask, "mask": mask}


def synthetic_batch(b=16, n=1, lq=8, ld=16, seed=0, vocab=100):
  rng = np.random.default_rng(seed)
  groups = {"q": text_group(rng, b, lq, vocab=vocab), "p": text_group(rng, b, ld, vocab=vocab)}
  if n:
    groups["n"] = text_group(rng, b, n, ld, vocab=vocab)
  pairs = {"q_ids_B": np.arange(b, dtype=np.int32), "p_ids_B": np.arange(b, dtype=np.int32),
           "neg_ids_BxN": (100 + np.arange(b * n, dtype=np.int32)).reshape(b, n),
           "valid_B": np.arange(b) < b - 2}  # a padded final batch
  pairs["p_ids_B"][3] = pairs["p_ids_B"][5]  # a duplicate positive
  return {"groups": groups, "inputs": {"pairs": pairs}}


def make_step(cfg, c, tx, schedule, axis=None, tasks=(), shards=1):
  """The train step of config `c` on the tiny model `cfg` (with `tasks`' terms); `shards`: the
  devices a jitted step's batch is split over."""
  return T.make_train_step(SentenceEncoder(cfg), build_objective(c, tasks), c, tx, schedule, axis,
                           shards)


def batch_shards(runner_name, devices):
  """make_train_step's batch_shards for a runner on `devices` (what train.run passes)."""
  return 1 if runner_name == "pmap" else len(devices)


def runner_model_config():
  """The runner tests' tiny model: no dropout, one layer (the runners' agreement does not depend
  on depth; the compile time does). The objectives' runner tests check pmap and grad caching
  against one device; jit on 8 devices partitions the same program, checked here and in
  test_multivector."""
  return tiny_config(num_layers=1, hidden_dropout=0.0, attention_dropout=0.0)


def _setup(grad_cache_chunk=0, runner="jit", symmetric=True):
  cfg = runner_model_config()
  c = scifact_mnrl.get_config()
  c.dropout = False
  c.loss.symmetric = symmetric
  c.train.grad_cache_chunk = grad_cache_chunk
  c.train.runner = runner
  tx, schedule = T.make_optimizer(c.optim, total_steps=10)
  state = T.init_state(init_params(cfg), tx, seed=0)
  return cfg, c, tx, schedule, state


def _run(runner_name, devices, chunk=0, steps=2, fsdp=1):
  cfg, c, tx, schedule, state = _setup(chunk, runner_name)
  axis = "batch" if runner_name == "pmap" else None
  runner = T.make_runner(runner_name, make_step(cfg, c, tx, schedule, axis,
                                                shards=batch_shards(runner_name, devices)),
                         devices, fsdp)
  state = runner.put_state(state)
  losses = []
  for s in range(steps):
    state, m = runner.step(state, synthetic_batch(seed=s))
    losses.append(float(m["loss"]))
  return losses, jax.tree.map(np.asarray, runner.get_state(state).params)


def run_objective(config, model_config, params, rep, batches, runner_name, devices):
  """(losses, final params) of the config's objective (over `rep`) trained on `batches` under a
  runner: what the representations' runner and grad-cache tests compare."""
  from embed_jax import train as T
  from embed_jax.models import SentenceEncoder
  from embed_jax.objective import build_objective
  tx, schedule = T.make_optimizer(config.optim, 10)
  step = T.make_train_step(SentenceEncoder(model_config), build_objective(config, representation=rep),
                           config, tx, schedule, "batch" if runner_name == "pmap" else None,
                           batch_shards(runner_name, devices))
  runner = T.make_runner(runner_name, step, devices)
  state = runner.put_state(T.init_state(params, tx, 0))
  out = []
  for batch in batches:
    state, m = runner.step(state, batch)
    out.append(float(m["loss"]))
  return out, jax.tree.map(np.asarray, runner.get_state(state).params)


def _assert_same(a, b, tol=1e-5):
  np.testing.assert_allclose(a[0], b[0], rtol=tol, atol=tol)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=tol), a[1], b[1])


@needs_8
def test_jit_and_pmap_on_8_devices_match_one_device():
  one = _run("jit", jax.devices()[:1])
  _assert_same(one, _run("jit", jax.devices()[:8]))
  _assert_same(one, _run("pmap", jax.devices()[:8]))


@needs_8
def test_grad_cache_equals_the_plain_gradient():
  one = _run("jit", jax.devices()[:1])
  _assert_same(one, _run("jit", jax.devices()[:1], chunk=4))
  _assert_same(one, _run("pmap", jax.devices()[:8], chunk=1))
  # jit on 8 devices: every chunk takes one pair from each device's shard (interleaved).
  _assert_same(one, _run("jit", jax.devices()[:8], chunk=1))


def test_grad_cache_chunks_take_a_slice_of_every_shard():
  """Chunk j of a batch split over S devices holds rows j*c..(j+1)*c-1 of each device's shard,
  and unchunking restores the order."""
  x = np.arange(24)
  chunks = T.interleaved_chunks(x, shards=4, n_chunks=3)
  np.testing.assert_array_equal(chunks[1], [2, 3, 8, 9, 14, 15, 20, 21])
  np.testing.assert_array_equal(T.uninterleaved(chunks, shards=4), x)
  np.testing.assert_array_equal(T.interleaved_chunks(x, 1, 3)[1], np.arange(8, 16))


def test_grad_cache_reuses_dropout_keys():
  """With dropout on, the cached gradient equals the plain one: both passes share each key."""
  cfg = tiny_config()
  c = scifact_mnrl.get_config()
  tx, schedule = T.make_optimizer(c.optim, 10)
  state = T.init_state(init_params(cfg), tx, 0)
  out = []
  for chunk in (0, 16):
    c.train.grad_cache_chunk = chunk
    step = jax.jit(make_step(cfg, c, tx, schedule))
    out.append(step(state, synthetic_batch())[1]["grad_norm"])
  # Each chunk draws its own dropout masks (fold_in(rng, chunk)); the plain step is chunk 0.
  np.testing.assert_allclose(out[0], out[1], rtol=1e-5)


@pytest.mark.parametrize("chunk", [pytest.param(0, marks=slow_variant), 4])
def test_frozen_parameters_never_move_and_the_rest_train_as_before(chunk):
  """optim.freeze: matching leaves keep their values bit for bit and hold no Adam state; with
  nothing frozen the update equals the plain optimiser's."""
  cfg = tiny_config(hidden_dropout=0.0, attention_dropout=0.0)
  c = scifact_mnrl.get_config()
  c.dropout = False
  c.train.grad_cache_chunk = chunk
  c.optim.freeze = "encoder/layer_.*"
  params = init_params(cfg)
  tx, schedule = T.make_optimizer(c.optim, total_steps=10)
  state = T.init_state(params, tx, seed=0)
  step = jax.jit(make_step(cfg, c, tx, schedule))
  for s in range(2):
    state, m = step(state, synthetic_batch(seed=s))
  frozen = O.frozen_mask(params, c.optim.freeze)
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), params,
                       state.params)
  flat = jax.tree_util.tree_flatten_with_path(moved)[0]
  assert all(not mv for (path, mv), f in zip(flat, jax.tree.leaves(frozen)) if f)
  assert any(mv for (path, mv), f in zip(flat, jax.tree.leaves(frozen)) if not f)
  n_state = sum(x.size for x in jax.tree.leaves(state.opt_state) if hasattr(x, "size"))
  n_train = sum(np.size(p) for p, f in zip(jax.tree.leaves(params), jax.tree.leaves(frozen))
                if not f)
  assert n_state < 2 * n_train + 100  # Adam moments for the trainable leaves only
  # The trainable leaves see the same gradient as with nothing frozen (the loss is unchanged).
  c.optim.freeze = ""
  tx0, _ = T.make_optimizer(c.optim, total_steps=10)
  _, m0 = jax.jit(make_step(cfg, c, tx0, schedule))(
      T.init_state(params, tx0, seed=0), synthetic_batch(seed=0))
  state1, m1 = step(T.init_state(params, tx, seed=0), synthetic_batch(seed=0))
  np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=1e-6)


def test_head_lr_sets_the_peak_rate_outside_the_encoder():
  """optim.head_lr: Adam's first step moves each leaf by about its group's rate (|g / sqrt(g^2)|
  = 1), the encoder by optim.lr and the heads by optim.head_lr; frozen leaves not at all."""
  from configs import base
  o = base.get_config().optim
  o.lr, o.head_lr, o.warmup_ratio, o.weight_decay = 1e-4, 1e-2, 0.0, 0.0
  o.freeze = "encoder/embeddings/.*"
  params = {"encoder": init_params(tiny_config())["encoder"],
            "mlm_head": {"bias": np.zeros(7, np.float32), "dense": {"kernel": np.ones((3, 3))}}}
  params = jax.tree.map(jnp.asarray, params)
  tx, schedule = T.make_optimizer(o, total_steps=10)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  labels = O.param_labels(params, o)
  for (path, u), label in zip(jax.tree_util.tree_flatten_with_path(updates)[0],
                              jax.tree.leaves(labels)):
    want = {"frozen": 0.0, "train": o.lr, "head": o.head_lr}[label]
    np.testing.assert_allclose(np.abs(np.asarray(u)).max(), want, rtol=1e-3,
                               err_msg=O.param_path(path))
  assert set(jax.tree.leaves(labels)) == {"frozen", "train", "head"}
  np.testing.assert_allclose(float(schedule(0)), o.lr, rtol=1e-6)  # the logged rate: the encoder's


@pytest.mark.parametrize("pattern, message", [
    ("dense/.*", "matches no parameter"), (".*", "freezes every parameter")])
def test_freeze_patterns_that_match_nothing_or_everything_are_refused(pattern, message):
  with pytest.raises(ValueError, match=message):
    O.check_freeze(init_params(tiny_config()), pattern)


def test_smoke_run_exports_and_resumes_exactly(tiny_beir, tmp_path):
  full = T.train(smoke_config(tiny_beir), tmp_path / "full")
  assert Path(full["export"], "model.safetensors").exists()
  results = json.loads((tmp_path / "full" / "results.json").read_text())
  assert results["results"][0]["representation"] == "float32"
  assert 0 <= full["test_ndcg@10"] <= 1

  part = T.train(smoke_config(tiny_beir), tmp_path / "part", stop_after=3)  # "killed" after 3
  assert part["steps"] == 3 and "export" not in part
  resumed = T.train(smoke_config(tiny_beir), tmp_path / "part")
  assert resumed["test_ndcg@10"] == pytest.approx(full["test_ndcg@10"], abs=1e-6)
  from embed_jax import hf
  _, a = hf.load(full["export"])
  _, b = hf.load(resumed["export"])
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a, b)
  lines = lambda d: [json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
  by_step = lambda rows: {r["step"]: r for r in rows if "loss" in r}
  full_m, part_m = by_step(lines("full")), by_step(lines("part"))
  assert full_m.keys() == part_m.keys()
  for s in full_m:
    assert full_m[s]["loss"] == pytest.approx(part_m[s]["loss"], rel=1e-5)


@pytest.mark.parametrize("change, message", [
    ({"loss.name": "hinge"}, "loss.name"),
    ({"loss.name": "cosent"}, r"CoSENT needs graded pairs: a task"),
    ({"evals.dev.every": -1}, r"evals.dev.every=-1 must be >= 0"),
    ({"evals.test.precisions": ("float32", "int4")}, r"evals.test.precisions \['int4'\]"),
    ({"export": "best"}, "export='best' needs evals.dev.every > 0"),
    ({"optim.lr": 0.0}, "optim.lr"),
    ({"batch_size": 7}, "multiple of the 8 devices"),
    ({"init": "/no/such/folder"}, "init='/no/such/folder' does not exist"),
    ({"train.grad_cache_chunk": 3}, "grad_cache_chunk"),
    ({"data.num_negatives": 2}, "data.negatives"),
    ({"optim.freeze": "encoder/(layer"}, "optim.freeze"),
    ({"optim.head_lr": -1e-3}, "optim.head_lr"),
])
def test_bad_config_is_refused_before_compute(change, message, tmp_path):
  c = smoke_config(tmp_path / "unused", **change)
  with pytest.raises(ValueError, match=message):
    T.check_config(c, num_devices=8)


def test_non_finite_loss_stops_with_step_and_checkpoint(tiny_beir, tmp_path):
  """lr 1e30 after a warmup step at lr 0: the checkpoint after that step is finite, the next
  steps' params blow up and their loss turns non-finite. The run stops naming the step and the
  last good checkpoint, which exists and holds finite params; no later checkpoint was saved."""
  c = smoke_config(tiny_beir, **{"optim.lr": 1e30, "optim.warmup_ratio": 0.5, "max_steps": 6,
                                 "checkpoint.every_steps": 1})
  with pytest.raises(T.TrainingError) as err:
    T.train(c, tmp_path / "nan")
  import re
  found = re.search(r"non-finite loss \S+ at step (\d+); last good checkpoint: step (\d+) in ",
                    str(err.value))
  assert found, str(err.value)
  bad_step, good = int(found[1]), int(found[2])
  mngr = checkpoint_manager(tmp_path / "nan", c.checkpoint.keep)
  assert good in mngr.all_steps() and max(mngr.all_steps()) == good <= bad_step
  template = T.init_state(init_params(tiny_config()), T.make_optimizer(c.optim, 6)[0], 0)
  for step in mngr.all_steps():
    state, _ = restore_checkpoint(mngr, template, step)
    assert params_are_finite(state.params)
  assert not params_are_finite({"x": np.array([1.0, np.nan])})  # the check can fail


def test_hardneg_smoke_mines_then_trains_from_the_cli(tiny_beir, tmp_path, capsys):
  from embed_jax.cli import main
  repo = Path(__file__).resolve().parents[1]
  negs = tmp_path / "negs" / "train.jsonl"
  rc = main(["train", "--config", f"{repo}/configs/scifact_hardneg.py:smoke", "--workdir",
             str(tmp_path / "run"), f"--config.data.dataset={tiny_beir}",
             f"--config.data.negatives={negs}", "--config.data.mine.skip_top=0",
             "--config.data.mine.margin=-1.0", "--config.evals.test.at_start=True"])
  out, err = capsys.readouterr()
  assert rc == 0, err
  assert "test nDCG@10 of tiny-random-bert: before" in out
  assert negs.exists() and (tmp_path / "run" / "export" / "model.safetensors").exists()
  assert main(["train", "--config", f"{repo}/configs/scifact_mnrl.py:smoke", "--workdir",
               str(tmp_path / "bad"), "--config.optim.lr=-1"]) == 2
  assert "optim.lr=-1.0 must be > 0" in capsys.readouterr().err
  assert main(["train", "--config", f"{repo}/configs/scifact_mnrl.py", "--workdir",
               str(tmp_path / "bad"), "--config.optim.lrr=1"]) == 2
  assert "no field 'lrr'" in capsys.readouterr().err


def test_run_killed_by_sigkill_resumes_to_the_same_params_and_metrics(tiny_beir, tmp_path):
  """A real hard kill (SIGKILL of the CLI process after its first checkpoint), then the same
  command again: the same final params and metrics as an uninterrupted run, no duplicate lines."""
  import os
  import signal
  import subprocess
  import time
  repo = Path(__file__).resolve().parents[1]
  overrides = {"max_steps": 40, "checkpoint.every_steps": 2, "evals.test.at_end": False}
  workdir = tmp_path / "killed"
  cmd = [sys.executable, "-m", "embed_jax.cli", "train", "--config",
         f"{repo}/configs/scifact_mnrl.py:smoke", "--workdir", str(workdir),
         f"--config.data.dataset={tiny_beir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
  env = {**os.environ, "PYTHONPATH": str(repo)}
  proc = subprocess.Popen(cmd, env=env, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  while proc.poll() is None and time.time() < deadline:
    steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
    if steps and max(steps) >= 2:
      break
    time.sleep(0.01)
  assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = checkpoint_manager(workdir).latest_step()
  assert killed_at is not None and killed_at < 40

  resumed = T.train(smoke_config(tiny_beir, **overrides), workdir)
  full = T.train(smoke_config(tiny_beir, **overrides), tmp_path / "full")
  from embed_jax import hf
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6),
               hf.load(full["export"])[1], hf.load(resumed["export"])[1])
  rows = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
  got, want = rows(workdir), rows(tmp_path / "full")
  assert [r["step"] for r in got] == [r["step"] for r in want]  # none written twice
  for a, b in zip(got, want):
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_export_best_survives_keep_k_and_equals_the_best_step(tiny_beir, tmp_path):
  """export='best' with keep=1: the best dev step's checkpoint is deleted by later saves, yet the
  export holds exactly its params."""
  over = {"data.dev_fraction": 0.4, "evals.dev.every": 2, "export": "best",
          "checkpoint.keep": 1, "max_steps": 8, "optim.lr": 3e-3}
  out = T.train(smoke_config(tiny_beir, **over), tmp_path / "run")
  dev = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
         if "dev_ndcg@10" in l]
  best_step = max(dev, key=lambda r: (r["dev_ndcg@10"], -r["step"]))["step"]
  # The params at best_step, from a run stopped there (same schedule: stop_after, not max_steps).
  T.train(smoke_config(tiny_beir, **over), tmp_path / "upto", stop_after=best_step)
  from embed_jax import hf
  c = smoke_config(tiny_beir, **over)
  mngr = checkpoint_manager(tmp_path / "upto", c.checkpoint.keep)
  assert mngr.latest_step() == best_step
  template = T.init_state(init_params(tiny_config()), T.make_optimizer(c.optim, 8)[0], 0)
  state, meta = restore_checkpoint(mngr, template)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6),
               jax.tree.map(np.asarray, state.params), hf.load(out["export"])[1])


def test_a_finished_run_is_not_exported_or_evaluated_again(tiny_beir, tmp_path, monkeypatch):
  first = T.train(smoke_config(tiny_beir), tmp_path / "run")
  from embed_jax import evaluate
  calls = []
  monkeypatch.setattr(evaluate, "evaluate_retrieval", lambda *a, **k: calls.append(1))
  again = T.train(smoke_config(tiny_beir), tmp_path / "run")
  assert not calls and again["steps_run"] == 0
  assert again["test_ndcg@10"] == first["test_ndcg@10"] and again["export"] == first["export"]
