"""Multi-vector (ColBERT) against dense on SciFact, with the same data and training budget:
quality against bytes per document and search time; writes
experiments/results/multivector/{multivector.md,multivector.json,ndcg_vs_bytes.png}.

    EMBED_JAX_DATA=../shared/data python experiments/multivector.py [--tabulate]

Rows: the dense hardneg model (configs/scifact_hardneg.py, its committed run); ColBERT from
all-MiniLM-L6-v2 (configs/scifact_colbert.py: the same negatives file, batch, steps and learning
rate), zero-shot from its initial head and trained; the trained model's token vectors pooled by 2
and 3 (hierarchical clustering, as PyLate); and through PLAID's candidate generation re-ranked by
exact MaxSim, with the recall@100 of its results against exact MaxSim. Runs live in
runs/multivector/<name>; re-running resumes and finished runs are not repeated. Run it on an idle
machine: the times are part of the result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import RESULTS, plot_ndcg_vs_bytes, run_config  # noqa: E402

OUT = RESULTS / "multivector"
RUNS = Path("runs/multivector")
NEGATIVES = Path("runs/negatives/scifact_train_minilm.jsonl")  # configs/scifact_hardneg.py's
VARIANTS = {"colbert": "scifact_colbert"}  # name -> config spec (all rows: pooling, PLAID)
# Ablations: before and after training only. PyLate starts the projection at random.
ABLATIONS = {"colbert_random": "scifact_colbert:random"}
# PLAID (nprobe, ncandidates) points measured on the one index; the row above uses the defaults.
SWEEP = ((2, 256), (4, 256), (8, 256), (8, 512), (8, 1024), (8, 2048))


def ensure_negatives(config=None) -> None:
  """A config's negatives file (default: the hardneg recipe's), mined by its starting model as
  the config mines it, unless it exists."""
  if config is None:
    from configs import scifact_hardneg
    config = scifact_hardneg.get_config()
  if Path(config.data.negatives).exists():
    return
  import embed_jax
  from embed_jax.data import load_beir
  from embed_jax.data.inputs import mine_if_missing
  mine_if_missing(config, load_beir("scifact"), embed_jax.load(config.model))


def search_rows(workdir: Path) -> dict:
  """Every index of the trained ColBERT export on SciFact test (cached in the workdir)."""
  cache = workdir / "indexes.json"
  if cache.exists():
    return json.loads(cache.read_text())
  import numpy as np

  import embed_jax
  from embed_jax.data import load_beir
  from embed_jax.evaluate import ir_metrics, run_from_topk
  from embed_jax.multivector import ExactMaxSim, Plaid
  from embed_jax.representations import of_model
  model = embed_jax.load(workdir / "export")
  rep, data = of_model(model, truncate_queries=True), load_beir("scifact")
  qrels = data.qrels("test")
  qids = [q for q in data.queries if q in qrels]
  t = time.perf_counter()
  docs = rep.encode(model, data.corpus_texts(" "), role="document", batch_size=64)
  queries = rep.encode(model, [data.queries[q] for q in qids], role="query", batch_size=64)
  encode_s = time.perf_counter() - t
  rows, found = [], {}
  for index in (ExactMaxSim(), ExactMaxSim(2), ExactMaxSim(3), Plaid()):
    t = time.perf_counter()
    index.index(docs)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    scores, ids = index.search(queries, 100)
    ms = (time.perf_counter() - t) * 1e3 / len(qids)
    found[index.name] = ids
    rows.append({"representation": index.name, "dims": rep.settings.dims,
                 "metrics": ir_metrics(qrels, run_from_topk(qids, data.corpus_ids, scores, ids),
                                       (1, 3, 5, 10, 100)),
                 "bytes_per_doc": index.bytes_per_doc, "ms_per_query": ms,
                 "build_seconds": build_s})
  exact = found["multivector"]

  def recall(ids) -> float:
    return float(np.mean([len(set(a) & set(b)) / 100 for a, b in zip(ids, exact)]))

  sweep = []  # PLAID's operating points on the same index: recall against time
  for nprobe, ncandidates in SWEEP:
    index.nprobe, index.ncandidates = nprobe, ncandidates
    t = time.perf_counter()
    scores, ids = index.search(queries, 100)
    ms = (time.perf_counter() - t) * 1e3 / len(qids)
    ndcg = ir_metrics(qrels, run_from_topk(qids, data.corpus_ids, scores, ids), (10,))["ndcg@10"]
    sweep.append({"nprobe": nprobe, "ncandidates": ncandidates, "recall@100_vs_exact": recall(ids),
                  "ndcg@10": ndcg, "ms_per_query": ms})
  out = {"rows": rows, "plaid_recall@100_vs_exact": recall(found["plaid"]),
         "plaid_sweep": sweep, "encode_seconds": encode_s}
  cache.write_text(json.dumps(out, indent=2) + "\n")
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tabulate", action="store_true", help="only rewrite the table from the runs")
  args = p.parse_args()
  dense = json.loads((RESULTS / "contrastive" / "scifact_hardneg.json").read_text())
  result = {"dense_hardneg": {"label": "dense hardneg (`scifact_hardneg.py`, its committed run)",
                              **dense["results"][0]}}
  for name, spec in VARIANTS.items():
    workdir = RUNS / name
    if not args.tabulate:
      ensure_negatives()
      run_config(spec, workdir, ["--config.evals.test.at_start=True"])
    before = json.loads((workdir / "results_before.json").read_text())["results"][0]
    result[f"{name}_zero_shot"] = {"label": f"ColBERT (`{spec}.py`), before training", **before}
    search = search_rows(workdir)
    for row in search["rows"]:
      label = {"multivector": "ColBERT, trained", "multivector+pool2": "ColBERT, pooled by 2",
               "multivector+pool3": "ColBERT, pooled by 3",
               "plaid": "ColBERT through PLAID, re-ranked by exact MaxSim"}[row["representation"]]
      result[f"{name}_{row['representation']}"] = {"label": label, **row}
    result[f"{name}_plaid_recall"] = search["plaid_recall@100_vs_exact"]
    result[f"{name}_plaid_sweep"] = search["plaid_sweep"]
    if (workdir / "wall_clock.json").exists():  # run_config keeps it, --tabulate reads it
      result[f"{name}_minutes"] = json.loads((workdir / "wall_clock.json").read_text())["seconds"] / 60
  for name, spec in ABLATIONS.items():
    workdir = RUNS / name
    if not args.tabulate:
      run_config(spec, workdir, ["--config.evals.test.at_start=True"])
    if not (workdir / "results.json").exists():
      continue
    for when, file, label in (("before", "results_before.json", "before training"),
                              ("after", "results.json", "trained")):
      row = json.loads((workdir / file).read_text())["results"][0]
      result[f"{name}_{when}"] = {"label": f"ColBERT, random projection (`{spec}`), {label}",
                                  **row}
  write(result)


def write(result: dict) -> None:
  rows = {k: v for k, v in result.items() if isinstance(v, dict)}
  dense = rows["dense_hardneg"]["metrics"]["ndcg@10"]
  lines = ["# Multi-vector (ColBERT) against dense on SciFact, same data and steps", "",
           "`python experiments/multivector.py`. SciFact test, 300 queries, 5,183 documents. Both "
           "models start from all-MiniLM-L6-v2 and train 87 steps (batch 32, lr 5e-5) on SciFact "
           "train with one hard negative per pair from the same file. Bytes per document are the "
           "stored vectors (float32; PLAID adds a 2-byte centroid id per token).", "",
           "| model | nDCG@10 | Recall@100 | bytes/doc | ms/query |", "|---|---|---|---|---|"]
  for r in rows.values():
    m = r["metrics"]
    lines.append(f"| {r['label']} | {m['ndcg@10']:.4f} | {m['recall@100']:.4f} | "
                 f"{r['bytes_per_doc']:,.0f} | {r['ms_per_query']:.2f} |")
  trained = rows.get("colbert_multivector")
  if trained:
    delta = trained["metrics"]["ndcg@10"] - dense
    lines += ["", f"- ColBERT against dense hardneg: {delta:+.4f} nDCG@10 "
                  f"({'beats it' if delta > 0 else 'does not beat it'}).",
              f"- PLAID: recall@100 of its results against exact MaxSim "
              f"{result['colbert_plaid_recall']:.3f} (target >= 0.95)."]
    lines += ["", "PLAID's operating points on the same index (candidates re-ranked by exact MaxSim; "
                  "the PLAID row above uses the defaults, nprobe 8 and 1,024 candidates):", "",
              "| nprobe | candidates | recall@100 vs exact | nDCG@10 | ms/query |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['nprobe']} | {r['ncandidates']:,} | {r['recall@100_vs_exact']:.3f} | "
              f"{r['ndcg@10']:.4f} | {r['ms_per_query']:.1f} |"
              for r in result.get("colbert_plaid_sweep", [])]
    lines.append("")
    if "colbert_minutes" in result:
      lines.append(f"- ColBERT training wall clock, evaluation included: "
                   f"{result['colbert_minutes']:.0f} min.")
  OUT.mkdir(parents=True, exist_ok=True)
  (OUT / "multivector.md").write_text("\n".join(lines) + "\n")
  (OUT / "multivector.json").write_text(json.dumps(result, indent=2) + "\n")
  plot_ndcg_vs_bytes([(r["label"], r["bytes_per_doc"], r["metrics"]["ndcg@10"],
                       "x" if "before training" in r["label"] else "o") for r in rows.values()],
                     OUT / "ndcg_vs_bytes.png")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
