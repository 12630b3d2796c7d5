"""LoRA against full fine-tuning on SciFact (issue #21): ranks 4, 16 and 64 on the attention
projections and on attention + feed-forward, the scifact_mnrl recipe (MNRL, batch 32, 3 epochs).

    EMBED_JAX_DATA=../shared/data python experiments/lora.py [--only r16,r16_ffn] [--tabulate]

Each training runs in its own process, resumable (runs/lora/<name>; full fine-tuning is
configs/scifact_mnrl.py in runs/lora/full). Test nDCG@10 from each run's results.json. Then, in
one process on the real all-MiniLM-L6-v2: trained parameters and their share, optimiser-state
bytes and train-step time (best of 3 after compiling, the same batch) of every setting, as ratios
to full fine-tuning measured in that process, and the step of the feed-forward settings with
those adapters merged into their kernels in the step (`merged`); checkpoint bytes from each run's
last checkpoint. The step times are cached in runs/lora/speed.json: delete it to measure again.
Writes experiments/results/lora/{lora.md,lora.json}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import REPO, RESULTS, run_config  # noqa: E402

OUT = RESULTS / "lora"
RUNS = Path("runs/lora")
# The grid at learning rate 2e-3 (the config's `hi`) first, the settings nearest the target
# (<= 3% trained) first within it, so a cut-short run has them; then the grid at 5e-4, where
# rank 16 under-fits in 87 steps.
SETTINGS = {"full": "scifact_mnrl",
            **{f"r{r}{s}_hi": f"scifact_lora:r{r}{',ffn' if s else ''},hi"
               for r in (16, 4, 64) for s in ("", "_ffn")},
            **{f"r{r}{s}": f"scifact_lora:r{r}{',ffn' if s else ''}"
               for r in (16, 4, 64) for s in ("", "_ffn")}}
# Step time only: the feed-forward adapters merged into their kernels inside the step
# (lora.merge_in_step), which computes the same values and gradients as the branch beside them.
MERGED = {f"r{r}_ffn_merged": f"scifact_lora:r{r},ffn,merged" for r in (16, 4, 64)}


def same_cost(name: str) -> str:
  """The settings that differ only in learning rate share this key: the same step and memory."""
  return name.removesuffix("_hi")


def speed(reps: int = 3) -> dict:
  """{setting: {trained, total, opt_state_bytes, step_ms}} in this process, one real batch."""
  import jax
  import numpy as np

  from embed_jax import lora, train as T
  from embed_jax.cli import load_config
  from embed_jax.data import inputs
  from embed_jax.embedder import Embedder
  from embed_jax.models import SentenceEncoder, heads
  from embed_jax.objective import build_objective
  from embed_jax import representations
  out = {}
  batch = None
  for name, spec in {**SETTINGS, **MERGED}.items():
    twin = next((n for n in out if same_cost(n) == same_cost(name)), None)
    if twin:  # the learning rate changes no cost
      out[name] = dict(out[twin])
      continue
    cname, _, arg = spec.partition(":")
    c = load_config(str(REPO / f"configs/{cname}.py") + (f":{arg}" if arg else ""), [])
    c.dropout = False
    cfg, params, tok, _ = heads.load_model(c, RUNS / name.removesuffix("_merged"))
    module = SentenceEncoder(cfg)
    if batch is None:
      rep = representations.get(c, cfg, tok)
      data = inputs.build(c, cfg, tok, Embedder(cfg, params, tok), RUNS / name,
                          *inputs.check(c), rep)
      batch = data.loader.batch(0)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    trained = total
    if c.lora.r:
      spec_ = lora.LoraSpec.from_config(c.lora)
      adapters = lora.init_adapters(params, cfg, spec_, jax.random.key(0))
      params = {**params, "lora": lora.nest(adapters)}
      c.optim.freeze = "encoder/.*"
      trained = lora.count(adapters)
    tx, schedule = T.make_optimizer(c.optim, 100)
    step = jax.jit(T.make_train_step(module, build_objective(c), c, tx, schedule))
    state = T.init_state(params, tx, 0)
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
    state, m = step(state, batch)  # compile
    jax.block_until_ready(m)
    best = float("inf")
    for _ in range(reps):
      t = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready(m)
      best = min(best, time.perf_counter() - t)
    out[name] = {"trained": trained, "total": total, "opt_state_bytes": opt_bytes,
                 "step_ms": round(best * 1e3, 1)}
    print(name, out[name], flush=True)
  return out


def checkpoint_bytes(workdir: Path) -> int | None:
  steps = sorted((workdir / "checkpoints").glob("[0-9]*"), key=lambda p: int(p.name))
  return sum(f.stat().st_size for f in steps[-1].rglob("*") if f.is_file()) if steps else None


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--only", default="", help="comma-separated settings to train (default: all)")
  p.add_argument("--tabulate", action="store_true", help="no training: tabulate what exists")
  p.add_argument("--stage", choices=list(SETTINGS), help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.stage:
    run_config(SETTINGS[args.stage], RUNS / args.stage)
    return
  if not args.tabulate:
    for name in [s for s in SETTINGS if not args.only or s in args.only.split(",")]:
      if not (RUNS / name / "results.json").exists():
        subprocess.run([sys.executable, __file__, "--stage", name], check=True, cwd=REPO)
  speeds = json.loads((RUNS / "speed.json").read_text()) if (RUNS / "speed.json").exists() else None
  if speeds is None:
    speeds = speed()
    (RUNS / "speed.json").write_text(json.dumps(speeds, indent=2) + "\n")
  full = speeds["full"]
  rows = {}
  for name in SETTINGS:
    res = RUNS / name / "results.json"
    ndcg = json.loads(res.read_text())["results"][0]["metrics"]["ndcg@10"] if res.exists() else None
    s = speeds[name]
    clock = RUNS / name / "wall_clock.json"
    rows[name] = {"config": SETTINGS[name], "ndcg@10": ndcg, "trained_share": s["trained"] / s["total"],
                  "trained": s["trained"], "opt_state_ratio": s["opt_state_bytes"] / full["opt_state_bytes"],
                  "step_time_ratio": s["step_ms"] / full["step_ms"], "step_ms": s["step_ms"],
                  "checkpoint_bytes": checkpoint_bytes(RUNS / name),
                  "train_minutes": round(json.loads(clock.read_text())["seconds"] / 60, 1)
                  if clock.exists() else None}
  ck_full = rows["full"]["checkpoint_bytes"]
  lines = ["| setting | nDCG@10 | vs full | trained params | share | optimiser state | checkpoint "
           "| step time | training (min) |", "|---|---|---|---|---|---|---|---|---|"]
  for name, r in rows.items():
    gap = "" if r["ndcg@10"] is None or rows["full"]["ndcg@10"] is None else \
        f"{r['ndcg@10'] - rows['full']['ndcg@10']:+.4f}"
    ck = "" if not (r["checkpoint_bytes"] and ck_full) else f"{r['checkpoint_bytes'] / ck_full:.3f}x"
    lines.append(f"| {name} (`{r['config']}`) | "
                 f"{'not trained' if r['ndcg@10'] is None else format(r['ndcg@10'], '.4f')} "
                 f"| {gap} | {r['trained']:,} | {100 * r['trained_share']:.2f}% | "
                 f"{r['opt_state_ratio']:.3f}x | {ck} | {r['step_time_ratio']:.2f}x "
                 f"({r['step_ms']:.0f} ms) | {r['train_minutes'] or ''} |")
  merged = {}
  if all(m in speeds for m in MERGED):
    lines += ["", "Feed-forward adapters merged into their kernels inside the step "
              "(`lora.merge_in_step=ffn`, config variant `merged`; the same values and gradients, "
              "so the nDCG above holds; step time as a ratio to full fine-tuning, same run):", "",
              "| setting | beside the kernels | merged in the step |", "|---|---|---|"]
    for m in MERGED:
      name = m.removesuffix("_merged")
      merged[name] = {"config": MERGED[m], "step_ms": speeds[m]["step_ms"],
                      "step_time_ratio": speeds[m]["step_ms"] / full["step_ms"]}
      lines.append(f"| {name} | {rows[name]['step_time_ratio']:.2f}x ({rows[name]['step_ms']:.0f} ms) "
                   f"| {merged[name]['step_time_ratio']:.2f}x ({merged[name]['step_ms']:.0f} ms) |")
  OUT.mkdir(parents=True, exist_ok=True)
  (OUT / "lora.json").write_text(json.dumps({**rows, "merged_in_step": merged}, indent=2) + "\n")
  (OUT / "lora.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
