"""MLM and multi-task training: masking statistics, the MLM loss falls, the BertForMaskedLM
export, weighted task losses, task sampling shares, per-task metrics, runners and resume."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embed_jax import train as T
from embed_jax.models.mlm import MaskingSpec, budget, mask_tokens
from embed_jax.tasks import SampledLoader, task
from tests.conftest import slow_variant
from tests.test_train import (_assert_same, batch_shards, make_step, needs_8, runner_model_config,
                              set_fields, smoke_config)

SPEC = MaskingSpec(mask_token_id=4, special_ids=(0, 1, 2, 3, 4), vocab_size=130)


def _rows(lengths, l=64, seed=0):
  rng = np.random.default_rng(seed)
  ids = np.zeros((len(lengths), l), np.int32)
  mask = np.zeros_like(ids)
  for i, n in enumerate(lengths):
    ids[i, 0], ids[i, 1:n - 1], ids[i, n - 1] = 2, rng.integers(5, 130, n - 2), 3  # [CLS] .. [SEP]
    mask[i, :n] = 1
  return jnp.asarray(ids), jnp.asarray(mask)


def test_masking_rates_and_no_special_or_padding_tokens():
  ids, mask = _rows([64, 40, 23, 10, 64, 57])
  draws = jax.jit(jax.vmap(lambda k: mask_tokens(k, ids, mask, SPEC)))(
      jax.random.split(jax.random.key(0), 400))
  masked, positions, labels, chosen = (np.asarray(x) for x in draws)
  maskable = (np.asarray(mask) > 0) & (np.asarray(ids) > 4)
  # Exactly round(15%) of each row's maskable tokens, never a special token or padding.
  assert (chosen.sum(-1) == np.round(0.15 * maskable.sum(1))).all()
  picked = np.take_along_axis(np.broadcast_to(maskable, (400, *maskable.shape)), positions, -1)
  assert picked[chosen].all()
  kept = np.take_along_axis(masked, positions, -1)[chosen]
  orig = labels[chosen]
  # 80% [MASK], 10% random, 10% kept (a random draw can hit the original id: ~1/125 of 10%).
  assert abs(np.mean(kept == 4) - 0.8) < 0.01
  assert abs(np.mean((kept != 4) & (kept != orig)) - 0.1 * (1 - 1 / 130)) < 0.01
  assert abs(np.mean(kept == orig) - 0.1) < 0.01
  # Tokens that were not chosen are untouched.
  untouched = np.ones_like(masked, bool)
  for d in range(400):
    for r in range(ids.shape[0]):
      untouched[d, r, positions[d, r][chosen[d, r]]] = False
  assert (masked[untouched] == np.broadcast_to(np.asarray(ids), masked.shape)[untouched]).all()
  assert budget(64, 0.15) >= chosen.sum(-1).max()


def test_whole_word_masking_chooses_whole_words():
  ids, mask = _rows([64, 64], seed=1)
  words = np.zeros(ids.shape, np.int32)
  cont = np.random.default_rng(2).random(ids.shape) < 0.4  # ~40% of tokens continue a word
  cont[:, 0] = False
  words[:] = np.cumsum(~cont, axis=1) - 1
  spec = MaskingSpec(4, (0, 1, 2, 3, 4), 130, whole_word=True)
  full = 0
  for s in range(50):
    _, positions, _, chosen = mask_tokens(jax.random.key(s), ids, mask, spec, jnp.asarray(words))
    for r in range(2):
      picked = set(np.asarray(positions[r])[np.asarray(chosen[r])].tolist())
      by_word = {}
      for pos in range(1, 63):
        by_word.setdefault(words[r, pos], []).append(pos)
      cut = [w for w, ps in by_word.items() if 0 < len(picked & set(ps)) < len(ps)]
      assert len(cut) <= 1  # at most the last word, cut at the row's budget
      full += len(picked) > 0
  assert full == 100


def _write_sts(folder):
  folder.mkdir(parents=True, exist_ok=True)
  rows = [(5.0, "the cell protein", "the protein of the cell"), (0.5, "cancer risk", "hello world"),
          (3.0, "mouse gene", "gene of the mouse"), (1.0, "blood level", "the study"),
          (4.0, "treatment effect", "effect of the treatment"), (0.0, "the world", "patients")] * 2
  (folder / "sts-train.csv").write_text(
      "".join(f"g\tf\t2012\t{i:04d}\t{s}\t{a}\t{b}\n" for i, (s, a, b) in enumerate(rows)))
  return folder


def _write_triplets(folder):
  folder.mkdir(parents=True, exist_ok=True)
  rows = [("the cell", "cells", "the world"), ("cancer risk", "risk of cancer", "hello"),
          ("mouse gene", "gene expression", "blood level"), ("blood", "human blood", "the study"),
          ("a study", "the study", "protein")] * 2
  (folder / "tiny_dev_triplets.tsv").write_text(
      "anchor\tpositive\tnegative\n" + "".join("\t".join(r) + "\n" for r in rows))
  return folder


def _multi(tiny_beir, tmp_path, **changes):
  c = smoke_config(tiny_beir)
  c.tasks.sts = task("sts", dataset=str(_write_sts(tmp_path / "sts")), batch_size=8, weight=0.5)
  c.tasks.nli = task("triplets", dataset=str(_write_triplets(tmp_path / "nli")), split="dev",
                     batch_size=8, weight=2.0, matryoshka_dims=(32, 8))
  c.tasks.mlm = task("mlm", batch_size=8, weight=0.25, heldout_fraction=0.2)
  return set_fields(c, changes)


def test_multitask_smoke_logs_each_task_and_the_weighted_sum(tiny_beir, tmp_path):
  c = _multi(tiny_beir, tmp_path)
  c.tasks.more = task("pairs", split="test", batch_size=8, weight=1.5)  # another qrels split
  out = T.train(c, tmp_path / "run")
  rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  m = rows[0]
  assert {"pairs_loss", "sts_loss", "nli_loss", "mlm_loss", "mlm_accuracy", "nli@8",
          "more_loss"} <= set(m)
  want = (m["pairs_loss"] + 0.5 * m["sts_loss"] + 2.0 * m["nli_loss"] + 0.25 * m["mlm_loss"]
          + 1.5 * m["more_loss"])
  assert m["loss"] == pytest.approx(want, rel=1e-5)
  assert m["nli_loss"] == pytest.approx(m["nli@32"] + m["nli@8"], rel=1e-5)
  before = json.loads((tmp_path / "run" / "mlm_before.json").read_text())["mlm"]
  assert before["mlm_heldout_tokens"] > 0
  assert out["mlm_perplexity_before"] == before["mlm_heldout_perplexity"]


@pytest.mark.parametrize("mode", ["round_robin", "proportional"])
def test_one_task_per_step_visits_tasks_in_their_shares(mode):
  class Fake:
    def __init__(self, name, n):
      self.name, self.steps_per_epoch = name, n

    def batch(self, step):
      return {self.name: step}

  loaders = [Fake("a", 10), Fake("b", 5), Fake("c", 5)]
  s = SampledLoader(loaders, [1.0, 3.0, 6.0], mode, seed=0)
  picks = [s.pick(i) for i in range(6000)]
  counts = np.bincount([w for w, _ in picks], minlength=3) / 6000
  want = [1 / 3] * 3 if mode == "round_robin" else [0.1, 0.3, 0.6]
  np.testing.assert_allclose(counts, want, atol=0.015)
  # Each loader counts its own steps: 0, 1, 2, ... in the order it is picked.
  for which in range(3):
    own = [o for w, o in picks if w == which]
    assert own == list(range(len(own)))
  assert s.steps_per_epoch == 20 and s.pick(7) == SampledLoader(loaders, [1.0, 3.0, 6.0], mode, 0).pick(7)


@slow_variant  # resume exactness is CI's in test_train (smoke run, SIGKILL); here for round robin
def test_round_robin_run_resumes_exactly(tiny_beir, tmp_path):
  over = {"task_sampling": "round_robin", "max_steps": 6, "evals.mlm.at_start": False,
          "evals.mlm.at_end": False}
  full = T.train(_multi(tiny_beir, tmp_path, **over), tmp_path / "full")
  T.train(_multi(tiny_beir, tmp_path, **over), tmp_path / "part", stop_after=4)
  resumed = T.train(_multi(tiny_beir, tmp_path, **over), tmp_path / "part")  # the same config
  from embed_jax import hf
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6),
               hf.load(full["export"])[1], hf.load(resumed["export"])[1])
  rows = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
  assert {"pairs_loss", "sts_loss", "nli_loss", "mlm_loss"} <= set().union(*rows)


def test_mlm_loss_falls_and_exports_a_bert_for_masked_lm(tiny_beir, tmp_path):
  c = smoke_config(tiny_beir, **{"loss.weight": 0.0, "max_steps": 40, "num_epochs": 0, "optim.lr": 3e-3,
                                 "optim.warmup_ratio": 0.0, "export_mlm": True,
                                 "evals.test.at_end": False, "dropout": False})
  c.tasks.mlm = task("mlm", batch_size=8, heldout_fraction=0.0)
  out = T.train(c, tmp_path / "mlm")
  losses_ = [json.loads(l)["mlm_loss"] for l in (tmp_path / "mlm" / "metrics.jsonl").read_text()
             .splitlines() if "mlm_loss" in l]
  assert np.mean(losses_[-2:]) < 0.8 * losses_[0]  # from log(130) = 4.87, chance
  # transformers loads the MLM export as BertForMaskedLM with every weight, and predicts as we do.
  import torch
  from transformers import AutoModelForMaskedLM
  from embed_jax import hf
  from embed_jax.models import SentenceEncoder
  hf_model, info = AutoModelForMaskedLM.from_pretrained(out["export_mlm"], output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  config, params = hf.load(out["export_mlm"])
  assert "mlm_head" in params  # read back from cls.predictions.*
  ids, mask = _rows([12, 9], l=16)
  ids = jnp.where(ids > 100, 50, ids)  # inside the tiny vocabulary
  positions = jnp.array([[1, 2, 5], [3, 4, 6]])
  ours = SentenceEncoder(config).apply({"params": params}, ids, mask, positions,
                                       method=SentenceEncoder.mlm_logits)
  with torch.no_grad():
    theirs = hf_model(input_ids=torch.tensor(np.asarray(ids)).long(),
                      attention_mask=torch.tensor(np.asarray(mask)).long()).logits.numpy()
  np.testing.assert_allclose(ours, np.take_along_axis(theirs, np.asarray(positions)[..., None], 1),
                             atol=1e-4)


def test_mlm_probe_fits_the_head_and_leaves_the_encoder_as_it_was(tiny_beir, tmp_path):
  """configs/scifact_mlm.py:probe (the base encoder's perplexity with a fitted head): the
  exported encoder equals the starting one bit for bit, and held-out perplexity falls."""
  from configs import scifact_mlm
  from embed_jax import hf
  c = scifact_mlm.get_config("probe,smoke")
  set_fields(c, {"data.dataset": str(tiny_beir), "max_steps": 12, "num_epochs": 0,
                 "tasks.mlm.heldout_fraction": 0.3})
  out = T.train(c, tmp_path / "probe")
  _, start = hf.load(tmp_path / "probe" / "tiny-model")
  _, end = hf.load(out["export"])
  jax.tree.map(np.testing.assert_array_equal, start["encoder"], end["encoder"])
  held = {k: json.loads((tmp_path / "probe" / f"{name}.json").read_text())["mlm"]
          for k, name in (("before", "mlm_before"), ("after", "mlm"))}
  assert held["after"]["mlm_heldout_perplexity"] < held["before"]["mlm_heldout_perplexity"]
  with pytest.raises(ValueError, match="unknown variant"):
    scifact_mlm.get_config("prob")


def _run_tasks(runner_name, devices, tmp_path, tiny_beir, chunk=0):
  from configs import scifact_mnrl
  from embed_jax.models import SentenceEncoder, heads
  from embed_jax.tasks import build_tasks
  from embed_jax.testing import init_params, tiny_tokenizer
  from embed_jax.data import load_beir
  c = _multi(tiny_beir, tmp_path)
  c.dropout = False
  c.train.grad_cache_chunk, c.train.runner = chunk, runner_name
  cfg = runner_model_config()
  tasks = build_tasks(c, tiny_tokenizer(), cfg, load_beir(str(tiny_beir)))
  module = SentenceEncoder(cfg)
  params = heads.add_mlm_head(init_params(cfg), module, 0)
  tx, schedule = T.make_optimizer(scifact_mnrl.get_config().optim, total_steps=10)
  axis = "batch" if runner_name == "pmap" else None
  runner = T.make_runner(runner_name, make_step(cfg, c, tx, schedule, axis, tasks,
                                                batch_shards(runner_name, devices)), devices)
  state = runner.put_state(T.init_state(params, tx, seed=0))
  from tests.test_train import synthetic_batch
  losses_ = []
  for s in range(2):
    batch = synthetic_batch(b=8, seed=s)
    for t in tasks:
      b = t.loader.batch(s)
      batch["groups"].update(b["groups"])
      batch["inputs"].update(b["inputs"])
    state, m = runner.step(state, batch)
    losses_.append(float(m["loss"]))
  return losses_, jax.tree.map(np.asarray, runner.get_state(state).params)


@needs_8
def test_tasks_agree_across_runners_and_grad_cache(tiny_beir, tmp_path):
  one = _run_tasks("jit", jax.devices()[:1], tmp_path / "1", tiny_beir)
  _assert_same(one, _run_tasks("pmap", jax.devices()[:8], tmp_path / "3", tiny_beir))
  _assert_same(one, _run_tasks("jit", jax.devices()[:1], tmp_path / "4", tiny_beir, chunk=2))
  # MLM masks follow each row's global index through the interleaved chunks of 8 devices.
  _assert_same(one, _run_tasks("jit", jax.devices()[:8], tmp_path / "5", tiny_beir, chunk=1))


@pytest.mark.parametrize("change, message", [
    ({"task_sampling": "random"}, "task_sampling='random'"),
    ({"tasks.sts.loss": "triplet"}, "a sts task takes cosent or mnrl"),
    ({"tasks.nli.batch_size": 7}, "tasks.nli.batch_size=7 must be >= 2 and a multiple"),
    ({"tasks.mlm.rate": 1.5}, r"tasks.mlm.rate=1.5 must be in \(0, 1\)"),
])
def test_bad_task_config_is_refused(change, message, tiny_beir, tmp_path):
  with pytest.raises(ValueError, match=message):
    T.check_config(_multi(tiny_beir, tmp_path, **change), num_devices=8)


def test_domain_adaptation_configs_smoke(tiny_beir, tmp_path):
  """configs/scifact_mlm.py:smoke and configs/scifact_multitask.py:smoke (real STS-B and SNLI
  files, a tiny model) run end to end through the CLI."""
  from embed_jax.cli import main
  from tests.conftest import REPO, data_root
  rc = main(["train", "--config", f"{REPO}/configs/scifact_mlm.py:smoke", "--workdir",
             str(tmp_path / "mlm"), f"--config.data.dataset={tiny_beir}"])
  assert rc == 0 and (tmp_path / "mlm" / "export_mlm" / "model.safetensors").exists()
  after = json.loads((tmp_path / "mlm" / "mlm.json").read_text())["mlm"]
  assert after["mlm_heldout_tokens"] > 0
  if data_root() is None or not (data_root() / "sts" / "stsb").exists():
    pytest.skip("no ../shared/data for the STS-B and SNLI tasks")
  rc = main(["train", "--config", f"{REPO}/configs/scifact_multitask.py:smoke", "--workdir",
             str(tmp_path / "multi"), f"--config.data.dataset={tiny_beir}",
             "--config.tasks.stsb.max_seq_length=32", "--config.tasks.nli.max_seq_length=32"])
  assert rc == 0
  first = json.loads((tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()[0])
  assert {"stsb_loss", "nli_loss", "pairs_loss"} <= set(first)
