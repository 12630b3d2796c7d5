"""Causal-decoder encoders (Qwen2, Qwen3): parity with transformers' PyTorch models on tiny
random configs, last-token and mean pooling through sentence-transformers, export round trip."""

from __future__ import annotations

import numpy as np
import pytest

import embed_jax
from tests.test_mpnet import texts

PROMPT = "Instruct: find the passage about it\nQuery: "  # Qwen3-Embedding's query form


def _tiny_decoder(root, family: str, pooling: str):
  """A random 2-layer transformers Qwen2Model / Qwen3Model (grouped-query attention: 4 query
  heads, 2 key/value heads) saved by sentence-transformers (Transformer -> Pooling ->
  Normalize); weights perturbed away from the init so that a wrong name or a missed norm shows."""
  import torch
  from sentence_transformers import SentenceTransformer, models
  from transformers import Qwen2Config, Qwen2Model, Qwen3Config, Qwen3Model
  from embed_jax.testing import tiny_tokenizer
  tok = tiny_tokenizer()
  # Room beside the tokenizer: loading a qwen2 folder, transformers may add a special token.
  shape = dict(vocab_size=len(tok) + 2, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=48, max_position_embeddings=512,
               pad_token_id=tok.pad_token_id, rms_norm_eps=1e-6)
  if family == "qwen3":
    model = Qwen3Model(Qwen3Config(head_dim=16, **shape))  # head_dim * heads != hidden, as Qwen3
  else:
    model = Qwen2Model(Qwen2Config(**shape))
  torch.manual_seed(0)
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.add_(torch.randn_like(p) * 0.2)
  model.eval().save_pretrained(root / "hf")
  tok.save_pretrained(root / "hf")
  st = SentenceTransformer(modules=[models.Transformer(str(root / "hf"), max_seq_length=128),
                                    models.Pooling(32, pooling), models.Normalize()], device="cpu",
                           prompts={"query": PROMPT, "document": ""})
  st.save(str(root / "st"))
  return root / "st", st


@pytest.mark.parametrize("family,pooling", [("qwen3", "lasttoken"), ("qwen2", "mean")])
def test_decoder_embeddings_equal_sentence_transformers(family, pooling, tmp_path):
  folder, st = _tiny_decoder(tmp_path, family, pooling)
  model = embed_jax.load(folder)
  assert model.config.architecture == family and model.config.decoder.num_kv_heads == 2
  batch = texts() * 2
  want = st.encode(batch, batch_size=8, convert_to_numpy=True)
  got = model.encode(batch, batch_size=8)
  assert np.abs(got - want).max() <= 1e-5
  # The model's query prompt (an instruction before each query), by name and by role.
  from embed_jax.representations import of_model
  assert model.config.prompt("query") == PROMPT
  want_q = st.encode(batch[:6], prompt_name="query", convert_to_numpy=True)
  assert np.abs(model.encode(batch[:6], prompt_name="query") - want_q).max() <= 1e-5
  as_query = of_model(model).encode(model, batch[:6], role="query")
  assert np.abs(as_query / np.linalg.norm(as_query, axis=1, keepdims=True) - want_q).max() <= 1e-5
  assert np.abs(want_q - want[:6]).max() > 1e-3  # the prompt changes the vectors
  with pytest.raises(ValueError, match="prompt_name 'passage'"):
    model.encode(["x"], prompt_name="passage")
  out = model.save(tmp_path / "export")
  assert embed_jax.load(out).config.prompts == (("query", PROMPT),)
  from sentence_transformers import SentenceTransformer
  again = SentenceTransformer(str(out), device="cpu").encode(batch, convert_to_numpy=True)
  assert np.abs(again - got).max() <= 1e-5
  assert np.abs(embed_jax.load(out).encode(batch) - got).max() <= 1e-6
