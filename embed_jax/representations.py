"""A representation: what a model outputs for a text, and how two outputs are scored.

The objective embeds its text groups through it (`embed`, inside the jitted step) and its losses
score with `score`; the data loaders tokenize through it (`tokenize`); the evaluator encodes a
corpus and its queries through it and searches them as `search_plan` says (`encode`); the
exporter writes its folder (`export`). A new kind of embedding is one more class here, a head on
the encoder and a score function; the trainer and the evaluator do not change.

    dense        one vector per text (pooling, optional Dense head), cosine similarity
    multivector  one unit vector per token (ColBERT / PyLate), MaxSim
    sparse       vocabulary weights (SPLADE, BGE-M3 lexical weights), dot product
    bm25         BM25 over the texts (no weights; evaluation only)
    cross        a cross-encoder's logit per (query, document) pair; re-ranks, does not search

A text group is a query group ("q", or a task's "<task>.q") or a document group (every other);
`for_group` gives the head for it, and `tokenize` the token ids of its texts.

    rep = representations.get(config, model_config, tokenizer)  # config.representation, bound
    out_BxE = rep.embed(module, params, {"ids": ids_BxL, "mask": mask_BxL}, train=False)
    scores_BxC = rep.score.matrix(rep.score.prepare(q_BxE), rep.score.prepare(d_CxE))
    rep = representations.of_model(embed_jax.load(folder))      # what a saved model is
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from embed_jax import losses
from embed_jax.models import SentenceEncoder


def role(group: str) -> str:
  """"query" for a query group ("q", "<task>.q"), else "document"."""
  return "query" if group == "q" or group.endswith(".q") else "document"


class Dense:
  """One vector per text: the pooled encoder output through the model's Dense head, if any;
  cosine similarity. Outputs are raw (unnormalised): the score normalises, so a Matryoshka
  prefix is re-normalised as a truncated embedding is."""
  name = "dense"
  score = losses.COSINE
  similarity = "cosine"  # the name results and exports give the score

  def __init__(self, layers: tuple[int, ...] = ()):
    # 2D Matryoshka: also the pooled output after these layers (1-based counts).
    self.layers = tuple(layers)

  def bind(self, model_config, tokenizer) -> "Dense":
    return self

  def for_group(self, group: str) -> "Dense":
    return self

  def tokenize(self, tokenizer, model_config, texts, role: str, max_len: int) -> list[list[int]]:
    """Token ids of texts after the model's prompt for the role ("query", "document"; none
    when it has none), [CLS]/[SEP] included, truncated to max_len."""
    from embed_jax.embedder import tokenize_texts
    prompt = model_config.prompt(role)
    return tokenize_texts(tokenizer, model_config, [prompt + t for t in texts] if prompt else texts,
                          max_len)

  # ---- in the step ----

  def embed(self, module: SentenceEncoder, params, group: dict, *, train: bool,
            dropout_rng=None, **_) -> jax.Array:
    """Vectors [..., E] of a text group {"ids": [..., L], "mask": [..., L]}; with `layers`,
    [..., 1 + K, E]: after the last layer (index 0), then after each of `layers`."""
    ids, mask = group["ids"], group["mask"]
    flat = (ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, ids.shape[-1]))
    kw = {"rngs": {"dropout": dropout_rng}} if train else {}
    if self.layers:
      out = module.apply({"params": params}, *flat, self.layers, deterministic=not train,
                         method=SentenceEncoder.embed_layers, **kw)
    else:
      out = module.apply({"params": params}, *flat, deterministic=not train, normalize=False, **kw)
    return out.reshape(*ids.shape[:-1], *out.shape[1:])

  def at_layer(self, out: jax.Array, index: int) -> jax.Array:
    """The output after one of the embedded layers (0: the last), without the layer axis."""
    return out[..., index, :] if self.layers else out

  prefix = staticmethod(losses.truncate)  # Matryoshka: the first d dims

  # ---- outside the step: encode, search, export ----

  def encode(self, model, texts, *, batch_size: int = 32, show_progress=None, role=None):
    """float32 [n, E] raw vectors of `texts` (an embed_jax.Embedder), in input order, after the
    model's prompt for the role (queries: "query") when it has one."""
    from embed_jax.embedder import role_prompt
    return model.encode(texts, batch_size=batch_size, normalize=False, show_progress=show_progress,
                        **role_prompt(model, role))

  def search_plan(self, docs_NxD, *, dims=None, precisions=("float32",), rescore: int = 0,
                  pool_factors=(), plaid: bool = False) -> list:
    """[(empty index, dims)]: exact search over the corpus vectors cut to each of `dims` (None:
    the full dims), at each precision (embed_jax.evaluate), and binary re-scored with the float
    query when `rescore` > 0."""
    from embed_jax import evaluate
    full = docs_NxD.shape[1]
    dims = sorted({int(d) for d in (dims or [full])}, reverse=True)
    if any(not 1 <= d <= full for d in dims):
      raise ValueError(f"dims {dims} must each be in 1..{full} (the model's dimension)")
    bad = [p for p in precisions if p not in evaluate.PRECISIONS]
    if bad:
      raise ValueError(f"precision {bad} not supported; choose from {evaluate.PRECISIONS}")
    if pool_factors or plaid:
      raise ValueError("token pooling and PLAID are for multi-vector models; this one is dense")
    plan = []
    for d in dims:
      plan += [(evaluate.dense_index(p), d) for p in precisions]
      if rescore and "binary" in precisions:
        plan.append((evaluate.Binary(rescore), d))
      if "binary" in precisions and d % 8:
        evaluate.log.warning("binary at %d dims: not a multiple of 8, the last byte is padded", d)
    return plan

  @staticmethod
  def dims_of(docs_NxD) -> int:
    return docs_NxD.shape[1]

  def export(self, params, model_config, tokenizer, out_dir, *, base_model=None):
    """A sentence-transformers folder (transformers.AutoModel loads its encoder)."""
    from embed_jax.checkpoint import export
    return export(params, model_config, tokenizer, out_dir, base_model=base_model)


class MultiVector:
  """One unit vector per token (late interaction: ColBERT, PyLate), scored by MaxSim. Queries
  are [CLS] [Q] tokens [SEP] padded with [MASK] to the query length (query augmentation; the
  encoder attends to the [MASK]s only with attend_to_expansion_tokens), every position scored;
  documents are [CLS] [D] tokens [SEP], punctuation (the skiplist) left out of the score.
  Outputs are {"vectors": [..., L, D], "mask": [..., L]} (mask: the tokens that are scored).

  Built from a model's LateInteraction settings; `bind(model_config, tokenizer)` resolves the
  token ids (markers, [MASK], [SEP], skiplist) the head and the tokenizer need."""
  name = "multivector"
  score = losses.MAXSIM
  similarity = "maxsim"
  layers = ()

  def __init__(self, settings=None, ids: dict | None = None, group_role: str = "document",
               truncate_queries: bool = False):
    # truncate_queries: cut a query longer than the query length (as PyLate does silently)
    # rather than refuse it.
    self.settings, self.ids, self.role = settings, ids, group_role
    self.truncate_queries = truncate_queries

  def bind(self, model_config, tokenizer) -> "MultiVector":
    li = model_config.late_interaction
    if li is None:
      raise ValueError("this is a dense model (no token projection): a multi-vector "
                       "representation needs a ColBERT/PyLate model or "
                       "config.representation='multivector' in training")
    if tokenizer.mask_token_id is None or tokenizer.sep_token_id is None:
      raise ValueError("a multi-vector model needs a tokenizer with [MASK] and [SEP] tokens")
    marker = lambda p: tokenizer.convert_tokens_to_ids(p) if p else None  # noqa: E731
    ids = {"query_prefix": marker(li.query_prefix), "document_prefix": marker(li.document_prefix),
           "mask": tokenizer.mask_token_id, "sep": tokenizer.sep_token_id,
           # as PyLate: a word missing from the vocabulary skips the unknown token
           "skiplist": tuple(sorted({tokenizer.convert_tokens_to_ids(w) for w in li.skiplist_words}))}
    unknown = [p for p in (li.query_prefix, li.document_prefix)
               if p and tokenizer.convert_tokens_to_ids(p) == tokenizer.unk_token_id]
    if unknown:
      raise ValueError(f"the markers {unknown} are not in the tokenizer: add them "
                       f"(embed_jax.models.heads.add_multivector_head) or set other prefixes")
    return MultiVector(li, ids, truncate_queries=self.truncate_queries)

  def for_group(self, group: str) -> "MultiVector":
    return MultiVector(self.settings, self.ids, role(group), self.truncate_queries)

  def tokenize(self, tokenizer, model_config, texts, role: str, max_len: int | None = None,
               truncate_queries: bool | None = None) -> list[list[int]]:
    """Token ids as PyLate makes them: truncated to the query or document length (the marker
    included), the marker inserted after [CLS], queries padded with [MASK] to the query length.
    A query longer than the query length is refused unless `truncate_queries` (default: the
    representation's)."""
    from embed_jax.embedder import tokenize_texts
    li = self.settings
    if truncate_queries is None:
      truncate_queries = self.truncate_queries
    length = min(li.query_length if role == "query" else li.document_length,
                 model_config.max_tokens)  # never past the position embeddings
    prefix = self.ids[f"{role}_prefix"]
    rows = tokenize_texts(tokenizer, model_config, texts, (length - 1) if prefix is not None else length)
    if role == "query" and not truncate_queries:
      full = tokenize_texts(tokenizer, model_config, texts, 10**6)
      long = [len(f) for f in full if len(f) > (length - 1 if prefix is not None else length)]
      if long:
        raise ValueError(f"{len(long)} of {len(texts)} queries are longer than query_length="
                         f"{length} tokens (the longest has {max(long) + (prefix is not None)}): "
                         f"raise the query length or truncate them")
    if prefix is not None:
      rows = [r[:1] + [prefix] + r[1:] for r in rows]
    if role == "query" and li.do_query_expansion:
      rows = [r + [self.ids["mask"]] * (length - len(r)) for r in rows]
    return rows

  def masks(self, ids_BxL, mask_BxL):
    """(attention mask, scored tokens) of token ids whose `mask_BxL` marks the real positions
    (query expansion [MASK]s included)."""
    mask_BxL = mask_BxL > 0
    if self.role == "query":
      attend = mask_BxL
      if self.settings.do_query_expansion and not self.settings.attend_to_expansion_tokens:
        # the expansion [MASK]s follow the first [SEP]
        first_sep_B = jnp.argmax(ids_BxL == self.ids["sep"], axis=-1)
        attend = mask_BxL & (jnp.arange(ids_BxL.shape[-1])[None, :] <= first_sep_B[:, None])
      return attend.astype(jnp.int32), mask_BxL
    keep = mask_BxL & ~jnp.isin(ids_BxL, jnp.asarray(self.ids["skiplist"], ids_BxL.dtype))
    return mask_BxL.astype(jnp.int32), keep

  # ---- in the step ----

  def embed(self, module: SentenceEncoder, params, group: dict, *, train: bool,
            dropout_rng=None, **_) -> dict:
    """{"vectors": [..., L, D], "mask": [..., L]} of a text group {"ids", "mask"}."""
    ids, mask = group["ids"], group["mask"]
    flat_ids, flat_mask = ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, ids.shape[-1])
    attend, keep = self.masks(flat_ids, flat_mask)
    kw = {"rngs": {"dropout": dropout_rng}} if train else {}
    vecs = module.apply({"params": params}, flat_ids, attend, deterministic=not train,
                        method=SentenceEncoder.token_vectors, **kw)
    return {"vectors": vecs.reshape(*ids.shape, vecs.shape[-1]),
            "mask": keep.astype(jnp.float32).reshape(ids.shape)}

  def at_layer(self, out, index: int):
    return out

  @staticmethod
  def prefix(out, d: int):
    raise ValueError("Matryoshka prefixes of token vectors are not supported")

  # ---- outside the step ----

  def encode(self, model, texts, *, batch_size: int = 32, show_progress=None,
             role: str = "document", truncate_queries: bool | None = None) -> list[np.ndarray]:
    """The scored token vectors of each text, [n_i, D] float32, in input order (PyLate's
    `encode(..., is_query=...)`); queries longer than the query length are refused unless
    `truncate_queries`."""
    from embed_jax.multivector import encode_tokens
    return encode_tokens(model, self.bind(model.config, model.tokenizer).for_group(
        "q" if role == "query" else "p"), texts, batch_size=batch_size,
        show_progress=show_progress, truncate_queries=truncate_queries)

  def search_plan(self, docs, *, pool_factors=(), plaid: bool = False, dims=None,
                  precisions=("float32",), rescore: int = 0) -> list:
    """[(empty index, None)]: exact MaxSim, pooled by each of `pool_factors`, and PLAID."""
    if (dims and list(dims) != [self.settings.dims]) or tuple(precisions) != ("float32",) or rescore:
      raise ValueError("a multi-vector model is searched at float32 and its own dims: --dims, "
                       "--precision and --rescore are for dense models (use --pool)")
    from embed_jax import multivector
    return [(index, None) for index in multivector.indexes(pool_factors=pool_factors, plaid=plaid)]

  @staticmethod
  def dims_of(docs) -> int:
    return int(docs[0].shape[1])

  def export(self, params, model_config, tokenizer, out_dir, *, base_model=None):
    """A PyLate folder (pylate.models.ColBERT loads it; transformers.AutoModel its encoder)."""
    from embed_jax.checkpoint import export
    return export(params, model_config, tokenizer, out_dir, base_model=base_model)


class Sparse:
  """Vocabulary-sized weights, scored by the dot product (an inverted index's score): SPLADE on
  the MLM head or BGE-M3-style lexical weights (models.config.SparseHead). Outputs are
  [..., V] float32, non-negative. Queries are tokenized to the query length, documents to the
  document length, as dense models. `bind(model_config, tokenizer)` resolves the special tokens
  the lexical head leaves out and the vocabulary the vectors index."""
  name = "sparse"
  score = losses.DOT
  similarity = "dot"
  layers = ()

  def __init__(self, head=None, special_ids: tuple[int, ...] = (), group_role: str = "document",
               query_top_k: int = 0, document_top_k: int = 0, vocab: str = ""):
    self.head, self.special_ids, self.role = head, tuple(special_ids), group_role
    self.query_top_k, self.document_top_k, self.vocab = query_top_k, document_top_k, vocab

  def _with(self, **changes) -> "Sparse":
    fields = dict(head=self.head, special_ids=self.special_ids, group_role=self.role,
                  query_top_k=self.query_top_k, document_top_k=self.document_top_k,
                  vocab=self.vocab)
    return Sparse(**{**fields, **changes})

  def bind(self, model_config, tokenizer) -> "Sparse":
    if model_config.sparse is None:
      kind = ("a multi-vector (ColBERT)" if model_config.late_interaction is not None
              else "a dense")
      raise ValueError(f"this is {kind} model (no sparse head): a sparse representation needs a "
                       f"SPLADE / SparseEncoder or lexical-weight model, or "
                       f"config.representation='sparse' in training")
    from embed_jax.sparse import vocab_fingerprint
    special = tuple(sorted({i for i in (tokenizer.cls_token_id, tokenizer.sep_token_id,
                                        tokenizer.pad_token_id, tokenizer.unk_token_id,
                                        tokenizer.bos_token_id, tokenizer.eos_token_id)
                            if i is not None}))
    return self._with(head=model_config.sparse, special_ids=special,
                      vocab=vocab_fingerprint(tokenizer))

  def for_group(self, group: str) -> "Sparse":
    return self._with(group_role=role(group))

  def tokenize(self, tokenizer, model_config, texts, role: str, max_len: int) -> list[list[int]]:
    from embed_jax.embedder import tokenize_texts
    return tokenize_texts(tokenizer, model_config, texts, max_len)

  # ---- in the step ----

  def vectors(self, module: SentenceEncoder, params, ids_BxL, mask_BxL, *, train: bool = False,
              dropout_rng=None) -> jax.Array:
    kw = {"rngs": {"dropout": dropout_rng}} if train else {}
    if self.head.kind == "splade":
      return module.apply({"params": params}, ids_BxL, mask_BxL, deterministic=not train,
                          method=SentenceEncoder.splade_vectors, **kw)
    return module.apply({"params": params}, ids_BxL, mask_BxL, self.special_ids,
                        deterministic=not train, method=SentenceEncoder.lexical_vectors, **kw)

  def embed(self, module: SentenceEncoder, params, group: dict, *, train: bool,
            dropout_rng=None, **_) -> jax.Array:
    """Weights [..., V] of a text group {"ids": [..., L], "mask": [..., L]}."""
    ids, mask = group["ids"], group["mask"]
    out = self.vectors(module, params, ids.reshape(-1, ids.shape[-1]),
                       mask.reshape(-1, ids.shape[-1]), train=train, dropout_rng=dropout_rng)
    return out.reshape(*ids.shape[:-1], out.shape[-1])

  def at_layer(self, out, index: int):
    return out

  @staticmethod
  def prefix(out, d: int):
    raise ValueError("Matryoshka prefixes of vocabulary weights are not supported")

  # ---- outside the step ----

  def encode(self, model, texts, *, batch_size: int = 32, show_progress=None,
             role: str = "document", max_len: int | None = None):
    """scipy.sparse CSR [n, V] float32 of `texts` (an embed_jax.Embedder with a sparse head),
    in input order; max_len defaults to the model's max_seq_length."""
    from embed_jax.sparse import encode_sparse
    rep = self.bind(model.config, model.tokenizer) if self.head is None else self
    return encode_sparse(model, rep.for_group("q" if role == "query" else "p"), texts,
                         batch_size=batch_size, show_progress=show_progress,
                         max_len=min(max_len or model.config.max_seq_length, model.config.max_tokens))

  def search_plan(self, docs, *, dims=None, precisions=("float32",), rescore: int = 0,
                  pool_factors=(), plaid: bool = False) -> list:
    """[(the inverted index, None)], pruned to the top-k weights when asked."""
    if dims or tuple(precisions) != ("float32",) or rescore or pool_factors or plaid:
      raise ValueError("a sparse model is searched through its inverted index: --dims, "
                       "--precision, --rescore, --pool and --plaid are for dense or multi-vector "
                       "models (use --top_k)")
    from embed_jax.sparse import InvertedIndex
    return [(InvertedIndex(self.query_top_k, self.document_top_k, self.vocab), None)]

  @staticmethod
  def dims_of(docs) -> int:
    return int(docs.shape[1])

  def export(self, params, model_config, tokenizer, out_dir, *, base_model=None):
    """A SparseEncoder folder (SPLADE) or a lexical-weight folder (embed_jax reads it)."""
    from embed_jax.checkpoint import export
    return export(params, model_config, tokenizer, out_dir, base_model=base_model)


class BM25:
  """BM25 (embed_jax.sparse.BM25Model) over the texts themselves: `encode` keeps the texts,
  the index tokenizes them. Evaluation only."""
  name = "bm25"
  similarity = "bm25"

  def __init__(self, model):
    self.model = model  # its settings (k1, b, stopwords, stemmer)

  def encode(self, model, texts, *, role: str = "document", **_):
    from embed_jax.sparse import check_texts
    check_texts(texts)
    return list(texts)

  def search_plan(self, docs, *, dims=None, precisions=("float32",), rescore: int = 0,
                  pool_factors=(), plaid: bool = False) -> list:
    if dims or tuple(precisions) != ("float32",) or rescore or pool_factors or plaid:
      raise ValueError("BM25 has no --dims, --precision, --rescore, --pool or --plaid")
    from embed_jax.sparse import BM25Index
    return [(BM25Index(self.model), None)]

  @staticmethod
  def dims_of(docs) -> int:
    return 0


class Cross:
  """A cross-encoder: one logit per joined (query, document) pair (config.classifier), no
  text embedding. Its text groups are pairs: "qp" [B, L] (each query with its positive) and
  "qn" [B, N, L] (with each hard negative), {"ids", "mask", "types"} (token type 1 marks the
  document for BERT); outputs are the relevance logits [B] and [B, N]. It is evaluated by
  re-ranking a first stage's top documents (embed_jax.rerank), not by search."""
  name = "cross"
  similarity = "cross-encoder"
  layers = ()
  score = None

  def bind(self, model_config, tokenizer) -> "Cross":
    if model_config.classifier is None:
      raise ValueError("this model has no classifier head: representation='cross' needs a "
                       "cross-encoder (embed_jax.models.heads.add_classifier_head)")
    return self

  def for_group(self, group: str) -> "Cross":
    return self

  def embed(self, module: SentenceEncoder, params, group: dict, *, train: bool,
            dropout_rng=None, **_) -> jax.Array:
    """The first label's logit [...] of a pair group {"ids": [..., L], "mask", "types"}."""
    ids, mask = group["ids"], group["mask"]
    types = group.get("types", jnp.zeros_like(ids))
    flat = [x.reshape(-1, ids.shape[-1]) for x in (ids, mask, types)]
    kw = {"rngs": {"dropout": dropout_rng}} if train else {}
    logits = module.apply({"params": params}, *flat, deterministic=not train,
                          method=SentenceEncoder.pair_logits, **kw)
    return logits[:, 0].reshape(ids.shape[:-1])

  def at_layer(self, out: jax.Array, index: int) -> jax.Array:
    return out

  def export(self, params, model_config, tokenizer, out_dir, *, base_model=None):
    """A CrossEncoder folder (transformers *ForSequenceClassification)."""
    from embed_jax.checkpoint import export
    return export(params, model_config, tokenizer, out_dir, base_model=base_model)


REPRESENTATIONS = {"dense": Dense, "multivector": MultiVector, "sparse": Sparse, "cross": Cross}


def get(config, model_config=None, tokenizer=None):
  """The representation a training config asks for (`config.representation`), bound to the
  model's tokenizer when given (multi-vector and sparse heads need its token ids)."""
  if config.representation not in REPRESENTATIONS:
    raise ValueError(f"representation={config.representation!r}: choose from "
                     f"{', '.join(REPRESENTATIONS)}")
  if config.representation == "dense":
    rep = Dense(layers=tuple(config.matryoshka.layers))
  elif config.representation == "multivector":
    rep = MultiVector(truncate_queries=config.multivector.truncate_queries)
  elif config.representation == "cross":
    rep = Cross()
  else:
    rep = Sparse(query_top_k=config.sparse.query_top_k, document_top_k=config.sparse.document_top_k)
  return rep if model_config is None else rep.bind(model_config, tokenizer)


def of_model(model, truncate_queries: bool = False, query_top_k: int = 0,
             document_top_k: int = 0):
  """The representation an embed_jax.Embedder's model has: multi-vector when it has a token
  projection, sparse when it has a sparse head, BM25 for embed_jax.sparse.BM25Model, else
  dense."""
  from embed_jax.sparse import BM25Model
  if isinstance(model, BM25Model):
    return BM25(model)
  if model.config.late_interaction is not None:
    return MultiVector(truncate_queries=truncate_queries).bind(model.config, model.tokenizer)
  if model.config.sparse is not None:
    return Sparse(query_top_k=query_top_k, document_top_k=document_top_k).bind(
        model.config, model.tokenizer)
  return Dense()
