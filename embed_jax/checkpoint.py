"""Checkpoints and exports: Orbax checkpoints of the train state (in <workdir>/checkpoints), and
atomic exports to Hugging Face / sentence-transformers and BertForMaskedLM folders.

    mngr = checkpoint_manager(workdir, keep=2)
    save_checkpoint(mngr, state, meta)          # asynchronous; the data position is the step
    state, meta = restore_checkpoint(mngr, abstract_state)  # into abstract_state's shardings
    export(params, model_config, tokenizer, "exports/minilm")
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np

from embed_jax import hf
from embed_jax.models import ModelConfig

_MODEL_FILES = ("config.json", "model.safetensors", "modules.json")


# ----------------------------------------------------------------------------------------------
# Orbax checkpoints of the train state.
# ----------------------------------------------------------------------------------------------


def checkpoint_manager(workdir: Path, keep: int = 2):
  """Orbax's manager of <workdir>/checkpoints, keeping the last `keep`, saving asynchronously."""
  import orbax.checkpoint as ocp
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager((Path(workdir) / "checkpoints").absolute(), options=options)


def save_checkpoint(mngr, state, meta: dict) -> None:
  """The state (a pytree with a `step`) and JSON metadata, at the state's step."""
  import orbax.checkpoint as ocp
  mngr.save(int(state.step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)))


def restore_checkpoint(mngr, abstract_state, step: int | None = None):
  """(state, meta) at `step` (default: the latest). `abstract_state` gives the structure, shapes,
  dtypes and shardings (jax.ShapeDtypeStruct leaves, e.g. from jax.eval_shape, or arrays): each
  array is read straight into its sharding, never built whole on one device first."""
  import orbax.checkpoint as ocp
  step = mngr.latest_step() if step is None else step
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  return out.state, out.meta


def params_are_finite(params) -> bool:
  return all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(params))


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def public(path: Path) -> None:
  """Gives a file written through a private temp file (0600) the modes of any other file the
  user writes (0644 under the usual umask), and a folder 0755, recursively: another user can
  load an export."""
  mask = _umask()
  path = Path(path)
  if path.is_dir():
    os.chmod(path, 0o777 & ~mask)
    for child in path.rglob("*"):
      os.chmod(child, (0o777 if child.is_dir() else 0o666) & ~mask)
  else:
    os.chmod(path, 0o666 & ~mask)


def atomic_write(path: Path, write, mode: str = "wb") -> None:
  """Calls write(file) on a temp file beside `path`, then renames it over `path` (with the
  modes of a plainly written file): `path` is the old file or the new one, never half of one."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
      write(f)
    public(Path(tmp))
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def check_writable(folder: Path) -> None:
  """Creates `folder` and writes a probe file in it, so that an output that cannot be written
  is refused before any compute; raises OSError naming the path."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
  os.close(fd)
  os.unlink(probe)


def _write_json(path: Path, obj) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _model_card(config: ModelConfig, base_model: str | None) -> str:
  dims = ", ".join(map(str, config.matryoshka_dims)) if config.matryoshka_dims else None
  lines = [
      "---",
      "library_name: sentence-transformers",
      "tags: [sentence-transformers, feature-extraction, sentence-similarity, embed_jax]",
      *([f"base_model: {base_model}"] if base_model and "/" in base_model and not os.path.exists(base_model) else []),
      "pipeline_tag: sentence-similarity",
      "---",
      "",
      "# Sentence embedding model exported by embed_jax",
      "",
      f"- Base model: `{base_model or 'unknown'}`",
      f"- Architecture: {config.architecture}, {config.num_layers} layers, hidden size {config.hidden_size}",
      f"- Embedding dimension: {config.embedding_dim}; pooling: {' + '.join(config.pooling)}; "
      f"normalised: {'yes' if config.normalize else 'no'}",
      f"- Max sequence length: {config.max_seq_length} tokens (longer texts are truncated)",
  ]
  if dims:
    lines.append(f"- Matryoshka dimensions trained: {dims} (truncate to any of them, then re-normalise)")
  lines += [
      "",
      "## Usage",
      "",
      "```python",
      "from sentence_transformers import SentenceTransformer",
      "model = SentenceTransformer('path/to/this/folder')",
      "embeddings = model.encode(['a first text', 'a second text'])",
      "```",
      "",
      "or with embed_jax: `embed_jax.load('path/to/this/folder').encode([...])`.",
      "",
  ]
  return "\n".join(lines)


def _refuse_non_finite(state: dict[str, np.ndarray]) -> None:
  for key, value in state.items():
    if value.dtype != np.int64 and not np.all(np.isfinite(value.astype(np.float32))):
      raise ValueError(f"parameter {key} has NaN or inf values; refusing to export it")


def _write_pylate(tmp: Path, params, config: ModelConfig, tokenizer, base_model: str | None) -> None:
  """A multi-vector model as PyLate writes it: Transformer -> 1_Dense (the token projection),
  its settings in config_sentence_transformers.json; pylate.models.ColBERT loads it."""
  from safetensors.numpy import save_file
  li = config.late_interaction
  state = hf.params_to_state_dict(params, config)
  token = hf.token_dense_params_to_state(params, config)
  _refuse_non_finite({**state, **token})
  _write_json(tmp / "config.json", hf.hf_config_dict(config))
  save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
  if tokenizer is not None:
    tokenizer.save_pretrained(str(tmp))
  _write_json(tmp / "modules.json", [
      {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
      {"idx": 1, "name": "1", "path": "1_Dense", "type": hf.PYLATE_DENSE}])
  _write_json(tmp / "1_Dense" / "config.json", {
      "in_features": config.hidden_size, "out_features": li.dims, "bias": li.bias,
      "activation_function": "torch.nn.modules.linear.Identity", "use_residual": False})
  save_file(token, str(tmp / "1_Dense" / "model.safetensors"), metadata={"format": "pt"})
  # PyLate sets the Transformer's max_seq_length per call (the length less the marker).
  _write_json(tmp / "sentence_bert_config.json",
              {"max_seq_length": li.document_length - 1, "do_lower_case": config.do_lower_case})
  from embed_jax import __version__
  _write_json(tmp / "config_sentence_transformers.json",
              {**hf.pylate_config_dict(config), "__version__": {"embed_jax": __version__}})
  card = [
      "---", "library_name: PyLate",
      "tags: [ColBERT, PyLate, sentence-transformers, sentence-similarity, embed_jax]",
      *([f"base_model: {base_model}"] if base_model and "/" in base_model
        and not os.path.exists(base_model) else []),
      "pipeline_tag: sentence-similarity", "---", "",
      "# Multi-vector (ColBERT) model exported by embed_jax", "",
      f"- Base model: `{base_model or 'unknown'}`",
      f"- {config.architecture}, {config.num_layers} layers, hidden size {config.hidden_size}; one "
      f"{li.dims}-dim unit vector per token, scored by MaxSim",
      f"- Queries: `{li.query_prefix}` marker, {li.query_length} tokens"
      + (" (padded with [MASK])" if li.do_query_expansion else "")
      + f"; documents: `{li.document_prefix}` marker, up to {li.document_length} tokens", "",
      "```python", "from pylate import models",
      "model = models.ColBERT('path/to/this/folder')",
      "queries = model.encode(['a question'], is_query=True)",
      "documents = model.encode(['a passage'], is_query=False)", "```", ""]
  (tmp / "README.md").write_text("\n".join(card), encoding="utf-8")


def _write_sparse(tmp: Path, params, config: ModelConfig, tokenizer, base_model: str | None) -> None:
  """A SPLADE model as sentence-transformers' SparseEncoder writes it (MLMTransformer over a
  BertForMaskedLM folder, then 1_SpladePooling); a lexical-weight model as a Transformer and
  1_LexicalWeights (BGE-M3's sparse_linear: linear.weight [1, hidden], linear.bias), which
  embed_jax reads (sentence-transformers has no such module)."""
  from safetensors.numpy import save_file
  head = config.sparse
  config_json = hf.hf_config_dict(config)
  if head.kind == "splade":
    if config.architecture != "bert" or "mlm_head" not in params:
      raise ValueError("a SPLADE export needs a BERT-family model with an MLM head")
    state = {f"bert.{k}": v for k, v in hf.params_to_state_dict(params, config).items()
             if not k.startswith("pooler.")}  # BertForMaskedLM has no pooler
    state.update(hf.mlm_head_state(params, config))
    config_json.update(architectures=["BertForMaskedLM"], tie_word_embeddings=True)
    files = hf.splade_module_files(head.pooling, head.activation, config.vocab_size)
    modules = files["modules.json"]
    _write_json(tmp / "1_SpladePooling" / "config.json", files["1_SpladePooling/config.json"])
    extra = {}
  else:
    state = hf.params_to_state_dict(params, config)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_LexicalWeights", "type": hf.LEXICAL_MODULE}]
    extra = hf._linear_to_state(params["lexical"], True)
    _write_json(tmp / "1_LexicalWeights" / "config.json", {
        "in_features": config.hidden_size, "out_features": 1, "activation": "relu",
        "pooling": "max over each token id's occurrences; [CLS], [SEP], [UNK], [PAD] weigh 0"})
  _refuse_non_finite({**state, **extra})
  _write_json(tmp / "config.json", config_json)
  save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
  if extra:
    save_file(extra, str(tmp / "1_LexicalWeights" / "model.safetensors"), metadata={"format": "pt"})
  if tokenizer is not None:
    tokenizer.save_pretrained(str(tmp))
  _write_json(tmp / "modules.json", modules)
  _write_json(tmp / "sentence_bert_config.json",
              {"max_seq_length": config.max_seq_length, "do_lower_case": config.do_lower_case})
  from embed_jax import __version__
  _write_json(tmp / "config_sentence_transformers.json", {
      "model_type": "SparseEncoder", "__version__": {"embed_jax": __version__},
      "prompts": {"query": "", "document": ""}, "default_prompt_name": None,
      "similarity_fn_name": "dot"})
  usage = (["from sentence_transformers import SparseEncoder",
            "model = SparseEncoder('path/to/this/folder')",
            "embeddings = model.encode(['a first text'])  # sparse [n, vocab]"]
           if head.kind == "splade" else
           ["import embed_jax", "from embed_jax.representations import of_model",
            "model = embed_jax.load('path/to/this/folder')",
            "vectors = of_model(model).encode(model, ['a first text'])  # scipy.sparse [n, vocab]"])
  card = ["---", "library_name: sentence-transformers" if head.kind == "splade" else "library_name: embed_jax",
          "tags: [sparse-encoder, sparse, splade, embed_jax]" if head.kind == "splade"
          else "tags: [sparse, lexical-weights, embed_jax]",
          *([f"base_model: {base_model}"] if base_model and "/" in base_model
            and not os.path.exists(base_model) else []),
          "---", "", f"# Sparse ({head.kind}) model exported by embed_jax", "",
          f"- Base model: `{base_model or 'unknown'}`",
          f"- {config.architecture}, {config.num_layers} layers, hidden size {config.hidden_size}; "
          f"one weight per vocabulary entry ({config.vocab_size}), scored by dot product",
          f"- Max sequence length: {config.max_seq_length} tokens", "", "```python", *usage, "```", ""]
  (tmp / "README.md").write_text("\n".join(card), encoding="utf-8")


def _write_cross_encoder(tmp: Path, params, config: ModelConfig, tokenizer,
                         base_model: str | None) -> None:
  """A cross-encoder as sentence-transformers' CrossEncoder saves it: a transformers
  *ForSequenceClassification folder (config.json names the activation CrossEncoder.predict
  applies), the tokenizer's model_max_length set to max_seq_length (CrossEncoder truncates
  each pair there, longest first)."""
  from safetensors.numpy import save_file

  from embed_jax.models.config import CLASSIFIER_ACTIVATIONS
  head = config.classifier
  state = hf.cross_encoder_state(params, config)
  _refuse_non_finite(state)
  config_json = hf.hf_config_dict(config)
  config_json.update(architectures=[hf.SEQUENCE_CLASSIFIERS[config.architecture]],
                     id2label={str(i): f"LABEL_{i}" for i in range(head.num_labels)},
                     label2id={f"LABEL_{i}": i for i in range(head.num_labels)},
                     sentence_transformers={"activation_fn": CLASSIFIER_ACTIVATIONS[head.activation]})
  _write_json(tmp / "config.json", config_json)
  save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
  if tokenizer is not None:
    tokenizer.save_pretrained(str(tmp))
    tok_cfg = tmp / "tokenizer_config.json"
    _write_json(tok_cfg, {**json.loads(tok_cfg.read_text(encoding="utf-8")),
                          "model_max_length": config.max_seq_length})
  card = ["---", "library_name: sentence-transformers",
          "tags: [sentence-transformers, cross-encoder, reranker, embed_jax]",
          *([f"base_model: {base_model}"] if base_model and "/" in base_model
            and not os.path.exists(base_model) else []),
          "pipeline_tag: text-ranking", "---", "", "# Cross-encoder exported by embed_jax", "",
          f"- Base model: `{base_model or 'unknown'}`",
          f"- {config.architecture}, {config.num_layers} layers, hidden size {config.hidden_size}; "
          f"{head.num_labels} logit(s) per (query, document) pair, {head.activation} in predict",
          f"- Max sequence length: {config.max_seq_length} tokens for the joined pair", "",
          "```python", "from sentence_transformers import CrossEncoder",
          "model = CrossEncoder('path/to/this/folder')",
          "scores = model.predict([('a query', 'a document')])", "```", ""]
  (tmp / "README.md").write_text("\n".join(card), encoding="utf-8")


def _write_model(tmp: Path, params, config: ModelConfig, tokenizer, base_model: str | None) -> None:
  if config.classifier is not None:
    return _write_cross_encoder(tmp, params, config, tokenizer, base_model)
  if config.late_interaction is not None:
    return _write_pylate(tmp, params, config, tokenizer, base_model)
  if config.sparse is not None:
    return _write_sparse(tmp, params, config, tokenizer, base_model)
  from safetensors.numpy import save_file
  state = hf.params_to_state_dict(params, config)
  dense = hf.dense_params_to_state(params, config) if config.dense_features else {}
  _refuse_non_finite({**state, **dense})
  _write_json(tmp / "config.json", hf.hf_config_dict(config))
  save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
  if tokenizer is not None:
    tokenizer.save_pretrained(str(tmp))
  modules = [
      {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
      {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
  ]
  if config.dense_features:
    from embed_jax.models.config import DENSE_ACTIVATIONS
    modules.append({"idx": 2, "name": "2", "path": "2_Dense",
                    "type": "sentence_transformers.models.Dense"})
    _write_json(tmp / "2_Dense" / "config.json", {
        "in_features": config.pooled_dim, "out_features": config.dense_features,
        "bias": config.dense_bias,
        "activation_function": DENSE_ACTIVATIONS[config.dense_activation]})
    save_file(dense, str(tmp / "2_Dense" / "model.safetensors"), metadata={"format": "pt"})
  if config.normalize:
    n = len(modules)
    modules.append({"idx": n, "name": str(n), "path": f"{n}_Normalize",
                    "type": "sentence_transformers.models.Normalize"})
    (tmp / f"{n}_Normalize").mkdir()
  _write_json(tmp / "modules.json", modules)
  # The legacy key format: every sentence-transformers version reads it.
  pool = {"word_embedding_dimension": config.hidden_size}
  for key, mode in [("pooling_mode_cls_token", "cls"), ("pooling_mode_mean_tokens", "mean"),
                    ("pooling_mode_max_tokens", "max"),
                    ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
                    ("pooling_mode_lasttoken", "lasttoken")]:
    pool[key] = mode in config.pooling
  _write_json(tmp / "1_Pooling" / "config.json", pool)
  _write_json(tmp / "sentence_bert_config.json",
              {"max_seq_length": config.max_seq_length, "do_lower_case": config.do_lower_case})
  from embed_jax import __version__
  st_config = {"__version__": {"embed_jax": __version__}, "prompts": dict(config.prompts),
               "default_prompt_name": None,
               "similarity_fn_name": "cosine"}
  if config.matryoshka_dims:
    st_config["embed_jax"] = {"matryoshka_dims": list(config.matryoshka_dims)}
  _write_json(tmp / "config_sentence_transformers.json", st_config)
  (tmp / "README.md").write_text(_model_card(config, base_model), encoding="utf-8")


def export(params, model_config: ModelConfig, tokenizer, out_dir: str | os.PathLike, *,
           base_model: str | None = None) -> Path:
  """Writes a folder that sentence-transformers and transformers.AutoModel load unchanged.

  Atomic: everything is written to a temporary folder beside `out_dir`, which then replaces it by
  rename, so an existing export is either the old one or the new one, never a mix. A non-empty
  `out_dir` that is not a model folder is refused rather than replaced.
  """
  return _atomic_folder(Path(out_dir), lambda tmp: _write_model(tmp, params, model_config,
                                                                  tokenizer, base_model))


def export_mlm(params, model_config: ModelConfig, tokenizer, out_dir: str | os.PathLike) -> Path:
  """A BertForMaskedLM folder (encoder keys under `bert.`, the `cls.predictions` head; the
  decoder tied to the word embeddings), atomically, as `export`."""
  if model_config.architecture != "bert" or "mlm_head" not in params:
    raise ValueError("export_mlm needs a BERT-family model with an MLM head (params['mlm_head'])")

  def write(tmp: Path) -> None:
    from safetensors.numpy import save_file
    state = {f"bert.{k}": v for k, v in hf.params_to_state_dict(params, model_config).items()
             if not k.startswith("pooler.")}  # BertForMaskedLM has no pooler
    for e in hf.mlm_head_table(model_config):
      value = np.asarray(hf._get(params, e.flax))
      state[e.hf] = np.ascontiguousarray(value.T if e.transpose else value)
    _refuse_non_finite(state)
    config = hf.hf_config_dict(model_config)
    config["architectures"] = ["BertForMaskedLM"]
    config["tie_word_embeddings"] = True
    _write_json(tmp / "config.json", config)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
      tokenizer.save_pretrained(str(tmp))

  return _atomic_folder(Path(out_dir), write)


def _atomic_folder(out_dir: Path, fill, marker: str = "config.json", what: str = "model") -> Path:
  """fill(tmp) writes a model folder into a temporary folder beside `out_dir`, which then
  replaces `out_dir` by rename: an existing folder is either the old one or the new one, never a
  mix. A non-empty `out_dir` that is not a model folder (no `marker` file) is refused rather than
  replaced; `what` names the kind of folder in the errors (an index uses index.json)."""
  out_dir = Path(out_dir).absolute()
  if out_dir.exists():
    if not out_dir.is_dir():
      raise FileExistsError(f"{out_dir} is a file; {what} output needs a folder path")
    if any(out_dir.iterdir()) and not (out_dir / marker).exists():
      raise FileExistsError(f"{out_dir} exists and is not {'an' if what[0] in 'aeiou' else 'a'} "
                            f"{what} folder; refusing to replace it. Choose a new or empty folder.")
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
  old = None
  try:
    fill(tmp)
    public(tmp)
    if out_dir.exists():
      old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
      try:
        os.rename(out_dir, old / "model")
      except OSError as e:  # e.g. a mount point, which cannot be renamed
        raise OSError(e.errno, f"cannot replace {out_dir} ({e.strerror}); export into a new "
                               f"folder, e.g. inside it", str(out_dir)) from None
      try:
        os.rename(tmp, out_dir)
      except BaseException:
        os.rename(old / "model", out_dir)
        raise
    else:
      os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  finally:
    # The replaced export once the new one is in place, or an empty folder; never the only copy.
    if old is not None and (out_dir.exists() or not (old / "model").exists()):
      shutil.rmtree(old, ignore_errors=True)
  return out_dir


# ----------------------------------------------------------------------------------------------
# A workdir's config: a resumed or finished run keeps the config it was made with.
# ----------------------------------------------------------------------------------------------

# Keys that do not change what a run trains: they may differ when a run resumes.
RUN_KEYS = ("evals.", "encode_batch_size", "checkpoint.", "train.log_every")


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_run_config(workdir: Path, config_json: str, fork: bool = False) -> bool:
  """Refuses to resume (or re-run) a run in `workdir` with a config that trains differently from
  the one it was made with (<workdir>/config.json), naming the differing keys; with `fork`, the
  run goes on with the new config and the old one is kept as config.fork-<n>.json. Writes
  config.json. Returns whether the run was forked."""
  saved = Path(workdir) / "config.json"
  ckpts = Path(workdir) / "checkpoints"
  has_run = (Path(workdir) / "export").exists() or (
      ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()))
  forked = False
  if saved.exists() and has_run:
    old, new = _flat(json.loads(saved.read_text())), _flat(json.loads(config_json))
    # A key the saved config lacks, set off (False, 0, '', None) in the new one, is an option
    # added to the configs since the run was made and left off: it trains the same.
    diff = [k for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k) and not k.startswith(RUN_KEYS)
            and not (k not in old and not new[k])]
    if diff and not fork:
      shown = "; ".join(f"{k}: {old.get(k, '(none)')!r} -> {new.get(k, '(none)')!r}"
                        for k in diff[:5]) + (f"; and {len(diff) - 5} more" if len(diff) > 5 else "")
      raise ValueError(f"{workdir} holds a run of another config ({shown}): use a new --workdir, "
                       f"or --fork to go on from its checkpoint with this config")
    if diff:
      n = len(list(Path(workdir).glob("config.fork-*.json")))
      os.replace(saved, Path(workdir) / f"config.fork-{n}.json")
      forked = True
  atomic_write(saved, lambda f: f.write(config_json + "\n"), "w")
  return forked
