"""A lexical-weight model (BGE-M3's sparse head: one learned weight per input token, no
vocabulary expansion) on all-MiniLM-L6-v2, trained on SciFact with the data and budget of
configs/scifact_hardneg.py: MNRL over sparse dot products with in-batch negatives and one mined
hard negative per pair, 87 steps.

    embed-jax train --config configs/scifact_lexical.py --workdir runs/scifact_lexical

The head (a linear map of each token's state to one weight, ReLU) starts random, so it learns at
optim.head_lr = 1e-3 while the encoder moves at 5e-5. BGE-M3 puts no sparsity regulariser on
it (its vectors hold only the text's own tokens), so the FLOPS weights are 0. Expected: above
its random start, and a lexical signal that fuses with a dense model (experiments/sparse.py).
`:smoke` runs in seconds on a tiny random model.
"""

from configs import base, scifact_hardneg


def get_config(arg: str | None = None):
  flags = base.variants(arg, ("smoke",), "scifact_lexical.py")
  c = scifact_hardneg.get_config()
  c.data.mine.enabled = False  # the hardneg recipe's negatives (mined by all-MiniLM-L6-v2)
  c.representation = "sparse"
  c.sparse.head = "lexical"
  c.sparse.query_weight = 0.0  # BGE-M3: no regulariser on lexical weights
  c.sparse.document_weight = 0.0
  c.loss.scale = 1.0  # dot products of the weights are the logits
  c.optim.head_lr = 1e-3  # the lexical head starts random
  c.evals.test.at_start = True
  if "smoke" in flags:
    base.apply_smoke(c)
    c.data.negatives = ""
    c.data.num_negatives = 0
  return c
