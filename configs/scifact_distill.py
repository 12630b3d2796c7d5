"""all-MiniLM-L6-v2 distilled from the fine-tuned all-mpnet-base-v2 teacher on unlabelled SciFact
text only: the corpus and the train queries, no qrels. The teacher never runs: its vectors come
from a store.

    embed-jax teacher --model runs/distill/teacher/export --dataset scifact \
        --texts corpus,queries --out runs/distill/teacher_store --name scifact_mpnet_mnrl
    embed-jax train --config configs/scifact_distill.py --workdir runs/distill/student_unlabelled

Losses: the student's embedding through a learned 384 -> 768 projection (training only, not
exported; it starts as the least-squares map from the starting student's embeddings of 4,096 of
these texts to the teacher's) against the teacher's (MSE of unit vectors), and the KL between the teacher's and the
student's similarity distributions over each batch of 64 texts. Expected (experiments/distill.py):
closes at least half of the student-teacher nDCG@10 gap. `:lr2e-4` is the same run at a peak
learning rate of 2e-4 instead of 5e-5 (the embedding loss of the default run falls only from 0.47
to 0.43 in its 186 steps). `:smoke` runs in seconds.
"""

from configs import base, scifact_mnrl


def get_config(arg: str | None = None):
  flags = base.variants(arg, ("lr2e-4", "smoke"), "scifact_distill.py")
  c = scifact_mnrl.get_config()
  c.loss.weight = 0.0  # no labels
  c.unlabelled.texts = "corpus+train_queries"  # 5,183 + 809 texts; the test queries are left out
  c.unlabelled.batch_size = 64
  c.num_epochs = 2  # 93 steps an epoch
  c.distill.store = "runs/distill/teacher_store"
  c.distill.teacher = "scifact_mpnet_mnrl"
  c.distill.embedding = 1.0
  c.distill.embedding_kind = "mse"
  c.distill.scores = 1.0
  c.distill.temperature = 0.05
  c.distill.teacher_temperature = 0.05
  if "lr2e-4" in flags:
    c.optim.lr = 2e-4
  if "smoke" in flags:
    base.apply_smoke(c)
    c.distill.store = ""  # set by the test to a store of a tiny teacher
    c.distill.teacher = ""
  return c
