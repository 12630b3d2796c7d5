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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import RESULTS, run_config  # noqa: E402
from experiments.st_check import st_evaluate  # noqa: E402

OUT = RESULTS / "contrastive"
ZERO_SHOT = RESULTS / "zeroshot" / "minilm_scifact_test.json"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--configs", default="scifact_mnrl,scifact_hardneg")
  p.add_argument("--runs", default="runs")
  args = p.parse_args()
  rows = []
  for name in args.configs.split(","):
    summary = run_config(name, Path(args.runs) / name)
    results = json.loads((Path(summary["workdir"]) / "results.json").read_text())
    row = {"config": summary["config"], "workdir": summary["workdir"],
           "wall_clock_min": summary["wall_clock_min"], "steps": summary["total_steps"],
           "embed_jax": results["results"][0]["metrics"],
           "model_fingerprint": results["settings"]["model_fingerprint"], "export": summary["export"]}
    row["sentence_transformers"] = st_evaluate(row["export"])
    OUT.mkdir(parents=True, exist_ok=True)  # the run's full test metrics and settings
    (OUT / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
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
