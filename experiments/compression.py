"""The compression spectrum on SciFact: for each model the project trains, every representation's
test nDCG@10, bytes per document, ms per query and index build time, in one table and plot.

    EMBED_JAX_DATA=../shared/data python experiments/compression.py [--tabulate]

Dense models (those whose export exists; zero-shot always) go through embed_jax.index's FAISS
indexes: float32 flat at 384/256/128/64 dims, HNSW, int8, binary, binary re-scored from the
stored floats, and the funnel (64 dims, shortlist 200, full dims); each index is built from the
model's corpus vectors (encoded once, cached in runs/compression/<model>/) and searched with the
300 test queries in one batch (best of 3, FAISS on 2 threads). Sparse and multi-vector models
(when their exports exist) add their own searches' rows (exact inverted index, exact MaxSim).
Writes experiments/results/compression/{compression.md,compression.json,ndcg_vs_bytes.png}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import RESULTS, plot_ndcg_vs_bytes  # noqa: E402

OUT = RESULTS / "compression"
RUNS = Path("runs/compression")
DENSE = {  # name -> model (a hub id or an export that experiments/*.py trains)
    "zero-shot": "sentence-transformers/all-MiniLM-L6-v2",
    "hardneg": "runs/sparse/dense_hardneg/export",  # experiments/sparse.py, rerank_distill.py
    "MRL (PCA start)": "runs/mrl_ablation/mrl_pca/export",  # experiments/mrl_ablation.py
    "student (MPNet scores)": "runs/rerank/student_bi/export",  # experiments/rerank_distill.py
}
OTHER = {  # representations with their own search (embed_jax.evaluate)
    "SPLADE": "runs/sparse/splade/export",  # experiments/sparse.py
    "ColBERT": "runs/multivector/colbert/export",  # experiments/multivector.py
}
# (label, FAISS kind, indexed dims, re-scored shortlist)
SETTINGS = [
    ("float32", "flat", None, 0), ("float32 256d", "flat", 256, 0),
    ("float32 128d", "flat", 128, 0), ("float32 64d", "flat", 64, 0),
    ("HNSW float32", "hnsw", None, 0), ("int8", "int8", None, 0), ("int8 128d", "int8", 128, 0),
    ("binary", "binary", None, 0), ("binary + rescore 100", "binary", None, 100),
    ("binary 128d + rescore 200", "binary", 128, 200), ("funnel 64d, 200 -> full", "flat", 64, 200),
]


def dataset():
  from embed_jax.data import load_beir
  return load_beir("scifact")


def vectors(name: str, model_path: str, ds):
  """(queries_QxD, docs_NxD, query ids) of SciFact test, encoded once."""
  cache = RUNS / name.replace(" ", "_").replace("(", "").replace(")", "")
  if not (cache / "docs.npy").exists():
    import embed_jax
    from embed_jax.representations import Dense
    model = embed_jax.load(model_path)
    qids = list(ds.split_queries("test"))
    cache.mkdir(parents=True, exist_ok=True)
    np.save(cache / "queries.npy", Dense().encode(model, [ds.queries[q] for q in qids], role="query"))
    np.save(cache / "docs.npy", Dense().encode(model, ds.corpus_texts(" "), batch_size=64,
                                               show_progress=True, role="document"))
    (cache / "query_ids.json").write_text(json.dumps(qids))
  return (np.load(cache / "queries.npy"), np.load(cache / "docs.npy"),
          json.loads((cache / "query_ids.json").read_text()))


def dense_rows(name: str, model_path: str, ds) -> list[dict]:
  import faiss

  from embed_jax.evaluate import ir_metrics, run_from_topk
  from embed_jax.index import VectorIndex, build_index
  faiss.omp_set_num_threads(2)
  queries, docs, qids = vectors(name, model_path, ds)
  qrels = ds.qrels("test")
  rows = []
  tmp = Path(tempfile.mkdtemp(prefix="compression-", dir=RUNS))
  try:
    for label, kind, dims, rescore in SETTINGS:
      t = time.perf_counter()
      path = build_index(docs, ds.corpus_ids, tmp / f"{kind}_{dims}", kind=kind, dims=dims,
                         fingerprint=name, corpus_checksum=ds.checksum)
      build_s = time.perf_counter() - t
      idx = VectorIndex(path, verify=False)
      if kind == "hnsw":
        idx.set_ef_search(128)
      idx.search(queries[:4], 100, rescore=rescore)  # warm-up
      best = float("inf")
      for _ in range(3):
        t = time.perf_counter()
        scores, found = idx.search(queries, 100, rescore=rescore)
        best = min(best, time.perf_counter() - t)
      metrics = ir_metrics(qrels, run_from_topk(qids, ds.corpus_ids, scores, found), (10, 100))
      rows.append({"model": name, "representation": label, "dims": dims or docs.shape[1],
                   "ndcg@10": round(metrics["ndcg@10"], 4),
                   "recall@100": round(metrics["recall@100"], 4),
                   "bytes_per_doc": round(idx.bytes_per_doc, 1),
                   "ms_per_query": round(best * 1e3 / len(qids), 4),
                   "build_s": round(build_s, 3)})
      shutil.rmtree(path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return rows


def other_rows(name: str, model_path: str, ds) -> list[dict]:
  import embed_jax
  from embed_jax.evaluate import evaluate_retrieval
  out = evaluate_retrieval(embed_jax.load(model_path), ds, "test", batch_size=64)
  return [{"model": name, "representation": r["representation"], "dims": r["dims"],
           "ndcg@10": round(r["metrics"]["ndcg@10"], 4),
           "recall@100": round(r["metrics"]["recall@100"], 4),
           "bytes_per_doc": round(r["bytes_per_doc"], 1), "ms_per_query": r["ms_per_query"],
           "build_s": None} for r in out["results"]]


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tabulate", action="store_true", help="only rewrite the table from the cache")
  args = p.parse_args()
  ds = dataset()
  cache = RUNS / "rows.json"
  done = json.loads(cache.read_text()) if cache.exists() else {}
  missing = []
  for name, path in {**DENSE, **OTHER}.items():
    if name in done:
      continue
    if args.tabulate or not (path.startswith("sentence-transformers/") or Path(path).exists()):
      missing.append(f"{name} ({path})")
      continue
    done[name] = (dense_rows if name in DENSE else other_rows)(name, path, ds)
    RUNS.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(done, indent=2) + "\n")
  done = {name: done[name] for name in {**DENSE, **OTHER} if name in done}  # the table's order
  rows = [r for name in done for r in done[name]]
  for name in done:  # each row's share of its model's own first (float32, full dims) row
    for r in done[name]:
      r["kept"] = round(r["ndcg@10"] / done[name][0]["ndcg@10"], 4)
  OUT.mkdir(parents=True, exist_ok=True)
  (OUT / "compression.json").write_text(json.dumps({"rows": rows, "not_run": missing}, indent=2) + "\n")
  lines = ["| model | representation | dims | nDCG@10 | kept | recall@100 | bytes/doc | ms/query | "
           "build s |", "|---|---|---|---|---|---|---|---|---|"]
  lines += [f"| {r['model']} | {r['representation']} | {r['dims']} | {r['ndcg@10']:.4f} | "
            f"{100 * r['kept']:.1f}% | "
            f"{r['recall@100']:.4f} | {r['bytes_per_doc']:g} | {r['ms_per_query']:.3f} | "
            f"{'' if r['build_s'] is None else format(r['build_s'], '.2f')} |" for r in rows]
  if missing:
    lines.append(f"\nNot run (no export here): {'; '.join(missing)}.")
  (OUT / "compression.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  markers = dict(zip(done, "os^vDP"))
  plot_ndcg_vs_bytes([(f"{r['model']}: {r['representation']}", r["bytes_per_doc"], r["ndcg@10"],
                       markers[r["model"]]) for r in rows], OUT / "ndcg_vs_bytes.png")


if __name__ == "__main__":
  main()
