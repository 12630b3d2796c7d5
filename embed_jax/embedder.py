"""`load(path_or_id) -> Embedder`: encode texts with a jitted forward over bucketed shapes."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from embed_jax import hf
from embed_jax.models import ModelConfig, SentenceEncoder
from embed_jax.models.pooling import l2_normalize

log = logging.getLogger(__name__)

# Padded sequence lengths; each (batch, length) shape compiles once. Sorting by length keeps the
# padding small, and more buckets would mean more compilations for little gain.
LENGTH_BUCKETS = (16, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def length_buckets(max_len: int) -> tuple[int, ...]:
  return tuple(b for b in LENGTH_BUCKETS if b < max_len) + (max_len,)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
  return next(b for b in buckets if b >= length)


def load_tokenizer(folder: str | os.PathLike):
  from transformers import AutoTokenizer
  try:
    tok = AutoTokenizer.from_pretrained(str(folder))
  except Exception as e:  # transformers raises many types here
    raise hf.ModelFormatError(f"could not load the tokenizer from {folder}: {e}") from e
  if not getattr(tok, "is_fast", False):
    raise hf.ModelFormatError(f"{folder}: the tokenizer is not a fast tokenizer (tokenizer.json missing)")
  return tok



def tokenize_texts(tokenizer, model_config, texts: Sequence[str], max_len: int,
                   special: bool = True) -> list[list[int]]:
  """Token ids per text, lower-cased first when the model says so; with `special`, wrapped in
  [CLS]/[SEP] and truncated to max_len, else the bare tokens, untruncated."""
  texts = [t.strip() for t in texts]  # as sentence-transformers' Transformer.tokenize
  texts = [t.lower() for t in texts] if model_config.do_lower_case else texts
  return tokenizer(texts, truncation=special, max_length=max_len if special else None,
                   add_special_tokens=special)["input_ids"]

def bucketed_batches(token_ids: list[list[int]], batch_size: int, max_len: int, pad_id: int):
  """Yields (positions, ids_BxL, mask_BxL) over `token_ids`: longest first, each batch padded to
  the bucket of its longest row and to `batch_size` rows (a smaller power of two when there are
  fewer texts), so that few shapes compile."""
  n = len(token_ids)
  order = np.argsort([-len(t) for t in token_ids], kind="stable")
  rows = batch_size if n >= batch_size else 1 << max(n - 1, 0).bit_length()
  buckets = length_buckets(max_len)
  for start in range(0, n, batch_size):
    idx = order[start:start + batch_size]
    length = bucket_for(len(token_ids[idx[0]]), buckets)
    ids = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), np.int32)
    for r, i in enumerate(idx):
      ids[r, :len(token_ids[i])] = token_ids[i]
      mask[r, :len(token_ids[i])] = 1
    yield idx, ids, mask


class Embedder:
  """A sentence-embedding model: config, params, tokenizer and a jitted forward."""

  def __init__(self, config: ModelConfig, params, tokenizer, source: str | None = None):
    if len(tokenizer) > config.vocab_size:
      # Out-of-range ids would silently embed as NaN (JAX gathers fill out-of-bounds rows).
      raise hf.ModelFormatError(f"the tokenizer has {len(tokenizer)} tokens but the model's "
                                f"vocab_size is {config.vocab_size}: they do not belong together")
    self.config = config
    self.params = jax.tree.map(jnp.asarray, params)
    self.tokenizer = tokenizer
    self.source = source
    self.module = SentenceEncoder(config)
    self._forward = jax.jit(self._embed)

  def _embed(self, params, ids_BxL, mask_BxL):
    # Raw pooled vectors; `encode` normalises after any truncation.
    return self.module.apply({"params": params}, ids_BxL, mask_BxL, normalize=False).astype(jnp.float32)

  @property
  def dim(self) -> int:
    return self.config.embedding_dim

  def tokenize(self, texts: Sequence[str], prompt: str = "") -> list[list[int]]:
    """Token ids per text (after `prompt`), with [CLS]/[SEP], truncated to max_seq_length (as
    sentence-transformers)."""
    for i, t in enumerate(texts):
      if not isinstance(t, str):
        raise TypeError(f"texts[{i}] is {type(t).__name__}, not str")
    texts = [prompt + t for t in texts] if prompt else texts
    return tokenize_texts(self.tokenizer, self.config, texts, self.config.max_seq_length)

  def batches(self, token_ids: list[list[int]], batch_size: int):
    """Yields (positions, ids_BxL, mask_BxL): longest first, padded to bucketed shapes."""
    return bucketed_batches(token_ids, batch_size, self.config.max_seq_length,
                            self.config.pad_token_id)

  def encode(self, texts: Sequence[str], batch_size: int = 32, normalize: bool | None = None,
             truncate_dim: int | None = None, show_progress: bool | None = None,
             prompt_name: str | None = None, prompt: str | None = None) -> np.ndarray:
    """Embeds `texts` -> float32 [n, d], in input order.

    prompt_name: one of the model's prompts (config_sentence_transformers.json, e.g. "query")
      put before each text; `prompt` gives the text itself. An unknown name is refused.

    normalize: None follows the model (unit length if it has a Normalize module), True always
      returns unit vectors, False returns the raw pooled vectors.
    truncate_dim: keep the first d dims (Matryoshka); normalisation applies after truncation.
    """
    if isinstance(texts, str):
      raise TypeError("encode takes a list of texts; wrap a single text in a list")
    if self.config.late_interaction is not None:
      raise ValueError("this is a multi-vector (ColBERT) model: it gives token vectors, not one "
                       "vector per text; use embed_jax.representations.of_model(model).encode("
                       "model, texts, role='query' or 'document')")
    if self.config.sparse is not None:
      raise ValueError("this is a sparse model: it gives vocabulary weights, not a dense vector; "
                       "use embed_jax.representations.of_model(model).encode(model, texts, "
                       "role='query' or 'document') (scipy.sparse rows)")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    d = self.dim if truncate_dim is None else int(truncate_dim)
    if not 1 <= d <= self.dim:
      raise ValueError(f"truncate_dim must be in 1..{self.dim}, got {truncate_dim}")
    if prompt_name is not None and prompt_name not in dict(self.config.prompts):
      raise ValueError(f"prompt_name {prompt_name!r}: the model's prompts are "
                       f"{sorted(dict(self.config.prompts)) or 'none'}")
    out = np.zeros((len(texts), d), np.float32)
    if not len(texts):
      return out
    token_ids = self.tokenize(texts, prompt if prompt is not None else self.config.prompt(prompt_name))
    truncated = sum(len(t) == self.config.max_seq_length for t in token_ids)
    if truncated:
      log.info("%d of %d texts reach max_seq_length=%d tokens (longer ones are truncated)",
               truncated, len(texts), self.config.max_seq_length)
    if show_progress is None:
      show_progress = len(texts) >= 1000
    from tqdm.auto import tqdm
    bar = tqdm(total=len(texts), desc="encode", unit="text", disable=not show_progress)
    pending = None  # fetch one batch late so the host copies while the next batch computes
    for idx, ids, mask in self.batches(token_ids, batch_size):
      emb = self._forward(self.params, ids, mask)
      if pending is not None:
        out[pending[0]] = np.asarray(pending[1])[:len(pending[0]), :d]
        bar.update(len(pending[0]))
      pending = (idx, emb)
    out[pending[0]] = np.asarray(pending[1])[:len(pending[0]), :d]
    bar.update(len(pending[0]))
    bar.close()
    if self.config.normalize if normalize is None else normalize:
      out = l2_normalize(out)
    return out

  def save(self, out_dir: str | os.PathLike) -> Path:
    from embed_jax.checkpoint import export
    return export(self.params, self.config, self.tokenizer, out_dir, base_model=self.source)


def role_prompt(model, role: str) -> dict:
  """{"prompt_name": role} for `model.encode` when the model has a prompt of that name (e.g. a
  query instruction), else {}: how callers encode queries as the model expects."""
  config = getattr(model, "config", None)
  return {"prompt_name": role} if config is not None and role in dict(config.prompts) else {}


def load(name_or_path: str | os.PathLike = hf.DEFAULT_MODEL, *, dtype: str = "float32",
         param_dtype: str = "float32", max_seq_length: int | None = None) -> Embedder:
  """Loads a model from a local folder or a hub id (see `embed_jax.hf.resolve`); "bm25" is
  BM25 (embed_jax.sparse.BM25Model, no weights), the lexical reference."""
  if str(name_or_path).lower() == "bm25" and not Path(name_or_path).exists():
    from embed_jax.sparse import BM25Model
    return BM25Model()
  overrides = dict(dtype=dtype, param_dtype=param_dtype)
  if max_seq_length is not None:
    overrides["max_seq_length"] = max_seq_length
  adapter = Path(name_or_path)
  if (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").is_file():
    from embed_jax import lora  # a PEFT LoRA folder: its base, with the adapter merged
    return lora.load_adapted(adapter, **overrides)
  folder = hf.resolve(name_or_path)
  config, params = hf.load(folder, **overrides)
  if config.classifier is not None:  # a cross-encoder folder (*ForSequenceClassification)
    from embed_jax.rerank import CrossEncoder
    return CrossEncoder(config, params, load_tokenizer(folder), source=str(name_or_path))
  return Embedder(config, params, load_tokenizer(folder), source=str(name_or_path))
