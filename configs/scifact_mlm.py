"""Domain-adaptive pre-training: masked-language-model training of all-MiniLM-L6-v2 on the SciFact
corpus (documents cut into 256-token windows; 2% of the documents held out).

    embed-jax train --config configs/scifact_mlm.py --workdir runs/domain/mlm

all-MiniLM-L6-v2 ships without an MLM head: one is initialised (the log says so). Reports the
held-out masked-token accuracy and perplexity before and after (mlm_before.json, mlm.json)
and writes two exports: <workdir>/export (sentence-transformers; the `init` of
configs/scifact_mlm_then_mnrl.py) and <workdir>/export_mlm (BertForMaskedLM, with the head).
The head starts random, so it learns at optim.head_lr = 1e-3 while the encoder moves at 5e-5.
Expected: lower held-out perplexity than the base encoder's. A random head makes the "before"
meaningless (perplexity in the tens of thousands), so `:probe` measures the base encoder fairly:
the same windows, steps and head learning rate with the encoder frozen
(`optim.freeze = "encoder/.*"`), into runs/domain/mlm_probe; the two runs differ only in whether
the encoder learns. `:smoke` (also `:probe,smoke`) runs in seconds on a tiny random model.
"""

from configs import base, scifact_mnrl
from embed_jax.tasks import task


def get_config(arg: str | None = None):
  flags = base.variants(arg, ("probe", "smoke"), "scifact_mlm.py")
  c = scifact_mnrl.get_config()
  c.loss.weight = 0.0  # no labelled pairs: MLM only
  c.tasks.mlm = task("mlm", texts="corpus", batch_size=32, rate=0.15, whole_word=True,
                     heldout_fraction=0.02)
  c.num_epochs = 1  # one pass over the corpus windows
  c.optim.lr = 5e-5  # the encoder's peak rate
  c.optim.head_lr = 1e-3  # the MLM head's: it starts random
  c.optim.warmup_ratio = 0.06
  c.evals.test.at_end = False  # the retrieval test comes after contrastive fine-tuning
  c.export_mlm = True
  c.checkpoint.every_steps = 50
  if "probe" in flags:
    c.optim.freeze = "encoder/.*"  # the base encoder as it is; only the MLM head learns
    c.export_mlm = False
  if "smoke" in flags:
    base.apply_smoke(c)
    c.tasks.mlm.batch_size = 8
    c.tasks.mlm.heldout_fraction = 0.25  # a tiny corpus: hold out enough to measure
  return c
