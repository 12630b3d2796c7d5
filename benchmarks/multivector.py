"""Multi-vector (ColBERT) against dense, on the same encoder and the same texts, in one run:
encoding throughput, exact search time per query and stored bytes per document.

    EMBED_JAX_DATA=../shared/data python benchmarks/multivector.py [--docs 1024] [--reps 3]

Both sides are all-MiniLM-L6-v2: dense as it is (mean pooling, 384 dims, cosine), multi-vector
with a 384 -> 128 token projection (random: speed does not depend on it), documents of up to 256
tokens either way. Encoding alternates the two engines over rounds and keeps each one's best;
search is exact in both (dense: one float32 product; multi-vector: MaxSim in chunks). Prints the
ratios multi-vector / dense. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main():
  import numpy as np

  import embed_jax
  from embed_jax import evaluate
  from embed_jax.data import load_beir
  from embed_jax.embedder import Embedder
  from embed_jax.models.config import LateInteraction
  from embed_jax.models.heads import add_prefix_tokens
  from embed_jax.multivector import ExactMaxSim
  from embed_jax.representations import MultiVector
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
  p.add_argument("--docs", type=int, default=1024, help="corpus documents encoded and searched")
  p.add_argument("--queries", type=int, default=300)
  p.add_argument("--reps", type=int, default=3)
  args = p.parse_args()
  data = load_beir("scifact")
  texts = data.corpus_texts(" ")[:args.docs]
  queries = list(data.split_queries("test").values())[:args.queries]

  dense = embed_jax.load(args.model, max_seq_length=256)
  cfg, params = add_prefix_tokens(dense.config, dense.params, dense.tokenizer, ["[Q] ", "[D] "])
  li = LateInteraction(dims=128, query_length=48, document_length=256)
  params = {**params, "token_dense": {"kernel": np.random.default_rng(0).normal(
      0, cfg.hidden_size ** -0.5, (cfg.hidden_size, 128)).astype(np.float32)}}
  colbert = Embedder(cfg.replace(late_interaction=li), params, dense.tokenizer)
  rep = MultiVector().bind(colbert.config, colbert.tokenizer)

  encoders = {"dense": lambda t: dense.encode(t, batch_size=32, normalize=False),
              "multivector": lambda t: rep.encode(colbert, t, role="document", batch_size=32)}
  for f in encoders.values():
    f(texts[:64])  # compile the shapes
  best = {k: float("inf") for k in encoders}
  outputs = {}
  for _ in range(args.reps):
    for name, f in encoders.items():
      t = time.perf_counter()
      outputs[name] = f(texts)
      best[name] = min(best[name], time.perf_counter() - t)
  q_dense = dense.encode(queries, normalize=False)
  q_multi = rep.encode(colbert, queries, role="query", truncate_queries=True)  # 6 are > 48

  flat, exact = evaluate.Float32(), ExactMaxSim()
  flat.index(outputs["dense"])
  exact.index(outputs["multivector"])
  search = {"dense": lambda: flat.search(q_dense, 100), "multivector": lambda: exact.search(q_multi, 100)}
  for f in search.values():
    f()
  ms = {}
  for name, f in search.items():
    times = []
    for _ in range(args.reps):
      t = time.perf_counter()
      f()
      times.append(time.perf_counter() - t)
    ms[name] = min(times) * 1e3 / len(queries)
  size = {"dense": flat.bytes_per_doc, "multivector": exact.bytes_per_doc}
  print(f"{len(texts)} SciFact documents, {len(queries)} queries, best of {args.reps}, "
        f"{os.cpu_count()} cores\n")
  print(f"{'':14}{'docs/s':>10}{'ms/query':>10}{'bytes/doc':>11}")
  for name in encoders:
    print(f"{name:14}{len(texts) / best[name]:10.1f}{ms[name]:10.3f}{size[name]:11,.0f}")
  print(f"\nmulti-vector / dense: encoding {best['dense'] / best['multivector']:.2f}x the "
        f"throughput, search {ms['multivector'] / ms['dense']:.1f}x the time per query, "
        f"{size['multivector'] / size['dense']:.0f}x the bytes")


if __name__ == "__main__":
  main()
