"""Tiny random models in the Hugging Face layout, for tests and smoke configs (seconds on a CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp

from embed_jax.checkpoint import export
from embed_jax.models import ModelConfig, SentenceEncoder

_WORDS = ("the a of and is in to for with on by are was be as at from that this not no "
          "hello world cell cells protein gene cancer patient patients study effect risk "
          "increase decrease level levels expression mouse mice human blood treatment").split()


def _tiny_vocab(specials: list[str]) -> list[str]:
  chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'()-%")
  pieces = ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
  return list(dict.fromkeys(specials + chars + pieces + list(_WORDS)))


def tiny_tokenizer():
  """A BERT WordPiece tokenizer over a ~120-token vocabulary (lower-cased, accents stripped)."""
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
  from transformers import BertTokenizerFast
  vocab = _tiny_vocab(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
  tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  tok.decoder = decoders.WordPiece()
  return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                           cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def tiny_mpnet_tokenizer():
  """An MPNet tokenizer over the same small vocabulary, laid out as all-mpnet-base-v2's: <s> 0,
  <pad> 1 (MPNet's padding_idx), </s> 2, WordPiece with lower-casing, `<s> A </s>` templates."""
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
  from transformers import MPNetTokenizerFast
  vocab = _tiny_vocab(["<s>", "<pad>", "</s>", "[UNK]"]) + ["<mask>"]
  tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
  tok.decoder = decoders.WordPiece()
  return MPNetTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            sep_token="</s>", cls_token="<s>", unk_token="[UNK]",
                            pad_token="<pad>", mask_token="<mask>")


def tiny_config(**overrides) -> ModelConfig:
  fields = dict(vocab_size=len(tiny_tokenizer()), hidden_size=32, num_layers=2, num_heads=4,
                intermediate_size=64, max_position_embeddings=128, max_seq_length=64)
  fields.update(overrides)
  return ModelConfig(**fields)


def init_params(config: ModelConfig, seed: int = 0) -> dict:
  ids_1x8 = jnp.zeros((1, 8), jnp.int32)
  return SentenceEncoder(config).init(jax.random.key(seed), ids_1x8, ids_1x8)["params"]


def make_tiny_model(out_dir: str | os.PathLike, seed: int = 0, **overrides) -> Path:
  """Writes a random 2-layer, hidden-32 BERT sentence-transformers folder to `out_dir`."""
  config = tiny_config(**overrides)
  return export(init_params(config, seed), config, tiny_tokenizer(), out_dir, base_model="tiny-random-bert")
