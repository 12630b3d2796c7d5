"""all-MiniLM-L6-v2 fine-tuned on SciFact with Matryoshka training: MNRL on the labelled pairs at
dims 384, 256, 128, 64 and 32, plus prefix self-distillation on the unlabelled SciFact corpus.

    embed-jax train --config configs/scifact_mrl.py --workdir runs/scifact_mrl

Target (experiments/mrl_ablation.py): the 64-dim prefix keeps >= 95% of the model's own 384-dim
SciFact test nDCG@10, and the 384-dim score stays within 0.005 of configs/scifact_mnrl.py's.
Variants: `:pairs` is MRL on the labelled pairs alone (the ablation's row (b)); `:smoke` runs in
seconds on a tiny random model (combine as `:pairs,smoke`).
"""

from configs import base, scifact_mnrl


def get_config(arg: str | None = None):
  flags = set((arg or "").split(","))
  c = scifact_mnrl.get_config()
  c.matryoshka.dims = (384, 256, 128, 64, 32)
  c.matryoshka.weights = ()  # all 1.0, as sentence-transformers' MatryoshkaLoss
  if "pairs" not in flags:
    c.unlabelled.texts = "corpus"
    c.unlabelled.batch_size = 32  # corpus texts per step, beside the 32 pairs
    sd = c.matryoshka.self_distill
    sd.weight = 1.0
    sd.target = "current"  # stop-gradient of the model's own full embedding
    sd.pairwise = 1.0
    sd.topk = 1.0
    sd.k = 8
  if "smoke" in flags:
    base.apply_smoke(c)
    c.matryoshka.dims = (32, 16, 8)  # the tiny model has 32 dims
  return c
