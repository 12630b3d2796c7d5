"""Training: the pure train step, the jit and pmap runners, and the loop.

    embed-jax train --config configs/scifact_mnrl.py --workdir runs/mnrl [--config.optim.lr=3e-5]

Sections in the order `train()` uses them: config checks, optimiser and state, the step (plain or
with gradient caching), runners (jit over a Mesh, pmap), model, the loop. What the step
optimises is an embed_jax.objective.Objective; batches come from embed_jax.data.inputs, heads
from embed_jax.models.heads, checkpoints and exports from embed_jax.checkpoint, evaluators from
embed_jax.evaluate.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from embed_jax import hf, lora
from embed_jax.checkpoint import (atomic_write, checkpoint_manager, restore_checkpoint,
                                  save_checkpoint)
from embed_jax.embedder import Embedder
from embed_jax.models import SentenceEncoder, heads
from embed_jax.objective import Objective, build_objective, check_model_fit, objective_problems
from embed_jax.optim import check_freeze, frozen_mask, make_optimizer, param_path

log = logging.getLogger(__name__)

RUNNERS = ("jit", "pmap")


class TrainingError(RuntimeError):
  """A run that cannot go on (non-finite loss): the message names the step and the checkpoint."""


# ----------------------------------------------------------------------------------------------
# Config checks: refuse bad values before any compute.
# ----------------------------------------------------------------------------------------------


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  from embed_jax.evaluate import evaluator_problems
  problems = []
  if config.train.runner not in RUNNERS:
    problems.append(f"train.runner={config.train.runner!r}: choose from {RUNNERS}")
  if config.optim.lr <= 0:
    problems.append(f"optim.lr={config.optim.lr} must be > 0")
  if config.optim.schedule not in ("linear", "cosine"):
    problems.append(f"optim.schedule={config.optim.schedule!r}: choose linear or cosine")
  try:
    re.compile(config.optim.freeze)
  except re.error as e:
    problems.append(f"optim.freeze={config.optim.freeze!r} is not a regular expression ({e})")
  if config.optim.head_lr < 0:
    problems.append(f"optim.head_lr={config.optim.head_lr} must be >= 0 (0: the heads use optim.lr)")
  if not 0 <= config.optim.warmup_ratio < 1:
    problems.append(f"optim.warmup_ratio={config.optim.warmup_ratio} must be in [0, 1)")
  if config.batch_size < 1 or config.batch_size % num_devices:
    problems.append(f"batch_size={config.batch_size} must be a positive multiple of the "
                    f"{num_devices} devices")
  fsdp = config.train.fsdp
  if fsdp < 1 or num_devices % fsdp:
    problems.append(f"train.fsdp={fsdp} must divide the {num_devices} devices (the mesh is "
                    f"data {num_devices} / fsdp x fsdp)")
  elif fsdp > 1 and config.train.runner != "jit":
    problems.append(f"train.fsdp={fsdp} needs train.runner='jit' (pmap replicates parameters)")
  chunk = config.train.grad_cache_chunk
  if chunk < 0 or (chunk and (config.batch_size // num_devices) % chunk):
    problems.append(f"train.grad_cache_chunk={chunk} must divide the per-device batch "
                    f"{config.batch_size // num_devices}")
  if config.num_epochs <= 0 and config.max_steps <= 0:
    problems.append("set num_epochs > 0 or max_steps > 0")
  if config.export not in ("final", "best"):
    problems.append(f"export={config.export!r}: choose final or best")
  for key, value in (("init", config.init), ("resume", config.resume),
                     ("data.negatives", "" if config.data.mine.enabled else config.data.negatives)):
    if value and not Path(value).exists():
      problems.append(f"{key}={value!r} does not exist")
  if config.data.num_negatives and not config.data.negatives:
    problems.append("data.num_negatives > 0 needs data.negatives (a file from `embed-jax mine`)")
  problems += objective_problems(config, num_devices) + evaluator_problems(config)
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


def init_state(params, tx, seed: int) -> TrainState:
  """Step 0: the params, fresh optimiser state, the run's key. Pure: jit it with out_shardings
  (or jax.eval_shape it for the state's shapes) to build the state where it will live."""
  params = jax.tree.map(jnp.asarray, params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)))


# ----------------------------------------------------------------------------------------------
# The step: encode the batch, the objective over the (global) batch, AdamW.
# ----------------------------------------------------------------------------------------------


def _gather(tree, axis_name):
  """The global batch from each device's shard (pmap); identity under jit, which sees it whole."""
  if axis_name is None:
    return tree
  return jax.tree.map(lambda x: jax.lax.all_gather(x, axis_name, tiled=True), tree)


def interleaved_chunks(x, shards: int, n_chunks: int):
  """[S * n * c, ...] -> [n, S * c, ...]: chunk j holds rows j*c..(j+1)*c-1 of each of the S
  device shards of the batch axis, so a loop over chunks keeps every device busy."""
  x = x.reshape(shards, n_chunks, x.shape[0] // (shards * n_chunks), *x.shape[1:])
  return jnp.swapaxes(x, 0, 1).reshape(n_chunks, -1, *x.shape[3:])


def uninterleaved(x, shards: int):
  """interleaved_chunks' inverse: [n, S * c, ...] -> [S * n * c, ...]."""
  x = x.reshape(x.shape[0], shards, x.shape[1] // shards, *x.shape[2:])
  return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[3:])


def make_train_step(module: SentenceEncoder, objective: Objective, config: ml_collections.ConfigDict,
                    tx, schedule, axis_name: str | None = None, batch_shards: int = 1) -> Callable:
  """step(state, batch) -> (state, metrics): pure; jit it, pmap it (axis_name), or call it. A
  batch is {"groups", "inputs"} (embed_jax.objective) and may hold any subset of the objective's
  groups: terms whose groups are absent do not count. batch_shards: the devices a jitted step's
  batch is split over (JitRunner's mesh), so that every gradient-caching chunk takes
  train.grad_cache_chunk rows from each device's shard and all devices work on every chunk."""
  train = bool(config.dropout)
  chunk = int(config.train.grad_cache_chunk)
  freeze = config.optim.get("freeze", "")
  spec = lora.LoraSpec.from_config(config.lora) if config.get("lora", {}).get("r") else None

  def embedded(params, groups, rng, mask_key, rows):
    """objective.embed with the params as trained. Frozen leaves sit behind stop_gradient, so
    their backward pass is never built and a frozen encoder costs a forward pass only. LoRA
    adapters (params["lora"]) are applied beside their frozen layers (lora.applied): gradients
    reach A and B without the base kernels' weight gradients."""
    if freeze:
      params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params,
                            frozen_mask(params, freeze))
    if spec is None:
      return objective.embed(module, params, groups, rng, train, mask_key, rows)
    with lora.trained({k: v for k, v in params.items() if k != "lora"}, lora.flat(params["lora"]),
                      spec, train) as base:
      return objective.embed(module, base, groups, rng, train, mask_key, rows)

  def loss_from_local_outputs(outputs, inputs, step):
    return objective.loss(_gather(outputs, axis_name), _gather(inputs, axis_name), step)

  def global_rows(groups, device):
    """Each group's rows' indices in the global batch (what MLM masks draw from)."""
    return {name: device * g["ids"].shape[0] + jnp.arange(g["ids"].shape[0])
            for name, g in groups.items()}

  def plain_grads(params, batch, rng, mask_key, device, step):
    rows = global_rows(batch["groups"], device)

    def loss_of_params(params):
      # The whole batch is chunk 0: the same dropout draw as gradient caching with one chunk.
      outputs = embedded(params, batch["groups"], jax.random.fold_in(rng, 0), mask_key, rows)
      return loss_from_local_outputs(outputs, batch["inputs"], step)
    return jax.value_and_grad(loss_of_params, has_aux=True)(params)

  def cached_grads(params, batch, rng, mask_key, device, step):
    """Gradient caching: embed every chunk without gradients, take the loss gradient w.r.t. the
    outputs, then back-propagate chunk by chunk. Peak memory grows with the chunk only. Every
    text group is cut into the same number of chunks (each device's pairs / chunk); chunk j
    holds the j-th slice of every device's shard (interleaved), so under jit all devices work on
    every chunk rather than one device on each."""
    groups, s = batch["groups"], batch_shards
    rows = groups["q" if "q" in groups else sorted(groups)[0]]["ids"].shape[0]
    n_chunks = rows // (s * chunk)

    chunked = lambda x: interleaved_chunks(x, s, n_chunks)  # noqa: E731
    unchunked = lambda x: uninterleaved(x, s)  # noqa: E731
    chunks = jax.tree.map(chunked, groups)
    chunk_rows = jax.tree.map(chunked, global_rows(groups, device))
    # Chunk j's dropout key: the j-th of this device's (pmap) or the global batch's (jit) chunks.
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(n_chunks))

    def embed_chunk(params, chunk_groups, key, rows):  # one key in both passes: same dropout
      return embedded(params, chunk_groups, key, mask_key, rows)

    outputs = jax.lax.map(lambda a: embed_chunk(jax.lax.stop_gradient(params), *a),
                          (chunks, keys, chunk_rows))
    outputs = jax.tree.map(unchunked, outputs)
    (loss, aux), out_grads = jax.value_and_grad(loss_from_local_outputs, has_aux=True)(
        outputs, batch["inputs"], step)
    out_grads = jax.tree.map(chunked, out_grads)

    def backward(acc, a):
      chunk_groups, key, rows, g = a
      _, vjp = jax.vjp(lambda p: embed_chunk(p, chunk_groups, key, rows), params)
      return jax.tree.map(jnp.add, acc, vjp(g)[0]), None

    grads, _ = jax.lax.scan(backward, jax.tree.map(jnp.zeros_like, params),
                            (chunks, keys, chunk_rows, out_grads))
    return (loss, aux), grads

  def step(state: TrainState, batch) -> tuple[TrainState, dict]:
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    rng, device = step_key, 0
    if axis_name is not None:  # a different dropout draw on each device's shard
      device = jax.lax.axis_index(axis_name)
      rng = jax.random.fold_in(rng, device)
    (loss, aux), grads = (cached_grads if chunk else plain_grads)(state.params, batch, rng,
                                                                  step_key, device, state.step)
    if axis_name is not None:
      # Every device computed the global loss; each gradient holds its own shard's path (times
      # the device count, from all_gather's transpose), so the mean is the full gradient.
      grads = jax.lax.pmean(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "lr": schedule(state.step), "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(params), "update_norm": optax.tree.norm(updates), **aux}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


# ----------------------------------------------------------------------------------------------
# Runners: the same step under jit over a Mesh (default) or under pmap. The state is built (or
# restored) straight into `state_shardings(...)`, then `put_state` places it for the step.
# ----------------------------------------------------------------------------------------------


# FSDP: which axis of a parameter (or optimiser state) leaf is split over the `fsdp` mesh axis.
# Each rule is (regex over the leaf's "/"-joined path, the axis to split, or None: replicate); the
# first match wins; a leaf matched by none, or whose rule's axis the fsdp size does not divide, is
# split on its largest axis that the fsdp size divides. Leaves below MIN_SHARD_SIZE elements
# (biases, norms, scalars) stay replicated: their all-gathers would cost more than their memory.
FSDP_RULES: tuple[tuple[str, int | None], ...] = (
    (r"(^|/)(step|rng|count)$", None),
    (r".*/(word_embeddings|embed_tokens)/embedding$", 0),  # [V, H]: the vocabulary axis
)
MIN_SHARD_SIZE = 1 << 14


def fsdp_spec(path: str, shape: tuple[int, ...], fsdp: int, rules=FSDP_RULES,
              min_size: int | None = None) -> P:
  """The PartitionSpec of one state leaf under FSDP over `fsdp` devices (see FSDP_RULES)."""
  if fsdp <= 1 or math.prod(shape) < (MIN_SHARD_SIZE if min_size is None else min_size):
    return P()
  for pattern, axis in rules:
    if re.search(pattern, path):
      if axis is None:
        return P()
      if shape[axis] % fsdp == 0:
        return P(*[("fsdp" if i == axis else None) for i in range(len(shape))])
      break  # e.g. BERT's 30,522-row vocabulary on 8 devices: the default below (hidden axis)
  fits = [i for i in range(len(shape)) if shape[i] % fsdp == 0]
  if not fits:
    return P()
  axis = max(fits, key=lambda i: shape[i])
  return P(*[("fsdp" if i == axis else None) for i in range(len(shape))])


class JitRunner:
  """One jitted step over a Mesh with `data` and `fsdp` axes. The batch is split over both
  (every device holds its own rows); with fsdp > 1 every parameter and optimiser-state leaf is
  split over the fsdp axis (FSDP / ZeRO-3: XLA gathers a layer's weights where the step uses
  them and reduce-scatters their gradients), else replicated. The loss sees the global batch."""

  def __init__(self, step_fn, devices=None, fsdp: int = 1):
    devices = devices or jax.devices()
    if fsdp < 1 or len(devices) % fsdp:
      raise ValueError(f"train.fsdp={fsdp} must divide the {len(devices)} devices")
    self.mesh = jax.make_mesh((len(devices) // fsdp, fsdp), ("data", "fsdp"), devices=devices,
                              axis_types=(jax.sharding.AxisType.Auto,) * 2)
    self.fsdp = fsdp
    self.replicated = NamedSharding(self.mesh, P())
    self.data = NamedSharding(self.mesh, P(("data", "fsdp")))
    self.step_fn = step_fn
    self._step = None  # jitted on the first state_shardings (it needs the state's shardings)

  def state_shardings(self, abstract_state):
    """The sharding of every leaf of a state (shapes or arrays), FSDP_RULES over its path."""
    shardings = jax.tree_util.tree_map_with_path(
        lambda keys, x: NamedSharding(self.mesh, fsdp_spec(param_path(keys), tuple(x.shape),
                                                            self.fsdp)),
        abstract_state)
    if self._step is None:
      self._step = jax.jit(self.step_fn, in_shardings=(shardings, self.data),
                           out_shardings=(shardings, self.replicated), donate_argnums=0)
    return shardings

  def put_state(self, state: TrainState) -> TrainState:
    return jax.device_put(state, self.state_shardings(state))

  def get_state(self, state: TrainState) -> TrainState:
    return state

  def step(self, state, batch):
    from embed_jax.distributed import global_batch
    return self._step(state, global_batch(batch, self.data))


class PmapRunner:
  """pmap over devices: all_gather inside the loss, pmean of gradients (kept thin on purpose)."""

  def __init__(self, step_fn, devices=None, fsdp: int = 1):
    if fsdp != 1:
      raise ValueError("train.fsdp > 1 needs train.runner='jit' (pmap replicates every parameter)")
    self.devices = devices or jax.devices()
    self.n = len(self.devices)
    self.state_sharding = jax.sharding.SingleDeviceSharding(self.devices[0])
    self._step = jax.pmap(step_fn, axis_name="batch", devices=self.devices, donate_argnums=0)

  def state_shardings(self, abstract_state):
    return jax.tree.map(lambda _: self.state_sharding, abstract_state)

  def put_state(self, state: TrainState) -> TrainState:
    """A copy of the state per device (through the host: pmap places its inputs itself)."""
    return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (self.n, *np.shape(x))), state)

  def get_state(self, state: TrainState) -> TrainState:
    """The first device's copy, read from its buffer: no computation over the devices (x[0]
    dispatches a gather across all of them, and with many simulated devices on a loaded CPU that
    cross-device step is where test workers aborted)."""
    return jax.tree.map(lambda x: x.addressable_data(0).reshape(x.shape[1:]), state)

  def step(self, state, batch):
    shards = jax.tree.map(lambda x: x.reshape(self.n, x.shape[0] // self.n, *x.shape[1:]), batch)
    state, metrics = self._step(state, shards)
    return state, jax.tree.map(lambda x: x[0], metrics)


def make_runner(name: str, step_fn, devices=None, fsdp: int = 1):
  return {"jit": JitRunner, "pmap": PmapRunner}[name](step_fn, devices, fsdp)


def saved_part(state, frozen: tuple[str, ...] = ()):
  """What a checkpoint holds: the state without the frozen top-level params (a LoRA run's base
  encoder, which the run re-reads from its model)."""
  if not frozen:
    return state
  return state.replace(params={k: v for k, v in state.params.items() if k not in frozen})


def start_state(runner, params, tx, seed: int, mngr=None, resume: str = "",
                frozen: tuple[str, ...] = ()):
  """(state placed for the runner, checkpoint meta): restored from `mngr`'s latest checkpoint,
  else from the `resume` workdir's, else initialised. Built by shape: the abstract state
  (jax.eval_shape) carries the runner's sharding, and the state is read or computed straight into
  it, never first built whole elsewhere. `frozen` top-level params are not in checkpoints
  (saved_part): a restored state takes them from `params`."""
  make = lambda p: init_state(p, tx, seed)  # noqa: E731
  shapes = jax.eval_shape(make, params)
  shardings = runner.state_shardings(shapes)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, shardings)
  for source in ([mngr] if mngr is not None else []) + (
      [checkpoint_manager(Path(resume))] if resume else []):
    if source.latest_step() is not None:
      state, meta = restore_checkpoint(source, saved_part(abstract, frozen))
      if frozen:
        state = state.replace(params={**state.params, **{k: params[k] for k in frozen}})
      log.info("starting from %s at step %d", source.directory, int(state.step))
      return runner.put_state(state), meta
    if source is not mngr:
      raise FileNotFoundError(f"resume={resume!r} has no checkpoint")
  state = jax.jit(make, out_shardings=shardings)(params)
  return runner.put_state(state), {"best_dev": None, "best_step": None}


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


class MetricsLog:
  """<workdir>/metrics.jsonl. A step's metrics are fetched one step late, so the host never
  waits on the device; a non-finite loss stops the run, naming the step and the last good
  checkpoint. Lines a resumed run will write again (steps after the checkpoint it resumes from,
  which a hard kill can leave behind) are dropped first."""

  def __init__(self, path: Path | None, start: int, keep: Callable[[int], bool], checkpoints: Path,
               last_good: int | None, bar):
    """path None: check the losses, write nothing (the other processes of a multi-host run)."""
    self.path, self.keep, self.checkpoints, self.last_good, self.bar = path, keep, checkpoints, last_good, bar
    self.pending = None
    self.file = None
    if path is None:
      return
    if path.exists():  # train lines carry the 0-based step, evaluation lines the steps done
      rows = []
      for line in path.read_text(encoding="utf-8").splitlines():
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut short by the kill
        if row.get("step", -1) <= (start - 1 if "loss" in row else start):
          rows.append(line + "\n")
      atomic_write(path, lambda f: f.writelines(rows), "w")
    self.file = open(path, "a", encoding="utf-8")

  def push(self, step: int, metrics: dict) -> None:
    self.flush()
    self.pending = (step, metrics)

  def flush(self) -> None:
    if self.pending is None:
      return
    step, m = self.pending
    self.pending = None
    m = {k: float(v) for k, v in m.items()}
    if not math.isfinite(m["loss"]):
      where = (f"step {self.last_good} in {self.checkpoints}" if self.last_good is not None
               else "none yet")
      raise TrainingError(f"non-finite loss {m['loss']} at step {step}; last good checkpoint: "
                          f"{where}. Lower optim.lr or check the data.")
    if self.keep(step):
      self.write({"step": step, **m})
    self.bar.set_postfix(loss=f"{m['loss']:.4f}")

  def write(self, row: dict) -> None:
    if self.file is None:
      return
    self.file.write(json.dumps(row) + "\n")
    self.file.flush()

  def close(self) -> None:
    if self.file is not None:
      self.file.close()


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
          devices=None, stop_after: int | None = None, fork: bool = False) -> dict:
  """Runs (or resumes) the experiment in `workdir`; returns a summary.

  Resume is the normal path: a checkpoint in <workdir>/checkpoints wins, then `config.resume`
  (another workdir), then `config.init`, then the pretrained model. A workdir's run resumes only
  with the config it was made with, unless `fork` (see checkpoint.check_run_config). `stop_after`
  ends the process early after that many steps (tests of interruption).
  """
  from tqdm.auto import tqdm

  from embed_jax import evaluate, representations
  from embed_jax.checkpoint import check_run_config, export_mlm
  from embed_jax.data import inputs

  # ---- config and logging: bad config and data are refused before the workdir exists ----
  from embed_jax import distributed
  devices = devices or jax.devices()
  check_config(config, len(devices))
  distributed.check_same(config.to_json_best_effort(sort_keys=True))
  main = distributed.is_main()  # logs, metrics, evaluation files and the export: process 0's
  dataset, store = inputs.check(config)
  workdir = Path(workdir)
  forked = False
  if main:
    workdir.mkdir(parents=True, exist_ok=True)
    forked = check_run_config(workdir, config.to_json_best_effort(indent=2), fork)
    _setup_logging(workdir)
  distributed.barrier("workdir")

  # ---- model and data ----
  log.info("loading %s", "a tiny random model (smoke)" if config.smoke else config.init or config.model)
  model_config, params, tokenizer, source = heads.load_model(config, workdir)
  check_model_fit(config, model_config)
  if not config.dropout:
    model_config = model_config.replace(hidden_dropout=0.0, attention_dropout=0.0)
  module = SentenceEncoder(model_config)
  embedder = lambda params: Embedder(model_config, params, tokenizer, source=source)  # noqa: E731
  rep = representations.get(config, model_config, tokenizer)
  data = inputs.build(config, model_config, tokenizer, embedder(params), workdir, dataset, store,
                      rep)
  params = heads.add_training_heads(config, params, module, data, embedder(params), workdir)
  spec, frozen = None, ()
  if config.lora.r:  # adapters beside the frozen encoder, which checkpoints leave out
    spec = lora.LoraSpec.from_config(config.lora)
    params = {**params, "lora": lora.nest(lora.init_adapters(
        params, model_config, spec, jax.random.fold_in(jax.random.key(config.seed), 17)))}
    frozen = ("encoder",)
    if not config.optim.freeze:
      config = ml_collections.ConfigDict(config.to_dict())  # this run's copy
      config.optim.freeze = "encoder/.*"
    spec.merged_in_step(lora.flat(params["lora"]))  # a bad merge_in_step: refused before compiling
    log.info("LoRA r=%d on %d layers: %d trainable adapter parameters", spec.r,
             len(lora.flat(params["lora"])), lora.count(lora.flat(params["lora"])))
  applied = lambda p: lora.materialised(p, spec)  # noqa: E731  (what evaluators and exports see)
  objective = build_objective(config, data.tasks, representation=rep,
                              distill_projection=heads.DISTILL_PROJECTION in params)
  total_steps = data.loader.steps_per_epoch * config.num_epochs
  if config.max_steps > 0:
    total_steps = min(total_steps, config.max_steps) if config.num_epochs > 0 else config.max_steps
  evals = evaluate.Evaluators(config, SimpleNamespace(
      config=config, workdir=workdir, dataset=data.dataset, dev_qrels=data.dev_qrels,
      embedder=embedder, representation=objective.representation, module=module, tasks=data.tasks))
  problems = evals.problems()
  if problems:
    raise ValueError("bad config:\n  " + "\n  ".join(problems))

  # ---- optimiser, step, runner, state ----
  check_freeze(params, config.optim.freeze)
  tx, schedule = make_optimizer(config.optim, total_steps)
  runner = make_runner(config.train.runner, make_train_step(
      module, objective, config, tx, schedule, *(("batch", 1) if config.train.runner == "pmap"
                                                 else (None, len(devices)))),
      devices, config.train.fsdp)
  mngr = checkpoint_manager(workdir, config.checkpoint.keep)
  state, meta = start_state(runner, params, tx, config.seed, mngr, config.resume, frozen)
  # The exported model card and config name the Matryoshka dims the model was trained for, and
  # the hub model it started from (a smoke run's tiny random model has none).
  export_config = model_config.replace(dtype="float32", matryoshka_dims=tuple(
      sorted(config.matryoshka.dims, reverse=True)) or model_config.matryoshka_dims)
  base_model = source if config.smoke else config.model

  # ---- loop ----
  start = int(runner.get_state(state).step)
  if start == 0:
    evals.at_start(applied(params))  # every process takes part: each encodes a share of the corpus
  end = total_steps if stop_after is None else min(total_steps, start + stop_after)
  log.info("training steps %d to %d of %d (%d per epoch), checkpoints in %s", start + 1, end,
           total_steps, data.loader.steps_per_epoch, workdir / "checkpoints")
  bar = tqdm(range(start, end), initial=start, total=total_steps, desc="train", unit="step",
             disable=end - start < 2)
  # With one task per step, every step is logged (each carries its own task's metrics).
  keep = lambda s: (s % config.train.log_every == 0 or s == total_steps - 1  # noqa: E731
                    or config.task_sampling != "all")
  metrics = MetricsLog(workdir / "metrics.jsonl" if main else None, start, keep,
                       workdir / "checkpoints", mngr.latest_step(), bar)
  try:
    for step in bar:
      state, m = runner.step(state, data.loader.batch(step))
      metrics.push(step, m)
      done = step + 1
      save = done % config.checkpoint.every_steps == 0 or done == end
      if save or evals.due(done, total_steps):
        metrics.flush()  # never evaluate or checkpoint params from a non-finite loss
        host = runner.get_state(state)
        scores = evals.every(done, total_steps, applied(distributed.to_host(host.params)))
        if scores and main:
          metrics.write({"step": done, **scores})
        dev = scores.get(evals.key("dev"))
        if dev is not None and (meta["best_dev"] is None or dev > meta["best_dev"]):
          meta = {"best_dev": dev, "best_step": done}
          if config.export == "best" and main:  # kept apart from the rolling checkpoints
            objective.representation.export(applied(distributed.to_host(host.params)), export_config,
                                            tokenizer, workdir / "best", base_model=base_model)
        if save:
          save_checkpoint(mngr, saved_part(host, frozen), meta)
          metrics.last_good = done
    metrics.flush()
  finally:
    mngr.wait_until_finished()
    metrics.close()
    bar.close()

  # ---- export and final evaluation ----
  summary = {"workdir": str(workdir), "model": source, "steps": end, "total_steps": total_steps,
             "steps_run": end - start}
  if end < total_steps:
    return summary  # interrupted on purpose; re-running the command resumes
  exported = workdir / "export"
  if distributed.agreed(start == end and exported.exists() and evals.written() and not forked):
    log.info("%s is finished (step %d): nothing to do", workdir, end)  # report what it wrote
  else:
    params = distributed.to_host(runner.get_state(state).params)  # every process takes part
    if spec and main:  # the adapters alone, as a PEFT folder (the last step's)
      lora.export_peft(lora.flat(params["lora"]), export_config, spec, workdir / "adapter",
                       base_model=base_model, fingerprint=evaluate.model_fingerprint(
                           embedder({k: v for k, v in params.items() if k != "lora"})))
    params = applied(params)
    if config.export == "best" and meta["best_step"] is not None:
      distributed.barrier("best")  # process 0 wrote it during training
      params = hf.load(workdir / "best")[1]
      log.info("exporting the best dev model (step %d, dev %.4f)", meta["best_step"],
               meta["best_dev"])
    if main:
      log.info("exporting to %s", exported)
      objective.representation.export(params, export_config, tokenizer, exported,
                                      base_model=base_model)
      if config.export_mlm:
        export_mlm(params, export_config, tokenizer, workdir / "export_mlm")
    evals.at_end(params)  # every process encodes a share of the corpus; process 0 writes
    distributed.barrier("export")
  summary["export"] = str(exported)
  if config.export_mlm:
    summary["export_mlm"] = str(workdir / "export_mlm")
  return {**summary, **evals.summary()}
