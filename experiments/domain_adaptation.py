"""Domain adaptation on SciFact: does MLM pre-training on the corpus, or multi-task training with
general STS and NLI data, help contrastive fine-tuning, and what does each do to general quality?
Writes experiments/results/domain_adaptation/{domain_adaptation.md,.json,.png}.

    EMBED_JAX_DATA=../shared/data python experiments/domain_adaptation.py

Rows, all from all-MiniLM-L6-v2 (runs resume; a finished run is not repeated):
  (a) the base model
  (b) contrastive only: configs/scifact_mnrl.py (runs/scifact_mnrl)
  (c) MLM then contrastive: configs/scifact_mlm.py (one epoch over the corpus) then
      configs/scifact_mlm_then_mnrl.py (the same 87 contrastive steps as (b)); the base
      encoder's held-out perplexity comes from configs/scifact_mlm.py:probe (encoder frozen,
      only the head trained on the same windows at the same rate), since the base model has
      no MLM head
  (d) multi-task: configs/scifact_multitask.py (the same 87 steps and SciFact batches as (b),
      plus STS-B train pairs with CoSENT and SNLI dev triplets each step)
  (d') the same with the STS-B loss weighted 0.07 (configs/scifact_multitask.py:balanced), which
      puts the three tasks' first-step gradient norms on one scale
Each is scored on SciFact test (nDCG@10, Recall@100) and on STS-B test (cosine Spearman, as
MTEB), where losing general quality (catastrophic forgetting) shows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import RESULTS, run_config  # noqa: E402

RUNS = Path("runs/domain")
OUT = RESULTS / "domain_adaptation"
LABELS = {"a": "(a) all-MiniLM-L6-v2, base", "b": "(b) contrastive only (MNRL)",
          "c": "(c) MLM on the corpus, then contrastive", "d": "(d) multi-task: MNRL + STS-B + NLI",
          "d2": "(d') multi-task, STS-B weighted 0.07 (gradient norms balanced)"}


def sts_of(model_dir: str, cache: Path) -> dict:
  """STS-B test cosine Spearman/Pearson of a model folder (cached beside its run)."""
  if not cache.exists():
    import embed_jax
    from embed_jax.data.sentences import load_sts
    from embed_jax.evaluate import evaluate_sts
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(evaluate_sts(embed_jax.load(model_dir), load_sts("stsb"), "test"),
                                indent=2) + "\n")
  return json.loads(cache.read_text())


def main():
  rows = {}
  zero = json.loads((RESULTS / "zeroshot" / "minilm_scifact_test.json").read_text())
  rows["a"] = {"scifact": zero["results"][0]["metrics"], "minutes": None,
               "sts": sts_of("sentence-transformers/all-MiniLM-L6-v2", RUNS / "base_sts.json")}
  mlm = None
  for key, spec, workdir in (("b", "scifact_mnrl", Path("runs/scifact_mnrl")),
                             ("mlm", "scifact_mlm", RUNS / "mlm"),
                             ("probe", "scifact_mlm:probe", RUNS / "mlm_probe"),
                             ("c", "scifact_mlm_then_mnrl", RUNS / "mlm_then_mnrl"),
                             ("d", "scifact_multitask", RUNS / "multitask"),
                             ("d2", "scifact_multitask:balanced", RUNS / "multitask_balanced")):
    summary = run_config(spec, workdir)
    if key in ("mlm", "probe"):
      held = {k: json.loads((workdir / f"{name}.json").read_text())["mlm"]
              for k, name in (("before", "mlm_before"), ("after", "mlm"))}
      if key == "mlm":
        mlm = {"minutes": summary["wall_clock_min"], "random_head": held["before"],
               "after": held["after"]}
      else:
        mlm.update(probe=held["after"], probe_minutes=summary["wall_clock_min"])
      continue
    rows[key] = {"scifact": json.loads((workdir / "results.json").read_text())["results"][0]["metrics"],
                 "sts": sts_of(summary["export"], workdir / "sts_test.json"),
                 "minutes": summary["wall_clock_min"] + (mlm["minutes"] if key == "c" else 0)}
  write(rows, mlm)


def write(rows: dict, mlm: dict) -> None:
  nd = {k: r["scifact"]["ndcg@10"] for k, r in rows.items()}
  sp = {k: r["sts"]["cosine_spearman"] for k, r in rows.items()}
  lines = ["# Domain adaptation on SciFact (all-MiniLM-L6-v2)", "",
           "`python experiments/domain_adaptation.py`. SciFact test (300 queries, 5,183 "
           "documents); STS-B test (1,379 pairs, cosine Spearman x 100, as MTEB).", "",
           "| model | SciFact nDCG@10 | SciFact Recall@100 | STS-B Spearman | training wall clock |",
           "|---|---|---|---|---|"]
  for k, r in rows.items():
    minutes = f"{r['minutes']:.0f} min" if r["minutes"] else ""
    lines.append(f"| {LABELS[k]} | {nd[k]:.4f} | {r['scifact']['recall@100']:.4f} | {sp[k]:.2f} | "
                 f"{minutes} |")
  ppl = {k: mlm[k]["mlm_heldout_perplexity"] for k in ("random_head", "probe", "after")}
  acc = {k: mlm[k]["mlm_heldout_accuracy"] for k in ("random_head", "probe", "after")}
  lines += ["", "MLM on the SciFact corpus, held-out documents "
            f"({mlm['after']['mlm_heldout_tokens']:,} masked tokens, the same masks for each row). "
            "all-MiniLM-L6-v2 ships without an MLM head, so the base encoder is measured with a "
            "head fitted while the encoder stays frozen (`configs/scifact_mlm.py:probe`):", "",
            "| encoder | MLM head | held-out perplexity | masked-token accuracy | wall clock |",
            "|---|---|---|---|---|",
            f"| base | random (as initialised) | {ppl['random_head']:,.1f} | {acc['random_head']:.3f} | |",
            f"| base, frozen | fitted (`:probe`: same windows, steps and head rate) | "
            f"{ppl['probe']:.2f} | {acc['probe']:.3f} | {mlm['probe_minutes']:.0f} min |",
            f"| MLM-adapted (`configs/scifact_mlm.py`) | trained with it | {ppl['after']:.2f} | "
            f"{acc['after']:.3f} | {mlm['minutes']:.0f} min |", "", "Findings:", "",
            f"- MLM {'lowers' if ppl['after'] < ppl['probe'] else 'does not lower'} held-out "
            f"perplexity against the base encoder with a fitted head ({ppl['probe']:.2f} -> "
            f"{ppl['after']:.2f})."]
  for k in ("c", "d", "d2"):
    verdict = "beats" if nd[k] > nd["b"] else "does not beat"
    lines.append(f"- {LABELS[k]} {verdict} contrastive only on SciFact ({nd[k]:.4f} vs "
                 f"{nd['b']:.4f}, {nd[k] - nd['b']:+.4f}); STS-B Spearman {sp[k]:.2f} vs "
                 f"{sp['b']:.2f} for (b) and {sp['a']:.2f} for the base model"
                 + (" (STS-B train is in its data, so this is not a forgetting check)."
                    if k.startswith("d") else "."))
  OUT.mkdir(parents=True, exist_ok=True)
  (OUT / "domain_adaptation.md").write_text("\n".join(lines) + "\n")
  (OUT / "domain_adaptation.json").write_text(json.dumps({"rows": rows, "mlm": mlm, "labels": LABELS},
                                                         indent=2) + "\n")
  plot(nd, sp)
  print("\n".join(lines))


def plot(nd: dict, sp: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  keys = list(nd)
  names = [k.replace("2", "'") for k in keys]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
  ax1.bar(names, [nd[k] for k in keys], color="tab:blue")
  ax1.set_ylim(min(nd.values()) - 0.03, max(nd.values()) + 0.02)
  ax1.set_title("SciFact test nDCG@10")
  ax2.bar(names, [sp[k] for k in keys], color="tab:orange")
  ax2.set_ylim(min(sp.values()) - 3, max(sp.values()) + 2)
  ax2.set_title("STS-B test Spearman")
  for ax, vals in ((ax1, nd), (ax2, sp)):
    for i, k in enumerate(keys):
      ax.text(i, vals[k], f"{vals[k]:.3f}" if ax is ax1 else f"{vals[k]:.1f}", ha="center",
              va="bottom", fontsize=8)
  fig.suptitle("(a) base  (b) MNRL  (c) MLM then MNRL  (d) MNRL + STS-B + NLI  "
               "(d') the same, STS-B weighted 0.07", fontsize=9)
  fig.tight_layout()
  fig.savefig(OUT / "domain_adaptation.png", dpi=120)


if __name__ == "__main__":
  main()
