"""all-MiniLM-L6-v2 fine-tuned on SciFact with Matryoshka training: MNRL on the labelled pairs at
dims 384, 256, 128, 64 and 32, each weighted 1 (as sentence-transformers' MatryoshkaLoss), starting
from a 384 -> 384 rotation onto the principal axes of the starting model's corpus embeddings
(projection.init = "pca": full-dim scores unchanged at the start; exported as a Dense module).

    embed-jax train --config configs/scifact_mrl.py --workdir runs/scifact_mrl

The best MRL recipe the ablation found (experiments/mrl_ablation.py, row (e)); its targets were
64 dims keeping >= 95% of the model's own 384-dim SciFact test nDCG@10 with the 384-dim score
within 0.005 of configs/scifact_mnrl.py's. Neither held (91% and -0.008): see
experiments/results/mrl_ablation. Variants: `:nopca` trains the model's own dims, no rotation
(row (b)); `:sd` adds prefix self-distillation on the unlabelled SciFact corpus (`:nopca,sd` is
row (d), which scored no better than (b)); `:smoke` runs in seconds on a tiny random model.
"""

from configs import base, scifact_mnrl


def get_config(arg: str | None = None):
  flags = base.variants(arg, ("nopca", "sd", "smoke"), "scifact_mrl.py")
  c = scifact_mnrl.get_config()
  c.matryoshka.dims = (384, 256, 128, 64, 32)
  c.matryoshka.weights = ()  # all 1.0, as sentence-transformers' MatryoshkaLoss
  if "nopca" not in flags:
    c.projection.dim = 384
    c.projection.init = "pca"
    c.projection.pca_texts = 4096
  if "sd" in flags:
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
    c.projection.dim = 0 if "nopca" in flags else 32
  return c
