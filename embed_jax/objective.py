"""The training objective a config asks for: which text groups a batch holds, how the step embeds
them (`embed_groups`), and the weighted sum of loss terms over the embeddings (`make_loss`).

A batch is a dict of numpy arrays. Text group `g` is `g_ids_<shape>` and `g_mask_<shape>` (and
`g_words_<shape>` for whole-word masking): q (queries), p (positives), n (hard negatives), u
(unlabelled texts), `<task>.<g>` (extra tasks, embed_jax.tasks). Everything else is a loss input
(ids for duplicate masking, validity masks, labels, teacher vectors).
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

from embed_jax import losses
from embed_jax.models import SentenceEncoder
from embed_jax.models.mlm import mlm_rows
from embed_jax.tasks import task_terms


DISTILL_PROJECTION = "distill_projection"  # a training-only params key (never exported)


UNLABELLED_TEXTS = ("corpus", "queries", "train_queries", "corpus+queries", "corpus+train_queries")


def uses_pairs(config) -> bool:
  """Whether the run reads labelled (query, positive) pairs."""
  return config.loss.weight > 0 or config.distill.pair_scores > 0 or config.distill.margin_mse > 0


def uses_unlabelled(config) -> bool:
  """Whether the run reads batches of unlabelled texts (text group u)."""
  return (config.matryoshka.self_distill.weight > 0 or config.distill.embedding > 0
          or config.distill.scores > 0)


def text_groups(batch) -> dict[str, tuple[str, ...]]:
  """The batch's text groups: name -> (ids key, mask key[, words key]). A group `g` is the int32
  arrays `g_ids_<shape>` and `g_mask_<shape>` [..., L] (and `g_words_<shape>`, word indices for
  whole-word masking): q (queries), p (positives), n (hard negatives [B, N, L]), u (unlabelled
  texts), `<task>.<g>` (extra tasks). Every other key is a loss input."""
  out = {}
  for key in batch:
    name, sep, shape = key.partition("_ids_")
    if sep:
      words = f"{name}_words_{shape}"
      out[name] = (key, f"{name}_mask_{shape}") + ((words,) if words in batch else ())
  return dict(sorted(out.items()))


_SALTS = {"q": 0, "p": 1, "n": 2}  # kept from the first release: results stay reproducible


def _salt(name: str) -> int:
  """A group's dropout stream is fold_in(rng, salt)."""
  return _SALTS.get(name, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def embed_groups(module: SentenceEncoder, params, batch, rng, train: bool,
                 layers: tuple[int, ...] = (), mlm: dict | None = None, mask_key=None,
                 chunk_id=0) -> dict:
  """Raw embeddings of every text group: [..., E], or [..., 1 + K, E] with earlier `layers`; with
  a distillation projection in `params`, also u_proj, the unlabelled texts in the teacher's space."""
  out = {}
  projection = params.get(DISTILL_PROJECTION)
  params = {k: v for k, v in params.items() if k != DISTILL_PROJECTION}
  for name, keys in text_groups(batch).items():
    ids, mask = batch[keys[0]], batch[keys[1]]
    if mlm and name in mlm:  # masked LM: per-row [cross-entropy, masked, correct] sums
      # Masks from the step's key and each row's global index (this call holds rows
      # chunk_id * B .. + B), so every runner and chunking masks the same tokens.
      key = jax.random.fold_in(rng if mask_key is None else mask_key, _salt(name) + 1)
      out[name] = mlm_rows(module, params, ids, mask, key, mlm[name], deterministic=not train,
                           dropout_rng=jax.random.fold_in(rng, _salt(name)),
                           words_BxL=batch[keys[2]] if len(keys) > 2 else None,
                           row_offset=chunk_id * ids.shape[0])
      continue
    kw = {"rngs": {"dropout": jax.random.fold_in(rng, _salt(name))}} if train else {}
    flat = (ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, ids.shape[-1]))
    if layers:
      e = module.apply({"params": params}, *flat, layers, deterministic=not train,
                       method=SentenceEncoder.embed_layers, **kw)
    else:
      e = module.apply({"params": params}, *flat, deterministic=not train, normalize=False, **kw)
    out[name] = e.reshape(*ids.shape[:-1], *e.shape[1:])
  if projection is not None and "u" in out:
    out["u_proj"] = jnp.matmul(out["u"], projection["kernel"])
  return out


def _pair_loss_fn(config) -> Callable:
  """loss(q, p, n, arrays) -> scalar: the configured pair loss, Matryoshka-wrapped if dims."""
  cfg = config.loss

  def base(q, p, n, *, arrays):
    if cfg.name == "mnrl":
      return losses.mnrl(q, p, n, scale=cfg.scale, symmetric=cfg.symmetric,
                         valid_B=arrays["valid_B"], p_ids_B=arrays["pos_doc_B"],
                         neg_ids_BxN=arrays.get("neg_doc_BxN"), q_ids_B=arrays["query_B"])
    if cfg.name == "triplet":
      return losses.triplet(q, p, n[:, 0], margin=cfg.margin, valid_B=arrays["valid_B"])
    raise ValueError(f"unknown loss {cfg.name!r}")

  return base


def make_loss(config, tasks=()) -> Callable:
  """loss(embs, arrays) -> (scalar, aux metrics), the weighted sum of the run's terms:
    pairs          the labelled pairs loss (loss.name) at each Matryoshka prefix and extra layer
    self_distill   prefix self-distillation on the unlabelled texts
    distill_*      distillation from the teacher's stored vectors: embedding (unlabelled texts),
                   scores (KL over the unlabelled batch), pair_scores (KL over queries x
                   positives), margin_mse (query, positive, first hard negative)
    <task>         each extra task's loss (embed_jax.tasks), weighted
  Score terms are Matryoshka-wrapped too (each student prefix against the full teacher). Only the
  terms whose texts are in the batch count: with one task per step, the others are absent."""
  mrl, sd, dist = config.matryoshka, config.matryoshka.self_distill, config.distill
  dims, weights = tuple(mrl.dims), tuple(mrl.weights) or (1.0,) * len(mrl.dims)
  layers = tuple(mrl.layers)
  base = _pair_loss_fn(config)

  def prefixes(loss, name, aux, *embs, **kw):
    """loss over each Matryoshka prefix (weighted sum, per-dim values in aux), or as it is."""
    if not dims:
      return loss(*embs, **kw)
    terms = losses.matryoshka_terms(loss, dims, *embs, **kw)
    for d, t in zip(dims, terms):
      aux[f"{name}@{d}"] = t
    return sum(w * t for w, t in zip(weights, terms))

  def loss_fn(embs, arrays):
    aux, parts = {}, {}
    last = (lambda x: x if x is None or not layers else x[..., 0, :])  # noqa: E731
    q, p, n, u = (last(embs.get(g)) for g in ("q", "p", "n", "u"))
    if config.loss.weight > 0 and q is not None:
      parts["pairs"] = (config.loss.weight,
                        prefixes(base, config.loss.name, aux, q, p, n, arrays=arrays))
      if layers:  # index 0 is the last layer; the earlier layers' losses are averaged, weighted
        at = lambda x, j: None if x is None else x[..., j, :]  # noqa: E731
        prior = [prefixes(base, f"{config.loss.name}/layer{layer}", aux, at(embs["q"], j),
                          at(embs["p"], j), at(embs.get("n"), j), arrays=arrays)
                 for j, layer in enumerate(layers, 1)]
        parts["pairs_layers"] = (mrl.layer_weight, sum(prior) / len(prior))
    if sd.weight > 0 and u is not None:
      parts["self_distill"] = (sd.weight, losses.prefix_self_distillation(
          u, dims, target_BxD=arrays.get("u_target_BxD"), pairwise=sd.pairwise, topk=sd.topk,
          k=sd.k, valid_B=arrays["u_valid_B"]))
    kl = dict(temperature=dist.temperature, teacher_temperature=dist.teacher_temperature)
    if dist.embedding > 0 and u is not None:
      student = last(embs["u_proj"]) if "u_proj" in embs else u
      parts["distill_embedding"] = (dist.embedding, losses.embedding_distillation(
          student, arrays["u_teacher_BxT"], kind=dist.embedding_kind, valid_B=arrays["u_valid_B"]))
    if dist.scores > 0 and u is not None:
      t = arrays["u_teacher_BxT"]
      parts["distill_scores"] = (dist.scores, prefixes(
          lambda a, b: losses.score_distillation(
              a, b, teacher_q_BxT=t, teacher_d_CxT=t, valid_B=arrays["u_valid_B"],
              valid_C=arrays["u_valid_B"], exclude_self=True, **kl), "distill_scores", aux, u, u))
    if dist.pair_scores > 0 and q is not None:
      parts["distill_pair_scores"] = (dist.pair_scores, prefixes(
          lambda a, b: losses.score_distillation(
              a, b, teacher_q_BxT=arrays["q_teacher_BxT"], teacher_d_CxT=arrays["p_teacher_BxT"],
              valid_B=arrays["valid_B"], valid_C=arrays["valid_B"], **kl),
          "distill_pair_scores", aux, q, p))
    if dist.margin_mse > 0 and q is not None:
      parts["distill_margin_mse"] = (dist.margin_mse, prefixes(
          lambda a, b, c: losses.margin_mse(
              a, b, c, teacher_q_BxT=arrays["q_teacher_BxT"], teacher_p_BxT=arrays["p_teacher_BxT"],
              teacher_n_BxT=arrays["n_teacher_BxNxT"][:, 0], valid_B=arrays["valid_B"]),
          "distill_margin_mse", aux, q, p, n[:, 0]))
    mlm_groups = {t.groups[0] for t in tasks if t.spec is not None}  # [B, 3] rows, no layer axis
    parts.update(task_terms(tasks, {k: v if k in mlm_groups else last(v) for k, v in embs.items()},
                            arrays, aux))
    if config.task_sampling == "proportional":  # the weights were the sampling shares
      parts = {k: (1.0, value) for k, (_, value) in parts.items()}
    if len(parts) > 1 or tasks:
      aux.update({f"{name}_loss": value for name, (_, value) in parts.items()})
    return sum(w * value for w, value in parts.values()), aux

  return loss_fn


# ----------------------------------------------------------------------------------------------
# Config checks (before any compute).
# ----------------------------------------------------------------------------------------------


def objective_problems(config, num_devices: int) -> list[str]:
  mrl, sd, proj = config.matryoshka, config.matryoshka.self_distill, config.projection
  dist, unl = config.distill, config.unlabelled
  problems = []
  if mrl.weights and len(mrl.weights) != len(mrl.dims):
    problems.append(f"matryoshka.weights has {len(mrl.weights)} values for {len(mrl.dims)} dims")
  if any(not isinstance(i, int) or i < 1 for i in mrl.layers):
    problems.append(f"matryoshka.layers={tuple(mrl.layers)}: 1-based layer counts, each >= 1")
  weights = {"loss.weight": config.loss.weight, "matryoshka.layer_weight": mrl.layer_weight,
             "matryoshka.self_distill.weight": sd.weight, "distill.embedding": dist.embedding,
             "distill.scores": dist.scores, "distill.pair_scores": dist.pair_scores,
             "distill.margin_mse": dist.margin_mse}
  problems += [f"{k}={v} must be >= 0" for k, v in weights.items() if v < 0]
  if not uses_pairs(config) and not uses_unlabelled(config) and not config.tasks:
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
  distilling = {k: v for k, v in weights.items() if k.startswith("distill.") and v > 0}
  if distilling and not dist.store:
    problems.append(f"{', '.join(distilling)} > 0 needs distill.store (a folder from "
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
