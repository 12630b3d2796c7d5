"""Training: TrainState, the pure train step, the jit and pmap runners, checkpoints, the loop.

    embed-jax train --config configs/scifact_mnrl.py --workdir runs/mnrl [--config.optim.lr=3e-5]

Sections, in the order the loop uses them: config checks, optimiser and state, the step (plain or
with gradient caching), runners (jit over a Mesh, pmap), checkpoints, model, the loop. What the
step optimises (text groups, loss terms) is embed_jax.objective; the run's batches come from
embed_jax.data.inputs and embed_jax.tasks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
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

from embed_jax import hf
from embed_jax.embedder import Embedder, load_tokenizer
from embed_jax.data.inputs import load_data, mine_if_missing, open_teacher, unlabelled_loader
from embed_jax.data.pairs import MergedLoader
from embed_jax.models import SentenceEncoder
from embed_jax.objective import (DISTILL_PROJECTION, check_model_fit, embed_groups, make_loss,
                                 objective_problems, text_groups, uses_pairs, uses_unlabelled)
from embed_jax.tasks import mlm_specs

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
  problems += objective_problems(config, num_devices)
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


def param_path(path) -> str:
  """A parameter's name as optim.freeze matches it: "encoder/layer_0/attention/query/kernel"."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def frozen_mask(params, pattern: str) -> Any:
  """True for the leaves whose path fully matches the optim.freeze regex ("" freezes nothing)."""
  rx = re.compile(pattern) if pattern else None
  return jax.tree_util.tree_map_with_path(
      lambda path, _: bool(rx and rx.fullmatch(param_path(path))), params)


def check_freeze(params, pattern: str) -> None:
  """optim.freeze must match some parameters and leave some to train."""
  if not pattern:
    return
  flags = jax.tree.leaves(frozen_mask(params, pattern))
  names = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  if not any(flags):
    raise ValueError(f"bad config: optim.freeze={pattern!r} matches no parameter; names look "
                     f"like {names[0]!r} (the regex must match the whole name)")
  if all(flags):
    raise ValueError(f"bad config: optim.freeze={pattern!r} freezes every parameter: nothing "
                     f"would train")


def param_labels(params, optim: ml_collections.ConfigDict) -> Any:
  """Each leaf's optimiser group: "frozen" (matches optim.freeze), "head" (outside the encoder,
  e.g. an MLM head or a projection, when optim.head_lr is set) or "train"."""
  head_lr = optim.get("head_lr", 0.0)
  return jax.tree_util.tree_map_with_path(
      lambda path, frozen: "frozen" if frozen else (
          "head" if head_lr and getattr(path[0], "key", None) != "encoder" else "train"),
      frozen_mask(params, optim.get("freeze", "")))


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int):
  """AdamW with warmup then linear or cosine decay to 0; global-norm clipping. -> (tx, schedule)
  Parameters matching optim.freeze get no update, no optimiser state and no weight decay; with
  optim.head_lr, the parameters outside the encoder follow the same schedule shape at that peak.
  `schedule` is the encoder's."""
  warmup = int(optim.warmup_ratio * total_steps)
  decay_steps = max(total_steps - warmup, 1)

  def schedule_of(lr: float):
    decay = (optax.linear_schedule(lr, 0.0, decay_steps) if optim.schedule == "linear"
             else optax.cosine_decay_schedule(lr, decay_steps))
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])

  def adamw(lr: float):
    return optax.adamw(schedule_of(lr), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                       weight_decay=optim.weight_decay, mask=decay_mask)

  tx = adamw(optim.lr)
  if optim.get("freeze") or optim.get("head_lr", 0.0):
    groups = {"train": tx, "frozen": optax.set_to_zero()}
    if optim.get("head_lr", 0.0):
      groups["head"] = adamw(optim.head_lr)
    tx = optax.multi_transform(groups, lambda params: param_labels(params, optim))
  if optim.clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim.clip_norm), tx)
  return tx, schedule_of(optim.lr)


def init_state(params, tx, seed: int) -> TrainState:
  params = jax.tree.map(jnp.asarray, params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)))


# ----------------------------------------------------------------------------------------------
# The step: encode the batch, the loss over the (global) batch, AdamW.
# ----------------------------------------------------------------------------------------------

def _gather(tree, axis_name):
  """The global batch from each device's shard (pmap); identity under jit, which sees it whole."""
  if axis_name is None:
    return tree
  return jax.tree.map(lambda x: jax.lax.all_gather(x, axis_name, tiled=True), tree)


def make_train_step(module: SentenceEncoder, config: ml_collections.ConfigDict, tx, schedule,
                    axis_name: str | None = None, tasks=()) -> Callable:
  """step(state, batch) -> (state, metrics): pure; jit it, pmap it (axis_name), or call it.
  `tasks` are the extra tasks (embed_jax.tasks.build_tasks); a batch may hold any subset."""
  train = bool(config.dropout)
  chunk = int(config.train.grad_cache_chunk)
  layers = tuple(config.matryoshka.layers)
  loss_fn = make_loss(config, tasks)
  mlm = mlm_specs(tasks)
  freeze = config.optim.get("freeze", "")

  def trainable(params):
    """Frozen leaves behind stop_gradient: their backward pass is never built, so a frozen
    encoder costs a forward pass only."""
    if not freeze:
      return params
    return jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params,
                        frozen_mask(params, freeze))

  def split(batch):
    text_keys = {k for pair in text_groups(batch).values() for k in pair}
    return ({k: v for k, v in batch.items() if k in text_keys},
            {k: v for k, v in batch.items() if k not in text_keys})

  def loss_from_local_embeddings(embs, arrays):
    return loss_fn(_gather(embs, axis_name), _gather(arrays, axis_name))

  def plain_grads(params, batch, rng, mask_key, device):
    text, arrays = split(batch)

    def loss_of_params(params):
      # The whole batch is chunk 0: the same dropout draw as gradient caching with one chunk.
      embs = embed_groups(module, trainable(params), text, jax.random.fold_in(rng, 0), train,
                          layers, mlm, mask_key, device)
      return loss_from_local_embeddings(embs, arrays)
    return jax.value_and_grad(loss_of_params, has_aux=True)(params)

  def cached_grads(params, batch, rng, mask_key, device):
    """Gradient caching: embed every chunk without gradients, take the loss gradient w.r.t. the
    embeddings, then back-propagate chunk by chunk. Peak memory grows with the chunk only. Every
    text group is cut into the same number of chunks (the pairs' batch / chunk)."""
    text, arrays = split(batch)
    groups = text_groups(text)  # chunks count the pairs' batch, else the first group's
    n_chunks = text[groups["q"][0] if "q" in groups else next(iter(groups.values()))[0]].shape[0] // chunk
    chunked = lambda x: x.reshape(n_chunks, x.shape[0] // n_chunks, *x.shape[1:])  # noqa: E731
    chunks = jax.tree.map(chunked, text)
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(n_chunks))
    ids = device * n_chunks + jnp.arange(n_chunks)  # global chunk index: MLM masks' rows

    def embed_chunk(params, chunk_text, key, chunk_id):  # the same key in both passes: same dropout
      return embed_groups(module, trainable(params), chunk_text, key, train, layers, mlm, mask_key,
                          chunk_id)

    embs = jax.lax.map(lambda a: embed_chunk(jax.lax.stop_gradient(params), *a),
                       (chunks, keys, ids))
    embs = jax.tree.map(lambda x: x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]), embs)
    (loss, aux), emb_grads = jax.value_and_grad(loss_from_local_embeddings, has_aux=True)(embs, arrays)
    emb_grads = jax.tree.map(chunked, emb_grads)

    def backward(acc, a):
      chunk_text, key, chunk_id, g = a
      _, vjp = jax.vjp(lambda p: embed_chunk(p, chunk_text, key, chunk_id), params)
      return jax.tree.map(jnp.add, acc, vjp(g)[0]), None

    grads, _ = jax.lax.scan(backward, jax.tree.map(jnp.zeros_like, params),
                            (chunks, keys, ids, emb_grads))
    return (loss, aux), grads

  def step(state: TrainState, batch) -> tuple[TrainState, dict]:
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    rng, device = step_key, 0
    if axis_name is not None:  # a different dropout draw on each device's shard
      device = jax.lax.axis_index(axis_name)
      rng = jax.random.fold_in(rng, device)
    (loss, aux), grads = (cached_grads if chunk else plain_grads)(state.params, batch, rng,
                                                                  step_key, device)
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
  tokenizer = load_tokenizer(folder)
  if config.projection.dim and not model_config.dense_features:
    kernel = (pca_kernel(config, model_config, params, tokenizer, workdir)
              if config.projection.init == "pca" else None)
    model_config, params = add_projection(model_config, params, config.projection.dim,
                                          config.projection.init, config.seed, kernel=kernel)
  return model_config, params, tokenizer, source


def pca_kernel(config, model_config, params, tokenizer, workdir: Path) -> np.ndarray:
  """[pooled, projection.dim]: the principal axes of the starting model's unit embeddings of
  `projection.pca_texts` corpus texts (a seeded sample; centred), largest variance first. At
  projection.dim = pooled it is a rotation: full-dim cosine scores are unchanged, and each prefix
  keeps the most variance a linear map to that many dims can. Fitted once per workdir
  (<workdir>/pca_projection.npy), so a resumed run does not encode again."""
  if config.projection.dim > model_config.pooled_dim:
    raise ValueError(f"bad config: projection.init='pca' needs projection.dim <= "
                     f"{model_config.pooled_dim}")
  cache = workdir / "pca_projection.npy"
  if cache.exists():
    return np.load(cache)
  from embed_jax.checkpoint import atomic_write
  from embed_jax.data import load_beir
  from embed_jax.evaluate import principal_axes
  texts = load_beir(config.data.dataset, data_dir=config.data.data_dir or None).corpus_texts(" ")
  take = np.random.default_rng([config.seed, 11]).permutation(len(texts))[:config.projection.pca_texts]
  log.info("projection.init='pca': fitting on %d corpus texts embedded by the starting model", len(take))
  x_NxD = Embedder(model_config, params, tokenizer).encode(
      [texts[i] for i in sorted(take)], batch_size=config.evals.batch_size, normalize=True)
  kernel = np.ascontiguousarray(principal_axes(x_NxD)[:, :config.projection.dim], dtype=np.float32)
  atomic_write(cache, lambda f: np.save(f, kernel), "wb")
  return kernel


def add_projection(model_config, params, dim: int, init: str, seed: int, kernel=None):
  """A linear Dense head (pooled -> dim) on a model without one: `kernel` when given (e.g.
  pca_kernel's), else `prefix` starts it as the truncation to the first `dim` dims (identity
  columns), `random` as N(0, 1/pooled_dim)."""
  pooled = model_config.pooled_dim
  if kernel is not None:
    kernel = np.asarray(kernel, np.float32)
    if kernel.shape != (pooled, dim):
      raise ValueError(f"projection kernel has shape {kernel.shape}, expected {(pooled, dim)}")
  elif init in ("prefix", "pca"):
    if dim > pooled:
      raise ValueError(f"bad config: projection.init={init!r} needs projection.dim <= {pooled}")
    kernel = np.eye(pooled, dim, dtype=np.float32)
  else:
    kernel = np.random.default_rng(seed).normal(0, pooled ** -0.5, (pooled, dim)).astype(np.float32)
  params = {**params, "dense": {"kernel": kernel, "bias": np.zeros(dim, np.float32)}}
  return model_config.replace(dense_features=dim, dense_activation="identity", dense_bias=True), params


def add_mlm_head(params, module: SentenceEncoder, seed: int):
  """A freshly initialised MLM head (BERT's initialisation) beside the encoder's params."""
  ids_1x8 = jnp.zeros((1, 8), jnp.int32)
  head = module.init(jax.random.key(seed), ids_1x8, ids_1x8, jnp.zeros((1, 2), jnp.int32),
                     method=SentenceEncoder.mlm_logits)["params"]["mlm_head"]
  return {**params, "mlm_head": jax.tree.map(np.asarray, head)}


def add_distill_projection(params, student_dims: int, teacher_dims: int, seed: int,
                           kernel: np.ndarray | None = None):
  """A linear map student -> teacher dims for embedding distillation, trained with the model and
  never exported (SentenceEncoder ignores the extra key): `kernel` when given (e.g.
  distill_projection_kernel's), else N(0, 1/student_dims)."""
  if kernel is None:
    kernel = np.random.default_rng([seed, 7]).normal(0, student_dims ** -0.5,
                                                     (student_dims, teacher_dims))
  if kernel.shape != (student_dims, teacher_dims):
    raise ValueError(f"distillation projection has shape {kernel.shape}, expected "
                     f"{(student_dims, teacher_dims)}")
  return {**params, DISTILL_PROJECTION: {"kernel": np.asarray(kernel, np.float32)}}


def distill_projection_kernel(config, dataset, store, start: Embedder, workdir: Path) -> np.ndarray:
  """[student dims, teacher dims]: the least-squares map from the starting student's unit
  embeddings to the teacher's stored vectors, over `distill.projection_texts` of the unlabelled
  texts (a seeded sample; a little ridge for stability). A random map would leave the student
  chasing a random rotation of the teacher while the map itself barely moves at the encoder's
  learning rate. Fitted once per workdir (<workdir>/distill_projection.npy)."""
  cache = workdir / "distill_projection.npy"
  if cache.exists():
    return np.load(cache)
  from embed_jax.checkpoint import atomic_write
  from embed_jax.data.teacher import dataset_texts
  ids, texts = dataset_texts(dataset, config.unlabelled.texts.split("+"))
  take = sorted(np.random.default_rng([config.seed, 13]).permutation(len(ids))
                [:config.distill.projection_texts])
  log.info("distill.projection_init='lstsq': fitting on %d texts embedded by the starting model",
           len(take))
  s_NxS = start.encode([texts[i] for i in take], batch_size=config.evals.batch_size, normalize=True)
  t_NxT = np.asarray(store.vectors[store.rows(ids[i] for i in take)], np.float32)
  gram_SxS = s_NxS.T @ s_NxS
  ridge = 1e-3 * np.trace(gram_SxS) / len(gram_SxS)
  kernel = np.linalg.solve(gram_SxS + ridge * np.eye(len(gram_SxS)), s_NxS.T @ t_NxT)
  kernel = kernel.astype(np.float32)
  atomic_write(cache, lambda f: np.save(f, kernel), "wb")
  return kernel


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
  check_model_fit(config, model_config)
  if not config.dropout:
    model_config = model_config.replace(hidden_dropout=0.0, attention_dropout=0.0)
  module = SentenceEncoder(model_config)

  def embedder(params):
    return Embedder(model_config, params, tokenizer, source=source)

  from embed_jax.data import load_beir
  dataset = load_beir(config.data.dataset, data_dir=config.data.data_dir or None)
  store = None
  if config.distill.store:  # checked against every text the run may read, before any compute
    from embed_jax.data.teacher import dataset_texts
    kinds = set(config.unlabelled.texts.split("+")) if uses_unlabelled(config) else set()
    if uses_pairs(config):
      kinds |= {"corpus", "queries"}
    store = open_teacher(config, dataset, *dataset_texts(dataset, sorted(kinds)))
  loaders, dev_qrels = [], None
  if uses_pairs(config):
    mine_if_missing(config, dataset, embedder(params))
    pair_loader, dev_qrels = load_data(config, dataset, tokenizer, model_config, store)
    loaders.append(pair_loader)
  if uses_unlabelled(config):
    loaders.append(unlabelled_loader(config, dataset, tokenizer, model_config, embedder(params),
                                     workdir, store))
  from embed_jax.tasks import SampledLoader, build_tasks
  tasks = build_tasks(config, tokenizer, model_config, dataset)
  if any(t.spec is not None for t in tasks) and "mlm_head" not in params:
    params = add_mlm_head(params, module, config.seed)
    log.info("%s has no MLM head (cls.predictions): initialised one", source)
  main = [] if not loaders else [loaders[0] if len(loaders) == 1 else MergedLoader(*loaders)]
  everything = main + [t.loader for t in tasks]
  if len(everything) == 1 or config.task_sampling == "all":
    loader = everything[0] if len(everything) == 1 else MergedLoader(*everything)
  else:
    loader = SampledLoader(everything, [1.0] * len(main) + [t.cfg.weight for t in tasks],
                           config.task_sampling, config.seed)
  if config.distill.embedding > 0 and store.dims != model_config.embedding_dim:
    kernel = (distill_projection_kernel(config, dataset, store, embedder(params), workdir)
              if config.distill.projection_init == "lstsq" else None)
    params = add_distill_projection(params, model_config.embedding_dim, store.dims, config.seed,
                                    kernel)
    log.info("embedding distillation through a learned %d -> %d projection (%s init, not "
             "exported)", model_config.embedding_dim, store.dims, config.distill.projection_init)
  total_steps = loader.steps_per_epoch * config.num_epochs
  if config.max_steps > 0:
    total_steps = min(total_steps, config.max_steps) if config.num_epochs > 0 else config.max_steps
  if config.evals.dev_every_steps and not dev_qrels:
    raise ValueError("evals.dev_every_steps > 0 but there is no dev split: set data.dev_split or "
                     "data.dev_fraction")

  # ---- optimiser, state, checkpoints ----
  check_freeze(params, config.optim.freeze)
  tx, schedule = make_optimizer(config.optim, total_steps)
  state = init_state(params, tx, config.seed)
  mngr = checkpoint_manager(workdir, config)
  meta = {"best_dev": None, "best_step": None}
  # The exported model card and config name the Matryoshka dims the model was trained for.
  export_config = model_config.replace(dtype="float32", matryoshka_dims=tuple(
      sorted(config.matryoshka.dims, reverse=True)) or model_config.matryoshka_dims)
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
  step_fn = make_train_step(module, config, tx, schedule, axis_name=axis, tasks=tasks)
  runner = make_runner(config.train.runner, step_fn, devices)
  state = runner.put_state(state)

  def dev_ndcg(params) -> float:
    out = evaluate.evaluate_retrieval(embedder(params), dataset, config.data.train_split
                                      if not config.data.dev_split else config.data.dev_split,
                                      qrels=dev_qrels, precisions=("float32",), k_values=(10,),
                                      batch_size=config.evals.batch_size)
    return out["results"][0]["metrics"]["ndcg@10"]

  eval_dims = sorted({model_config.embedding_dim, *config.matryoshka.dims}, reverse=True)

  def test_eval(params, name: str) -> float:
    results = evaluate.evaluate_retrieval(embedder(params), dataset, "test", dims=eval_dims,
                                          batch_size=config.evals.batch_size)
    results["settings"]["config"] = json.loads(config.to_json_best_effort())
    atomic_write(workdir / name, lambda f: f.write(json.dumps(results, indent=2) + "\n"), "w")
    return results["results"][0]["metrics"]["ndcg@10"]

  # ---- loop ----
  start = int(runner.get_state(state).step)
  before = workdir / "results_before.json"
  if config.evals.test_at_start and start == 0 and not before.exists():
    log.info("test nDCG@10 before training %.4f", test_eval(params, before.name))
  held_out = [t for t in tasks if t.heldout is not None] if config.evals.mlm_heldout else []

  def mlm_eval(params, name: str) -> dict:
    from embed_jax.tasks import mlm_evaluate
    out = {t.name: mlm_evaluate(module, params, t, config.seed) for t in held_out}
    for task_name, m in out.items():
      log.info("%s (%s): held-out masked-token accuracy %.4f, perplexity %.2f", task_name, name,
               m["mlm_heldout_accuracy"], m["mlm_heldout_perplexity"])
    atomic_write(workdir / name, lambda f: f.write(json.dumps(out, indent=2) + "\n"), "w")
    return out

  if held_out and start == 0 and not (workdir / "mlm_before.json").exists():
    mlm_eval(params, "mlm_before.json")
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
    # With one task per step, every step is logged (each carries its own task's metrics).
    if (step % config.train.log_every == 0 or step == total_steps - 1
        or config.task_sampling != "all"):
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
              export(host.params, export_config, tokenizer, workdir / "best", base_model=config.model)
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
  done = {"export": workdir / "export", "results": workdir / "results.json"}
  if start == end and done["export"].exists() and (
      done["results"].exists() or not config.evals.test_at_end):
    # A finished run: report what it wrote rather than export and evaluate again.
    summary["export"] = str(done["export"])
    if done["results"].exists():
      summary["test_ndcg@10"] = json.loads(done["results"].read_text())["results"][0]["metrics"]["ndcg@10"]
    if before.exists():
      summary["test_ndcg@10_before"] = json.loads(before.read_text())["results"][0]["metrics"]["ndcg@10"]
    for name in ("mlm_before", "mlm_after"):
      if (workdir / f"{name}.json").exists():
        summary.setdefault("mlm", {})[name.split("_")[1]] = json.loads((workdir / f"{name}.json").read_text())
    if config.export_mlm and (workdir / "export_mlm").exists():
      summary["export_mlm"] = str(workdir / "export_mlm")
    log.info("%s is finished (step %d): nothing to do", workdir, end)
    return summary

  # ---- export and test evaluation ----
  final = runner.get_state(state)
  params = final.params
  if config.export == "best" and meta["best_step"] is not None:
    params = hf.load(workdir / "best")[1]
    log.info("exporting the best dev model (step %d, dev nDCG@10 %.4f)", meta["best_step"],
             meta["best_dev"])
  out_dir = export(params, export_config, tokenizer, workdir / "export", base_model=config.model)
  summary["export"] = str(out_dir)
  if config.export_mlm:
    from embed_jax.checkpoint import export_mlm
    summary["export_mlm"] = str(export_mlm(params, export_config, tokenizer, workdir / "export_mlm"))
  if held_out:
    first = workdir / "mlm_before.json"
    summary["mlm"] = {"before": json.loads(first.read_text()) if first.exists() else None,
                      "after": mlm_eval(params, "mlm_after.json")}
  if before.exists():
    summary["test_ndcg@10_before"] = json.loads(before.read_text())["results"][0]["metrics"]["ndcg@10"]
  if config.evals.test_at_end:
    summary["test_ndcg@10"] = test_eval(params, "results.json")
    log.info("test nDCG@10 %.4f", summary["test_ndcg@10"])
  return summary
