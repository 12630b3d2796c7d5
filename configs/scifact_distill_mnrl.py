"""configs/scifact_mnrl.py (labelled MNRL on SciFact train) plus distillation from the fine-tuned
all-mpnet-base-v2 teacher's store: on each step's 32 pairs (KL of the in-batch query-document
similarity distributions) and on 32 unlabelled texts (embedding MSE through a projection, and
the KL over the batch), as configs/scifact_distill.py.

    embed-jax train --config configs/scifact_distill_mnrl.py --workdir runs/distill/student_labels

Expected (experiments/distill.py): beats labelled MNRL alone (configs/scifact_mnrl.py).
"""

from configs import base, scifact_distill, scifact_mnrl


def get_config(arg: str | None = None):
  flags = base.variants(arg, ("smoke",), "scifact_distill_mnrl.py")
  c = scifact_mnrl.get_config()
  d = scifact_distill.get_config()
  c.distill = d.distill
  c.unlabelled.texts = d.unlabelled.texts
  c.unlabelled.batch_size = 32
  c.distill.pair_scores = 1.0
  if "smoke" in flags:
    base.apply_smoke(c)
    c.distill.store = ""
    c.distill.teacher = ""
  return c
