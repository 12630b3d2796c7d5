"""scifact_mnrl plus one mined hard negative per pair (mined once by the starting model).

    embed-jax train --config configs/scifact_hardneg.py --workdir runs/scifact_hardneg

The first run mines `data.negatives` with all-MiniLM-L6-v2 (top 50, positives removed, 3 ranks
skipped, candidates within 0.05 of the lowest positive dropped, 5 kept per query) unless the file
exists; each pair then draws 1 of its query's negatives per epoch. Target: SciFact test nDCG@10
>= 0.715. `--config configs/scifact_hardneg.py:smoke` runs in seconds.
"""

from configs import base, scifact_mnrl


def get_config(arg: str | None = None):
  flags = base.variants(arg, ("smoke",), "scifact_hardneg.py")
  c = scifact_mnrl.get_config()
  c.data.negatives = "runs/negatives/scifact_train_minilm.jsonl"
  c.data.mine.enabled = True
  c.data.num_negatives = 1  # per pair: with batch 32, 32 positives + 32 hard negatives per query
  if "smoke" in flags:
    base.apply_smoke(c)
    c.data.negatives = ""  # set by the test to a temp path
  return c
