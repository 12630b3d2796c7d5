"""Exact search speed per representation: 300 SciFact test queries over the 5,183-document corpus.

    EMBED_JAX_DATA=../shared/data python benchmarks/search.py [--reps 5]

Times float32, int8, uint8, binary (Hamming) and binary with the top 100 re-scored by the float
query, in one run, on all-MiniLM-L6-v2 embeddings (computed once by embed_jax, then cached in
runs/cache/), and prints ms per query, bytes per document and the speed-up over float32.
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

import numpy as np


def embeddings(model_name: str, cache: Path):
  """(queries_QxD, docs_NxD) of SciFact test, computed once and cached as .npy."""
  from embed_jax.data import load_beir
  ds = load_beir(Path(os.environ.get("EMBED_JAX_DATA", REPO.parent / "shared" / "data")) / "beir" / "scifact")
  q_file, d_file = cache / "scifact_test_queries.npy", cache / "scifact_docs.npy"
  if not (q_file.exists() and d_file.exists()):
    import embed_jax
    model = embed_jax.load(model_name)
    cache.mkdir(parents=True, exist_ok=True)
    queries = ds.split_queries("test")
    np.save(q_file, model.encode(list(queries.values()), normalize=False))
    np.save(d_file, model.encode(ds.corpus_texts(" "), normalize=False, show_progress=True))
  return np.load(q_file), np.load(d_file)


def main():
  from embed_jax import evaluate
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
  p.add_argument("--reps", type=int, default=5, help="timed repetitions; the best is kept")
  p.add_argument("--k", type=int, default=100)
  p.add_argument("--rescore", type=int, default=100)
  args = p.parse_args()
  queries, docs = embeddings(args.model, REPO / "runs" / "cache" / args.model.replace("/", "__"))
  print(f"{len(queries)} queries x {len(docs)} documents, {docs.shape[1]} dims, top {args.k}, "
        f"best of {args.reps}, {os.cpu_count()} cores")
  reps = [evaluate.Float32(), evaluate.Scalar("int8"), evaluate.Scalar("uint8"),
          evaluate.Binary(), evaluate.Binary(args.rescore)]
  rows = []
  for rep in reps:
    rep.index(docs)
    rep.search(queries[:8], args.k)  # warm-up
    best = min(_timed(lambda: rep.search(queries, args.k)) for _ in range(args.reps))
    rows.append((rep.name, best * 1e3 / len(queries), rep.bytes_per_doc))
  ref = rows[0][1]
  print(f"\n{'representation':16}{'ms/query':>10}{'bytes/doc':>11}{'speed-up':>10}")
  for name, ms, nbytes in rows:
    print(f"{name:16}{ms:10.3f}{nbytes:11g}{ref / ms:9.2f}x")


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


if __name__ == "__main__":
  main()
