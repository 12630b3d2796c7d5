"""Contrastive fine-tuning of all-MiniLM-L6-v2 on SciFact, and the check of each export through
sentence-transformers; writes experiments/results/contrastive/{summary.md,summary.json}.

    EMBED_JAX_DATA=../shared/data python experiments/contrastive.py \
        [--configs scifact_mnrl,scifact_hardneg] [--runs runs]

Each config trains in runs/<name> (re-running resumes; a finished run is not repeated), its
export is then loaded by sentence-transformers and evaluated on SciFact test. Wall clock is summed
over the invocations that trained the run (runs/<name>/wall_clock.json). Run it on an idle
machine: the wall clock is part of the result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments.st_check import st_evaluate  # noqa: E402

OUT = REPO / "experiments" / "results" / "contrastive"
ZERO_SHOT = REPO / "experiments" / "results" / "zeroshot" / "minilm_scifact_test.json"


def run_config(name: str, runs: Path) -> dict:
  from embed_jax.cli import load_config
  from embed_jax.train import train
  workdir = runs / name
  clock = workdir / "wall_clock.json"
  spent = json.loads(clock.read_text())["seconds"] if clock.exists() else 0.0
  t = time.perf_counter()
  summary = train(load_config(str(REPO / "configs" / f"{name}.py"), []), workdir)
  if summary.get("steps_run", 1):  # only time invocations that did work
    spent += time.perf_counter() - t
    workdir.mkdir(parents=True, exist_ok=True)
    clock.write_text(json.dumps({"seconds": spent}) + "\n")
  results = json.loads((workdir / "results.json").read_text())
  return {"config": f"configs/{name}.py", "workdir": str(workdir), "wall_clock_min": spent / 60,
          "steps": summary["total_steps"], "embed_jax": results["results"][0]["metrics"],
          "model_fingerprint": results["settings"]["model_fingerprint"],
          "export": summary["export"]}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--configs", default="scifact_mnrl,scifact_hardneg")
  p.add_argument("--runs", default="runs")
  args = p.parse_args()
  rows = []
  for name in args.configs.split(","):
    row = run_config(name, Path(args.runs))
    row["sentence_transformers"] = st_evaluate(row["export"])
    row["ndcg@10_difference"] = row["sentence_transformers"]["ndcg@10"] - row["embed_jax"]["ndcg@10"]
    rows.append(row)
    print(f"{name}: nDCG@10 {row['embed_jax']['ndcg@10']:.4f} (sentence-transformers "
          f"{row['sentence_transformers']['ndcg@10']:.4f}), {row['wall_clock_min']:.1f} min")

  zero = json.loads(ZERO_SHOT.read_text())["results"][0]["metrics"]
  lines = ["# Contrastive fine-tuning of all-MiniLM-L6-v2 on SciFact", "",
           "`python experiments/contrastive.py` (each config: `embed-jax train --config "
           "configs/<name>.py --workdir runs/<name>`). SciFact test, 300 queries, 5,183 documents; "
           "the export re-evaluated through sentence-transformers (PyTorch).", "",
           "| model | nDCG@10 | Recall@100 | nDCG@10 via sentence-transformers | wall clock |",
           "|---|---|---|---|---|",
           f"| all-MiniLM-L6-v2, zero-shot | {zero['ndcg@10']:.4f} | {zero['recall@100']:.4f} | "
           "0.6451 (MTEB) | |"]
  for r in rows:
    lines.append(f"| {r['config']} ({r['steps']} steps) | {r['embed_jax']['ndcg@10']:.4f} | "
                 f"{r['embed_jax']['recall@100']:.4f} | {r['sentence_transformers']['ndcg@10']:.4f} "
                 f"({r['ndcg@10_difference']:+.4f}) | {r['wall_clock_min']:.1f} min |")
  OUT.mkdir(parents=True, exist_ok=True)
  (OUT / "summary.md").write_text("\n".join(lines) + "\n")
  (OUT / "summary.json").write_text(json.dumps({"zero_shot": zero, "runs": rows}, indent=2) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
