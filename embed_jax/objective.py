"""The training objective: a list of weighted terms over the outputs of named text groups, built
once from the config.

A batch has explicit structure:

    {"groups": {"q": {"ids": ids_BxLq, "mask": mask_BxLq}, "p": ..., "n": {"ids": ids_BxNxLd, ...},
                "u": ..., "stsb.a": ..., "mlm.x": {"ids", "mask", "words"}},
     "inputs": {"pairs": {"valid_B", "q_ids_B", "p_ids_B", "neg_ids_BxN", "q_teacher_BxT", ...},
                "u": {"valid_B", "teacher_BxT", "target_BxD"}, "stsb": {"valid_B", "labels_B"}}}

Groups are the texts the step encodes: q (queries), p (positives), n (hard negatives), u
(unlabelled texts) and each extra task's `<task>.<g>` (embed_jax.tasks). Inputs are what the
losses read beside the outputs, per data source: validity masks, text ids for duplicate masking,
labels, teacher vectors.

`Objective.embed` puts each group through its head (the representation, or an MLM task's head)
and adds the views (the distillation projection); `Objective.loss` sums the terms whose groups
are in the batch (with one task per step, the others are absent), logging each term's value and
each Matryoshka prefix's. A term names its weight, its groups, the source of its inputs, its loss
and optional Matryoshka dims; `main_terms` is the list for the labelled pairs and unlabelled
texts, and each task adds its own (embed_jax.tasks). A new term is one entry in such a list.
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

from embed_jax import losses
from embed_jax.models.heads import DISTILL_PROJECTION

UNLABELLED_TEXTS = ("corpus", "queries", "train_queries", "corpus+queries", "corpus+train_queries")
PAIR_LOSSES = ("mnrl", "triplet")
CROSS_LOSSES = ("listwise", "bce")  # a cross-encoder's, over each query's candidate group
RESERVED_SOURCES = ("pairs", "u")  # inputs of the labelled pairs and the unlabelled texts


def uses_pairs(config) -> bool:
  """Whether the run reads labelled (query, positive) pairs: a term on inputs "pairs"."""
  return any(t.source == "pairs" and t.weight > 0 for t in main_terms(config))


def uses_unlabelled(config) -> bool:
  """Whether the run reads batches of unlabelled texts (text group u): a term on inputs "u"."""
  return any(t.source == "u" and t.weight > 0 for t in main_terms(config))


# ----------------------------------------------------------------------------------------------
# Terms.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Term:
  """One weighted loss. `loss(*outputs, inputs=...) -> scalar` reads the outputs of `groups` in
  order (then those of `optional`, None where the batch has none) and `inputs[source]`."""
  name: str  # logged as <name>_loss
  weight: float
  groups: tuple[str, ...]
  source: str
  loss: Callable
  optional: tuple[str, ...] = ()
  dims: tuple[int, ...] = ()  # Matryoshka: the loss on each prefix (losses.matryoshka)
  dim_weights: tuple[float, ...] = ()  # () = all 1
  label: str = ""  # per-dim metrics are <label>@<d> ("" = name)
  layer: int = 0  # 2D Matryoshka: the output after which embedded layer (0: the last)
  metrics: Callable | None = None  # (*outputs, inputs=...) -> {name: value}, logged <name>_<key>
  ramp: Callable | None = None  # step -> factor on the weight (a warm-up); None: constant


@dataclasses.dataclass(frozen=True)
class View:
  """A group's output through a training-only linear map in params[param] (not exported)."""
  group: str
  param: str

  def __call__(self, params, out):
    return jnp.matmul(out, params[self.param]["kernel"])


def ranking_loss(name: str, *, scale: float = 20.0, symmetric: bool = False, margin: float = 0.5,
                 score: losses.Score = losses.COSINE) -> Callable:
  """loss(q, p, n=None, *, inputs) over (query, positive[, hard negatives [B, N]]) rows: `mnrl`
  (in-batch and hard negatives) or `triplet` (the first hard negative). Inputs: valid_B and the
  text ids that mask duplicates (q_ids_B, p_ids_B, neg_ids_BxN; any may be absent)."""
  if name == "mnrl":
    return lambda q, p, n=None, *, inputs: losses.mnrl(
        q, p, n, scale=scale, symmetric=symmetric, valid_B=inputs["valid_B"],
        p_ids_B=inputs.get("p_ids_B"), neg_ids_BxN=inputs.get("neg_ids_BxN"),
        q_ids_B=inputs.get("q_ids_B"), score=score)
  if name == "triplet":
    return lambda q, p, n, *, inputs: losses.triplet(q, p, n[:, 0], margin=margin,
                                                     valid_B=inputs["valid_B"], score=score)
  raise ValueError(f"unknown ranking loss {name!r}; choose from {', '.join(PAIR_LOSSES)}")


def main_terms(config, rep=None, *, distill_projection: bool = False) -> list[Term]:
  """The config's terms over the labelled pairs (q, p, n; inputs "pairs") and the unlabelled
  texts (u; inputs "u"), in the order they are summed (weight 0: off). `rep` is the
  representation whose score the losses use (default: the config's). A new term is one more
  entry here (and its weight's default in configs/base.py).
    pairs              loss.name (mnrl | triplet) at each Matryoshka prefix
    pairs/layer<l>     the same after layer l (2D Matryoshka), each weighted layer_weight / K
    self_distill       prefix self-distillation on the unlabelled texts
    distill_embedding  the student's embedding (through the projection) vs the teacher's
    distill_scores     KL of in-batch score distributions over the unlabelled texts
    distill_pair_scores  the same over queries x positives
    distill_margin_mse Margin-MSE on (query, positive, first hard negative)
    distill_candidate_kl, distill_candidate_margin_mse  from a score store (candidate_terms)
  Score terms are Matryoshka-wrapped too: each student prefix against the full teacher."""
  if config.representation == "cross":
    return cross_terms(config)
  if rep is None:
    from embed_jax import representations
    rep = representations.get(config)
  c, mrl, sd, d = config.loss, config.matryoshka, config.matryoshka.self_distill, config.distill
  prefixes = dict(dims=tuple(mrl.dims), dim_weights=tuple(mrl.weights))
  pairs = ranking_loss(c.name, scale=c.scale, symmetric=c.symmetric, margin=c.margin,
                       score=rep.score)
  pair_groups = dict(groups=("q", "p"), optional=("n",)) if c.name == "mnrl" else dict(
      groups=("q", "p", "n"))
  kl = dict(temperature=d.temperature, teacher_temperature=d.teacher_temperature, score=rep.score)
  layers = tuple(mrl.layers)
  terms = [
      Term("pairs", c.weight, source="pairs", loss=pairs, label=c.name, **pair_groups, **prefixes),
      *[Term(f"pairs/layer{layer}", mrl.layer_weight / len(layers), source="pairs", loss=pairs,
             label=f"{c.name}/layer{layer}", layer=j, **pair_groups, **prefixes)
        for j, layer in enumerate(layers, 1) if c.weight],
      Term("self_distill", sd.weight, ("u",), "u", lambda u, *, inputs: (
          losses.prefix_self_distillation(u, tuple(mrl.dims), target_BxD=inputs.get("target_BxD"),
                                          pairwise=sd.pairwise, topk=sd.topk, k=sd.k,
                                          valid_B=inputs["valid_B"]))),
      Term("distill_embedding", d.embedding, ("u_proj" if distill_projection else "u",), "u",
           lambda s, *, inputs: losses.embedding_distillation(
               s, inputs["teacher_BxT"], kind=d.embedding_kind, valid_B=inputs["valid_B"])),
      Term("distill_scores", d.scores, ("u", "u"), "u", lambda a, b, *, inputs: (
          losses.score_distillation(a, b, teacher_q_BxT=inputs["teacher_BxT"],
                                    teacher_d_CxT=inputs["teacher_BxT"], valid_B=inputs["valid_B"],
                                    valid_C=inputs["valid_B"], exclude_self=True, **kl)),
           **prefixes),
      Term("distill_pair_scores", d.pair_scores, ("q", "p"), "pairs", lambda q, p, *, inputs: (
          losses.score_distillation(q, p, teacher_q_BxT=inputs["q_teacher_BxT"],
                                    teacher_d_CxT=inputs["p_teacher_BxT"],
                                    valid_B=inputs["valid_B"], valid_C=inputs["valid_B"], **kl)),
           **prefixes),
      Term("distill_margin_mse", d.margin_mse, ("q", "p", "n"), "pairs", lambda q, p, n, *, inputs: (
          losses.margin_mse(q, p, n[:, 0], teacher_q_BxT=inputs["q_teacher_BxT"],
                            teacher_p_BxT=inputs["p_teacher_BxT"],
                            teacher_n_BxT=inputs["n_teacher_BxNxT"][:, 0],
                            valid_B=inputs["valid_B"], score=rep.score)), **prefixes),
  ]
  if config.representation == "sparse":
    terms += sparse_terms(config)

  def student_group(q, p, n=None, *, inputs):  # the student's scores of each query's group
    score = rep.score
    qp = score.prepare(q)
    s_p = score.pairs(qp, score.prepare(p))
    s_n = None if n is None else jax.vmap(lambda n_i: score.pairs(qp, score.prepare(n_i)),
                                          in_axes=1, out_axes=1)(n)
    return candidate_group(s_p, s_n, inputs)

  return terms + candidate_terms(config, ("q", "p"), student_group)


def candidate_terms(config, groups: tuple[str, ...], student_group: Callable) -> list[Term]:
  """Distillation from a score store over each query's candidate group (the positive and the
  drawn hard negatives; inputs teacher_p_B, teacher_n_BxN): `student_group(*outputs, inputs)`
  gives the student's (scores [B, 1 + N], allowed). Student scores / distill.temperature,
  teacher scores / distill.teacher_temperature.
    distill_candidate_kl          KL(teacher || student) of the softmax over the group
    distill_candidate_margin_mse  Margin-MSE over (positive, each negative)"""
  d = config.distill

  def pair(fn):
    def loss(*outputs, inputs):
      s, allowed = student_group(*outputs, inputs=inputs)
      t, _ = candidate_group(inputs["teacher_p_B"], inputs.get("teacher_n_BxN") if s.shape[1] > 1
                             else None, inputs)
      return fn(s / d.temperature, t / d.teacher_temperature, allowed, inputs["valid_B"])
    return loss

  return [Term("distill_candidate_kl", d.candidate_kl, groups, "pairs", pair(losses.listwise_kl),
               optional=("n",) if groups == ("q", "p") else ("qn",)),
          Term("distill_candidate_margin_mse", d.candidate_margin_mse, groups, "pairs",
               pair(losses.group_margin_mse),
               optional=("n",) if groups == ("q", "p") else ("qn",))]


def candidate_group(qp_B, qn_BxN, inputs) -> tuple[jax.Array, jax.Array]:
  """(scores [B, 1 + N], allowed [B, 1 + N]) of each query's positive (column 0) and hard
  negatives (padding negatives, doc id -1, not allowed)."""
  if qn_BxN is None:
    return qp_B[:, None], jnp.ones((qp_B.shape[0], 1), bool)
  allowed = losses.group_allowed(inputs.get("neg_ids_BxN"), qn_BxN.shape[1], qp_B.shape[0])
  return jnp.concatenate([qp_B[:, None], qn_BxN], axis=1), allowed


def cross_terms(config) -> list[Term]:
  """A cross-encoder's term over the pair groups qp [B] and qn [B, N] (logits): `listwise`,
  cross-entropy of the positive among its group (1 positive + N mined negatives, logits times
  loss.scale; FlagEmbedding's reranker loss), or `bce`, pointwise binary cross-entropy
  (positive 1, negatives 0). Logs the share of rows whose positive scores highest."""
  c = config.loss

  def loss(qp, qn=None, *, inputs):
    scores, allowed = candidate_group(qp, qn, inputs)
    if c.name == "bce":
      return losses.pointwise_bce(scores, allowed, inputs["valid_B"])
    return losses.listwise_ce(scores * c.scale, allowed, inputs["valid_B"])

  def accuracy(qp, qn=None, *, inputs):
    scores, allowed = candidate_group(qp, qn, inputs)
    best = jnp.all(jnp.where(allowed[:, 1:], scores[:, 1:] < scores[:, :1], True), axis=1)
    return {"accuracy": losses._mean_over(best.astype(jnp.float32), inputs["valid_B"])}

  return [Term("pairs", c.weight, ("qp",), "pairs", loss, optional=("qn",), label=c.name,
               metrics=accuracy),
          *candidate_terms(config, ("qp",), lambda qp, qn=None, *, inputs: candidate_group(
              qp, qn, inputs))]


def sparse_terms(config) -> list[Term]:
  """A sparse model's regularisers (config.sparse), as SPLADE trains them: `regularizer`
  (flops | l1) of the query vectors and of the documents' (positives and hard negatives
  together, as sentence-transformers' SpladeLoss), each weight rising quadratically from 0 over
  the first `warmup_steps` steps (SPLADE's schedule)."""
  sp = config.sparse
  reg = losses.REGULARIZERS.get(sp.regularizer)
  if reg is None:
    return []  # refused by objective_problems

  def ramp(step):
    if sp.warmup_steps <= 0:
      return 1.0
    return jnp.minimum(1.0, (step / sp.warmup_steps)) ** 2

  def documents(p, n, *, inputs):
    valid_B = inputs["valid_B"]
    if n is None:
      return reg(p, valid_B)
    n_rows = n.reshape(-1, n.shape[-1])
    valid = jnp.concatenate([valid_B, jnp.repeat(valid_B, n.shape[1])])
    return reg(jnp.concatenate([p, n_rows]), valid)

  return [Term("query_regularizer", sp.query_weight, ("q",), "pairs",
               lambda q, *, inputs: reg(q, inputs["valid_B"]), ramp=ramp,
               label=f"query_{sp.regularizer}"),
          Term("document_regularizer", sp.document_weight, ("p",), "pairs", documents,
               optional=("n",), ramp=ramp, label=f"document_{sp.regularizer}",
               metrics=lambda p, n, *, inputs: sparsity(p, inputs["valid_B"]))]


def sparsity(w_BxV, valid_B) -> dict:
  """The mean count of non-zero weights per valid row (logged as a term metric)."""
  nnz_B = jnp.sum(w_BxV > 0, axis=-1).astype(jnp.float32)
  return {"nnz": jnp.sum(jnp.where(valid_B, nnz_B, 0.0)) / jnp.maximum(jnp.sum(valid_B), 1)}


# ----------------------------------------------------------------------------------------------
# The objective: embed the groups, sum the terms.
# ----------------------------------------------------------------------------------------------


_SALTS = {"q": 0, "p": 1, "n": 2}  # kept from the first release: results stay reproducible


def salt(group: str) -> int:
  """A group's dropout stream is fold_in(rng, salt); an MLM group's masks fold in salt + 1."""
  return _SALTS.get(group, zlib.crc32(group.encode()) & 0x7FFFFFFF)


@dataclasses.dataclass(frozen=True)
class Objective:
  representation: object  # the model's output kind (embed_jax.representations)
  terms: tuple[Term, ...]
  heads: dict = dataclasses.field(default_factory=dict)  # group -> another head (an MLM task's)
  views: dict = dataclasses.field(default_factory=dict)  # name -> View of a group's output
  equal_weights: bool = False  # proportional task sampling: the weights were the sampling shares

  def head(self, group: str):
    return self.heads[group] if group in self.heads else self.representation.for_group(group)

  def embed(self, module, params, groups: dict, rng, train: bool, mask_key=None,
            rows: dict | None = None) -> dict:
    """{group or view: output} for the text groups of a batch (or of one gradient-caching
    chunk): `rows` {group: [B] each row's index in the global batch} (default 0..B-1) keeps MLM
    masks the same however the batch is split. Dropout draws from fold_in(rng, salt(group))."""
    view_params = {v.param for v in self.views.values()}
    encoder_params = {k: v for k, v in params.items() if k not in view_params}
    out = {}
    for name in sorted(groups):
      group = groups[name]
      out[name] = self.head(name).embed(
          module, encoder_params, group, train=train,
          dropout_rng=jax.random.fold_in(rng, salt(name)),
          mask_rng=jax.random.fold_in(rng if mask_key is None else mask_key, salt(name) + 1),
          rows=None if rows is None else rows[name])
    for name, view in self.views.items():
      if view.group in out and view.param in params:
        out[name] = view(params, out[view.group])
    return out

  def loss(self, outputs: dict, inputs: dict, step=0) -> tuple[jax.Array, dict]:
    """(the weighted sum of the terms whose groups are present, metrics): <term>_loss for each,
    <label>@<d> for each Matryoshka prefix, and any term metrics. `step` (the optimiser steps
    taken) sets the weight of a term with a ramp (<term>_weight in the metrics)."""
    aux, parts = {}, []
    for t in self.terms:
      if any(g not in outputs for g in t.groups):
        continue
      head = lambda g: self.head(self.views[g].group if g in self.views else g)  # noqa: E731
      args = [None if g not in outputs else head(g).at_layer(outputs[g], t.layer)
              for g in t.groups + t.optional]
      source = inputs[t.source]
      loss = lambda *a, t=t, source=source: t.loss(*a, inputs=source)  # noqa: E731
      if t.dims:
        value, per_dim = losses.matryoshka(loss, t.dims, t.dim_weights,
                                           prefix=self.representation.prefix)(*args)
        aux.update({f"{t.label or t.name}@{d}": v for d, v in per_dim.items()})
      else:
        value = loss(*args)
      if t.metrics is not None:
        aux.update({f"{t.name}_{k}": v for k, v in t.metrics(*args, inputs=source).items()})
      aux[f"{t.name}_loss"] = value
      weight = 1.0 if self.equal_weights else t.weight
      if t.ramp is not None:
        weight = weight * t.ramp(step)
        aux[f"{t.name}_weight"] = jnp.asarray(weight, jnp.float32)
      parts.append((weight, value))
    return losses.weighted_sum(parts), aux


def build_objective(config, tasks=(), *, distill_projection: bool = False,
                    representation=None) -> Objective:
  """The config's objective: its representation (bound to the model's tokenizer; default the
  config's, unbound), main terms and each task's terms and heads."""
  from embed_jax import representations
  rep = representation or representations.get(config)
  terms = [t for t in main_terms(config, rep, distill_projection=distill_projection) if t.weight > 0]
  heads = {}
  for t in tasks:
    terms += t.terms(rep)
    heads.update(t.heads())
  views = {"u_proj": View("u", DISTILL_PROJECTION)} if distill_projection else {}
  return Objective(rep, tuple(terms), heads, views,
                   equal_weights=config.task_sampling == "proportional")


# ----------------------------------------------------------------------------------------------
# Config checks (before any compute).
# ----------------------------------------------------------------------------------------------


def objective_problems(config, num_devices: int) -> list[str]:
  from embed_jax import representations
  mrl, sd, proj = config.matryoshka, config.matryoshka.self_distill, config.projection
  dist, unl = config.distill, config.unlabelled
  problems = []
  if config.representation == "cross":
    return cross_problems(config)
  if config.loss.name not in PAIR_LOSSES:
    problems.append(f"loss.name={config.loss.name!r}: choose from {', '.join(PAIR_LOSSES)} (CoSENT "
                    f"needs graded pairs: a task, tasks.<name> = task('sts', loss='cosent'))")
  if config.loss.name == "triplet" and config.data.num_negatives < 1:
    problems.append("loss.name='triplet' needs data.num_negatives >= 1 (and data.negatives)")
  if mrl.weights and len(mrl.weights) != len(mrl.dims):
    problems.append(f"matryoshka.weights has {len(mrl.weights)} values for {len(mrl.dims)} dims")
  if any(not isinstance(i, int) or i < 1 for i in mrl.layers):
    problems.append(f"matryoshka.layers={tuple(mrl.layers)}: 1-based layer counts, each >= 1")
  if config.representation not in representations.REPRESENTATIONS:
    problems.append(f"representation={config.representation!r}: choose from "
                    f"{', '.join(representations.REPRESENTATIONS)}")
  if config.loss.name not in PAIR_LOSSES or config.representation not in representations.REPRESENTATIONS:
    return problems  # the terms below cannot be built
  if config.representation == "sparse":
    sp = config.sparse
    dense_only = {"matryoshka.dims": mrl.dims, "matryoshka.layers": mrl.layers,
                  "matryoshka.self_distill.weight": sd.weight,
                  "distill.embedding": dist.embedding, "projection.dim": proj.dim,
                  "tasks": tuple(config.tasks.keys())}
    problems += [f"{k}={v}: dense representation only (a sparse model's vocabulary weights are "
                 f"scored by dot product)" for k, v in dense_only.items() if v]
    from embed_jax.models.config import SPARSE_HEADS
    if sp.head not in SPARSE_HEADS:
      problems.append(f"sparse.head={sp.head!r}: choose from {', '.join(SPARSE_HEADS)}")
    if sp.regularizer not in losses.REGULARIZERS:
      problems.append(f"sparse.regularizer={sp.regularizer!r}: choose from "
                      f"{', '.join(losses.REGULARIZERS)}")
    if sp.query_weight < 0 or sp.document_weight < 0 or sp.warmup_steps < 0:
      problems.append(f"sparse.query_weight={sp.query_weight}, document_weight="
                      f"{sp.document_weight} and warmup_steps={sp.warmup_steps} must be >= 0")
    if sp.init_doc_nnz < 0 or (sp.init_doc_nnz and sp.init_texts < 1):
      problems.append(f"sparse.init_doc_nnz={sp.init_doc_nnz} must be >= 0 (0: the MLM head as it "
                      f"is) and sparse.init_texts={sp.init_texts} >= 1")
    if sp.query_top_k < 0 or sp.document_top_k < 0:
      problems.append(f"sparse.query_top_k={sp.query_top_k} and document_top_k="
                      f"{sp.document_top_k} must be >= 0 (0: keep every weight)")
  if config.representation == "multivector":
    dense_only = {"matryoshka.dims": mrl.dims, "matryoshka.self_distill.weight": sd.weight,
                  "distill.embedding": dist.embedding, "projection.dim": proj.dim,
                  "tasks": tuple(config.tasks.keys())}
    problems += [f"{k}={v}: dense representation only (multivector scores token vectors by "
                 f"MaxSim)" for k, v in dense_only.items() if v]
    mv = config.multivector
    if mv.projection_init not in ("pca", "random"):
      problems.append(f"multivector.projection_init={mv.projection_init!r}: choose pca or random")
    if mv.dims < 1 or mv.query_length < 4 or mv.document_length < 4:
      problems.append(f"multivector: dims={mv.dims} must be >= 1, query_length="
                      f"{mv.query_length} and document_length={mv.document_length} >= 4")
  terms = main_terms(config)
  problems += [f"the {t.name} term's weight is {t.weight}: weights must be >= 0 (0: off)"
               for t in terms if t.weight < 0]
  if not any(t.weight > 0 for t in terms) and not config.tasks:
    problems.append("nothing to train: loss.weight is 0, no (self-)distillation weight is > 0 "
                    "and there are no tasks")
  from embed_jax.tasks import task_problems
  problems += task_problems(config, num_devices)
  if sd.weight > 0:
    if not mrl.dims:
      problems.append("matryoshka.self_distill.weight > 0 needs matryoshka.dims")
    if sd.target not in ("current", "initial"):
      problems.append(f"matryoshka.self_distill.target={sd.target!r}: choose current or initial")
    if sd.k < 1:
      problems.append(f"matryoshka.self_distill.k={sd.k} must be >= 1")
  problems += score_store_problems(config)
  distilling = [t.name for t in terms if t.name.startswith("distill_") and t.weight > 0
                and not t.name.startswith("distill_candidate_")]
  if distilling and not dist.store:
    problems.append(f"the {' and '.join(distilling)} term(s) need distill.store (a folder from "
                    f"`embed-jax teacher`)")
  if dist.store and not Path(dist.store).exists():
    problems.append(f"distill.store={dist.store!r} does not exist: build it with `embed-jax "
                    f"teacher --model T --dataset D --out {dist.store}`")
  if dist.embedding_kind not in ("mse", "cosine"):
    problems.append(f"distill.embedding_kind={dist.embedding_kind!r}: choose mse or cosine")
  if dist.projection_init not in ("lstsq", "random"):
    problems.append(f"distill.projection_init={dist.projection_init!r}: choose lstsq or random")
  if dist.projection_texts < 1:
    problems.append(f"distill.projection_texts={dist.projection_texts} must be >= 1")
  if dist.margin_mse > 0 and config.data.num_negatives < 1:
    problems.append("distill.margin_mse > 0 needs hard negatives (data.num_negatives >= 1)")
  if dist.temperature <= 0 or dist.teacher_temperature <= 0:
    problems.append("distill.temperature and distill.teacher_temperature must be > 0")
  if uses_unlabelled(config):
    if unl.texts not in UNLABELLED_TEXTS:
      problems.append(f"unlabelled.texts={unl.texts!r}: choose from {', '.join(UNLABELLED_TEXTS)}")
    if unl.batch_size < 2 or unl.batch_size % num_devices:
      problems.append(f"unlabelled.batch_size={unl.batch_size} must be >= 2 and a multiple of "
                      f"the {num_devices} devices")
    chunk, per_device = config.train.grad_cache_chunk, config.batch_size // num_devices
    if chunk > 0 and not uses_pairs(config) and (unl.batch_size // num_devices) % chunk:
      problems.append(f"train.grad_cache_chunk={chunk} must divide the per-device unlabelled "
                      f"batch {unl.batch_size // num_devices}")
    if chunk > 0 and uses_pairs(config) and per_device % chunk == 0:  # else refused above
      n_chunks = per_device // chunk
      if (unl.batch_size // num_devices) % n_chunks:
        problems.append(f"unlabelled.batch_size={unl.batch_size} must split into the {n_chunks} "
                        f"gradient-caching chunks per device")
  if proj.dim < 0 or proj.init not in ("prefix", "random", "pca"):
    problems.append(f"projection.dim={proj.dim} must be >= 0 and projection.init={proj.init!r} "
                    f"prefix, random or pca")
  if proj.init == "pca" and proj.get("pca_texts", 0) < 2:
    problems.append(f"projection.pca_texts={proj.get('pca_texts')} must be >= 2 (corpus texts the "
                    f"PCA is fitted on)")
  return problems


def score_store_problems(config) -> list[str]:
  """The candidate-score distillation settings: a score store for its terms, negatives to score."""
  d = config.distill
  problems = []
  weights = {"distill.candidate_kl": d.candidate_kl,
             "distill.candidate_margin_mse": d.candidate_margin_mse}
  on = [k for k, v in weights.items() if v > 0]
  if (on or d.drop_false_negatives) and not d.score_store:
    problems.append(f"{' and '.join(on) or 'distill.drop_false_negatives'} need(s) "
                    f"distill.score_store (a folder from `embed-jax teacher --scores`)")
  if d.score_store and not Path(d.score_store).exists():
    problems.append(f"distill.score_store={d.score_store!r} does not exist: build it with "
                    f"`embed-jax teacher --scores --model T --negatives {config.data.negatives or 'F'} "
                    f"--out {d.score_store}`")
  if on and d.candidate_margin_mse > 0 and config.data.num_negatives < 1:
    problems.append("distill.candidate_margin_mse > 0 needs hard negatives (data.num_negatives >= 1)")
  if d.drop_false_negatives and not config.data.negatives:
    problems.append("distill.drop_false_negatives filters data.negatives; set it")
  return problems


def cross_problems(config) -> list[str]:
  """A cross-encoder's config: its loss, candidate groups, and nothing that needs embeddings."""
  mrl, dist = config.matryoshka, config.distill
  problems = []
  if config.loss.name not in CROSS_LOSSES:
    problems.append(f"loss.name={config.loss.name!r}: a cross-encoder (representation='cross') "
                    f"trains with {' or '.join(CROSS_LOSSES)}")
  if config.data.num_negatives < 1:
    problems.append("representation='cross' needs hard negatives (data.num_negatives >= 1 and "
                    "data.negatives): each query's group is its positive and those negatives")
  if config.loss.weight <= 0:
    problems.append(f"loss.weight={config.loss.weight}: a cross-encoder has one term; it must "
                    f"be > 0")
  embedding_only = {"matryoshka.dims": mrl.dims, "matryoshka.layers": mrl.layers,
                    "matryoshka.self_distill.weight": mrl.self_distill.weight,
                    "distill.store": dist.store, "projection.dim": config.projection.dim,
                    "tasks": tuple(config.tasks.keys())}
  problems += [f"{k}={v}: for embedding models (a cross-encoder scores joined pairs)"
               for k, v in embedding_only.items() if v]
  return problems + score_store_problems(config)


def check_model_fit(config, model_config) -> None:
  """The checks that need the model's shape (after loading it, before any compute)."""
  mrl = config.matryoshka
  try:
    losses.check_matryoshka_dims(tuple(mrl.dims), model_config.embedding_dim, tuple(mrl.weights))
  except ValueError as e:
    raise ValueError(f"bad config: {e}") from None
  bad = [i for i in mrl.layers if i >= model_config.num_layers]
  if bad:
    raise ValueError(f"bad config: matryoshka.layers {bad} must be < the model's "
                     f"{model_config.num_layers} layers (the last layer is always trained)")
