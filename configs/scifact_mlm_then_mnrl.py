"""configs/scifact_mnrl.py started from the MLM-adapted encoder of configs/scifact_mlm.py
(domain-adaptive pre-training, then contrastive fine-tuning).

    embed-jax train --config configs/scifact_mlm.py --workdir runs/domain/mlm
    embed-jax train --config configs/scifact_mlm_then_mnrl.py --workdir runs/domain/mlm_then_mnrl

experiments/domain_adaptation.py compares it with configs/scifact_mnrl.py on SciFact test nDCG@10
and STS-B test Spearman.
"""

from configs import base, scifact_mnrl


def get_config(arg: str | None = None):
  flags = base.variants(arg, ("smoke",), "scifact_mlm_then_mnrl.py")
  c = scifact_mnrl.get_config(arg)
  if "smoke" not in flags:
    c.init = "runs/domain/mlm/export"
  return c
