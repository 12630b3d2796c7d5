"""all-MiniLM-L6-v2 fine-tuned on SciFact train with in-batch negatives (MNRL / InfoNCE).

    embed-jax train --config configs/scifact_mnrl.py --workdir runs/scifact_mnrl

Target: SciFact test nDCG@10 from 0.645 (zero-shot) to >= 0.705 (sentence-transformers with the
same recipe reaches 0.707). `--config configs/scifact_mnrl.py:smoke` runs in seconds.
"""

from configs import base


def get_config(arg: str | None = None):
  flags = base.variants(arg, ("smoke",), "scifact_mnrl.py")
  c = base.get_config()
  c.data.dataset = "scifact"
  c.loss.name = "mnrl"
  c.loss.scale = 20.0  # temperature 0.05, sentence-transformers' default
  c.batch_size = 32  # global, across devices
  c.num_epochs = 3  # 919 pairs: 29 steps an epoch
  c.optim.lr = 5e-5
  c.optim.warmup_ratio = 0.1
  c.checkpoint.every_steps = 20
  return base.apply_smoke(c) if "smoke" in flags else c
