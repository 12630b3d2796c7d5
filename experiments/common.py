"""What every experiment script shares: train a config in a workdir (resuming), with its wall
clock; the metrics of a trained model at given Matryoshka dims."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "experiments" / "results"


def run_config(spec: str, workdir: str | os.PathLike, overrides: list[str] = ()) -> dict:
  """Trains `configs/<spec>` ("name" or "name:arg") in `workdir`, resuming what is done (a
  finished run is not repeated). Returns the training summary plus `wall_clock_min`, summed over
  the invocations that trained (kept in <workdir>/wall_clock.json), those that died included."""
  from embed_jax.cli import load_config
  from embed_jax.train import train
  name, _, arg = spec.partition(":")
  config_path = f"configs/{name}.py" + (f":{arg}" if arg else "")
  workdir = Path(workdir)
  clock, partial = workdir / "wall_clock.json", workdir / "wall_clock.partial.json"
  spent = json.loads(clock.read_text())["seconds"] if clock.exists() else 0.0
  if partial.exists():  # an invocation that died (killed, crashed) still spent its time
    spent += json.loads(partial.read_text())["seconds"]
    clock.write_text(json.dumps({"seconds": spent}) + "\n")
    partial.unlink()
  workdir.mkdir(parents=True, exist_ok=True)
  t = time.perf_counter()
  stop = threading.Event()

  def tick():  # every 30 s, so a crash loses at most that much of the clock
    while not stop.wait(30):
      partial.write_text(json.dumps({"seconds": time.perf_counter() - t}) + "\n")

  ticker = threading.Thread(target=tick, daemon=True)
  ticker.start()
  try:
    config = load_config(str(REPO / config_path), list(overrides))
    summary = train(config, workdir)
  finally:
    stop.set()
    ticker.join()
  if summary["steps_run"]:
    spent += time.perf_counter() - t
    clock.write_text(json.dumps({"seconds": spent}) + "\n")
  partial.unlink(missing_ok=True)
  return {**summary, "wall_clock_min": spent / 60, "config": config_path}


def metrics_at_dims(workdir: str | os.PathLike, dims, dataset: str = "scifact") -> dict[int, dict]:
  """float32 test metrics of <workdir>/export at each of `dims`: from its results.json where it
  has them, else by evaluating the export (cached in <workdir>/results_dims.json)."""
  workdir = Path(workdir)
  have = {}
  for name in ("results.json", "results_dims.json"):
    if (workdir / name).exists():
      for r in json.loads((workdir / name).read_text())["results"]:
        if r["representation"] == "float32":
          have[r["dims"]] = r["metrics"]
  missing = sorted(set(dims) - set(have), reverse=True)
  if missing:
    import embed_jax
    from embed_jax.data import load_beir
    from embed_jax.evaluate import evaluate_retrieval
    model = embed_jax.load(workdir / "export")
    out = evaluate_retrieval(model, load_beir(dataset), "test", dims=missing, batch_size=64)
    (workdir / "results_dims.json").write_text(json.dumps(out, indent=2) + "\n")
    have.update({r["dims"]: r["metrics"] for r in out["results"]})
  return {d: have[d] for d in dims}


CARRIED = " (earlier run)"  # a committed table's row kept: its run folder is not on this machine


def carried(label: str) -> str:
  """`label` marked (once) as a row kept from the committed table."""
  return label.replace(CARRIED, "") + CARRIED


def cached(path: Path, compute):
  """The JSON at `path`, or compute() written there (its folder made) and returned."""
  if path.exists():
    return json.loads(path.read_text())
  out = compute()
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out) + "\n")
  return out


def plot_ndcg_vs_bytes(points, path: Path, xlabel: str = "bytes per document (log)",
                       legend: str = "lower left") -> None:
  """A scatter of SciFact test nDCG@10 against bytes per document (log x) of (label, bytes,
  ndcg, marker) points; the config names in the labels (" (`x.py` ...)") stay in the tables."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib missing (pip install -e .[plots]): no plot")
    return
  import re
  outside = legend == "outside"  # many points: the legend beside the axes, not over them
  fig, ax = plt.subplots(figsize=(12, 5) if outside else (7, 4.5))
  for i, (label, x, y, marker) in enumerate(points):
    ax.scatter(x, y, label=re.sub(r" \(`[^`]*`[^)]*\)", "", label), marker=marker,
               color=plt.cm.tab20(i % 20) if outside else None)
  if outside:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  else:
    ax.legend(fontsize=7 if len(points) < 10 else 6, loc=legend)
  ax.set_xscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel("SciFact test nDCG@10")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
