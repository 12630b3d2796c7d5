"""Defaults shared by every experiment; each configs/<name>.py starts from get_config() here.

    embed-jax train --config configs/scifact_mnrl.py --workdir runs/mnrl [--config.optim.lr=3e-5]
    embed-jax train --config configs/scifact_mnrl.py:smoke --workdir /tmp/smoke   # seconds
"""

import ml_collections

from embed_jax.evaluate import evaluator


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # data order is a function of (seed, epoch); dropout keys are fold_in(seed, step)
  c.smoke = False  # True: a tiny random model and a few steps (see apply_smoke)

  # Model: a hub id or a local Hugging Face folder. `init` (a folder) overrides its weights, e.g.
  # the export of an earlier stage; `resume` (a workdir) continues another run's checkpoint.
  c.model = "sentence-transformers/all-MiniLM-L6-v2"
  c.init = ""
  c.resume = ""
  c.max_seq_length = 256  # documents, tokens incl. [CLS]/[SEP]
  c.query_max_seq_length = 64  # queries are short claims/questions
  c.dtype = "float32"  # compute dtype; bfloat16 on TPU/GPU
  c.dropout = True  # the encoder's own dropout rates during training
  # What the model outputs for a text and how outputs are scored (embed_jax.representations):
  # dense = one vector per text, cosine; multivector = a unit vector per token, MaxSim (ColBERT,
  # PyLate). The objective, evaluators and export all use it.
  c.representation = "dense"
  # A multi-vector head put on a dense starting model (a PyLate model keeps its own settings);
  # names and defaults as PyLate's.
  c.multivector = ml_collections.ConfigDict()
  c.multivector.dims = 128  # per-token vector dims (the token projection, no bias)
  c.multivector.query_length = 32  # tokens, [CLS], marker and [SEP] included
  c.multivector.document_length = 180  # tokens, the same
  c.multivector.query_prefix = "[Q] "  # marker after [CLS]; a new token unless it exists
  c.multivector.document_prefix = "[D] "
  c.multivector.do_query_expansion = True  # pad queries with [MASK] to query_length
  c.multivector.attend_to_expansion_tokens = False  # the encoder attends to those [MASK]s
  c.multivector.truncate_queries = False  # False: a query longer than query_length is refused
  c.multivector.projection_init = "pca"  # pca (token states' principal directions) | random
  c.multivector.projection_texts = 1024  # corpus texts the pca init is fitted on

  # A sparse head (representation="sparse"): vocabulary weights scored by dot product. splade
  # reads the model's MLM head (SPLADE, sentence-transformers' SparseEncoder); lexical is
  # BGE-M3's learned lexical weights (a linear map of each token's state, no expansion).
  c.sparse = ml_collections.ConfigDict()
  c.sparse.head = "splade"  # splade | lexical
  c.sparse.pooling = "max"  # splade: max (SPLADE v2/++) | sum (v1)
  c.sparse.activation = "relu"  # splade: relu = log(1 + ReLU) | log1p_relu (twice log1p)
  c.sparse.regularizer = "flops"  # flops | l1, of query and document weights
  c.sparse.query_weight = 5e-5  # lambda_q (sentence-transformers' SPLADE example)
  c.sparse.document_weight = 3e-5  # lambda_d, positives and hard negatives together
  c.sparse.warmup_steps = 0  # both weights rise as (step / warmup_steps)^2 to their value
  # SPLADE from an MLM head: shift its bias (the masked-LM is unchanged) so that the starting
  # documents average this many non-zeros, calibrated on init_texts corpus texts; 0: as it is.
  c.sparse.init_doc_nnz = 256
  c.sparse.init_texts = 256
  c.sparse.query_top_k = 0  # evaluation: keep each query's k largest weights (0: all)
  c.sparse.document_top_k = 0  # evaluation: the same for documents

  # A cross-encoder (representation="cross"): a classifier over the joined (query, document)
  # pair, max_seq_length tokens for both (CrossEncoder truncates the pair longest-first); it
  # trains on each query's positive and data.num_negatives mined negatives (loss.name listwise
  # or bce) and is evaluated by re-ranking rerank.first_stage's top rerank.top documents.
  c.rerank = ml_collections.ConfigDict()
  c.rerank.first_stage = "sentence-transformers/all-MiniLM-L6-v2"  # a model folder, hub id or bm25
  c.rerank.top = 100

  # Data: pairs from a BEIR split's qrels (relevance > 0).
  c.data = ml_collections.ConfigDict()
  c.data.dataset = "scifact"  # BEIR name under $EMBED_JAX_DATA/beir, or a folder/zip
  c.data.data_dir = ""  # TFDS cache; "" = ~/.cache/embed_jax/tfds
  c.data.train_split = "train"
  c.data.dev_split = ""  # "" = carve dev queries from train (below) when the dataset has no dev
  c.data.dev_fraction = 0.0  # share of train queries held out as dev; 0 = no dev evaluation
  c.data.negatives = ""  # JSONL from `embed-jax mine`: {"query_id", "negatives": [doc ids]}
  c.data.num_negatives = 0  # hard negatives per pair, drawn from that file
  # Mine `data.negatives` with the starting model when the file does not exist yet.
  c.data.mine = ml_collections.ConfigDict()
  c.data.mine.enabled = False
  c.data.mine.top_k = 50  # candidates retrieved per query
  c.data.mine.skip_top = 3  # ranks skipped after removing positives (likely unlabelled positives)
  c.data.mine.margin = 0.05  # drop candidates scoring above (lowest positive - margin)
  c.data.mine.num_negatives = 5  # kept per query; training samples data.num_negatives of them
  c.data.mine.sampling = "random"  # random | top

  # The labelled pairs' loss (embed_jax.losses; graded pairs with CoSENT are a task, see tasks).
  c.loss = ml_collections.ConfigDict()
  c.loss.name = "mnrl"  # mnrl (InfoNCE) | triplet
  c.loss.scale = 20.0  # 1 / temperature on cosine similarities
  c.loss.symmetric = False  # also rank queries given each positive
  c.loss.margin = 0.5  # triplet margin
  c.loss.weight = 1.0  # of the labelled pairs loss; 0 = no labelled pairs (unlabelled texts only)

  # Unlabelled texts (text group "u"), read by self-distillation and distillation.
  c.unlabelled = ml_collections.ConfigDict()
  # corpus | queries | train_queries | corpus+queries | corpus+train_queries (texts, never qrels;
  # train_queries leaves the test queries out)
  c.unlabelled.texts = "corpus"
  c.unlabelled.batch_size = 64  # texts per step, global; a multiple of the devices

  # Distillation from a teacher store (`embed-jax teacher`): the teacher never runs in training.
  c.distill = ml_collections.ConfigDict()
  c.distill.store = ""  # the store's folder; "" = no distillation
  c.distill.teacher = ""  # the teacher the store must come from (name or fingerprint); "" = any
  c.distill.embedding = 0.0  # weight: student embedding (projected to the teacher's dims when
  #   they differ, by a learned linear map used only in training) vs the teacher's, unlabelled texts
  c.distill.embedding_kind = "mse"  # mse (|s - t|^2 of unit vectors) | cosine (1 - cos)
  # That projection starts as the least-squares map from the starting student's embeddings to
  # the teacher's over a seeded sample of the unlabelled texts (lstsq), or random (N(0, 1/dims)).
  c.distill.projection_init = "lstsq"  # lstsq | random
  c.distill.projection_texts = 4096  # lstsq: texts the map is fitted on (encoded once per run)
  c.distill.scores = 0.0  # weight: KL of the in-batch similarity distributions, unlabelled texts
  c.distill.pair_scores = 0.0  # weight: the same over the labelled queries x positives
  c.distill.margin_mse = 0.0  # weight: Margin-MSE on (query, positive, hard negative)
  c.distill.temperature = 0.05  # the student's in the KL
  c.distill.teacher_temperature = 0.05  # the teacher's in the KL
  # Teacher scores of each training query's candidates (`embed-jax teacher --scores`: a
  # cross-encoder's logits or a bi-encoder's cosines of the positives and data.negatives): the
  # student's scores of the same group (its similarity / temperature) against the teacher's
  # (/ teacher_temperature; 1.0 for a cross-encoder's logits).
  c.distill.score_store = ""  # the score store's folder; "" = none
  c.distill.candidate_kl = 0.0  # weight: KL of the softmax over each query's group (RocketQAv2)
  c.distill.candidate_margin_mse = 0.0  # weight: Margin-MSE over (positive, each negative)
  # False-negative removal: drop a mined negative the teacher scores above (its query's lowest
  # positive - margin), in the teacher's units. Needs distill.score_store.
  c.distill.drop_false_negatives = False
  c.distill.false_negative_margin = 0.0
  # Matryoshka (embed_jax.losses.matryoshka): the loss on each prefix of the embedding.
  c.matryoshka = ml_collections.ConfigDict()
  c.matryoshka.dims = ()  # e.g. (384, 256, 128, 64, 32), any order, each <= the model dim; () = off
  c.matryoshka.weights = ()  # one per dim; () = all 1.0
  # 2D Matryoshka: the loss also on the pooled output after these layers (1-based counts, each
  # < the model's layers), as sentence-transformers' Matryoshka2dLoss (without its KL term).
  c.matryoshka.layers = ()
  c.matryoshka.layer_weight = 1.0  # weight of the mean of the earlier layers' losses
  # Prefix self-distillation on unlabelled texts (losses.prefix_self_distillation): each step also
  # embeds a batch of `unlabelled` texts and pulls each prefix's similarities toward the full ones.
  c.matryoshka.self_distill = ml_collections.ConfigDict()
  c.matryoshka.self_distill.weight = 0.0  # > 0 turns it on (needs matryoshka.dims)
  c.matryoshka.self_distill.target = "current"  # current (stop-gradient) | initial (frozen start)
  c.matryoshka.self_distill.pairwise = 1.0  # weight of the all-pairs similarity term
  c.matryoshka.self_distill.topk = 1.0  # weight of the k-nearest-neighbour term
  c.matryoshka.self_distill.k = 8  # neighbours per text in the batch

  # A learned linear projection after pooling (a sentence-transformers Dense module, exported):
  # the fixed-feature (FF) baseline of the MRL paper trains one model per dim with it.
  c.projection = ml_collections.ConfigDict()
  c.projection.dim = 0  # output dims; 0 = none (a model that already has a Dense head keeps it)
  # prefix (starts as truncation to the first dim dims) | random | pca (the principal axes of the
  # starting model's corpus embeddings: at dim = the model's dims a rotation, full-dim scores
  # unchanged, each prefix as good as a linear map to it can start)
  c.projection.init = "prefix"
  c.projection.pca_texts = 4096  # corpus texts (a seeded sample) the pca init is fitted on

  # Extra tasks (embed_jax.tasks): c.tasks.<name> = tasks.task("sts" | "triplets" | "mlm", ...).
  c.tasks = ml_collections.ConfigDict()
  c.task_sampling = "all"  # all (every task each step) | round_robin | proportional (one a step)
  c.export_mlm = False  # also write <workdir>/export_mlm, a BertForMaskedLM folder (MLM head)

  c.batch_size = 32  # global, across devices; must divide by the device count
  c.num_epochs = 3
  c.max_steps = 0  # > 0 stops early (smoke runs, budgets)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 5e-5  # peak, after warmup
  c.optim.schedule = "linear"  # linear | cosine decay to 0 after warmup
  c.optim.warmup_ratio = 0.1  # of the total steps
  c.optim.weight_decay = 0.01  # AdamW; never on biases and LayerNorm
  c.optim.clip_norm = 1.0  # global gradient norm; 0 = off
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-6
  # A regex over parameter names ("encoder/.*" freezes the encoder, leaving heads to train):
  # matching parameters get no updates and no backward pass. "" trains everything.
  c.optim.freeze = ""
  # Peak learning rate of the parameters outside the encoder (an MLM head, a projection), with
  # the same warmup and decay: a head that starts random learns faster than the encoder moves.
  # 0 uses optim.lr for everything.
  c.optim.head_lr = 0.0

  # LoRA adapters (embed_jax.lora, as PEFT): r > 0 trains low-rank A, B on the Dense layers
  # `target` selects (a preset: attention | ffn | attention+ffn, or a regex over layer paths such
  # as "encoder/layer_0/attention/self/query"); the encoder is frozen (optim.freeze defaults to
  # "encoder/.*"), heads still train; checkpoints hold the adapters, not the base; the export is
  # merged, and <workdir>/adapter is a PEFT adapter folder.
  c.lora = ml_collections.ConfigDict()
  c.lora.r = 0
  c.lora.target = "attention"
  c.lora.alpha = 32.0  # the update is scaled by alpha / r (alpha / sqrt(r) with rslora)
  c.lora.dropout = 0.0  # on the adapter input in training (PEFT's lora_dropout; its default 0)
  c.lora.init = "kaiming"  # A as PEFT's default (kaiming-uniform) | gaussian; B starts at 0
  c.lora.rslora = False
  # Layers whose adapters the train step merges into their kernels (a preset such as "ffn" or a
  # regex; '' none): the same gradients, faster on XLA:CPU for the feed-forward layers
  # (experiments/README.md, LoRA); no adapter dropout on them.
  c.lora.merge_in_step = ""

  c.train = ml_collections.ConfigDict()
  c.train.runner = "jit"  # jit (a Mesh with `data` and `fsdp` axes) | pmap
  # Devices along the mesh's fsdp axis: > 1 splits every parameter and optimiser-state leaf over
  # them (FSDP, train.FSDP_RULES); the batch is split over all devices either way.
  c.train.fsdp = 1
  c.train.grad_cache_chunk = 0  # > 0: gradient caching with chunks of this many pairs
  c.train.log_every = 10  # steps between metric lines (every step with one task per step)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 50
  c.checkpoint.keep = 2

  # Evaluators (embed_jax.evaluate.evaluator), each with its cadence: `every` n steps during
  # training (0 = never), `at_start` (the starting model -> <output>_before.json), `at_end` (the
  # final model -> <output>.json); its headline metric is in metrics.jsonl and the summary.
  c.evals = ml_collections.ConfigDict()
  # BEIR test split at every Matryoshka dim -> results.json (test_at_start: before/after)
  c.evals.test = evaluator("retrieval", split="test", at_end=True, output="results")
  # nDCG@10 of the dev queries (data.dev_split, or carved by data.dev_fraction); every > 0 needs one
  c.evals.dev = evaluator("retrieval", split="dev", all_dims=False, k_values=(10,))
  # MLM tasks: held-out masked-token accuracy and perplexity -> mlm_before.json, mlm.json
  c.evals.mlm = evaluator("mlm_heldout", at_start=True, at_end=True)
  c.encode_batch_size = 64  # texts per forward outside the step: evaluators, mining, fits
  c.export = "final"  # final | best (the best evals.dev nDCG@10)
  return c


def apply_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks any experiment to seconds on a CPU: a tiny random model, short texts, a few steps."""
  c.smoke = True
  c.max_seq_length = 64
  c.query_max_seq_length = 32
  c.batch_size = 8
  c.max_steps = 4
  c.checkpoint.every_steps = 2
  c.encode_batch_size = 256
  c.unlabelled.batch_size = 8
  return c


def variants(arg: str | None, allowed: tuple[str, ...], config: str) -> set[str]:
  """The comma-separated variant flags of `--config configs/<config>:<arg>`; refuses unknown ones."""
  flags = set((arg or "").split(",")) - {""}
  if flags - set(allowed):
    raise ValueError(f"configs/{config}: unknown variant {sorted(flags - set(allowed))}; "
                     f"use {', '.join(allowed)}")
  return flags
