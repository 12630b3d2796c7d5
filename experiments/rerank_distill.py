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
Every training holds out 10% of the train queries (data.dev_fraction = 0.1, seed 0): the better
teacher is picked on them, never on test. Times are part of the result: run on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import REPO, RESULTS, cached, run_config  # noqa: E402

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
# The bi-encoder teacher first: it is the cheaper teacher (one MPNet training) and unblocks the
# students and SPLADE's distillation; the cross-encoders follow.
ORDER = ["dense", "scores_dense", "splade_tiny_dense", "mpnet_bi", "scores_bi", "student_bi",
         "student_bi_fn", "mlm", "splade_bi", "splade_tiny_bi", "ce_minilm", "ce_mpnet", "scores_ce",
         "student_ce", "student_ce_fn", "splade_ce"]
FIRST_STAGES = {"zero-shot": "sentence-transformers/all-MiniLM-L6-v2", "bm25": "bm25",
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
  """The cross-encoder `ce`'s re-ranking of a first stage's top TOP, cached."""
  def compute():
    import embed_jax
    from embed_jax.rerank import evaluate_reranking
    data, dev = dev_qrels()
    run, _ = first_stage(first, split)
    qrels = dev if split == "dev" else data.qrels("test")
    return evaluate_reranking(embed_jax.load(TRAININGS[ce][1] / "export"), data,
                              "test" if split == "test" else "train", run, qrels=qrels, top=TOP,
                              batch_size=64, label=f"{first} + {ce} top {TOP}")
  return cached(RUNS / ce / f"rerank_{first}_{split}.json", compute)


def better_cross_encoder() -> str:
  """The cross-encoder whose re-ranking of the zero-shot first stage is better on the dev
  queries (the teacher of the students)."""
  dev = {ce: reranked("zero-shot", ce, "dev")["metrics"]["ndcg@10"] for ce in ("ce_minilm", "ce_mpnet")
         if (TRAININGS[ce][1] / "export").exists()}
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
  spec, workdir, overrides = TRAININGS[name]
  if not (workdir / ("export_mlm" if name == "mlm" else "export")).exists():
    run_config(spec, workdir, overrides)


def minutes(workdir: Path) -> float | None:
  clock = workdir / "wall_clock.json"
  return round(json.loads(clock.read_text())["seconds"] / 60, 1) if clock.exists() else None


def speed(queries: int = 50) -> list[dict]:
  """Latency of each model in one process on `queries` SciFact test queries: a bi-encoder's
  query encoding (the corpus is encoded offline), a cross-encoder's re-ranking of the top TOP of
  the zero-shot first stage (the first stage's own time excluded); ms per query, best of 2."""
  import embed_jax
  from embed_jax.rerank import rerank
  data, _ = dev_qrels()
  run, _ = first_stage("zero-shot")
  qids = sorted(run)[:queries]
  texts = [data.queries[q] for q in qids]
  docs = dict(zip(data.corpus_ids, data.corpus_texts(" ")))
  rows = []
  for name in ("student_ce", "student_bi", "dense", "mpnet_bi", "ce_minilm", "ce_mpnet"):
    export = TRAININGS[name][1] / "export"
    if not export.exists():
      continue
    model = embed_jax.load(export)
    best = float("inf")
    for _ in range(2):  # the first pass compiles
      t = time.perf_counter()
      if name.startswith("ce_"):
        rerank(model, {q: run[q] for q in qids}, data.queries, docs, top=TOP, batch_size=64)
      else:
        model.encode(texts, batch_size=1)
      best = min(best, time.perf_counter() - t)
    rows.append({"model": name, "work": f"re-rank top {TOP}" if name.startswith("ce_") else
                 "encode the query (batch 1)", "ms_per_query": round(1000 * best / len(qids), 2)})
  return rows


def tabulate() -> dict:
  from embed_jax.evaluate import format_table
  rows, result = [], {}

  def add(key, row, label, **extra):
    row = {**row, "representation": label, **extra}
    rows.append(row)
    result[key] = row

  for name in FIRST_STAGES:
    if name == "hardneg" and not (TRAININGS["dense"][1] / "export").exists():
      continue
    _, row = first_stage(name)
    add(name, row, name, train_minutes=minutes(TRAININGS["dense"][1]) if name == "hardneg" else None)
    for ce in ("ce_minilm", "ce_mpnet"):
      if (TRAININGS[ce][1] / "export").exists():
        r = reranked(name, ce)
        add(f"{name}+{ce}", r, f"{name} + {ce} (top {TOP})", train_minutes=minutes(TRAININGS[ce][1]))
  for name in ("mpnet_bi", "student_ce", "student_ce_fn", "student_bi", "student_bi_fn", "splade_ce",
               "splade_bi", "splade_tiny_bi", "splade_tiny_dense"):
    workdir = TRAININGS[name][1]
    if (workdir / "export").exists():
      from embed_jax.rerank import first_stage as fs
      data, _ = dev_qrels()
      _, row = fs(str(workdir / "export"), data, "test", data.qrels("test"), top=TOP,
                  batch_size=64, cache=workdir / "first_stage_test.json")
      add(name, row, name, train_minutes=minutes(workdir))
  result["latency"] = speed()
  lat = ["| model | work per query | ms/query |", "|---|---|---|"] + [
      f"| {r['model']} | {r['work']} | {r['ms_per_query']:.2f} |" for r in result["latency"]]
  OUT.mkdir(parents=True, exist_ok=True)
  (OUT / "rerank_distill.json").write_text(json.dumps(result, indent=2) + "\n")
  table = format_table(rows) + "\n\nLatency, one process:\n\n" + "\n".join(lat)
  (OUT / "rerank_distill.md").write_text(table + "\n")
  print(table)
  return result


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tabulate", action="store_true", help="only rewrite the table from the runs")
  p.add_argument("--only", default="", help="comma-separated stages to run (default: all)")
  p.add_argument("--stage", choices=ORDER, help=argparse.SUPPRESS)  # one stage, in-process
  args = p.parse_args()
  if args.stage:
    return stage(args.stage)
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
