"""A ColBERT (multi-vector) model from all-MiniLM-L6-v2, trained on SciFact with the data and
budget of configs/scifact_hardneg.py: MNRL over MaxSim scores with in-batch negatives and one
mined hard negative per pair (the same negatives file, mined by all-MiniLM-L6-v2), 87 steps.

    embed-jax mine --model sentence-transformers/all-MiniLM-L6-v2 --dataset scifact --split train \
      --out runs/negatives/scifact_train_minilm.jsonl --top_k 50 --skip_top 3 --margin 0.05
    embed-jax train --config configs/scifact_colbert.py --workdir runs/scifact_colbert

(the mine command is what configs/scifact_hardneg.py runs first; experiments/multivector.py runs
both). The model gets PyLate's markers ([Q], [D]) and a 384 -> 128 token projection started on
the principal directions of MiniLM's document token states (multivector.projection_init="pca").
Target: SciFact test nDCG@10 above the dense model trained on the same data and steps (0.7319).
Variants: `:random` starts the projection at random (PyLate's default); `:smoke` runs in seconds
on a tiny random model.
"""

from configs import base, scifact_hardneg


def get_config(arg: str | None = None):
  flags = base.variants(arg, ("random", "smoke"), "scifact_colbert.py")
  c = scifact_hardneg.get_config()
  c.data.mine.enabled = False  # the hardneg recipe's negatives (mined by all-MiniLM-L6-v2)
  c.representation = "multivector"
  mv = c.multivector
  mv.dims = 128  # PyLate's default
  mv.query_length = 48  # SciFact claims: median 21 tokens, 154 of 1,109 over 31, 6 over 47
  mv.truncate_queries = True  # those 6 are cut to 48 tokens (PyLate cuts them silently)
  mv.document_length = 256  # the dense recipe's max_seq_length
  mv.projection_init = "random" if "random" in flags else "pca"
  c.loss.scale = 1.0  # MaxSim sums of cosines are the logits (PyLate's temperature 1)
  if "smoke" in flags:
    base.apply_smoke(c)
    c.data.negatives = ""
    c.data.num_negatives = 0
    mv.dims = 16
    mv.query_length = 16
    mv.document_length = 32
    mv.projection_texts = 16
  return c
