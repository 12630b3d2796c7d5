"""Scores an exported model through sentence-transformers (PyTorch) on a BEIR split, and compares
the result with what embed_jax measured for the same export.

    python experiments/st_check.py --export runs/scifact_mnrl/export \
        --results runs/scifact_mnrl/results.json [--truncate_dim 64] [--out check.json]

sentence-transformers loads the folder as a user would (`SentenceTransformer(folder,
truncate_dim=...)`), encodes the corpus (title + " " + text, as MTEB) and the split's judged
queries, and the metrics come from `embed_jax.evaluate.evaluate_embeddings` (pytrec_eval
semantics). The two nDCG@10 should agree to +-0.001 (the issue's +-0.1 points); a larger gap
means the export and the model that was evaluated differ.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def st_evaluate(export_dir: str | os.PathLike, dataset: str = "scifact", split: str = "test",
                truncate_dim: int | None = None, batch_size: int = 32) -> dict:
  """Metrics of `export_dir` loaded by sentence-transformers: {"ndcg@10": ..., ...}."""
  from sentence_transformers import SentenceTransformer
  from embed_jax.data import load_beir
  from embed_jax.evaluate import evaluate_embeddings
  ds = load_beir(dataset)
  qrels = ds.qrels(split)
  query_ids = [q for q in ds.queries if q in qrels]
  model = SentenceTransformer(str(export_dir), device="cpu", truncate_dim=truncate_dim)
  enc = lambda texts: model.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                                   normalize_embeddings=True, show_progress_bar=len(texts) > 1000)
  docs = enc(ds.corpus_texts(" "))
  queries = enc([ds.queries[q] for q in query_ids])
  result = evaluate_embeddings(queries, query_ids, docs, ds.corpus_ids, qrels,
                               precisions=("float32",))[0]
  return {"dims": int(docs.shape[1]), "max_seq_length": model.max_seq_length, **result["metrics"]}


def ours_at(results_json: str | os.PathLike, dims: int | None) -> dict:
  """embed_jax's float32 metrics at `dims` (None: full) from an `eval`/train results.json."""
  rows = [r for r in json.loads(Path(results_json).read_text())["results"]
          if r["representation"] == "float32"]
  row = rows[0] if dims is None else next((r for r in rows if r["dims"] == dims), None)
  if row is None:
    raise SystemExit(f"{results_json} has no float32 row at {dims} dims; "
                     f"it has {sorted(r['dims'] for r in rows)}")
  return row["metrics"]


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--export", required=True, help="a sentence-transformers folder")
  p.add_argument("--results", help="embed_jax's results.json for the same model, to compare")
  p.add_argument("--dataset", default="scifact")
  p.add_argument("--split", default="test")
  p.add_argument("--truncate_dim", type=int, default=None)
  p.add_argument("--out", help="write the comparison here (JSON)")
  args = p.parse_args()
  if not Path(args.export, "modules.json").exists():
    raise SystemExit(f"{args.export} is not a sentence-transformers folder (no modules.json)")
  st = st_evaluate(args.export, args.dataset, args.split, args.truncate_dim)
  out = {"export": args.export, "dataset": args.dataset, "split": args.split,
         "truncate_dim": args.truncate_dim, "sentence_transformers": st}
  print(f"sentence-transformers: nDCG@10 {st['ndcg@10']:.4f}, Recall@100 {st['recall@100']:.4f} "
        f"({st['dims']} dims)")
  if args.results:
    ours = ours_at(args.results, args.truncate_dim)
    out["embed_jax"] = ours
    out["ndcg@10_difference"] = st["ndcg@10"] - ours["ndcg@10"]
    print(f"embed_jax:             nDCG@10 {ours['ndcg@10']:.4f}; difference "
          f"{out['ndcg@10_difference']:+.5f}")
  if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
  main()
