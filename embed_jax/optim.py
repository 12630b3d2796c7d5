"""The optimiser from `config.optim`: AdamW with warmup and linear or cosine decay, global-norm
clipping, frozen parameters (a regex over names) and a separate peak rate for the heads.

    tx, schedule = make_optimizer(config.optim, total_steps)

Parameter names are paths such as "encoder/layer_0/attention/query/kernel" (`param_path`).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import ml_collections
import optax


def decay_mask(params) -> Any:
  """Weight decay on kernels and embeddings only: never on biases or LayerNorm scales."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding"), params)


def param_path(path) -> str:
  """A parameter's name as optim.freeze matches it: "encoder/layer_0/attention/query/kernel"
  (a dataclass field, as TrainState's, by its name: "params/encoder/...")."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


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
