"""Parameter surgery: heads added to a loaded model before training, and their initialisations.

    model_config, params = add_projection(model_config, params, 64, "prefix", seed=0)
    params = add_mlm_head(params, SentenceEncoder(model_config), seed=0)
    params = add_distill_projection(params, 384, 768, seed=0, kernel=lstsq_map(s_NxS, t_NxT))

A projection is a sentence-transformers Dense module (exported as 2_Dense); the MLM head is BERT's
`cls.predictions` (exported by checkpoint.export_mlm); the distillation projection maps the
student's embedding into the teacher's space during training only and is never exported.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from embed_jax import hf
from embed_jax.checkpoint import atomic_write
from embed_jax.embedder import Embedder, load_tokenizer
from embed_jax.models import SentenceEncoder

log = logging.getLogger(__name__)

DISTILL_PROJECTION = "distill_projection"  # a training-only params key (never exported)


def add_projection(model_config, params, dim: int, init: str, seed: int, kernel=None):
  """A linear Dense head (pooled -> dim) on a model without one: `kernel` when given (e.g.
  principal axes), else `prefix` starts it as the truncation to the first `dim` dims (identity
  columns), `random` as N(0, 1/pooled_dim). -> (model_config, params)"""
  pooled = model_config.pooled_dim
  if kernel is not None:
    kernel = np.asarray(kernel, np.float32)
    if kernel.shape != (pooled, dim):
      raise ValueError(f"projection kernel has shape {kernel.shape}, expected {(pooled, dim)}")
  elif init in ("prefix", "pca"):
    if dim > pooled:
      raise ValueError(f"bad config: projection.init={init!r} needs projection.dim <= {pooled}")
    kernel = np.eye(pooled, dim, dtype=np.float32)
  else:
    kernel = np.random.default_rng(seed).normal(0, pooled ** -0.5, (pooled, dim)).astype(np.float32)
  params = {**params, "dense": {"kernel": kernel, "bias": np.zeros(dim, np.float32)}}
  return model_config.replace(dense_features=dim, dense_activation="identity", dense_bias=True), params


def principal_axes(x_NxD: np.ndarray) -> np.ndarray:
  """[D, D]: the principal axes of the (centred) rows as columns, largest variance first. An
  orthogonal matrix: rotating embeddings by it keeps every cosine, and puts the most variance a
  linear map to d dims can keep into the first d."""
  centred_NxD = np.asarray(x_NxD, np.float64)
  centred_NxD = centred_NxD - centred_NxD.mean(0)
  _, axes_DxD = np.linalg.eigh(centred_NxD.T @ centred_NxD)  # ascending eigenvalues
  return axes_DxD[:, ::-1]


def add_mlm_head(params, module: SentenceEncoder, seed: int):
  """A freshly initialised MLM head (BERT's initialisation) beside the encoder's params."""
  ids_1x8 = jnp.zeros((1, 8), jnp.int32)
  head = module.init(jax.random.key(seed), ids_1x8, ids_1x8, jnp.zeros((1, 2), jnp.int32),
                     method=SentenceEncoder.mlm_logits)["params"]["mlm_head"]
  return {**params, "mlm_head": jax.tree.map(np.asarray, head)}


def add_distill_projection(params, student_dims: int, teacher_dims: int, seed: int,
                           kernel: np.ndarray | None = None):
  """A linear map student -> teacher dims for embedding distillation, trained with the model and
  never exported (SentenceEncoder ignores the extra key): `kernel` when given (e.g.
  `lstsq_map`'s), else N(0, 1/student_dims)."""
  if kernel is None:
    kernel = np.random.default_rng([seed, 7]).normal(0, student_dims ** -0.5,
                                                     (student_dims, teacher_dims))
  if kernel.shape != (student_dims, teacher_dims):
    raise ValueError(f"distillation projection has shape {kernel.shape}, expected "
                     f"{(student_dims, teacher_dims)}")
  return {**params, DISTILL_PROJECTION: {"kernel": np.asarray(kernel, np.float32)}}


def lstsq_map(s_NxS: np.ndarray, t_NxT: np.ndarray) -> np.ndarray:
  """[S, T] float32: the least-squares map from rows s to rows t, with a little ridge (1e-3 of
  the mean eigenvalue) for stability. A random distillation projection would leave the student
  chasing a random rotation of the teacher while the map itself barely moves at the encoder's
  learning rate; this one starts where the starting student already is."""
  gram_SxS = s_NxS.T @ s_NxS
  ridge = 1e-3 * np.trace(gram_SxS) / len(gram_SxS)
  kernel = np.linalg.solve(gram_SxS + ridge * np.eye(len(gram_SxS)), s_NxS.T @ t_NxT)
  return kernel.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# A training config's model: the pretrained (or init) weights and the heads the config asks for.
# ----------------------------------------------------------------------------------------------


def load_model(config, workdir: Path):
  """(ModelConfig, params, tokenizer, source): the pretrained model, a tiny random one (smoke),
  with `init` weights when given, and the config's projection head."""
  overrides = dict(dtype=config.dtype, max_seq_length=config.max_seq_length)
  if config.smoke:
    from embed_jax.testing import make_tiny_model
    folder = workdir / "tiny-model"
    if not (folder / "config.json").exists():
      make_tiny_model(folder)
    source = "tiny-random-bert"
  else:
    folder, source = hf.resolve(config.model), config.model
  model_config, params = hf.load(folder, **overrides)
  if config.init:
    init_config, params = hf.load(config.init, **overrides)
    if init_config.replace(hf_config=None) != model_config.replace(hf_config=None):
      log.warning("init %s has a different config from %s; using the init's", config.init, source)
      model_config = init_config
    folder, source = Path(config.init), config.init
  tokenizer = load_tokenizer(folder)
  if config.projection.dim and not model_config.dense_features:
    kernel = None
    if config.projection.init == "pca":
      if config.projection.dim > model_config.pooled_dim:
        raise ValueError(f"bad config: projection.init='pca' needs projection.dim <= "
                         f"{model_config.pooled_dim}")
      kernel = cached(workdir / "pca_projection.npy", lambda: pca_kernel(
          config, Embedder(model_config, params, tokenizer)))
    model_config, params = add_projection(model_config, params, config.projection.dim,
                                                config.projection.init, config.seed, kernel=kernel)
  if config.representation == "multivector" and model_config.late_interaction is None:
    model_config, params = add_multivector_head(config, model_config, params, tokenizer, workdir)
  elif config.representation == "multivector":
    log.info("%s is a multi-vector model: its own settings are used (%s)", source,
             model_config.late_interaction)
  elif model_config.late_interaction is not None:
    raise ValueError(f"bad config: {source} is a multi-vector (ColBERT) model; set "
                     f"representation='multivector' to train it")
  if config.representation == "cross":
    model_config, params = add_classifier_head(model_config, params, source, config.seed)
  elif model_config.classifier is not None:
    raise ValueError(f"bad config: {source} is a cross-encoder; set representation='cross' to "
                     f"train it")
  if config.representation == "sparse":
    model_config, params = add_sparse_head(config, model_config, params, source,
                                           tokenizer=tokenizer, workdir=workdir)
  elif model_config.sparse is not None:
    raise ValueError(f"bad config: {source} is a sparse ({model_config.sparse.kind}) model; set "
                     f"representation='sparse' to train it")
  return model_config, params, tokenizer, source


def add_classifier_head(model_config, params, source: str, seed: int):
  """A cross-encoder's head on a loaded encoder, as transformers initialises a fresh
  *ForSequenceClassification (normal(0.02) kernels, zero biases): BERT's [CLS] pooler when the
  checkpoint has none, and the classifier (one label); MPNet's classification head. A model
  that already is a cross-encoder keeps its head. -> (model_config, params)"""
  from embed_jax.models.config import Classifier
  if model_config.classifier is not None:
    log.info("%s is a cross-encoder: its classifier is trained further", source)
    return model_config, params
  rng = np.random.default_rng([seed, 29])
  hidden = model_config.hidden_size

  def dense(n_in, n_out):
    return {"kernel": rng.normal(0, 0.02, (n_in, n_out)).astype(np.float32),
            "bias": np.zeros(n_out, np.float32)}

  params = dict(params)
  if model_config.architecture == "bert" and not model_config.add_pooler:
    params["encoder"] = {**params["encoder"], "pooler": dense(hidden, hidden)}
    model_config = model_config.replace(add_pooler=True)
  if model_config.architecture == "mpnet":  # MPNetForSequenceClassification has no pooler
    params["encoder"] = {k: v for k, v in params["encoder"].items() if k != "pooler"}
    model_config = model_config.replace(add_pooler=False)
    params["classifier_dense"] = dense(hidden, hidden)
  params["classifier"] = dense(hidden, 1)
  log.info("cross-encoder head on %s (%s)", source, model_config.architecture)
  return model_config.replace(classifier=Classifier(), normalize=False), params


def model_heads(model_config, params) -> list[str]:
  """The heads a loaded model has, by name (for error messages)."""
  out = [f"pooling ({'+'.join(model_config.pooling)})"]
  if "dense" in params:
    out.append("Dense")
  if "mlm_head" in params:
    out.append("MLM head (cls.predictions)")
  if "token_dense" in params:
    out.append("token projection (ColBERT)")
  if "lexical" in params:
    out.append("lexical weights")
  return out


def add_sparse_head(config, model_config, params, source: str, seed: int | None = None,
                    tokenizer=None, workdir: Path | None = None):
  """A sparse head (config.sparse) on a loaded model: SPLADE reads the model's MLM head (a
  model without one is refused, naming the heads it has), its bias shifted so that the starting
  documents average `sparse.init_doc_nnz` non-zero weights (see splade_bias_shift); the
  lexical-weight head is a fresh linear map hidden -> 1 (BGE-M3's sparse_linear), N(0, 1/hidden)
  kernel and bias 0, unless the model has one. -> (model_config, params)"""
  from embed_jax.models.config import SparseHead
  sp = config.sparse
  have = model_config.sparse
  if have is not None and have.kind != sp.head:
    raise ValueError(f"bad config: {source} is a {have.kind} model; sparse.head={sp.head!r} asks "
                     f"for another head")
  head = have or SparseHead(sp.head, pooling=sp.pooling, activation=sp.activation)
  if head.kind == "splade" and config.smoke and "mlm_head" not in params:
    params = add_mlm_head(params, SentenceEncoder(model_config), config.seed)  # a tiny random model
  if head.kind == "splade" and ("mlm_head" not in params or model_config.architecture != "bert"):
    raise ValueError(f"bad config: sparse.head='splade' needs a BERT-family model with an MLM head "
                     f"(cls.predictions); {source} has {', '.join(model_heads(model_config, params))}. "
                     f"Start from a masked-LM checkpoint (configs/scifact_mlm.py writes one to "
                     f"<workdir>/export_mlm) or use sparse.head='lexical'")
  if head.kind == "splade" and have is None and sp.init_doc_nnz > 0 and workdir is not None:
    shift = float(cached(workdir / "splade_bias_shift.npy", lambda: np.float32(
        splade_bias_shift(config, model_config.replace(sparse=head), params, tokenizer))))
    mlm = {**params["mlm_head"], "bias": np.asarray(params["mlm_head"]["bias"]) - shift}
    params = {**params, "mlm_head": mlm}
    log.info("SPLADE: the MLM head's bias shifted by %.3f, for %d non-zeros per starting document "
             "(the softmax, and so the masked-LM, is unchanged)", -shift, sp.init_doc_nnz)
  if head.kind == "lexical" and "lexical" not in params:
    seed = config.seed if seed is None else seed
    hidden = model_config.hidden_size
    kernel = np.random.default_rng([seed, 23]).normal(0, hidden ** -0.5, (hidden, 1))
    params = {**params, "lexical": {"kernel": kernel.astype(np.float32),
                                    "bias": np.zeros(1, np.float32)}}
  log.info("sparse head: %s (%s)", head.kind, source)
  return model_config.replace(sparse=head, normalize=False), params


def add_prefix_tokens(model_config, params, tokenizer, tokens):
  """Adds marker tokens the tokenizer does not know (as PyLate adds "[Q] " and "[D] "), growing
  the word-embedding table to the tokenizer's size; a new row starts as the mean of the existing
  rows (transformers' resize draws around that mean: this takes the mean itself, so a run is
  deterministic). -> (model_config, params)"""
  new = [t for t in dict.fromkeys(tokens)
         if t and tokenizer.convert_tokens_to_ids(t) == tokenizer.unk_token_id]
  if not new:
    return model_config, params
  tokenizer.add_tokens(new)
  table_VxH = np.asarray(params["encoder"]["embeddings"]["word_embeddings"]["embedding"])
  size = len(tokenizer)
  if size > len(table_VxH):
    grown = np.concatenate([table_VxH, np.repeat(table_VxH.mean(0, keepdims=True),
                                                 size - len(table_VxH), axis=0)])
    embeddings = {**params["encoder"]["embeddings"], "word_embeddings": {"embedding": grown}}
    params = {**params, "encoder": {**params["encoder"], "embeddings": embeddings}}
    model_config = model_config.replace(vocab_size=size)
  log.info("added the marker tokens %s to the tokenizer (ids %s)", new,
           tokenizer.convert_tokens_to_ids(new))
  return model_config, params


def add_multivector_head(config, model_config, params, tokenizer, workdir: Path):
  """Turns a dense model into a multi-vector one (config.multivector): marker tokens, and a
  token projection hidden -> dims, no bias. `projection_init="pca"` starts it on the principal
  directions of the starting encoder's document token states (the uncentred second moment, over
  `projection_texts` corpus texts, cached in <workdir>/multivector_projection.npy): each token
  keeps as much of its state as a map to that many dims can, so MaxSim starts close to the
  cosine of the token states themselves; "random" is N(0, 1/hidden). -> (model_config, params)"""
  from embed_jax.models.config import LateInteraction
  mv = config.multivector
  li = LateInteraction(dims=mv.dims, bias=False, query_prefix=mv.query_prefix,
                       document_prefix=mv.document_prefix, query_length=mv.query_length,
                       document_length=mv.document_length,
                       do_query_expansion=mv.do_query_expansion,
                       attend_to_expansion_tokens=mv.attend_to_expansion_tokens)
  model_config, params = add_prefix_tokens(model_config, params, tokenizer,
                                           [li.query_prefix, li.document_prefix])
  model_config = model_config.replace(late_interaction=li,
                                      max_seq_length=max(li.document_length, li.query_length))
  hidden = model_config.hidden_size
  if mv.projection_init == "pca":
    kernel = cached(workdir / "multivector_projection.npy",
                    lambda: token_pca_kernel(config, model_config, params, tokenizer))
  else:
    kernel = np.random.default_rng([config.seed, 17]).normal(
        0, hidden ** -0.5, (hidden, li.dims)).astype(np.float32)
  log.info("multi-vector head: %d -> %d token projection (%s init), markers %r / %r",
           hidden, li.dims, mv.projection_init, li.query_prefix, li.document_prefix)
  return model_config, {**params, "token_dense": {"kernel": np.asarray(kernel, np.float32)}}


def splade_bias_shift(config, model_config, params, tokenizer) -> float:
  """The constant to subtract from an MLM head's bias so that SPLADE vectors of a seeded sample
  of `sparse.init_texts` corpus texts average `sparse.init_doc_nnz` non-zeros. SPLADE keeps the
  logits above 0; the masked-LM objective never sets where 0 lies (its softmax ignores a constant
  shift), and a head trained briefly on a small corpus, as configs/scifact_mlm.py's, has positive
  logits for nearly the whole vocabulary at some token of every document (30,512 of 30,522 here):
  every document then matches every query. Shifting the bias moves the threshold without changing
  the masked-LM at all."""
  from embed_jax.data import load_beir
  from embed_jax.embedder import bucketed_batches, tokenize_texts
  sp = config.sparse
  texts = load_beir(config.data.dataset, data_dir=config.data.data_dir or None).corpus_texts(" ")
  take = sorted(np.random.default_rng([config.seed, 29]).permutation(len(texts))[:sp.init_texts])
  rows = tokenize_texts(tokenizer, model_config, [texts[i] for i in take], config.max_seq_length)
  module = SentenceEncoder(model_config)
  top = jax.jit(lambda p, ids, mask: module.apply({"params": p}, ids, mask,
                                                  method=SentenceEncoder.splade_max_logits))
  log.info("sparse.init_doc_nnz=%d: the MLM head's logits over %d corpus texts", sp.init_doc_nnz,
           len(rows))
  maxima = [np.asarray(top(params, ids, mask))[:len(idx)] for idx, ids, mask in bucketed_batches(
      rows, config.encode_batch_size, config.max_seq_length, model_config.pad_token_id)]
  maxima_NxV = np.concatenate(maxima)
  keep = min(sp.init_doc_nnz, maxima_NxV.shape[1])
  return float(np.quantile(maxima_NxV, 1 - keep / maxima_NxV.shape[1]))


def token_pca_kernel(config, model_config, params, tokenizer) -> np.ndarray:
  """[hidden, dims]: the leading eigenvectors of the second moment of the starting encoder's
  token states over a seeded sample of corpus texts, tokenized as documents."""
  import jax
  from embed_jax.data import load_beir
  from embed_jax.embedder import bucketed_batches
  from embed_jax.representations import MultiVector
  mv = config.multivector
  texts = load_beir(config.data.dataset, data_dir=config.data.data_dir or None).corpus_texts(" ")
  take = sorted(np.random.default_rng([config.seed, 19]).permutation(len(texts))[:mv.projection_texts])
  rep = MultiVector().bind(model_config, tokenizer)
  rows = rep.tokenize(tokenizer, model_config, [texts[i] for i in take], "document")
  module = SentenceEncoder(model_config)
  states = jax.jit(lambda p, ids, mask: module.apply({"params": p}, ids, mask,
                                                      method=SentenceEncoder.encode_tokens))
  gram = np.zeros((model_config.hidden_size,) * 2, np.float64)
  log.info("multivector.projection_init='pca': token states of %d corpus texts", len(rows))
  for _, ids, mask in bucketed_batches(rows, config.encode_batch_size,
                                       model_config.late_interaction.document_length,
                                       model_config.pad_token_id):
    h = np.asarray(states(params, ids, mask), np.float64)[mask > 0]
    gram += h.T @ h
  _, axes = np.linalg.eigh(gram)  # ascending
  return np.ascontiguousarray(axes[:, ::-1][:, :model_config.late_interaction.dims], np.float32)


def cached(path: Path, compute: Callable[[], np.ndarray]) -> np.ndarray:
  """An array fitted once per workdir: read from `path`, else computed and written atomically
  (a resumed run does not encode again)."""
  if path.exists():
    return np.load(path)
  value = compute()
  atomic_write(path, lambda f: np.save(f, value), "wb")
  return value


def pca_kernel(config, start: Embedder) -> np.ndarray:
  """[pooled, projection.dim]: the principal axes of the starting model's unit embeddings of
  `projection.pca_texts` corpus texts (a seeded sample), largest variance first. At
  projection.dim = pooled it is a rotation: full-dim cosine scores are unchanged, and each
  prefix keeps the most variance a linear map to that many dims can."""
  from embed_jax.data import load_beir
  texts = load_beir(config.data.dataset, data_dir=config.data.data_dir or None).corpus_texts(" ")
  take = np.random.default_rng([config.seed, 11]).permutation(len(texts))[:config.projection.pca_texts]
  log.info("projection.init='pca': fitting on %d corpus texts embedded by the starting model", len(take))
  x_NxD = start.encode([texts[i] for i in sorted(take)], batch_size=config.encode_batch_size,
                       normalize=True)
  return np.ascontiguousarray(principal_axes(x_NxD)[:, :config.projection.dim], np.float32)


def distill_projection_kernel(config, data, start: Embedder) -> np.ndarray:
  """[student dims, teacher dims]: `heads.lstsq_map` from the starting student's unit embeddings
  to the teacher's stored vectors, over `distill.projection_texts` of the unlabelled texts (a
  seeded sample)."""
  from embed_jax.data.teacher import dataset_texts
  ids, texts = dataset_texts(data.dataset, config.unlabelled.texts.split("+"))
  take = sorted(np.random.default_rng([config.seed, 13]).permutation(len(ids))
                [:config.distill.projection_texts])
  log.info("distill.projection_init='lstsq': fitting on %d texts embedded by the starting model",
           len(take))
  s_NxS = start.encode([texts[i] for i in take], batch_size=config.encode_batch_size, normalize=True)
  t_NxT = np.asarray(data.store.vectors[data.store.rows(ids[i] for i in take)], np.float32)
  return lstsq_map(s_NxS, t_NxT)


def add_training_heads(config, params, module: SentenceEncoder, data, start: Embedder,
                       workdir: Path):
  """The heads the objective trains beside the model: an MLM head for MLM tasks (when the model
  has none), the distillation projection when the teacher's dims differ from the student's."""
  if any(t.spec is not None for t in data.tasks) and "mlm_head" not in params:
    params = add_mlm_head(params, module, config.seed)
    log.info("%s has no MLM head (cls.predictions): initialised one", start.source)
  dims = module.config.embedding_dim
  if config.distill.embedding > 0 and data.store.dims != dims:
    kernel = (cached(workdir / "distill_projection.npy",
                     lambda: distill_projection_kernel(config, data, start))
              if config.distill.projection_init == "lstsq" else None)
    params = add_distill_projection(params, dims, data.store.dims, config.seed, kernel)
    log.info("embedding distillation through a learned %d -> %d projection (%s init, not "
             "exported)", dims, data.store.dims, config.distill.projection_init)
  return params
