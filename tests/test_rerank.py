"""Cross-encoders: sentence-transformers' CrossEncoder folders in and out, identical scores."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import embed_jax

MAX_LEN = 48


def _texts() -> list[str]:
  return ["", "hello", "the cell protein level", "Hello World! Hello world?",
          "Größe café 日本語 ∑ unknown tokens", "cancer risk in patients " * 12,
          "the mouse gene expression study of human blood cells and the effect of treatment",
          "word " * 300]


def varied_pairs(n: int = 64) -> list[tuple[str, str]]:
  """Short, long (truncated longest-first), empty and unknown-token texts on both sides."""
  pairs = list(itertools.product(_texts(), repeat=2))
  return pairs[:n]


def _write_st_cross_encoder(root, arch: str):
  """A random tiny transformers *ForSequenceClassification (num_labels 1) saved by
  sentence-transformers' CrossEncoder; weights perturbed away from the init so that a wrong
  name or a missed bias shows."""
  import torch
  from sentence_transformers import CrossEncoder
  from transformers import (BertConfig, BertForSequenceClassification, MPNetConfig,
                            MPNetForSequenceClassification)
  from embed_jax.testing import tiny_mpnet_tokenizer, tiny_tokenizer
  tok = tiny_tokenizer() if arch == "bert" else tiny_mpnet_tokenizer()
  shape = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, pad_token_id=tok.pad_token_id, num_labels=1)
  if arch == "bert":
    model = BertForSequenceClassification(BertConfig(max_position_embeddings=64, **shape))
  else:
    model = MPNetForSequenceClassification(MPNetConfig(max_position_embeddings=66, **shape))
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_(torch.randn_like(p) * (1.0 if "relative_attention_bias" in name else 0.1))
  model.eval().save_pretrained(root / "hf")
  tok.save_pretrained(root / "hf")
  ce = CrossEncoder(str(root / "hf"), max_length=MAX_LEN, device="cpu")
  ce.save(str(root / "st"))
  return root / "st"


@pytest.fixture(scope="module", params=["bert", "mpnet"])
def st_cross_encoder(request, tmp_path_factory):
  return _write_st_cross_encoder(tmp_path_factory.mktemp(f"ce_{request.param}"), request.param)


def _st_scores(folder, pairs, identity=False):
  import torch
  from sentence_transformers import CrossEncoder
  ce = CrossEncoder(str(folder), device="cpu")
  kw = {"activation_fn": torch.nn.Identity()} if identity else {}
  return np.asarray(ce.predict(pairs, batch_size=16, **kw), np.float32)


def test_a_cross_encoder_folder_scores_as_sentence_transformers(st_cross_encoder):
  model = embed_jax.load(st_cross_encoder)
  assert model.config.classifier is not None and model.config.max_seq_length == MAX_LEN
  pairs = varied_pairs()
  assert len(pairs) == 64
  ours = model.predict(pairs, batch_size=16)
  want = _st_scores(st_cross_encoder, pairs)
  assert np.abs(ours - want).max() <= 1e-5
  logits = model.predict(pairs, activation=False)
  assert np.abs(logits - _st_scores(st_cross_encoder, pairs, identity=True)).max() <= 1e-5
  assert logits.std() > 0.01  # the pairs are told apart: the check can fail
  with pytest.raises(ValueError, match="cross-encoder"):
    model.encode(["a text"])


def test_our_export_loads_in_sentence_transformers_and_scores_the_same(st_cross_encoder, tmp_path):
  from safetensors.numpy import load_file
  model = embed_jax.load(st_cross_encoder)
  out = model.save(tmp_path / "export")
  pairs = varied_pairs()
  assert np.abs(_st_scores(out, pairs) - model.predict(pairs)).max() <= 1e-5
  a, b = load_file(str(st_cross_encoder / "model.safetensors")), load_file(str(out / "model.safetensors"))
  assert set(a) - {"bert.embeddings.position_ids"} == set(b)
  assert all(np.array_equal(a[k], b[k]) for k in b)
  again = embed_jax.load(out)
  assert np.array_equal(again.predict(pairs, activation=False), model.predict(pairs, activation=False))


def test_rank_orders_documents_and_rerank_keeps_the_top(st_cross_encoder):
  from embed_jax.rerank import rerank
  model = embed_jax.load(st_cross_encoder)
  docs = {f"d{i}": t for i, t in enumerate(_texts())}
  ranked = model.rank("the cell protein", list(docs.values()))
  scores = model.predict([("the cell protein", t) for t in docs.values()])
  assert [r["corpus_id"] for r in ranked] == list(np.argsort(-scores, kind="stable"))
  first = {"q": {d: float(-i) for i, d in enumerate(docs)}}  # d0 best ... d7 worst
  run, timing = rerank(model, first, {"q": "the cell protein"}, docs, top=5)
  assert set(run["q"]) == {"d0", "d1", "d2", "d3", "d4"} and timing["pairs"] == 5
  logits = model.predict([("the cell protein", docs[d]) for d in run["q"]], activation=False)
  assert np.allclose([run["q"][d] for d in run["q"]], logits)
