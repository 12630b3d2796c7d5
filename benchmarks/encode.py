"""Encoding throughput: embed_jax vs sentence-transformers on the SciFact corpus, in one run.

    EMBED_JAX_DATA=../shared/data python benchmarks/encode.py [--limit N] [--batch_size 32]

Both embed the same documents (title + " " + text) with the same batch size and max_seq_length.
Prints docs/s for each and their ratio, and the model FLOPs utilisation (real tokens only) of each
against the float32 matmul peak measured in the same run. The two alternate over `--rounds` full
passes (embed_jax, sentence-transformers, embed_jax, ...) and each keeps its best pass, so a slow
stretch of a shared machine does not decide the ratio. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np


def scifact_texts(limit: int | None) -> list[str]:
  root = Path(os.environ.get("EMBED_JAX_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
  path = root / "beir" / "scifact" / "corpus.jsonl"
  if not path.exists():
    raise SystemExit(f"{path} not found: set EMBED_JAX_DATA to the folder holding beir/scifact")
  rows = [json.loads(line) for line in path.open(encoding="utf-8")]
  texts = [f"{r.get('title', '')} {r['text']}".strip() for r in rows]
  return texts[:limit] if limit else texts


def matmul_peak(n: int = 2048, reps: int = 10) -> dict[str, float]:
  """Best float32 GFLOP/s of an n x n matmul in numpy and in jax."""
  a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
  out = {}
  for name, fn in [("numpy", lambda: a @ a),
                   ("jax", lambda f=jax.jit(lambda x: x @ x), x=jnp.asarray(a): f(x).block_until_ready())]:
    fn()
    best = min(_timed(fn) for _ in range(reps))
    out[name] = 2 * n ** 3 / best / 1e9
  return out


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def model_flops(n_tokens_per_doc: np.ndarray, hidden: int, inter: int, layers: int) -> float:
  """Forward FLOPs on real tokens: projections + FFN (2 per MAC) and attention scores/values."""
  per_token = layers * 2 * (4 * hidden * hidden + 2 * hidden * inter)
  attention = layers * 2 * 2 * hidden * (n_tokens_per_doc.astype(np.float64) ** 2)
  return float(per_token * n_tokens_per_doc.sum() + attention.sum())


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
  p.add_argument("--limit", type=int, default=None, help="first N documents (default: all 5,183)")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--max_seq_length", type=int, default=256)
  p.add_argument("--rounds", type=int, default=2, help="alternating timed passes per engine")
  p.add_argument("--skip_st", action="store_true", help="embed_jax only")
  args = p.parse_args()

  import embed_jax
  from embed_jax import hf
  texts = scifact_texts(args.limit)
  model = embed_jax.load(args.model, max_seq_length=args.max_seq_length)
  tokens = np.array([len(t) for t in model.tokenize(texts)])
  cfg = model.config
  flops = model_flops(tokens, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers)
  print(f"{len(texts)} documents, {tokens.sum():,} real tokens (mean {tokens.mean():.0f}), "
        f"max_seq_length {args.max_seq_length}, batch {args.batch_size}, "
        f"{jax.device_count()} {jax.default_backend()} device(s), {os.cpu_count()} cores")

  peak = matmul_peak()
  print(f"float32 matmul peak: numpy {peak['numpy']:.0f} GFLOP/s, jax {peak['jax']:.0f} GFLOP/s")
  peak_gflops = max(peak.values())

  # Padded tokens under embed_jax's bucketing (what the compiled shapes actually compute).
  padded = sum(ids.shape[0] * ids.shape[1] for _, ids, _ in
               model.batches(model.tokenize(texts), args.batch_size))

  # Warm-up: compile each (batch, bucket) shape once, outside the timed passes.
  t = time.perf_counter()
  seen_lengths = set()
  for _, ids, mask in model.batches(model.tokenize(texts), args.batch_size):
    if ids.shape[1] not in seen_lengths:
      seen_lengths.add(ids.shape[1])
      jax.block_until_ready(model._forward(model.params, ids, mask))
  print(f"embed_jax: compiled {model._forward._cache_size()} shapes in {time.perf_counter() - t:.1f} s")

  engines = {"embed_jax": lambda: model.encode(texts, batch_size=args.batch_size, show_progress=False)}
  pads = {"embed_jax": padded}
  if not args.skip_st:
    import torch
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(str(hf.resolve(args.model)), device="cpu")
    st.max_seq_length = args.max_seq_length
    st.encode(texts[:64], batch_size=args.batch_size)  # warm-up
    engines["sentence-transformers"] = lambda: st.encode(texts, batch_size=args.batch_size,
                                                         convert_to_numpy=True)
    order = np.argsort([-n for n in tokens], kind="stable")
    pads["sentence-transformers"] = sum(
        len(b) * tokens[b].max()
        for b in np.array_split(order, range(args.batch_size, len(order), args.batch_size)))
  best, outputs = {}, {}
  for r in range(args.rounds):
    for name, run in engines.items():
      t = time.perf_counter()
      outputs[name] = run()
      secs = time.perf_counter() - t
      best[name] = min(best.get(name, secs), secs)
      print(f"round {r + 1}: {name} {len(texts) / secs:.1f} docs/s")
  if not args.skip_st:
    diff = np.abs(outputs["embed_jax"] - outputs["sentence-transformers"]).max()
    print(f"max |embed_jax - sentence-transformers| = {diff:.2e} "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
  rows = [(name, best[name], pads[name]) for name in engines]

  print(f"\n{'':24}{'docs/s':>9}{'tokens/s':>10}{'GFLOP/s':>9}{'MFU':>7}{'padding':>9}")
  for name, secs, pad in rows:
    print(f"{name:24}{len(texts) / secs:9.1f}{tokens.sum() / secs:10.0f}{flops / secs / 1e9:9.1f}"
          f"{flops / secs / 1e9 / peak_gflops:7.1%}{pad / tokens.sum() - 1:9.1%}")
  if len(rows) == 2:
    print(f"\nratio embed_jax / sentence-transformers: {rows[1][1] / rows[0][1]:.2f}x docs/s")


if __name__ == "__main__":
  main()
