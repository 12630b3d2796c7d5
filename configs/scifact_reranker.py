"""A cross-encoder re-ranker on SciFact train: all-MiniLM-L6-v2 (`:mpnet`: all-mpnet-base-v2)
with a fresh classification head over the joined (query, document) pair, trained with listwise
cross-entropy over groups of 1 positive + 7 mined hard negatives (FlagEmbedding's reranker
recipe; `:bce` for pointwise binary cross-entropy, sentence-transformers' CrossEncoder default).

    embed-jax train --config configs/scifact_reranker.py --workdir runs/reranker/minilm
    embed-jax train --config configs/scifact_reranker.py:mpnet --workdir runs/reranker/mpnet

(`:mpnet` trains one epoch over groups of 1 + 3: MPNet costs ~8x MiniLM a pair on a CPU.)

Negatives: 15 per query from all-MiniLM-L6-v2's top 100 (positives removed, 3 ranks skipped,
candidates within 0.05 of the lowest positive dropped), mined once into
runs/negatives/scifact_train_minilm_ce.jsonl; each pair draws 7 of them per epoch. Pairs are
cut longest-first to 128 tokens (the query and the start of an abstract). Evaluated by
re-ranking the top 100 of rerank.first_stage (zero-shot all-MiniLM-L6-v2 by default) on SciFact
test; the export is a sentence-transformers CrossEncoder folder. `:smoke` runs in seconds on a
tiny random model.
"""

from configs import base, scifact_mnrl


def get_config(arg: str | None = None):
  flags = base.variants(arg, ("smoke", "mpnet", "bce"), "scifact_reranker.py")
  c = scifact_mnrl.get_config()
  c.representation = "cross"
  c.loss.name = "bce" if "bce" in flags else "listwise"
  c.loss.scale = 1.0  # the classifier's logits as they are
  c.data.negatives = "runs/negatives/scifact_train_minilm_ce.jsonl"
  c.data.mine.enabled = True
  c.data.mine.top_k = 100
  c.data.mine.num_negatives = 15
  c.data.num_negatives = 7  # a group of 8 per query
  c.batch_size = 16  # queries per step: 128 joined pairs
  # Measured on the 81 dev queries (experiments/results/rerank_distill/cross_encoders_dev.md):
  # 1 epoch at 5e-5, 320 tokens, left the listwise loss at 1.8 of ln 8 = 2.08 and re-ranked the
  # zero-shot top 100 to 0.198 nDCG@10 (the first stage: 0.663); 2 epochs at 1e-4, 128 tokens
  # (half the cost a step), reached loss 0.35 and 0.703. The head starts random: head_lr.
  c.max_seq_length = 128  # the joined pair: the query and the start of the abstract
  c.num_epochs = 2  # 104 steps, 33 min on 2 CPU cores
  c.optim.lr = 1e-4
  c.optim.head_lr = 1e-3
  c.train.grad_cache_chunk = 4  # 32 pairs at a time through the encoder (the same gradient)
  c.rerank.first_stage = "sentence-transformers/all-MiniLM-L6-v2"
  c.rerank.top = 100
  if "mpnet" in flags:  # ~8x MiniLM's cost a pair: one epoch of groups of 4 (~2 h on 2 cores)
    c.model = "sentence-transformers/all-mpnet-base-v2"
    c.optim.lr = 2e-5
    c.data.num_negatives = 3
    c.encode_batch_size = 32
  if "smoke" in flags:
    base.apply_smoke(c)
    c.data.negatives = ""  # set by the test to a temp path
    c.train.grad_cache_chunk = 0
    c.rerank.first_stage = "bm25"
    c.rerank.top = 10
  return c
