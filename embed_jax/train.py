"""Contrastive fine-tuning: TrainState, the pure train step, the jit and pmap runners, the loop.

    embed-jax train --config configs/scifact_mnrl.py --workdir runs/mnrl [--config.optim.lr=3e-5]

Sections, in the order the loop uses them: config checks and logging, model and data, optimiser,
the step (plain or with gradient caching), runners (jit over a Mesh, pmap), checkpoints,
evaluation, the loop.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from embed_jax import hf, losses
from embed_jax.embedder import Embedder, load_tokenizer
from embed_jax.models import SentenceEncoder

log = logging.getLogger(__name__)

LOSSES = ("mnrl", "triplet")
RUNNERS = ("jit", "pmap")


class TrainingError(RuntimeError):
  """A run that cannot go on (non-finite loss): the message names the step and the checkpoint."""


# ----------------------------------------------------------------------------------------------
# Config checks: refuse bad values before any compute.
# ----------------------------------------------------------------------------------------------


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  problems = []
  if config.loss.name not in LOSSES:
    problems.append(f"loss.name={config.loss.name!r}: choose from {LOSSES}")
  if config.loss.name == "triplet" and config.data.num_negatives < 1:
    problems.append("loss.name='triplet' needs data.num_negatives >= 1 (and data.negatives)")
  if config.train.runner not in RUNNERS:
    problems.append(f"train.runner={config.train.runner!r}: choose from {RUNNERS}")
  if config.optim.lr <= 0:
    problems.append(f"optim.lr={config.optim.lr} must be > 0")
  if config.optim.schedule not in ("linear", "cosine"):
    problems.append(f"optim.schedule={config.optim.schedule!r}: choose linear or cosine")
  if not 0 <= config.optim.warmup_ratio < 1:
    problems.append(f"optim.warmup_ratio={config.optim.warmup_ratio} must be in [0, 1)")
  if config.batch_size < 1 or config.batch_size % num_devices:
    problems.append(f"batch_size={config.batch_size} must be a positive multiple of the "
                    f"{num_devices} devices")
  chunk = config.train.grad_cache_chunk
  if chunk < 0 or (chunk and (config.batch_size // num_devices) % chunk):
    problems.append(f"train.grad_cache_chunk={chunk} must divide the per-device batch "
                    f"{config.batch_size // num_devices}")
  if config.num_epochs <= 0 and config.max_steps <= 0:
    problems.append("set num_epochs > 0 or max_steps > 0")
  if config.export not in ("final", "best"):
    problems.append(f"export={config.export!r}: choose final or best")
  if config.export == "best" and not config.evals.dev_every_steps:
    problems.append("export='best' needs evals.dev_every_steps > 0 and a dev split")
  for key, value in (("init", config.init), ("resume", config.resume),
                     ("data.negatives", "" if config.data.mine.enabled else config.data.negatives)):
    if value and not Path(value).exists():
      problems.append(f"{key}={value!r} does not exist")
  if config.data.num_negatives and not config.data.negatives:
    problems.append("data.num_negatives > 0 needs data.negatives (a file from `embed-jax mine`)")
  if problems:
    raise ValueError("bad config:\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------------------------
# State and optimiser.
# ----------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray  # int32 scalar: steps taken, also the data position
  params: Any
  opt_state: Any
  rng: jnp.ndarray  # raw uint32 key data; per-step keys are fold_in(rng, step)


def decay_mask(params) -> Any:
  """Weight decay on kernels and embeddings only: never on biases or LayerNorm scales."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding"), params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int):
  """AdamW with warmup then linear or cosine decay to 0; global-norm clipping. -> (tx, schedule)"""
  warmup = int(optim.warmup_ratio * total_steps)
  decay_steps = max(total_steps - warmup, 1)
  decay = (optax.linear_schedule(optim.lr, 0.0, decay_steps) if optim.schedule == "linear"
           else optax.cosine_decay_schedule(optim.lr, decay_steps))
  schedule = optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), decay], [warmup])
  parts = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm > 0 else []
  parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           weight_decay=optim.weight_decay, mask=decay_mask))
  return optax.chain(*parts), schedule


def init_state(params, tx, seed: int) -> TrainState:
  params = jax.tree.map(jnp.asarray, params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)))


# ----------------------------------------------------------------------------------------------
# The step: encode the batch, the loss over the (global) batch, AdamW.
# ----------------------------------------------------------------------------------------------

BATCH_INDEX_KEYS = ("query_B", "pos_doc_B", "neg_doc_BxN", "valid_B")


def encode_pairs(module: SentenceEncoder, params, batch, rng, train: bool):
  """Embeds queries, positives and negatives of a (local) batch -> (q_BxD, p_BxD, n_BxNxD|None)."""
  def emb(ids, mask, salt):
    kw = {"rngs": {"dropout": jax.random.fold_in(rng, salt)}} if train else {}
    return module.apply({"params": params}, ids, mask, deterministic=not train, normalize=False, **kw)

  q = emb(batch["q_ids_BxLq"], batch["q_mask_BxLq"], 0)
  p = emb(batch["p_ids_BxLd"], batch["p_mask_BxLd"], 1)
  n = None
  if "n_ids_BxNxLd" in batch:
    b, k, l = batch["n_ids_BxNxLd"].shape
    n = emb(batch["n_ids_BxNxLd"].reshape(b * k, l), batch["n_mask_BxNxLd"].reshape(b * k, l), 2)
    n = n.reshape(b, k, -1)
  return q, p, n


def loss_on_embeddings(loss_cfg, q, p, n, ids) -> jnp.ndarray:
  """The configured loss over a batch's embeddings; `ids` are the batch's index arrays."""
  if loss_cfg.name == "mnrl":
    return losses.mnrl(q, p, n, scale=loss_cfg.scale, symmetric=loss_cfg.symmetric,
                       valid_B=ids["valid_B"], p_ids_B=ids["pos_doc_B"],
                       neg_ids_BxN=ids.get("neg_doc_BxN"), q_ids_B=ids["query_B"])
  if loss_cfg.name == "triplet":
    return losses.triplet(q, p, n[:, 0], margin=loss_cfg.margin, valid_B=ids["valid_B"])
  raise ValueError(f"unknown loss {loss_cfg.name!r}")


def _gather(tree, axis_name):
  """The global batch from each device's shard (pmap); identity under jit, which sees it whole."""
  if axis_name is None:
    return tree
  return jax.tree.map(lambda x: jax.lax.all_gather(x, axis_name, tiled=True), tree)


def make_train_step(module: SentenceEncoder, config: ml_collections.ConfigDict, tx, schedule,
                    axis_name: str | None = None) -> Callable:
  """step(state, batch) -> (state, metrics): pure; jit it, pmap it (axis_name), or call it."""
  train = bool(config.dropout)
  chunk = int(config.train.grad_cache_chunk)

  def ids_of(batch):
    return {k: batch[k] for k in BATCH_INDEX_KEYS if k in batch}

  def loss_from_local_embeddings(embs, ids):
    q, p, n = _gather(embs, axis_name)
    return loss_on_embeddings(config.loss, q, p, n, _gather(ids, axis_name))

  def plain_grads(params, batch, rng):
    def loss_fn(params):
      # The whole batch is chunk 0: the same dropout draw as gradient caching with one chunk.
      key = jax.random.fold_in(rng, 0)
      return loss_from_local_embeddings(encode_pairs(module, params, batch, key, train), ids_of(batch))
    return jax.value_and_grad(loss_fn)(params)

  def cached_grads(params, batch, rng):
    """Gradient caching: embed every chunk without gradients, take the loss gradient w.r.t. the
    embeddings, then back-propagate chunk by chunk. Peak memory grows with the chunk only."""
    text = {k: v for k, v in batch.items() if k not in BATCH_INDEX_KEYS}
    b = text["q_ids_BxLq"].shape[0]
    chunks = jax.tree.map(lambda x: x.reshape(b // chunk, chunk, *x.shape[1:]), text)
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(b // chunk))

    def embed_chunk(params, chunk_batch, key):  # the same key in both passes: same dropout
      return encode_pairs(module, params, chunk_batch, key, train)

    embs = jax.lax.map(lambda a: embed_chunk(jax.lax.stop_gradient(params), *a), (chunks, keys))
    embs = jax.tree.map(lambda x: x.reshape(b, *x.shape[2:]), embs)
    loss, emb_grads = jax.value_and_grad(loss_from_local_embeddings)(embs, ids_of(batch))
    emb_grads = jax.tree.map(lambda g: g.reshape(b // chunk, chunk, *g.shape[1:]), emb_grads)

    def backward(acc, a):
      chunk_batch, key, g = a
      _, vjp = jax.vjp(lambda p: embed_chunk(p, chunk_batch, key), params)
      return jax.tree.map(jnp.add, acc, vjp(g)[0]), None

    grads, _ = jax.lax.scan(backward, jax.tree.map(jnp.zeros_like, params), (chunks, keys, emb_grads))
    return loss, grads

  def step(state: TrainState, batch) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if axis_name is not None:  # a different dropout draw on each device's shard
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    loss, grads = (cached_grads if chunk else plain_grads)(state.params, batch, rng)
    if axis_name is not None:
      # Every device computed the global loss; each gradient holds its own shard's path (times
      # the device count, from all_gather's transpose), so the mean is the full gradient.
      grads = jax.lax.pmean(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "lr": schedule(state.step), "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(params), "update_norm": optax.tree.norm(updates)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


# ----------------------------------------------------------------------------------------------
# Runners: the same step under jit over a Mesh (default) or under pmap.
# ----------------------------------------------------------------------------------------------


class JitRunner:
  """Batch sharded over a `data` axis, params replicated; the loss sees the global batch."""

  def __init__(self, step_fn, devices=None):
    devices = devices or jax.devices()
    self.mesh = jax.make_mesh((len(devices),), ("data",), devices=devices,
                              axis_types=(jax.sharding.AxisType.Auto,))
    self.replicated = NamedSharding(self.mesh, P())
    self.data = NamedSharding(self.mesh, P("data"))
    self._step = jax.jit(step_fn, in_shardings=(self.replicated, self.data),
                         out_shardings=(self.replicated, self.replicated), donate_argnums=0)

  def put_state(self, state: TrainState) -> TrainState:
    return jax.device_put(state, self.replicated)

  def get_state(self, state: TrainState) -> TrainState:
    return state

  def step(self, state, batch):
    return self._step(state, jax.device_put(batch, self.data))


class PmapRunner:
  """pmap over devices: all_gather inside the loss, pmean of gradients (kept thin on purpose)."""

  def __init__(self, step_fn, devices=None):
    self.devices = devices or jax.devices()
    self.n = len(self.devices)
    self._step = jax.pmap(step_fn, axis_name="batch", devices=self.devices, donate_argnums=0)

  def put_state(self, state: TrainState) -> TrainState:
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (self.n, *jnp.shape(x))), state)

  def get_state(self, state: TrainState) -> TrainState:
    return jax.tree.map(lambda x: x[0], state)

  def step(self, state, batch):
    shards = jax.tree.map(lambda x: x.reshape(self.n, x.shape[0] // self.n, *x.shape[1:]), batch)
    state, metrics = self._step(state, shards)
    return state, jax.tree.map(lambda x: x[0], metrics)


def make_runner(name: str, step_fn, devices=None):
  return {"jit": JitRunner, "pmap": PmapRunner}[name](step_fn, devices)


# ----------------------------------------------------------------------------------------------
# Checkpoints: Orbax, in <workdir>/checkpoints; the data position is the step.
# ----------------------------------------------------------------------------------------------


def checkpoint_manager(workdir: Path, config):
  import orbax.checkpoint as ocp
  options = ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options)


def save_checkpoint(mngr, state: TrainState, meta: dict) -> None:
  import orbax.checkpoint as ocp
  mngr.save(int(state.step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)))


def restore_checkpoint(mngr, abstract_state: TrainState, step: int | None = None):
  import orbax.checkpoint as ocp
  step = mngr.latest_step() if step is None else step
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  return out.state, out.meta


def params_are_finite(params) -> bool:
  return bool(jax.tree.reduce(lambda a, x: a & jnp.isfinite(x).all(), params, jnp.array(True)))


# ----------------------------------------------------------------------------------------------
# Model and data.
# ----------------------------------------------------------------------------------------------


def load_model(config, workdir: Path):
  """(ModelConfig, params, tokenizer, source): the pretrained model, a tiny random one (smoke),
  with `init` weights when given."""
  overrides = dict(dtype=config.dtype, max_seq_length=config.max_seq_length)
  if config.smoke:
    from embed_jax.testing import make_tiny_model
    folder = workdir / "tiny-model"
    if not (folder / "config.json").exists():
      make_tiny_model(folder)
    source = "tiny-random-bert"
  else:
    folder, source = hf.resolve(config.model), config.model
  model_config, params = hf.load(folder, **overrides)
  if config.init:
    init_config, params = hf.load(config.init, **overrides)
    if dataclasses.replace(init_config, hf_config=None) != dataclasses.replace(model_config, hf_config=None):
      log.warning("init %s has a different config from %s; using the init's", config.init, source)
      model_config = init_config
    folder, source = Path(config.init), config.init
  return model_config, params, load_tokenizer(folder), source


def mine_if_missing(config, dataset, embedder: Embedder) -> None:
  """Writes `data.negatives` with the starting model when `data.mine.enabled` and it is absent."""
  path = Path(config.data.negatives)
  if not config.data.negatives or path.exists() or not config.data.mine.enabled:
    return
  from embed_jax.data.mining import mine_hard_negatives, write_negatives
  m = config.data.mine
  log.info("mining hard negatives for %s %s into %s", dataset.name, config.data.train_split, path)
  rows = mine_hard_negatives(embedder, dataset, config.data.train_split, top_k=m.top_k,
                             skip_top=m.skip_top, margin=m.margin, num_negatives=m.num_negatives,
                             sampling=m.sampling, seed=config.seed,
                             batch_size=config.evals.batch_size)
  write_negatives(rows, path)


def load_data(config, dataset, tokenizer, model_config):
  """(PairLoader, dev_qrels or None) for `dataset`."""
  from embed_jax.data.pairs import PairLoader, build_pairs, carve_dev
  train_qrels = dataset.qrels(config.data.train_split)
  train_queries = [q for q in dataset.queries if q in train_qrels]
  dev_qrels = None
  if config.data.dev_split:
    dev_qrels = dataset.qrels(config.data.dev_split)
  elif config.data.dev_fraction > 0:
    train_queries, dev_queries = carve_dev(train_queries, config.data.dev_fraction, config.seed)
    dev_qrels = {q: train_qrels[q] for q in dev_queries}
  negatives = None
  if config.data.negatives:
    from embed_jax.data.mining import read_negatives
    negatives = read_negatives(config.data.negatives, dataset)
  pairs = build_pairs(dataset, config.data.train_split, query_subset=train_queries,
                      negatives=negatives)

  def tok(texts, max_len):
    texts = [t.lower() for t in texts] if model_config.do_lower_case else texts
    return tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]

  q_tokens = tok([dataset.queries[q] for q in pairs.query_ids], config.query_max_seq_length)
  d_tokens = tok(dataset.corpus_texts(" "), config.max_seq_length)
  loader = PairLoader(pairs, q_tokens, d_tokens, batch_size=config.batch_size, seed=config.seed,
                      num_negatives=config.data.num_negatives,
                      q_max_len=config.query_max_seq_length, d_max_len=config.max_seq_length,
                      pad_id=model_config.pad_token_id)
  log.info("%s: %d training pairs from %d queries, %d steps per epoch of %d; dev queries: %d",
           dataset.name, len(pairs.pairs_Px2), len(pairs.query_ids), loader.steps_per_epoch,
           config.batch_size, len(dev_qrels or {}))
  return loader, dev_qrels


# ----------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------


def _setup_logging(workdir: Path) -> None:
  """Package logs also go to <workdir>/train.log (replacing an earlier run's file handler)."""
  logger = logging.getLogger("embed_jax")
  for h in [h for h in logger.handlers if getattr(h, "embed_jax_run", False)]:
    logger.removeHandler(h)
    h.close()
  handler = logging.FileHandler(workdir / "train.log")
  handler.embed_jax_run = True
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)


def _truncate_metrics(path: Path, start: int) -> None:
  """Drops the lines a resumed run will write again: steps taken after the checkpoint it resumes
  from (a hard kill can leave them behind). Train lines carry the 0-based step index, dev lines the
  number of steps done."""
  if not path.exists():
    return
  from embed_jax.checkpoint import atomic_write
  keep = []
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line cut short by the kill
    limit = start if "dev_ndcg@10" in row else start - 1
    if row.get("step", -1) <= limit:
      keep.append(line + "\n")
  atomic_write(path, lambda f: f.writelines(keep), "w")


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
          devices=None, stop_after: int | None = None) -> dict:
  """Runs (or resumes) the experiment in `workdir`; returns a summary.

  Resume is the normal path: a checkpoint in <workdir>/checkpoints wins, then `config.resume`
  (another workdir), then `config.init`, then the pretrained model. `stop_after` ends the process
  early after that many steps (tests of interruption).
  """
  from embed_jax import evaluate
  from embed_jax.checkpoint import atomic_write, export
  devices = devices or jax.devices()
  check_config(config, len(devices))
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  _setup_logging(workdir)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

  # ---- model and data ----
  model_config, params, tokenizer, source = load_model(config, workdir)
  if not config.dropout:
    model_config = model_config.replace(hidden_dropout=0.0, attention_dropout=0.0)
  module = SentenceEncoder(model_config)

  def embedder(params):
    return Embedder(model_config, params, tokenizer, source=source)

  from embed_jax.data import load_beir
  dataset = load_beir(config.data.dataset, data_dir=config.data.data_dir or None)
  mine_if_missing(config, dataset, embedder(params))
  loader, dev_qrels = load_data(config, dataset, tokenizer, model_config)
  total_steps = loader.steps_per_epoch * config.num_epochs
  if config.max_steps > 0:
    total_steps = min(total_steps, config.max_steps) if config.num_epochs > 0 else config.max_steps
  if config.evals.dev_every_steps and not dev_qrels:
    raise ValueError("evals.dev_every_steps > 0 but there is no dev split: set data.dev_split or "
                     "data.dev_fraction")

  # ---- optimiser, state, checkpoints ----
  tx, schedule = make_optimizer(config.optim, total_steps)
  state = init_state(params, tx, config.seed)
  mngr = checkpoint_manager(workdir, config)
  meta = {"best_dev": None, "best_step": None}
  if mngr.latest_step() is not None:
    state, meta = restore_checkpoint(mngr, state)
    log.info("resuming %s from step %d", workdir, int(state.step))
  elif config.resume:
    other = checkpoint_manager(Path(config.resume), config)
    if other.latest_step() is None:
      raise FileNotFoundError(f"resume={config.resume!r} has no checkpoint")
    state, meta = restore_checkpoint(other, state)
    log.info("starting from %s at step %d", config.resume, int(state.step))

  # ---- step and runner ----
  axis = "batch" if config.train.runner == "pmap" else None
  step_fn = make_train_step(module, config, tx, schedule, axis_name=axis)
  runner = make_runner(config.train.runner, step_fn, devices)
  state = runner.put_state(state)

  def dev_ndcg(params) -> float:
    out = evaluate.evaluate_retrieval(embedder(params), dataset, config.data.train_split
                                      if not config.data.dev_split else config.data.dev_split,
                                      qrels=dev_qrels, precisions=("float32",), k_values=(10,),
                                      batch_size=config.evals.batch_size)
    return out["results"][0]["metrics"]["ndcg@10"]

  def test_eval(params, name: str) -> float:
    results = evaluate.evaluate_retrieval(embedder(params), dataset, "test",
                                          batch_size=config.evals.batch_size)
    results["settings"]["config"] = json.loads(config.to_json_best_effort())
    atomic_write(workdir / name, lambda f: f.write(json.dumps(results, indent=2) + "\n"), "w")
    return results["results"][0]["metrics"]["ndcg@10"]

  # ---- loop ----
  start = int(runner.get_state(state).step)
  before = workdir / "results_before.json"
  if config.evals.test_at_start and start == 0 and not before.exists():
    log.info("test nDCG@10 before training %.4f", test_eval(params, before.name))
  end = total_steps if stop_after is None else min(total_steps, start + stop_after)
  _truncate_metrics(workdir / "metrics.jsonl", start)
  metrics_file = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
  last_good = mngr.latest_step()
  from tqdm.auto import tqdm
  bar = tqdm(range(start, end), initial=start, total=total_steps, desc="train", unit="step",
             disable=end - start < 2)
  pending = None

  def flush(pending) -> None:
    """Fetches a step's metrics (one step late, so the host never waits on the device)."""
    step, m = pending
    m = {k: float(v) for k, v in m.items()}
    if not math.isfinite(m["loss"]):
      where = f"step {last_good} in {workdir / 'checkpoints'}" if last_good is not None else "none yet"
      raise TrainingError(f"non-finite loss {m['loss']} at step {step}; last good checkpoint: "
                          f"{where}. Lower optim.lr or check the data.")
    if step % config.train.log_every == 0 or step == total_steps - 1:
      metrics_file.write(json.dumps({"step": step, **m}) + "\n")
      metrics_file.flush()
    bar.set_postfix(loss=f"{m['loss']:.4f}")

  try:
    for step in bar:
      state, m = runner.step(state, loader.batch(step))
      if pending is not None:
        flush(pending)
      pending = (step, m)
      done = step + 1
      if done % config.checkpoint.every_steps == 0 or done == end:
        flush(pending)  # never checkpoint params that came from a non-finite loss
        pending = None
        host = runner.get_state(state)
        if config.evals.dev_every_steps and (done % config.evals.dev_every_steps == 0 or done == total_steps):
          score = dev_ndcg(host.params)
          log.info("step %d: dev nDCG@10 %.4f", done, score)
          metrics_file.write(json.dumps({"step": done, "dev_ndcg@10": score}) + "\n")
          if meta["best_dev"] is None or score > meta["best_dev"]:
            meta = {"best_dev": score, "best_step": done}
            if config.export == "best":  # kept apart from the rolling checkpoints (keep-K)
              export(host.params, model_config.replace(dtype="float32"), tokenizer, workdir / "best",
                     base_model=config.model)
        save_checkpoint(mngr, host, meta)
        last_good = done
    if pending is not None:
      flush(pending)
  finally:
    mngr.wait_until_finished()
    metrics_file.close()
    bar.close()

  summary = {"workdir": str(workdir), "model": source, "steps": end, "total_steps": total_steps,
             "steps_run": end - start}
  if end < total_steps:
    return summary  # interrupted on purpose; re-running the command resumes

  # ---- export and test evaluation ----
  final = runner.get_state(state)
  params = final.params
  if config.export == "best" and meta["best_step"] is not None:
    params = hf.load(workdir / "best")[1]
    log.info("exporting the best dev model (step %d, dev nDCG@10 %.4f)", meta["best_step"],
             meta["best_dev"])
  out_dir = export(params, model_config.replace(dtype="float32"), tokenizer, workdir / "export",
                   base_model=config.model)
  summary["export"] = str(out_dir)
  if before.exists():
    summary["test_ndcg@10_before"] = json.loads(before.read_text())["results"][0]["metrics"]["ndcg@10"]
  if config.evals.test_at_end:
    summary["test_ndcg@10"] = test_eval(params, "results.json")
    log.info("test nDCG@10 %.4f", summary["test_ndcg@10"])
  return summary
