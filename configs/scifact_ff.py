"""The MRL paper's fixed-feature (FF) baseline on SciFact: all-MiniLM-L6-v2 plus a learned linear
projection to d dims (exported as a sentence-transformers Dense module), fine-tuned with MNRL as
configs/scifact_mnrl.py. One model per d.

    embed-jax train --config configs/scifact_ff.py:64 --workdir runs/scifact_ff64

The projection starts as truncation to the first d dims (projection.init = "prefix"), so each FF
model starts from the truncated zero-shot model. experiments/mrl_ablation.py compares it with MRL
at the same d. `:64,smoke` runs in seconds on a tiny random model (d <= 32 there).
"""

from configs import base, scifact_mnrl


def get_config(arg: str | None = None):
  dims = [int(f) for f in (arg or "").split(",") if f.isdigit()]
  if len(dims) != 1:
    raise ValueError("configs/scifact_ff.py needs the projection dim: --config configs/scifact_ff.py:64")
  flags = base.variants(arg, ("smoke", str(dims[0])), "scifact_ff.py")
  c = scifact_mnrl.get_config()
  c.projection.dim = dims[0]
  c.projection.init = "prefix"
  if "smoke" in flags:
    base.apply_smoke(c)
  return c
