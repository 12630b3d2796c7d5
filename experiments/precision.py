"""bfloat16 compute against float32: the hardneg recipe (all-MiniLM-L6-v2, SciFact train, 10% of
the train queries held out as dev) trained with `config.dtype = "bfloat16"` (parameters, AdamW
state, embeddings and losses float32) and with float32, both exports evaluated in float32 on
SciFact test in this process. Writes experiments/results/precision/{precision.md,precision.json}.

    EMBED_JAX_DATA=../shared/data python experiments/precision.py

The float32 run is the dense hardneg run of experiments/sparse.py and experiments/rerank_distill.py
(runs/sparse/dense_hardneg, trained here if missing); the bfloat16 run differs from it in the
dtype only (runs/precision/bfloat16). Each training runs in its own process, resumable. On a CPU
bfloat16 is no faster (XLA:CPU's bf16 matmuls run at about the float32 rate); the point is the
quality gap a TPU or GPU run would see. Target: within 0.005 nDCG@10 of float32.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import REPO, RESULTS, run_config  # noqa: E402

OUT = RESULTS / "precision"
RUNS = {"float32": Path("runs/sparse/dense_hardneg"), "bfloat16": Path("runs/precision/bfloat16")}
SAME = ["--config.data.dev_fraction=0.1", "--config.evals.test.at_end=False",
        "--config.data.mine.enabled=False"]  # as experiments/sparse.py's dense run


def main():
  if len(sys.argv) == 2:  # one training, in this process
    dtype = sys.argv[1]
    run_config("scifact_hardneg", RUNS[dtype], SAME + [f"--config.dtype={dtype}"])
    return
  from experiments.multivector import ensure_negatives
  ensure_negatives()
  for dtype in RUNS:
    if not (RUNS[dtype] / "export").exists():
      subprocess.run([sys.executable, __file__, dtype], check=True, cwd=REPO)
  from embed_jax.data import load_beir
  from embed_jax.rerank import first_stage
  data = load_beir("scifact")
  rows = {}
  for dtype, workdir in RUNS.items():
    _, r = first_stage(str(workdir / "export"), data, "test", data.qrels("test"), top=100,
                       batch_size=64, cache=workdir / "first_stage_test.json")
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
