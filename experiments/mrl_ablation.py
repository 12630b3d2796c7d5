"""The MRL ablation on SciFact: does a Matryoshka model at d dims match a model trained for d dims
alone, and how much does truncating an ordinary model lose? (Kusupati et al., 2022)

    EMBED_JAX_DATA=../shared/data python experiments/mrl_ablation.py [--only mrl_pairs,ff64] \
        [--tabulate]

Methods, all from all-MiniLM-L6-v2 with the recipe of configs/scifact_mnrl.py (MNRL, batch 32,
lr 5e-5, 3 epochs), each evaluated on SciFact test at every dim it supports:
  base      the untouched model, truncated (experiments/results/zeroshot)
  plain     (a) configs/scifact_mnrl.py, truncated
  mrl_pairs (b) configs/scifact_mrl.py:nopca, MRL at 384/256/128/64/32 on the labelled pairs
  ff<d>     (c) configs/scifact_ff.py:<d>, one model per d with a learned projection (FF)
  mrl_sd    (d) configs/scifact_mrl.py:nopca,sd, MRL plus prefix self-distillation on the corpus
  mrl_pca   (e) configs/scifact_mrl.py (as committed), MRL starting from a rotation onto the principal axes of
            the starting model's corpus embeddings (a Dense 384 -> 384 head, trained and exported)
  plain_pca     (a) with its output rotated onto the principal axes of its corpus embeddings (an
                orthogonal map fitted without labels, no training): 384-dim scores unchanged
Each trains in runs/mrl_ablation/<method> (re-running resumes; `plain` shares runs/scifact_mnrl).
Writes experiments/results/mrl_ablation/{ablation.md,ablation.json,ndcg_vs_dims.png}. The claims
are checked on configs/scifact_mrl.py (the best MRL recipe found) and printed as they come out: the table is the result.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import RESULTS, metrics_at_dims, run_config  # noqa: E402

DIMS = (384, 256, 128, 64, 32)
OUT = RESULTS / "mrl_ablation"
RUNS = Path("runs")
# method -> (label, config spec, workdir, dims it supports)
METHODS = {
    "plain": ("(a) MNRL, truncated", "scifact_mnrl", RUNS / "scifact_mnrl", DIMS),
    "mrl_pairs": ("(b) MRL on the pairs", "scifact_mrl:nopca", RUNS / "mrl_ablation" / "mrl_pairs", DIMS),
    **{f"ff{d}": (f"(c) FF {d}", f"scifact_ff:{d}", RUNS / "mrl_ablation" / f"ff{d}", (d,))
       for d in DIMS[1:]},
    "mrl_sd": ("(d) MRL + self-distillation", "scifact_mrl:nopca,sd", RUNS / "mrl_ablation" / "mrl_sd", DIMS),
    "mrl_pca": ("(e) MRL from a PCA rotation", "scifact_mrl", RUNS / "mrl_ablation" / "mrl_pca", DIMS),
}
BEST = "mrl_pca"  # configs/scifact_mrl.py as committed: (e) scored above (b) and (d) at every dim
MRL = ("mrl_pairs", "mrl_sd", "mrl_pca")


def zero_shot() -> dict[int, dict]:
  rows = json.loads((RESULTS / "zeroshot" / "minilm_scifact_test.json").read_text())["results"]
  return {r["dims"]: r["metrics"] for r in rows if r["representation"] == "float32"}


def collect(methods, train: bool) -> dict:
  out = {"base": {"label": "all-MiniLM-L6-v2, truncated", "dims": zero_shot()}}
  for key in methods:
    label, spec, workdir, dims = METHODS[key]
    if not (workdir / "export").exists() and not train:
      continue
    if train:
      minutes = run_config(spec, workdir)["wall_clock_min"]
    else:
      clock = workdir / "wall_clock.json"
      minutes = json.loads(clock.read_text())["seconds"] / 60 if clock.exists() else None
    out[key] = {"label": label, "config": spec, "workdir": str(workdir), "wall_clock_min": minutes,
                "dims": metrics_at_dims(workdir, dims)}
  # FF at 384 dims is the plain model (no projection needed).
  ff = {d: out[f"ff{d}"]["dims"][d] for d in DIMS[1:] if f"ff{d}" in out}
  if "plain" in out:
    ff[384] = out["plain"]["dims"][384]
  if ff:
    out["ff"] = {"label": "(c) FF, one model per d", "dims": dict(sorted(ff.items(), reverse=True))}
  if "plain" in out:
    out["plain_pca"] = {"label": "(a) + PCA rotation, no training", "dims": pca_rotated(METHODS["plain"][2])}
  return out


def pca_rotated(workdir: Path) -> dict[int, dict]:
  """Test metrics at each of DIMS of <workdir>/export with its (unit) output rotated onto the
  principal axes of its corpus embeddings, largest variance first. The rotation is orthogonal, so
  the full-dim scores are unchanged; it is fitted on the corpus texts alone (no labels), as a
  deployment could fit it on the collection it indexes. Cached in <workdir>/results_pca.json."""
  cache = workdir / "results_pca.json"
  if not cache.exists():
    import embed_jax
    from embed_jax.data import load_beir
    from embed_jax.evaluate import evaluate_embeddings
    from embed_jax.models.heads import principal_axes
    model, data = embed_jax.load(workdir / "export"), load_beir("scifact")
    qrels = data.qrels("test")
    query_ids = [q for q in data.queries if q in qrels]
    docs_NxD = model.encode(data.corpus_texts(" "), batch_size=64, normalize=True)
    queries_QxD = model.encode([data.queries[q] for q in query_ids], batch_size=64, normalize=True)
    rotation_DxD = principal_axes(docs_NxD)
    results = evaluate_embeddings(queries_QxD @ rotation_DxD, query_ids, docs_NxD @ rotation_DxD,
                                  data.corpus_ids, qrels, dims=DIMS)
    cache.write_text(json.dumps({"results": results}, indent=2) + "\n")
  rows = json.loads(cache.read_text())["results"]
  return {r["dims"]: r["metrics"] for r in rows}


def claims(res: dict) -> list[tuple[str, bool | None, str]]:
  """The issue's claims, each (statement, held?, numbers); None when a run is missing."""
  nd = lambda key, d: res.get(key, {}).get("dims", {}).get(d, {}).get("ndcg@10")  # noqa: E731
  out = []
  plain = nd("plain", 384)
  for key in MRL:
    name = "configs/scifact_mrl.py" + (f" ({METHODS[key][0]})" if key == BEST else f":{METHODS[key][1].partition(':')[2]}")
    full, at64 = nd(key, 384), nd(key, 64)
    if full and at64 and plain:
      out.append((f"{name} keeps >= 95% of its 384-dim nDCG@10 at 64 dims", at64 / full >= 0.95,
                  f"{at64:.4f} / {full:.4f} = {at64 / full:.1%}"))
      out.append((f"{name}: 384-dim nDCG@10 >= plain MNRL's - 0.005", full >= plain - 0.005,
                  f"{full:.4f} vs {plain:.4f} ({full - plain:+.4f})"))
  for key in MRL:
    gaps = {d: nd(key, d) - nd("ff", d) for d in DIMS if nd(key, d) and nd("ff", d)}
    if gaps:
      worst = min(gaps.values())
      out.append((f"{METHODS[key][0]} is within 0.010 of FF at every d", worst >= -0.010,
                  ", ".join(f"{d}: {g:+.4f}" for d, g in gaps.items())))
    beats = {d: nd(key, d) - nd("plain", d) for d in (64, 32) if nd(key, d) and nd("plain", d)}
    if beats:
      out.append((f"{METHODS[key][0]} beats truncated plain MNRL by >= 0.030 at 64 dims and below",
                  min(beats.values()) >= 0.030,
                  ", ".join(f"{d}: {g:+.4f}" for d, g in beats.items())))
  return out


def write(res: dict, st_check: dict | None) -> None:
  OUT.mkdir(parents=True, exist_ok=True)
  order = ["base", "plain", "plain_pca", "mrl_pairs", "ff", "mrl_sd", "mrl_pca"]
  lines = ["# Matryoshka ablation on SciFact (all-MiniLM-L6-v2)", "",
           "`python experiments/mrl_ablation.py`; SciFact test, 300 queries, 5,183 documents, "
           "cosine over the first d dims (re-normalised). nDCG@10:", "",
           "| method | " + " | ".join(str(d) for d in DIMS) + " | 64 as % of 384 |",
           "|---|" + "---|" * (len(DIMS) + 1)]
  for key in order:
    if key not in res:
      continue
    row = res[key]["dims"]
    cells = [f"{row[d]['ndcg@10']:.4f}" if d in row else "" for d in DIMS]
    keep = f"{row[64]['ndcg@10'] / row[384]['ndcg@10']:.1%}" if 64 in row and 384 in row else ""
    lines.append(f"| {res[key]['label']} | " + " | ".join(cells) + f" | {keep} |")
  lines += ["", "Recall@100:", "", "| method | " + " | ".join(str(d) for d in DIMS) + " |",
            "|---|" + "---|" * len(DIMS)]
  for key in order:
    if key in res:
      row = res[key]["dims"]
      lines.append(f"| {res[key]['label']} | " + " | ".join(
          f"{row[d]['recall@100']:.4f}" if d in row else "" for d in DIMS) + " |")
  lines += ["", "Claims (checked on configs/scifact_mrl.py and each MRL variant):", ""]
  for text, held, numbers in claims(res):
    lines.append(f"- {'HOLDS' if held else 'DOES NOT HOLD'}: {text} ({numbers})")
  if st_check:
    lines += ["", f"sentence-transformers, `SentenceTransformer(export, truncate_dim=64)` on the "
              f"configs/scifact_mrl.py export: nDCG@10 {st_check['ndcg@10']:.4f} "
              f"(embed_jax at 64 dims: {st_check['embed_jax']:.4f}, difference "
              f"{st_check['ndcg@10'] - st_check['embed_jax']:+.4f})."]
  runs = [f"- {r['label']}: `{r['config']}`, {r['wall_clock_min']:.0f} min" for k, r in res.items()
          if r.get("wall_clock_min")]
  if runs:
    lines += ["", "Training runs (wall clock on the 2-core CPU, test evaluation included):", "", *runs]
  (OUT / "ablation.md").write_text("\n".join(lines) + "\n")
  (OUT / "ablation.json").write_text(json.dumps(
      {"methods": {k: {**v, "dims": {str(d): m for d, m in v["dims"].items()}} for k, v in res.items()},
       "claims": [{"claim": c, "holds": h, "numbers": n} for c, h, n in claims(res)],
       "sentence_transformers_truncate_dim_64": st_check}, indent=2) + "\n")
  plot(res, order)
  print("\n".join(lines))


def plot(res: dict, order) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  styles = {"base": ":", "plain": "--", "plain_pca": ":", "ff": "-.", "mrl_pairs": "-", "mrl_sd": "-", "mrl_pca": "-"}
  for key in order:
    if key not in res or len(res[key]["dims"]) < 2:
      continue
    dims = sorted(res[key]["dims"])
    ax.plot(dims, [res[key]["dims"][d]["ndcg@10"] for d in dims], styles[key], marker="o",
            label=res[key]["label"])
  ax.set_xscale("log", base=2)
  ax.set_xticks(DIMS, [str(d) for d in DIMS])
  ax.set_xlabel("embedding dims (prefix)")
  ax.set_ylabel("SciFact test nDCG@10")
  ax.set_title("Matryoshka ablation, all-MiniLM-L6-v2 on SciFact")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(OUT / "ndcg_vs_dims.png", dpi=120)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--only", default="", help="comma-separated methods to train (default: all)")
  p.add_argument("--tabulate", action="store_true", help="no training: tabulate what exists")
  args = p.parse_args()
  methods = [m for m in (args.only.split(",") if args.only else METHODS) if m]
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
  res = collect(METHODS if args.tabulate else methods, train=not args.tabulate)
  st = None
  best_dir = METHODS[BEST][2]
  if BEST in res:
    cache = best_dir / "st_truncate64.json"
    if not cache.exists():
      from experiments.st_check import st_evaluate
      cache.write_text(json.dumps(st_evaluate(best_dir / "export", truncate_dim=64)) + "\n")
    st = {**json.loads(cache.read_text()), "embed_jax": res[BEST]["dims"][64]["ndcg@10"]}
  write(res, st)


if __name__ == "__main__":
  main()
