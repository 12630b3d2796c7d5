"""bfloat16 compute against float32: the hardneg recipe (all-MiniLM-L6-v2, SciFact train) trained
with `config.dtype = "bfloat16"` (parameters, AdamW state, embeddings and losses float32) and
with float32, each evaluated in float32 on SciFact test. Writes
experiments/results/precision/{precision.md,precision.json}.

    EMBED_JAX_DATA=../shared/data python experiments/precision.py

Each training runs in its own process (runs/precision/<dtype>), resumable. On a CPU bfloat16 is
no faster (XLA:CPU's bf16 matmuls run at about the float32 rate); the point is the quality gap a
TPU or GPU run would see. Target: within 0.005 nDCG@10 of float32.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import REPO, RESULTS, run_config  # noqa: E402

OUT = RESULTS / "precision"
RUNS = {"float32": Path("runs/precision/float32"), "bfloat16": Path("runs/precision/bfloat16")}


def main():
  if len(sys.argv) == 2:  # one training, in this process
    dtype = sys.argv[1]
    run_config("scifact_hardneg", RUNS[dtype], [f"--config.dtype={dtype}",
                                                "--config.data.mine.enabled=False"])
    return
  from experiments.multivector import ensure_negatives
  ensure_negatives()
  for dtype in RUNS:
    if not (RUNS[dtype] / "results.json").exists():
      subprocess.run([sys.executable, __file__, dtype], check=True, cwd=REPO)
  rows = {}
  for dtype, workdir in RUNS.items():
    r = json.loads((workdir / "results.json").read_text())["results"][0]
    clock = json.loads((workdir / "wall_clock.json").read_text())["seconds"] / 60
    rows[dtype] = {"ndcg@10": r["metrics"]["ndcg@10"], "recall@100": r["metrics"]["recall@100"],
                   "train_minutes": round(clock, 1)}
  gap = rows["bfloat16"]["ndcg@10"] - rows["float32"]["ndcg@10"]
  lines = ["| compute dtype | nDCG@10 | Recall@100 | training (min) |", "|---|---|---|---|"]
  lines += [f"| {d} | {v['ndcg@10']:.4f} | {v['recall@100']:.4f} | {v['train_minutes']} |"
            for d, v in rows.items()]
  lines.append(f"\nbfloat16 - float32: {gap:+.4f} nDCG@10 (target: within 0.005: "
               f"{'met' if abs(gap) <= 0.005 else 'missed'})")
  OUT.mkdir(parents=True, exist_ok=True)
  (OUT / "precision.json").write_text(json.dumps({"rows": rows, "gap": gap}, indent=2) + "\n")
  (OUT / "precision.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
