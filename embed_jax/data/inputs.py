"""The batches of a training run, from its config: labelled pairs (with mined hard negatives and
teacher vectors), unlabelled texts (with self-distillation targets and teacher vectors), each
extra task's, and the teacher store they read, checked before any compute.

    dataset, store = check(config)   # before any workdir or model exists
    data = build(config, model_config, tokenizer, start_embedder, workdir, dataset, store)
    batch = data.loader.batch(step)   # {"groups": ..., "inputs": ...} (embed_jax.objective)
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from embed_jax.embedder import Embedder
from embed_jax.objective import uses_pairs, uses_unlabelled

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunData:
  dataset: object  # the BEIR dataset (embed_jax.data.beir)
  loader: object  # batch(step) -> a batch; steps_per_epoch
  dev_qrels: dict | None  # the dev queries' qrels (data.dev_split or carved from train)
  tasks: list  # embed_jax.tasks.Task
  store: object | None  # the teacher store (embed_jax.data.teacher)


def max_lengths(config, rep) -> tuple[int, int]:
  """(query, document) lengths in tokens: the config's, or a multi-vector model's own."""
  if rep.name == "multivector":
    return rep.settings.query_length, rep.settings.document_length
  return config.query_max_seq_length, config.max_seq_length


def tokenize(config, rep, tokenizer, model_config, texts, role: str) -> list[list[int]]:
  """Token ids of a text group's texts through the representation (a multi-vector model adds
  its markers and pads queries with [MASK]; queries beyond its query length are refused unless
  multivector.truncate_queries)."""
  q_len, d_len = max_lengths(config, rep)
  if rep.name == "multivector":
    return rep.tokenize(tokenizer, model_config, texts, role)
  return rep.tokenize(tokenizer, model_config, texts, role, q_len if role == "query" else d_len)


def check(config):
  """(dataset, teacher store or None): refused, before any workdir or model exists, when they
  lack what the config reads: the qrels splits of training, dev and each evaluator (and of
  `pairs` tasks on this dataset), and every text the run may read in the store."""
  from embed_jax.data import load_beir
  from embed_jax.evaluate import qrels_splits_read
  dataset = load_beir(config.data.dataset, data_dir=config.data.data_dir or None)
  read = [("data.train_split", config.data.train_split)] if uses_pairs(config) else []
  read += [("data.dev_split", config.data.dev_split)] if config.data.dev_split else []
  read += [(f"tasks.{name}.split", t.split) for name, t in config.tasks.items()
           if t.kind == "pairs" and not t.dataset]
  read += qrels_splits_read(config)
  missing = [f"{key}={split!r}" for key, split in read if split not in dataset.qrels_splits]
  if missing:
    raise ValueError(f"bad config: {', '.join(missing)}: {dataset.name} has no such qrels split; "
                     f"it has {', '.join(dataset.qrels_splits) or 'none (no qrels/*.tsv)'}")
  if config.distill.score_store:  # the teacher's scores of the run's candidates, checked now
    from embed_jax.data.scores import ScoreStore
    train_qrels = dataset.qrels(config.data.train_split)
    ScoreStore(config.distill.score_store).check(
        dataset, config.data.train_split, config.data.negatives or None,
        [q for q in dataset.queries if q in train_qrels], teacher=config.distill.teacher or None)
  store = None
  if config.distill.store:  # checked against every text the run may read, before any compute
    from embed_jax.data.teacher import dataset_texts
    kinds = set(config.unlabelled.texts.split("+")) if uses_unlabelled(config) else set()
    if uses_pairs(config):
      kinds |= {"corpus", "queries"}
    store = open_teacher(config, dataset, *dataset_texts(dataset, sorted(kinds)))
  return dataset, store


def build(config, model_config, tokenizer, start: Embedder, workdir: Path, dataset,
          store=None, rep=None) -> RunData:
  """Every loader the config asks for, combined into one: the labelled pairs and the unlabelled
  texts merged into each step, then the tasks, every one each step (task_sampling="all") or one
  a step. `dataset` and `store` come from `check`; `rep` (the bound representation, default
  dense) tokenizes; `start` (the starting model) mines hard negatives and encodes
  self-distillation targets when the config asks for them."""
  if rep is None:
    from embed_jax.representations import Dense
    rep = Dense()
  from embed_jax.data.pairs import MergedLoader
  from embed_jax.tasks import SampledLoader, build_tasks
  main, dev_qrels = [], None
  if uses_pairs(config):
    from embed_jax import distributed
    if distributed.is_main():  # one process mines; the others read the file it writes
      mine_if_missing(config, dataset, start)
    distributed.barrier("negatives")
    pairs, dev_qrels = load_data(config, dataset, tokenizer, model_config, store, rep)
    main.append(pairs)
  if uses_unlabelled(config):
    main.append(unlabelled_loader(config, dataset, tokenizer, model_config, start, workdir, store,
                                  rep))
  main = [MergedLoader(*main)] if len(main) > 1 else main
  tasks = build_tasks(config, tokenizer, model_config, dataset)
  loaders = main + [t.loader for t in tasks]
  if len(loaders) == 1 or config.task_sampling == "all":
    loader = loaders[0] if len(loaders) == 1 else MergedLoader(*loaders)
  else:
    loader = SampledLoader(loaders, [1.0] * len(main) + [t.cfg.weight for t in tasks],
                           config.task_sampling, config.seed)
  return RunData(dataset, loader, dev_qrels, tasks, store)


def open_teacher(config, dataset, needed_ids: list[str], needed_texts: list[str]):
  """The config's teacher store, checked against the texts the run will read (ids present,
  checksums equal, the named teacher) before any compute; None without distillation."""
  if not config.distill.store:
    return None
  from embed_jax.data.teacher import TeacherStore
  store = TeacherStore(config.distill.store)
  store.check(dataset, needed_ids, needed_texts, teacher=config.distill.teacher or None)
  log.info("teacher store %s: %s, %d dims, %d texts", store.path,
           store.manifest["teacher"]["name"], store.dims, len(store.ids))
  return store


def unlabelled_loader(config, dataset, tokenizer, model_config, start: Embedder, workdir: Path,
                      store=None, rep=None):
  """Batches of the dataset's unlabelled texts (group u), with the self-distillation targets of
  the starting model (target='initial': encoded once, kept in <workdir>/self_distill_targets.npy)
  and the teacher's vectors, when the run needs them."""
  from embed_jax.checkpoint import atomic_write
  from embed_jax.data.pairs import TextLoader
  from embed_jax.data.teacher import dataset_texts
  unl, sd = config.unlabelled, config.matryoshka.self_distill
  ids, texts = dataset_texts(dataset, unl.texts.split("+"))
  extras = {}
  if sd.weight > 0 and sd.target == "initial":
    path = workdir / "self_distill_targets.npy"
    if path.exists() and np.load(path, mmap_mode="r").shape[0] == len(texts):
      extras["target_BxD"] = np.load(path)
    else:
      log.info("encoding %d texts with the starting model (self-distillation targets)", len(texts))
      targets = start.encode(texts, batch_size=config.encode_batch_size, normalize=True)
      atomic_write(path, lambda f: np.save(f, targets))
      extras["target_BxD"] = targets
  if store is not None and (config.distill.embedding > 0 or config.distill.scores > 0):
    extras["teacher_BxT"] = np.asarray(store.vectors[store.rows(ids)], np.float32)
  if rep is None:
    from embed_jax.representations import Dense
    rep = Dense()
  tokens = tokenize(config, rep, tokenizer, model_config, texts, "document")
  log.info("unlabelled: %d texts (%s), %d per step", len(texts), unl.texts, unl.batch_size)
  return TextLoader(tokens, batch_size=unl.batch_size, seed=config.seed,
                    max_len=max_lengths(config, rep)[1], pad_id=model_config.pad_token_id,
                    extras=extras)


def mine_if_missing(config, dataset, embedder: Embedder) -> None:
  """Writes `data.negatives` with the starting model when `data.mine.enabled` and it is absent."""
  path = Path(config.data.negatives)
  if not config.data.negatives or path.exists() or not config.data.mine.enabled:
    return
  from embed_jax.data.mining import mine_hard_negatives, write_negatives
  m = config.data.mine
  log.info("mining hard negatives for %s %s into %s", dataset.name, config.data.train_split, path)
  rows = mine_hard_negatives(embedder, dataset, config.data.train_split, top_k=m.top_k,
                             skip_top=m.skip_top, margin=m.margin, num_negatives=m.num_negatives,
                             sampling=m.sampling, seed=config.seed,
                             batch_size=config.encode_batch_size)
  write_negatives(rows, path)


def drop_false_negatives(negatives: dict[str, list[str]], qrels, scores, margin: float):
  """The mined negatives without those the teacher scores above (the query's lowest positive -
  margin): likely unlabelled positives (RocketQA's denoising)."""
  out, dropped, total = {}, 0, 0
  for q, negs in negatives.items():
    if q not in scores.rows:
      out[q] = negs
      continue
    s = scores.query_scores(q)
    pos = [s[d] for d, rel in qrels.get(q, {}).items() if rel > 0 and d in s]
    floor = min(pos) - margin if pos else np.inf
    out[q] = [d for d in negs if s.get(d, -np.inf) <= floor]
    dropped += len(negs) - len(out[q])
    total += len(negs)
  log.info("false-negative removal: %d of %d mined negatives scored by the teacher within %g of "
           "their query's lowest positive are dropped", dropped, total, margin)
  return out


def load_data(config, dataset, tokenizer, model_config, store=None, rep=None):
  """(PairLoader, dev_qrels or None) for `dataset`; with a teacher store (and a pair-level
  distillation weight), the teacher's vectors of the batch's texts too."""
  from embed_jax.data.pairs import PairLoader, build_pairs, carve_dev
  train_qrels = dataset.qrels(config.data.train_split)
  train_queries = [q for q in dataset.queries if q in train_qrels]
  dev_qrels = None
  if config.data.dev_split:
    dev_qrels = dataset.qrels(config.data.dev_split)
  elif config.data.dev_fraction > 0:
    train_queries, dev_queries = carve_dev(train_queries, config.data.dev_fraction, config.seed)
    dev_qrels = {q: train_qrels[q] for q in dev_queries}
  negatives = None
  if config.data.negatives:
    from embed_jax.data.mining import read_negatives
    negatives = read_negatives(config.data.negatives, dataset)
  scores = None
  if config.distill.score_store:
    from embed_jax.data.scores import ScoreStore
    scores = ScoreStore(config.distill.score_store)
    if config.distill.drop_false_negatives and negatives:
      negatives = drop_false_negatives(negatives, train_qrels, scores,
                                       config.distill.false_negative_margin)
  pairs = build_pairs(dataset, config.data.train_split, query_subset=train_queries,
                      negatives=negatives)
  score_inputs = {}
  if scores is not None:
    by_query = [scores.query_scores(q) for q in pairs.query_ids]
    score_inputs = {
        "teacher_pos_P": np.array([by_query[q][pairs.doc_ids[d]] for q, d in pairs.pairs_Px2],
                                  np.float32),
        "teacher_neg": [np.array([by_query[q][pairs.doc_ids[d]] for d in negs], np.float32)
                        for q, negs in enumerate(pairs.negatives)]}

  if rep is None:
    from embed_jax.representations import Dense
    rep = Dense()
  if rep.name == "cross":  # a cross-encoder: each (query, document) pair joined, as CrossEncoder
    from embed_jax.data.pairs import CrossPairLoader
    from embed_jax.rerank import tokenize_pairs
    doc_texts = dataset.corpus_texts(" ")
    max_len = min(config.max_seq_length, model_config.max_seq_length)

    def pair_tokens(q: int, d: int):
      ids, types = tokenize_pairs(tokenizer, max_len, [dataset.queries[pairs.query_ids[q]]],
                                  [doc_texts[d]])
      return ids[0], types[0]

    loader = CrossPairLoader(pairs, pair_tokens, max_len=max_len, batch_size=config.batch_size,
                             seed=config.seed, num_negatives=config.data.num_negatives,
                             pad_id=model_config.pad_token_id, **score_inputs)
    log.info("%s: %d (query, positive) pairs from %d queries with %d negatives each, joined for "
             "a cross-encoder (%d tokens); %d steps per epoch of %d; dev queries: %d",
             dataset.name, len(pairs.pairs_Px2), len(pairs.query_ids), config.data.num_negatives,
             max_len, loader.steps_per_epoch, config.batch_size, len(dev_qrels or {}))
    return loader, dev_qrels
  q_tokens = tokenize(config, rep, tokenizer, model_config,
                      [dataset.queries[q] for q in pairs.query_ids], "query")
  d_tokens = tokenize(config, rep, tokenizer, model_config, dataset.corpus_texts(" "), "document")
  q_max_len, d_max_len = max_lengths(config, rep)
  teacher = {}
  if store is not None and (config.distill.pair_scores > 0 or config.distill.margin_mse > 0):
    teacher = {"teacher_queries_QxT": np.asarray(
                   store.vectors[store.rows(f"queries/{q}" for q in pairs.query_ids)], np.float32),
               "teacher_docs_NxT": np.asarray(
                   store.vectors[store.rows(f"corpus/{d}" for d in pairs.doc_ids)], np.float32)}
  loader = PairLoader(pairs, q_tokens, d_tokens, batch_size=config.batch_size, seed=config.seed,
                      num_negatives=config.data.num_negatives,
                      q_max_len=q_max_len, d_max_len=d_max_len,
                      pad_id=model_config.pad_token_id, **teacher, **score_inputs)
  log.info("%s: %d training pairs from %d queries, %d steps per epoch of %d; dev queries: %d",
           dataset.name, len(pairs.pairs_Px2), len(pairs.query_ids), loader.steps_per_epoch,
           config.batch_size, len(dev_qrels or {}))
  return loader, dev_qrels
