"""Cross-encoder re-rankers and students distilled from teacher scores on SciFact: first stages
(zero-shot all-MiniLM-L6-v2, BM25, dense hardneg) re-ranked by MiniLM and MPNet cross-encoders
trained on SciFact train, and MiniLM bi-encoder students trained with MNRL plus the listwise KL
of a teacher's scores over each query's candidates (the cross-encoder's, and the fine-tuned
MPNet bi-encoder's), with and without false-negative removal. Writes
experiments/results/rerank_distill/{rerank_distill.md,rerank_distill.json}.

    EMBED_JAX_DATA=../shared/data python experiments/rerank_distill.py [--only STAGE,...] [--tabulate]

Stages, each resumable, each training in its own process (runs/rerank/<name>):
  dense       configs/scifact_hardneg.py (shared with experiments/sparse.py: runs/sparse/dense_hardneg)
  ce_minilm   configs/scifact_reranker.py: all-MiniLM-L6-v2 cross-encoder, listwise CE, groups of 8
  ce_mpnet    configs/scifact_reranker.py:mpnet: the same from all-mpnet-base-v2
  mpnet_bi    configs/scifact_mpnet_mnrl.py: the fine-tuned MPNet bi-encoder (a teacher)
  scores_ce   `embed-jax teacher --scores` of the better cross-encoder on dev (runs/teachers/)
  scores_bi   the same for the MPNet bi-encoder (cosines); scores_dense: for dense hardneg
  student_*   configs/scifact_hardneg.py + 3 negatives per pair from the 15-per-query file + the
              teacher's candidate KL (ce | bi), `_fn`: false negatives dropped by the teacher
  mlm         configs/scifact_mlm.py (runs/domain/mlm, shared with experiments/sparse.py): the
              MLM-adapted MiniLM that SPLADE starts from
  splade_ce   configs/scifact_splade.py with the same negatives and the cross-encoder's KL
              (SPLADE's distillation recipe, issue #17); splade_bi: the bi-encoder's KL;
              splade_tiny_bi: the same from rasyosef/splade-tiny (configs/scifact_splade.py:tiny);
              splade_tiny_dense: the same with the dense hardneg MiniLM as the teacher (a teacher
              one 15-minute training away, where the MPNet one is 45 minutes and its scores 10)
  rerank_F_C  the first stage F's (hardneg, zero-shot, bm25) top 100 re-ranked by the cross-encoder
              C, on the test and the dev queries (~30 min a MiniLM one on 2 cores); the table adds
              the re-ranked scores mixed with the first stage's, the weight picked on dev
Every training holds out 10% of the train queries (data.dev_fraction = 0.1, seed 0): the better
teacher is picked on them (with one cross-encoder trained, it is the teacher), never on test.
Times are part of the result: run on an idle machine. All of it is ~12 hours on 2 CPU cores, more
than one session of a machine whose run folders do not last: the table keeps the committed rows
of models whose run folders are absent, marked "(earlier run)"; --tabulate re-reads the runs.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import (  # noqa: E402
    CARRIED, REPO, RESULTS, cached, carried, run_config)

OUT = RESULTS / "rerank_distill"
RUNS = Path("runs/rerank")
NEGATIVES = "runs/negatives/scifact_train_minilm_ce.jsonl"  # 15 per query (scifact_reranker.py)
DEV = ["--config.data.dev_fraction=0.1", "--config.evals.test.at_end=False"]
TOP = 100  # documents re-ranked per query


def student(teacher: str, drop: bool) -> list[str]:
  """The hardneg recipe plus candidate distillation from a score store."""
  store = f"runs/teachers/scifact_{teacher}_scores"
  # A cross-encoder's logits as they are; a bi-encoder's (bi: MPNet, dense: MiniLM hardneg)
  # cosines scaled as its training scaled them (/ 0.05).
  t_temp = 1.0 if teacher == "ce" else 0.05
  return DEV + [f"--config.data.negatives={NEGATIVES}", "--config.data.mine.enabled=False",
                "--config.data.num_negatives=3", f"--config.distill.score_store={store}",
                "--config.distill.candidate_kl=1.0", "--config.distill.temperature=0.05",
                f"--config.distill.teacher_temperature={t_temp}",
                f"--config.distill.drop_false_negatives={drop}"]


def splade_student(teacher: str, *extra: str) -> list[str]:
  """student()'s overrides for a SPLADE model: its scores are sparse dot products (MNRL scale 1),
  so the student's temperature is 1; the teacher's is its own (a bi-encoder's cosines / 0.05)."""
  t_temp = 1.0 if teacher == "ce" else 0.05
  return ([o for o in student(teacher, False) if "temperature" not in o]
          + ["--config.distill.temperature=1.0", f"--config.distill.teacher_temperature={t_temp}",
             "--config.evals.test.at_start=False", *extra])


TRAININGS = {  # name -> (config spec, workdir, overrides)
    "dense": ("scifact_hardneg", Path("runs/sparse/dense_hardneg"),
              DEV + ["--config.data.mine.enabled=False"]),
    "ce_minilm": ("scifact_reranker", RUNS / "ce_minilm", DEV),
    "ce_mpnet": ("scifact_reranker:mpnet", RUNS / "ce_mpnet", DEV),
    # The first recipe tried (its dev row stays in the cross-encoders' table): one epoch at 5e-5,
    # pairs of 320 tokens; it did not learn the task in 52 steps.
    "ce_minilm_320": ("scifact_reranker", RUNS / "ce_minilm_320",
                      DEV + ["--config.max_seq_length=320", "--config.num_epochs=1",
                             "--config.optim.lr=5e-5"]),
    "mpnet_bi": ("scifact_mpnet_mnrl", RUNS / "mpnet_bi", DEV),
    "student_ce": ("scifact_hardneg", RUNS / "student_ce", student("ce", False)),
    "student_ce_fn": ("scifact_hardneg", RUNS / "student_ce_fn", student("ce", True)),
    "student_bi": ("scifact_hardneg", RUNS / "student_bi", student("bi", False)),
    "student_bi_fn": ("scifact_hardneg", RUNS / "student_bi_fn", student("bi", True)),
    # SPLADE (issue #17's recipe) plus the cross-encoder's candidate KL: SPLADE's distillation.
    # Its student scores are sparse dot products (MNRL scale 1): temperatures 1.
    "splade_ce": ("scifact_splade", RUNS / "splade_ce", splade_student("ce")),  # start: sparse.py
    "mlm": ("scifact_mlm", Path("runs/domain/mlm"), []),  # SPLADE's start (experiments/sparse.py)
    # The same from the MPNet bi-encoder's cosines (scaled as its training scaled them).
    "splade_bi": ("scifact_splade", RUNS / "splade_bi", splade_student("bi")),
    # The same from a SPLADE already trained on MS MARCO (rasyosef/splade-tiny), at the learning
    # rate the dev queries picked for it without distillation (experiments/sparse.py).
    "splade_tiny_bi": ("scifact_splade:tiny", RUNS / "splade_tiny_bi",
                       splade_student("bi", "--config.optim.lr=5e-4")),
    # The same with the dense hardneg MiniLM's cosines as the teacher's scores.
    "splade_tiny_dense": ("scifact_splade:tiny", RUNS / "splade_tiny_dense",
                          splade_student("dense", "--config.optim.lr=5e-4")),
}
CROSS_ENCODERS = ("ce_minilm", "ce_mpnet")
# Re-rankings of a first stage's top TOP by a cross-encoder, each its own stage (test and dev):
# with a MiniLM cross-encoder on 2 CPU cores one takes ~30 minutes (30k pairs of 320 tokens).
RERANKINGS = {f"rerank_{first}_{ce}": (first, ce) for ce in CROSS_ENCODERS
              for first in ("hardneg", "zero-shot", "bm25")}
# The MiniLM cross-encoder's path first (the cheapest teacher to train, and its student is the
# recipe the field relies on), then the re-rankings, then the MPNet teachers.
ORDER = ["ce_minilm", "scores_ce", "student_ce", "dense", "rerank_hardneg_ce_minilm",
         "rerank_zero-shot_ce_minilm", "student_ce_fn", "scores_dense", "splade_tiny_dense",
         "mpnet_bi", "scores_bi", "student_bi", "student_bi_fn", "ce_mpnet",
         "rerank_hardneg_ce_mpnet", "rerank_zero-shot_ce_mpnet", "rerank_bm25_ce_minilm",
         "rerank_bm25_ce_mpnet", "mlm", "splade_bi", "splade_tiny_bi", "splade_ce",
         "ce_minilm_320"]
MINILM, MPNET = "sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/all-mpnet-base-v2"
FIRST_STAGES = {"zero-shot": MINILM, "bm25": "bm25",
                "hardneg": "runs/sparse/dense_hardneg/export"}


def dev_qrels():
  from embed_jax.data import load_beir
  from embed_jax.data.pairs import carve_dev
  data = load_beir("scifact")
  train = data.qrels("train")
  _, dev = carve_dev([q for q in data.queries if q in train], 0.1, 0)
  return data, {q: train[q] for q in dev}


def first_stage(name: str, split: str = "test") -> tuple[dict, dict]:
  """(run of the top TOP, result row) of a first stage on test (or the dev queries), cached."""
  from embed_jax.rerank import first_stage as fs
  data, dev = dev_qrels()
  qrels = dev if split == "dev" else data.qrels("test")
  return fs(FIRST_STAGES.get(name, name), data, split if split == "test" else "train", qrels,
            top=TOP, batch_size=64, cache=RUNS / "first_stage" / f"{name}_{split}.json")


def reranked(first: str, ce: str, split: str = "test") -> dict:
  """{"row", "run"}: the cross-encoder `ce`'s re-ranking of a first stage's top TOP (the run:
  its logits), cached."""
  def compute():
    import embed_jax
    from embed_jax.rerank import evaluate_reranking
    data, dev = dev_qrels()
    run, _ = first_stage(first, split)
    row = evaluate_reranking(embed_jax.load(TRAININGS[ce][1] / "export"), data,
                             "test" if split == "test" else "train", run,
                             qrels=dev if split == "dev" else None, top=TOP, batch_size=64,
                             label=f"{first} + {ce} top {TOP}", keep_run=True)
    return {"run": row.pop("run"), "row": row}
  return cached(RUNS / ce / f"rerank_{first}_{split}.json", compute)


def interpolated(first: str, ce: str) -> dict:
  """The re-ranking's logits and the first stage's scores over its top TOP, each min-max
  normalised per query and mixed convexly, the weight picked on the dev queries (never test):
  the usual last step of a re-ranking pipeline (e.g. Pradeep et al. 2021's expando-mono-duo,
  SPLADE/ColBERT + cross-encoder hybrids). Its ms/query is the re-ranking's."""
  from embed_jax.evaluate import DEFAULT_K, ir_metrics
  from embed_jax.sparse import convex, tune_convex
  data, dev = dev_qrels()
  (dev_run, _), dev_ce = first_stage(first, "dev"), reranked(first, ce, "dev")["run"]
  weight, table = tune_convex(dev_ce, dev_run, dev)
  run, _ = first_stage(first)
  test = reranked(first, ce)
  fused = convex(test["run"], {q: run[q] for q in test["run"]}, weight)
  return {**test["row"], "metrics": ir_metrics(data.qrels("test"), fused, DEFAULT_K),
          "cross_encoder_weight": weight, "dev_ndcg@10": table[weight],
          "dev_ndcg@10_reranked_alone": table[1.0]}


def better_cross_encoder() -> str:
  """The cross-encoder whose re-ranking of the zero-shot first stage is better on the dev
  queries (the teacher of the students)."""
  trained = [ce for ce in CROSS_ENCODERS if (TRAININGS[ce][1] / "export").exists()]
  if len(trained) == 1:
    return trained[0]
  dev = {ce: reranked("zero-shot", ce, "dev")["row"]["metrics"]["ndcg@10"] for ce in trained}
  return max(dev, key=dev.get)


def score_store(kind: str) -> None:
  out = Path(f"runs/teachers/scifact_{kind}_scores")
  teacher = better_cross_encoder() if kind == "ce" else {"bi": "mpnet_bi", "dense": "dense"}[kind]
  model = TRAININGS[teacher][1] / "export"
  t = time.perf_counter()
  subprocess.run([sys.executable, "-m", "embed_jax.cli", "teacher", "--scores", "--model", str(model),
                  "--negatives", NEGATIVES, "--out", str(out), "--batch_size", "64"],
                 check=True, cwd=REPO)
  clock = out / "wall_clock.json"
  if not clock.exists():
    clock.write_text(json.dumps({"seconds": time.perf_counter() - t}) + "\n")


def stage(name: str) -> None:
  """One stage, in this process (the driver starts one process per stage)."""
  if name.startswith("scores_"):
    return score_store(name.split("_")[1])
  if name in RERANKINGS:
    for split in ("dev", "test"):
      reranked(*RERANKINGS[name], split)
    return
  spec, workdir, overrides = TRAININGS[name]
  if not (workdir / ("export_mlm" if name == "mlm" else "export")).exists():
    run_config(spec, workdir, overrides)


def minutes(workdir: Path) -> float | None:
  clock = workdir / "wall_clock.json"
  return round(json.loads(clock.read_text())["seconds"] / 60, 1) if clock.exists() else None


def stand_in(name: str):
  """The untrained architecture of a model trained by `name` (its weights do not change its
  latency): the zero-shot bi-encoder it starts from, or that encoder with a fresh cross-encoder
  head at the reranker config's max_seq_length."""
  import embed_jax
  from configs import scifact_reranker
  from embed_jax.models.heads import add_classifier_head
  from embed_jax.rerank import CrossEncoder
  hub = {"mpnet_bi": MPNET, "ce_mpnet": MPNET}.get(name, MINILM)
  if not name.startswith("ce_"):
    return embed_jax.load(hub)
  bi = embed_jax.load(hub, max_seq_length=scifact_reranker.get_config().max_seq_length)
  config, params = add_classifier_head(bi.config, bi.params, hub, seed=0)
  return CrossEncoder(config, params, bi.tokenizer, source=hub)


def speed(queries: int = 50, ce_queries: int = 4) -> list[dict]:
  """Latency of each model in one process on `queries` SciFact test queries: a bi-encoder's
  query encoding (the corpus is encoded offline; `queries` of them), a cross-encoder's re-ranking
  of the top TOP of the zero-shot first stage (the first stage's own time excluded; `ce_queries`
  of them: TOP pairs a query); ms per query, best of 2. A
  model not trained on this machine is timed as its untrained architecture (stand_in)."""
  import embed_jax
  from embed_jax.rerank import rerank
  data, _ = dev_qrels()
  run, _ = first_stage("zero-shot")
  qids = sorted(run)[:queries]
  texts = [data.queries[q] for q in qids]
  docs = dict(zip(data.corpus_ids, data.corpus_texts(" ")))
  rows = []
  for name in ("student_ce", "dense", "mpnet_bi", "ce_minilm", "ce_mpnet"):
    export = TRAININGS[name][1] / "export"
    model = embed_jax.load(export) if export.exists() else stand_in(name)
    best = float("inf")
    for _ in range(2):  # the first pass compiles
      t = time.perf_counter()
      if name.startswith("ce_"):
        rerank(model, {q: run[q] for q in qids[:ce_queries]}, data.queries, docs, top=TOP,
               batch_size=64)
      else:
        model.encode(texts, batch_size=1)
      best = min(best, (time.perf_counter() - t) / (ce_queries if name.startswith("ce_") else
                                                    len(qids)))
    rows.append({"model": name, "timed": "trained" if export.exists() else "architecture",
                 "work": f"re-rank top {TOP}" if name.startswith("ce_") else
                 "encode the query (batch 1)", "ms_per_query": round(1000 * best, 2)})
  return rows


BI_ENCODERS = ("mpnet_bi", "student_ce", "student_ce_fn", "student_bi", "student_bi_fn", "splade_ce",
               "splade_bi", "splade_tiny_bi", "splade_tiny_dense")


def tabulate() -> dict:
  committed = json.loads((OUT / "rerank_distill.json").read_text()) if (
      OUT / "rerank_distill.json").exists() else {}
  result = {}

  def add(key, row, label, workdir=None, **extra):
    result[key] = {**row, "representation": label, "train_minutes": workdir and minutes(workdir),
                   **extra}

  def keep(key):  # a model trained on another machine keeps its committed row, marked
    if key in committed:
      row = committed[key]
      result[key] = {**row, "representation": carried(row["representation"])}

  for name in FIRST_STAGES:
    if name == "hardneg" and not (TRAININGS["dense"][1] / "export").exists():
      for key in [k for k in committed if k == name or k.startswith(f"{name}+")]:
        keep(key)
      continue
    _, row = first_stage(name)
    add(name, row, name, TRAININGS["dense"][1] if name == "hardneg" else None)
    for ce in CROSS_ENCODERS:  # the re-rankings run as stages: here only read
      if not all((RUNS / ce / f"rerank_{name}_{split}.json").exists() for split in ("dev", "test")):
        keep(f"{name}+{ce}")
        keep(f"{name}+{ce}+mix")
        continue
      add(f"{name}+{ce}", reranked(name, ce)["row"], f"{name} + {ce} (top {TOP})", TRAININGS[ce][1])
      mix = interpolated(name, ce)
      add(f"{name}+{ce}+mix", mix, f"{name} + {ce} (top {TOP}), scores mixed "
          f"(cross-encoder weight {mix['cross_encoder_weight']:g}, on dev)", TRAININGS[ce][1])
  from embed_jax.rerank import first_stage as fs
  data, _ = dev_qrels()
  for name in BI_ENCODERS:
    workdir = TRAININGS[name][1]
    if not (workdir / "export").exists():
      keep(name)
      continue
    _, row = fs(str(workdir / "export"), data, "test", data.qrels("test"), top=TOP,
                batch_size=64, cache=workdir / "first_stage_test.json")
    add(name, row, name, workdir)
  result["latency"] = speed()
  OUT.mkdir(parents=True, exist_ok=True)
  (OUT / "rerank_distill.json").write_text(json.dumps(result, indent=2) + "\n")
  table = markdown(result)
  (OUT / "rerank_distill.md").write_text(table + "\n")
  print(table)
  return result


# The issue's references when their rows are not in the table: dense hardneg and the fine-tuned
# MPNet bi-encoder as measured earlier (experiments/results/hardneg, .../distill).
HARDNEG, MPNET_BI = 0.7319, 0.7568


def targets(result: dict) -> list[str]:
  """#18's two targets as lines: a student >= hardneg + 0.010, a re-ranked pipeline > MPNet."""
  def ndcg(key, default):
    return result[key]["metrics"]["ndcg@10"] if key in result else default

  hardneg, mpnet = ndcg("hardneg", HARDNEG), ndcg("mpnet_bi", MPNET_BI)
  lines = []
  for key in ("student_ce", "student_ce_fn", "student_bi", "student_bi_fn"):
    if key in result:
      d = ndcg(key, None) - hardneg
      lines.append(f"- {key} against dense hardneg ({hardneg:.4f}): {d:+.4f} nDCG@10 (target "
                   f"+0.010: {'met' if d >= 0.010 else 'missed'}).")
  mixed = {k: r for k, r in result.items() if "+ce_" in k}
  if mixed:
    best = max(mixed, key=lambda k: mixed[k]["metrics"]["ndcg@10"])
    d = mixed[best]["metrics"]["ndcg@10"] - mpnet
    lines.append(f"- best re-ranked pipeline, {mixed[best]['representation']}, against the "
                 f"fine-tuned MPNet bi-encoder ({mpnet:.4f}): {d:+.4f} nDCG@10 (target: above it: "
                 f"{'met' if d > 0 else 'missed'}).")
  return lines


def markdown(result: dict) -> str:
  def fmt(x, spec):
    return "" if x is None else format(x, spec)

  lines = ["| pipeline (SciFact test) | nDCG@10 | Recall@100 | MRR@10 | ms/query | training min |",
           "|---|---|---|---|---|---|"]
  for key, r in result.items():
    if key == "latency":
      continue
    m = r["metrics"]
    lines.append(f"| {r['representation']} | {m['ndcg@10']:.4f} | {m['recall@100']:.4f} | "
                 f"{m['mrr@10']:.4f} | {fmt(r.get('ms_per_query'), '.2f')} | "
                 f"{fmt(r.get('train_minutes'), '.1f')} |")
  if any(CARRIED in r["representation"] for k, r in result.items() if k != "latency"):
    lines += ["", f"Rows marked{CARRIED} are kept from the committed table: their run folders are "
              "not on the machine that wrote this one (their ms/query is that run's)."]
  lines += [""] + targets(result)
  lines += ["", "A re-ranked row's ms/query is the cross-encoder's alone (the first stage's is its "
            "own row's); a re-ranked list is the top 100, so its Recall@100 is the first stage's.",
            "", "Latency, one process (a model not trained on this machine is timed as its "
            "untrained architecture: weights do not change the work):", "",
            "| model | timed | work per query | ms/query |", "|---|---|---|---|"]
  lines += [f"| {r['model']} | {r['timed']} | {r['work']} | {r['ms_per_query']:.2f} |"
            for r in result["latency"]]
  return "\n".join(lines)


def cross_encoders_dev() -> dict:
  """Each trained cross-encoder's re-ranking of the zero-shot first stage's top TOP on the dev
  queries, beside the first stage, with its training (steps, minutes, the listwise loss and the
  share of groups whose positive scores highest, mean of the last 3 logged steps):
  experiments/results/rerank_distill/cross_encoders_dev.{md,json}. A cross-encoder trained on
  another machine keeps its committed row, marked."""
  path = OUT / "cross_encoders_dev.json"
  committed = json.loads(path.read_text()) if path.exists() else {}
  _, first = first_stage("zero-shot", "dev")
  rows = {"zero-shot": {"label": "zero-shot all-MiniLM-L6-v2 (first stage)",
                        "ndcg@10": first["metrics"]["ndcg@10"]}}
  for ce in ("ce_minilm_320", "ce_minilm", "ce_mpnet"):
    workdir = TRAININGS[ce][1]
    if not (workdir / "export").exists():
      if ce in committed:
        rows[ce] = {**committed[ce], "label": carried(committed[ce]["label"])}
      continue
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
              if '"pairs_loss"' in line]
    config = json.loads((workdir / "config.json").read_text())
    train_log = (workdir / "train.log").read_text()
    how = " ".join(TRAININGS[ce][2][len(DEV):]) or "as configured"
    rows[ce] = {"label": f"zero-shot top {TOP} + {ce} ({how})",
                "ndcg@10": reranked("zero-shot", ce, "dev")["row"]["metrics"]["ndcg@10"],
                "steps": int(re.findall(r"training steps .* of (\d+)", train_log)[-1]),
                "train_minutes": minutes(workdir),
                "max_seq_length": config.get("max_seq_length"),
                "final_loss": sum(r["pairs_loss"] for r in logged[-3:]) / len(logged[-3:]),
                "final_accuracy": sum(r["pairs_accuracy"] for r in logged[-3:]) / len(logged[-3:])}
  OUT.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(rows, indent=2) + "\n")

  def fmt(x, spec):
    return "" if x is None else format(x, spec)

  lines = ["| dev queries (81) | nDCG@10 | steps | minutes | tokens | loss at the end "
           "| positive first |",
           "|---|---|---|---|---|---|---|"]
  lines += [f"| {r['label']} | {r['ndcg@10']:.4f} | {fmt(r.get('steps'), 'd')} | "
            f"{fmt(r.get('train_minutes'), '.1f')} | {fmt(r.get('max_seq_length'), 'd')} | "
            f"{fmt(r.get('final_loss'), '.3f')} | {fmt(r.get('final_accuracy'), '.2f')} |"
            for r in rows.values()]
  lines += ["", "Listwise loss over a group of 1 positive + 7 mined negatives: ln 8 = 2.079 for "
            "constant logits; 'positive first': the share of groups whose positive scores highest "
            "(chance 0.125). Both are means of the last 3 logged training steps."]
  (OUT / "cross_encoders_dev.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tabulate", action="store_true", help="only rewrite the table from the runs")
  p.add_argument("--only", default="", help="comma-separated stages to run (default: all)")
  p.add_argument("--stage", choices=ORDER, help=argparse.SUPPRESS)  # one stage, in-process
  p.add_argument("--cross_encoders", action="store_true",
                 help="only the cross-encoders' dev table (re-ranks the dev queries where needed)")
  args = p.parse_args()
  if args.stage:
    return stage(args.stage)
  if args.cross_encoders:
    return cross_encoders_dev()
  if not args.tabulate:
    from experiments.multivector import ensure_negatives
    from configs import scifact_reranker
    ensure_negatives()
    # The candidate lists every teacher scores (15 a query), mined once whichever stage runs first.
    ensure_negatives(scifact_reranker.get_config())
    for name in [s for s in ORDER if not args.only or s in args.only.split(",")]:
      subprocess.run([sys.executable, __file__, "--stage", name], check=True, cwd=REPO)
  tabulate()


if __name__ == "__main__":
  main()
