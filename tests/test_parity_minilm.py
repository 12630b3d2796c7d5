"""Integration: the real all-MiniLM-L6-v2 against sentence-transformers (PyTorch), and export."""

import numpy as np
import pytest
from safetensors.numpy import load_file

import embed_jax


def varied_texts() -> list[str]:
  """64 texts: short, empty, longer than max_seq_length, non-ASCII, repeated, odd whitespace."""
  base = [
      "", " ", "a", "Hello world!", "hello world", "HELLO WORLD",
      "Vitamin D deficiency is associated with an increased risk of cardiovascular disease.",
      "The protein p53 suppresses tumours by inducing cell-cycle arrest and apoptosis.",
      "0-dimensional biomaterials show inductive properties.",
      "Größe, naïve café, Ærøskøbing, smörgåsbord.", "日本語のテキストです。", "Это русский текст.",
      "مرحبا بالعالم", "emoji 🙂🚀 and symbols ∑∫√ ≤ ≥", "tabs\tand\nnewlines\r\n  and   runs   \n ",
      "URL https://example.org/a?b=c&d=e and e-mail someone@example.com",
      "C++ / Python3.11 / x86_64 / 3.14159 / 1e-5 / 10^6",
      "What is the capital of France?", "Paris is the capital and largest city of France.",
      "Do SSRIs increase the risk of bleeding?", "ALDH1 expression is associated with poor prognosis.",
  ]
  long = ["Long abstract. " + "Cells divide and proteins fold under stress conditions. " * 60,
          "word " * 600, " ".join(str(i) for i in range(400)),
          "Antibiotic resistance " * 130]
  texts = base + long
  texts += [f"Claim {i}: gene {i % 7} regulates pathway {i * 3} in mice." for i in range(64 - len(texts) - 8)]
  texts += base[3:7] + long[:2] + base[:2]  # repeats
  assert len(texts) == 64
  return texts


@pytest.fixture(scope="module")
def st_model(minilm_dir):
  from sentence_transformers import SentenceTransformer
  return SentenceTransformer(str(minilm_dir), device="cpu")


@pytest.fixture(scope="module")
def jax_model(minilm_dir):
  return embed_jax.load(minilm_dir)


def test_parity_with_sentence_transformers(st_model, jax_model):
  texts = varied_texts()
  ours = jax_model.encode(texts, batch_size=16)
  ref = st_model.encode(texts, batch_size=16, convert_to_numpy=True)
  assert ours.shape == ref.shape == (64, 384)
  assert np.abs(ours - ref).max() <= 1e-5
  ours_256 = jax_model.encode(texts, truncate_dim=256)
  ref_256 = st_model.encode(texts, truncate_dim=256, normalize_embeddings=True)
  assert np.abs(ours_256 - ref_256).max() <= 1e-5


def test_export_loads_in_sentence_transformers_and_transformers(jax_model, st_model, minilm_dir, tmp_path):
  from sentence_transformers import SentenceTransformer
  out = jax_model.save(tmp_path / "minilm-export")
  texts = varied_texts()
  reloaded = SentenceTransformer(str(out), device="cpu")
  assert reloaded.max_seq_length == 256
  ref = st_model.encode(texts, convert_to_numpy=True)
  assert np.abs(reloaded.encode(texts, convert_to_numpy=True) - ref).max() <= 1e-5
  assert set(load_file(str(out / "model.safetensors"))) == set(
      load_file(str(minilm_dir / "model.safetensors")))

  import torch
  from transformers import AutoModel, AutoTokenizer
  hf_model = AutoModel.from_pretrained(str(out)).eval()
  tok = AutoTokenizer.from_pretrained(str(out))
  batch = tok(texts[:8], padding=True, truncation=True, max_length=256, return_tensors="pt")
  with torch.no_grad():
    hidden = hf_model(**batch).last_hidden_state
  mask = batch["attention_mask"][..., None].float()
  mean = (hidden * mask).sum(1) / mask.sum(1)
  mean = torch.nn.functional.normalize(mean, dim=-1).numpy()
  assert np.abs(mean - ref[:8]).max() <= 1e-5
