"""LoRA adapters (Hu et al., 2021) on an encoder's Dense layers, laid out as Hugging Face PEFT
lays them out, so that an adapter trained here loads in PEFT and the reverse.

    spec = LoraSpec(target="attention", r=16, alpha=32)
    adapters = init_adapters(params, model_config, spec, jax.random.key(0))
    merged = merge(params, adapters, spec)          # kernel + alpha / r * A @ B (inference)
    with applied(adapters, spec, train=True):       # training: y = x W + s (dropout(x) A) B
      module.apply({"params": params}, ...)
    with trained(params, adapters, spec) as base:   # the step: spec.merge_in_step layers merged,
      module.apply({"params": base}, ...)           # the others applied beside their kernels
    export_peft(adapters, model_config, spec, "runs/adapter", base_model=..., fingerprint=...)
    adapters, spec = import_peft("runs/adapter", model_config)

An adapted layer y = x W + b becomes y = x W + b + (alpha / r) x A B with A [in, r] and
B [r, out] (PEFT's lora_A.weight is A^T [r, in], lora_B.weight is B^T [out, r]); rsLoRA scales
by alpha / sqrt(r). A starts as PEFT's default (Kaiming-uniform with a = sqrt(5): uniform in
+-1/sqrt(in)) or Gaussian (std 1/r), B at zero, so training starts at the base model.

`adapters` is a dict {layer path: {"a": A, "b": B}}, the layer path as in the params tree
("encoder/layer_0/attention/self/query"), chosen by a regex over those paths (full match) or a
preset: "attention" (query/key/value/output projections), "ffn" (the feed-forward block's two or
three projections), "attention+ffn".
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

PRESETS = {  # per architecture family: the layer paths' regexes
    "attention": r"encoder/layers?_\d+/(attention/(self/(query|key|value)|output/dense|attn/[qkvo])"
                 r"|self_attn/[qkvo]_proj)",
    "ffn": r"encoder/layers?_\d+/((intermediate|output)/dense|mlp/(gate|up|down)_proj)",
}
PRESETS["attention+ffn"] = f"({PRESETS['attention']})|({PRESETS['ffn']})"
INITS = ("kaiming", "gaussian")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PEFT_PREFIX = "base_model.model."


class LoraError(ValueError):
  """An adapter that cannot be made, applied or read as asked; the message says why."""


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  target: str = "attention"  # a preset or a regex over layer paths
  r: int = 16
  alpha: float = 32.0
  dropout: float = 0.0  # on the adapter's input in training (PEFT's lora_dropout)
  init: str = "kaiming"
  rslora: bool = False
  # Layers (a preset or a regex over layer paths) whose adapters the train step merges into the
  # frozen kernel, x (W + s A B), instead of adding the branch beside it: one full-size weight
  # gradient projected onto A and B, which XLA:CPU runs faster than the branch's skinny products
  # for the feed-forward layers. The same values and gradients; no adapter dropout there.
  merge_in_step: str = ""

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

  @classmethod
  def from_config(cls, c) -> "LoraSpec":
    return cls(target=c.target, r=int(c.r), alpha=float(c.alpha), dropout=float(c.dropout),
               init=c.init, rslora=bool(c.get("rslora", False)),
               merge_in_step=c.get("merge_in_step", ""))

  def merged_in_step(self, adapters: dict) -> list[str]:
    """The adapted layers the train step merges (`merge_in_step`), refused when the pattern
    selects none of them or asks for adapter dropout there."""
    if not self.merge_in_step:
      return []
    rx = _layer_regex("merge_in_step", self.merge_in_step)
    chosen = [p for p in adapters if rx.fullmatch(p)]
    if not chosen:
      raise LoraError(f"lora merge_in_step {self.merge_in_step!r} matches no adapted layer (they "
                      f"look like {next(iter(adapters))!r}); use a preset ({', '.join(PRESETS)}) or ''")
    if self.dropout:
      raise LoraError(f"lora merge_in_step {self.merge_in_step!r} with dropout {self.dropout}: a "
                      "merged layer has no separate adapter input to drop; set lora.dropout=0 or "
                      "merge_in_step=''")
    return chosen


def dense_layers(model_config) -> dict[str, str]:
  """{Flax layer path: Hugging Face module path} of the encoder's Dense (Linear) layers."""
  from embed_jax import hf
  return {e.flax[:-len("/kernel")]: e.hf[:-len(".weight")]
          for e in hf.NAME_TABLES[model_config.architecture](model_config)
          if e.transpose and e.flax.endswith("/kernel")}


def _layer_regex(option: str, value: str) -> re.Pattern:
  """lora.<option>'s layer-path regex: a preset's or its own; refused when it does not compile."""
  try:
    return re.compile(PRESETS.get(value, value))
  except re.error as e:
    raise LoraError(f"lora {option} {value!r} is not a valid regex ({e})") from None


def targets(params, model_config, target: str) -> list[str]:
  """The layer paths `target` (a preset or a regex, full match) selects; refused when it selects
  nothing or a parameter that is not a Dense layer's."""
  rx = _layer_regex("target", target)
  layers = dense_layers(model_config)
  from embed_jax.optim import param_path
  names = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  not_dense = sorted({n.rsplit("/", 1)[0] for n in names if rx.fullmatch(n.rsplit("/", 1)[0])}
                     - set(layers))
  if not_dense:
    raise LoraError(f"lora target {target!r} matches {not_dense[0]!r}, which is not a Dense layer "
                    f"of the encoder; LoRA adapts Dense layers such as {next(iter(layers))!r}")
  chosen = [p for p in layers if rx.fullmatch(p)]
  if not chosen:
    raise LoraError(f"lora target {target!r} matches no Dense layer; layer paths look like "
                    f"{next(iter(layers))!r} (full match), or use a preset: {', '.join(PRESETS)}")
  return chosen


def _kernel(params, path: str):
  from embed_jax.hf import _get
  return _get(params, f"{path}/kernel")


def init_adapters(params, model_config, spec: LoraSpec, key) -> dict:
  """Fresh adapters on the layers `spec.target` selects: A as PEFT initialises it, B zero."""
  if spec.init not in INITS:
    raise LoraError(f"lora init {spec.init!r}: choose from {', '.join(INITS)}")
  if spec.r < 1:
    raise LoraError(f"lora rank r={spec.r} must be >= 1")
  adapters = {}
  for i, path in enumerate(targets(params, model_config, spec.target)):
    d_in, d_out = _kernel(params, path).shape
    if spec.r > min(d_in, d_out):
      raise LoraError(f"lora rank r={spec.r} exceeds layer {path} ({d_in} x {d_out}); choose r <= "
                      f"{min(d_in, d_out)}")
    k = jax.random.fold_in(key, i)
    if spec.init == "kaiming":  # torch's kaiming_uniform_(a=sqrt(5)) on [r, in]: bound 1/sqrt(in)
      a = jax.random.uniform(k, (d_in, spec.r), jnp.float32, -1, 1) / math.sqrt(d_in)
    else:
      a = jax.random.normal(k, (d_in, spec.r), jnp.float32) / spec.r
    adapters[path] = {"a": a, "b": jnp.zeros((spec.r, d_out), jnp.float32)}
  return adapters


def merge(params, adapters: dict, spec: LoraSpec):
  """params with each adapted kernel replaced by kernel + scale * A @ B (a new tree; the input
  is unchanged): what inference, evaluation and the merged export use. Training applies the
  adapters beside the frozen kernels instead (`applied`)."""
  from embed_jax.hf import _set
  out = jax.tree.map(lambda x: x, params)  # a copy of the containers, leaves shared
  for path, ab in adapters.items():
    kernel = _kernel(params, path)
    delta = (ab["a"] @ ab["b"]) * spec.scale
    _set(out, f"{path}/kernel", (kernel + delta.astype(kernel.dtype)))
  return out


@contextlib.contextmanager
def applied(adapters: dict, spec: LoraSpec, train: bool = False):
  """A context in which every Flax Dense layer named in `adapters` (by its module path, which
  is its params path) computes x W + b + scale * (dropout(x) A) B, as PEFT trains. Entered while
  a step is traced, so the jitted step holds the adapter branch and never forms the frozen
  kernel's weight gradient x^T dy (merging first would: d(W + s A B) is that product). On
  XLA:CPU the rank-r products over all tokens run far below the matmul peak: attention-only
  adapters step at 0.8x full fine-tuning, feed-forward ones at ~1.5x, and at 1.0x when the step
  merges them instead (`trained`, LoraSpec.merge_in_step; experiments/README.md, LoRA). Dropout
  (spec.dropout, train only) draws from the module's "dropout" rng, as the encoder's own
  dropout does."""
  import flax.linen as nn

  from embed_jax.models.bert import Projection

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    path = "/".join(module.path)
    ab = adapters.get(path) if (
        context.method_name == "__call__" and isinstance(module, (nn.Dense, Projection))) else None
    y = next_fun(*args, **kwargs)
    if ab is None:
      return y
    used.add(path)
    x, scale = args[0], spec.scale
    if isinstance(module, Projection):  # (x W + b) * s: the branch is scaled too
      scale = scale * (args[1] if len(args) > 1 else kwargs.get("scale", 1.0))
    if train and spec.dropout:
      keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - spec.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - spec.dropout), 0).astype(x.dtype)
    return y + ((x @ ab["a"].astype(x.dtype)) @ (ab["b"] * scale).astype(x.dtype)).astype(y.dtype)

  used = set()
  with nn.intercept_methods(interceptor):
    yield
  unused = sorted(set(adapters) - used)
  if unused:
    raise LoraError(f"lora: the model applied no adapter at {unused[0]!r} "
                    f"(not an nn.Dense or Projection call); adapt another layer")


def nest(adapters: dict) -> dict:
  """{path: {"a", "b"}} -> the same nested by path components (params["lora"] in training: a
  pytree whose names read as the layers', e.g. "lora/encoder/layer_0/attention/self/query/a")."""
  from embed_jax.hf import _set
  tree = {}
  for path, ab in adapters.items():
    _set(tree, path, dict(ab))
  return tree


def flat(tree: dict, prefix: str = "") -> dict:
  """nest's inverse."""
  if set(tree) == {"a", "b"}:
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(flat(v, f"{prefix}/{k}" if prefix else k))
  return out


def materialised(params, spec: LoraSpec | None):
  """The params a model applies: params["lora"] (nested adapters) merged into the kernels and
  dropped; params without adapters as they are."""
  if spec is None or "lora" not in params:
    return params
  return merge({k: v for k, v in params.items() if k != "lora"}, flat(params["lora"]), spec)


@contextlib.contextmanager
def trained(params, adapters: dict, spec: LoraSpec, train: bool = False):
  """What the train step applies: yields params with the `spec.merge_in_step` layers' adapters
  merged into their kernels, inside a context (`applied`) that adds the other adapters' branches
  beside their frozen kernels. Either way the frozen kernels get no update."""
  merged = spec.merged_in_step(adapters)
  if merged:
    params = merge(params, {p: adapters[p] for p in merged}, spec)
  with applied({p: ab for p, ab in adapters.items() if p not in merged}, spec, train):
    yield params


def count(adapters: dict) -> int:
  return sum(int(np.prod(v.shape)) for ab in adapters.values() for v in ab.values())


# ---- PEFT folders ----


def export_peft(adapters: dict, model_config, spec: LoraSpec, out_dir: str | os.PathLike, *,
                base_model: str, fingerprint: str) -> Path:
  """A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) that
  `PeftModel.from_pretrained(AutoModel(base), folder)` loads onto the base's encoder, plus
  embed_jax_adapter.json naming the base's fingerprint. Atomic."""
  from safetensors.numpy import save_file

  from embed_jax.checkpoint import _atomic_folder
  layers = dense_layers(model_config)

  def fill(tmp: Path) -> None:
    state = {}
    for path, ab in adapters.items():
      module = f"{PEFT_PREFIX}{layers[path]}"
      state[f"{module}.lora_A.weight"] = np.ascontiguousarray(np.asarray(ab["a"], np.float32).T)
      state[f"{module}.lora_B.weight"] = np.ascontiguousarray(np.asarray(ab["b"], np.float32).T)
    save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "FEATURE_EXTRACTION", "r": spec.r,
              "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "use_rslora": spec.rslora,
              "target_modules": sorted(layers[p] for p in adapters), "bias": "none",
              "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
              "base_model_name_or_path": base_model, "modules_to_save": None}
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "embed_jax_adapter.json").write_text(json.dumps(
        {"base_model": base_model, "base_fingerprint": fingerprint, "target": spec.target,
         "init": spec.init, "trainable_parameters": count(adapters)}, indent=2) + "\n")

  return _atomic_folder(Path(out_dir), fill, marker="adapter_config.json", what="adapter")


def import_peft(folder: str | os.PathLike, model_config, *, fingerprint: str | None = None):
  """(adapters, spec) of a PEFT LoRA folder for this model config; refused when it targets
  layers the model does not have, is not LoRA, or (with `fingerprint`) names another base."""
  from safetensors.numpy import load_file
  folder = Path(folder)
  if not (folder / "adapter_config.json").is_file():
    raise LoraError(f"{folder} is not a PEFT adapter folder (no adapter_config.json)")
  cfg = json.loads((folder / "adapter_config.json").read_text())
  if cfg.get("peft_type") != "LORA":
    raise LoraError(f"{folder}: peft_type {cfg.get('peft_type')!r}; only LORA adapters are read")
  if cfg.get("use_dora") or cfg.get("bias", "none") != "none" or cfg.get("fan_in_fan_out"):
    raise LoraError(f"{folder}: DoRA, trained biases and fan_in_fan_out are not supported")
  ours = folder / "embed_jax_adapter.json"
  if fingerprint and ours.is_file():
    want = json.loads(ours.read_text())["base_fingerprint"]
    if want != fingerprint:
      raise LoraError(f"{folder} adapts another base model (fingerprint {want[:12]}, this one "
                      f"{fingerprint[:12]}); load it onto {cfg.get('base_model_name_or_path')}")
  files = [f for f in ("adapter_model.safetensors",) if (folder / f).is_file()]
  if not files:
    raise LoraError(f"{folder} has no adapter_model.safetensors")
  state = load_file(str(folder / files[0]))
  by_module = {hf_path: path for path, hf_path in dense_layers(model_config).items()}
  adapters = {}
  for key, value in state.items():
    m = re.fullmatch(r"(?:base_model\.model\.)?(?:(?:bert|mpnet|model)\.)?(.+)\.lora_([AB])"
                     r"(?:\.default)?\.weight", key)
    if not m or m.group(1) not in by_module:
      raise LoraError(f"{folder}: tensor {key!r} adapts no Dense layer of this "
                      f"{model_config.architecture} model; is it an adapter for another base?")
    adapters.setdefault(by_module[m.group(1)], {})["a" if m.group(2) == "A" else "b"] = \
        jnp.asarray(value.T, jnp.float32)
  r = int(cfg["r"])
  pattern = cfg.get("rank_pattern") or {}
  if pattern:
    raise LoraError(f"{folder}: per-layer ranks (rank_pattern) are not supported")
  target = "|".join(re.escape(p) for p in sorted(adapters))
  spec = LoraSpec(target=target, r=r, alpha=float(cfg["lora_alpha"]), dropout=0.0,
                  rslora=bool(cfg.get("use_rslora", False)))
  for path, ab in adapters.items():
    if set(ab) != {"a", "b"} or ab["a"].shape[1] != r:
      raise LoraError(f"{folder}: layer {path} lacks lora_A or lora_B, or its rank is not {r}")
  return adapters, spec


def load_adapted(folder: str | os.PathLike, base: str | None = None, **overrides):
  """An Embedder of the base model (adapter_config.json's base_model_name_or_path, or `base`)
  with the PEFT LoRA adapter at `folder` merged in: what `embed_jax.load(adapter folder)` gives.
  An adapter whose recorded base fingerprint differs from the base's is refused."""
  import embed_jax
  from embed_jax.embedder import Embedder
  from embed_jax.evaluate import model_fingerprint
  folder = Path(folder)
  cfg = json.loads((folder / "adapter_config.json").read_text())
  base = base or cfg.get("base_model_name_or_path")
  if not base:
    raise LoraError(f"{folder}: adapter_config.json names no base_model_name_or_path; pass base=")
  model = embed_jax.load(base, **overrides)
  adapters, spec = import_peft(folder, model.config, fingerprint=model_fingerprint(model))
  return Embedder(model.config, merge(model.params, adapters, spec), model.tokenizer,
                  source=str(folder))
