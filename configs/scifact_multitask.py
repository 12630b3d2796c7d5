"""Multi-task fine-tuning of all-MiniLM-L6-v2: SciFact MNRL (configs/scifact_mnrl.py) plus STS-B
train pairs with CoSENT plus SNLI dev triplets with MNRL (the contradiction as hard negative);
every step takes a batch of each and minimises the sum of the losses (weights 1).

    embed-jax train --config configs/scifact_multitask.py --workdir runs/domain/multitask

Same optimiser steps and SciFact batches as configs/scifact_mnrl.py (87 steps); each step also
reads 32 STS-B pairs and 32 NLI triplets. experiments/domain_adaptation.py compares SciFact test
nDCG@10 and STS-B test Spearman (the STS-B train split is in this model's data, so its STS-B score
is not a forgetting check). `:smoke` runs in seconds on a tiny random model.

`:balanced` weights the STS-B task 0.07 instead of 1: at the first step, CoSENT's gradient norm
on all-MiniLM-L6-v2 is 138.9 against 9.6 for SciFact MNRL and 8.5 for NLI MNRL (each task alone,
`train.log_every` metrics), so with weights 1 the sum points almost along STS-B's gradient and
Adam's per-parameter steps follow it; 0.07 x 138.9 = 9.7 puts the three on one scale.
"""

from configs import base, scifact_mnrl
from embed_jax.tasks import task


def get_config(arg: str | None = None):
  c = scifact_mnrl.get_config()
  c.tasks.stsb = task("sts", dataset="stsb", split="train", loss="cosent", scale=20.0,
                      batch_size=32, weight=1.0)
  c.tasks.nli = task("triplets", dataset="snli", split="dev", loss="mnrl", scale=20.0,
                     batch_size=32, weight=1.0)
  c.task_sampling = "all"
  flags = base.variants(arg, ("balanced", "smoke"), "scifact_multitask.py")
  if "balanced" in flags:
    c.tasks.stsb.weight = 0.07  # step-0 gradient norms: STS-B 138.9, SciFact 9.6, NLI 8.5
  if "smoke" in flags:
    base.apply_smoke(c)
    for t in c.tasks.values():
      t.batch_size = 8
  return c
