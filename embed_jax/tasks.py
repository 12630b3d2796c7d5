"""Extra training tasks beside the main objective: `config.tasks.<name>`, each with its data, loss,
batch size and weight (multi-task fine-tuning, and MLM domain adaptation).

    c.tasks.stsb = task("sts", dataset="stsb", split="train", loss="cosent", batch_size=32)
    c.tasks.nli = task("triplets", dataset="snli", split="dev", loss="mnrl", batch_size=32)
    c.tasks.mlm = task("mlm", texts="corpus", batch_size=32)   # masked LM on the BEIR corpus
    c.task_sampling = "all"  # each step a batch of every task, weighted sum of the losses;
                             # round_robin | proportional: one task per step

Kinds and their text groups (named after the task, e.g. `stsb.a`; the inputs are `stsb`'s):
  pairs     q, p: a BEIR dataset's (query, relevant document) pairs from a qrels split: MNRL
  sts       a, b and labels_B (gold scores): CoSENT (or MNRL on the pairs, scores unused)
  triplets  q (anchor), p (positive), n (negative): MNRL with the negative as a hard negative,
            or the triplet loss
  mlm       x: windows of the dataset's texts, masked in the step (embed_jax.models.mlm); a
            seeded share of the documents is held out for masked-token accuracy and perplexity
Any embedding loss may be Matryoshka-wrapped (`matryoshka_dims`). In the sampling modes the
chosen task's loss is multiplied by its weight (round_robin) or used as it is, the weights being
the sampling shares (proportional); an epoch is every task's data once.

A task is a data source for the objective (embed_jax.objective): its loader fills the text groups
`<name>.<g>` and the inputs `<name>`, and `Task.terms` adds its loss term (an MLM task also its
head, `Task.heads`).
"""

from __future__ import annotations

import dataclasses
import logging

import jax.numpy as jnp
import ml_collections
import numpy as np

from embed_jax import losses
from embed_jax.data.pairs import TupleLoader
from embed_jax.embedder import tokenize_texts
from embed_jax.models.mlm import MaskedLM, MaskingSpec, mlm_rows
from embed_jax.objective import RESERVED_SOURCES, Term, ranking_loss

log = logging.getLogger(__name__)

TASK_KINDS = {"pairs": ("mnrl",), "sts": ("cosent", "mnrl"), "triplets": ("mnrl", "triplet"),
              "mlm": ("mlm",)}
SAMPLING = ("all", "round_robin", "proportional")


def task(kind: str, **fields) -> ml_collections.ConfigDict:
  """A task's config with its defaults (see the module docstring)."""
  c = ml_collections.ConfigDict()
  c.kind = kind  # pairs | sts | triplets | mlm
  c.dataset = ""  # pairs: a BEIR name or folder; sts/triplets: a name under
  #   $EMBED_JAX_DATA/{sts,nli} or a folder; mlm: "" = config.data.dataset
  c.split = "train"  # pairs: a qrels split; sts/triplets: a split
  c.texts = "corpus"  # mlm: corpus | corpus+train_queries | corpus+queries
  c.loss = TASK_KINDS.get(kind, ("?",))[0]
  c.scale = 20.0  # cosent / mnrl: 1 / temperature
  c.margin = 0.5  # triplet
  c.batch_size = 32  # global, across devices
  c.weight = 1.0
  c.max_seq_length = 128  # tokens; mlm windows use config.max_seq_length
  c.matryoshka_dims = ()  # wrap the loss in Matryoshka prefixes
  c.rate = 0.15  # mlm: share of tokens predicted (80% [MASK], 10% random, 10% kept)
  c.whole_word = False  # mlm: mask whole words (WordPiece ## continuations)
  c.heldout_fraction = 0.02  # mlm: documents held out for accuracy and perplexity
  c.update(fields)
  return c


def task_configs(config) -> dict[str, ml_collections.ConfigDict]:
  return {name: config.tasks[name] for name in sorted(config.tasks.keys())}


def task_problems(config, num_devices: int) -> list[str]:
  problems = []
  if config.task_sampling not in SAMPLING:
    problems.append(f"task_sampling={config.task_sampling!r}: choose from {', '.join(SAMPLING)}")
  for name, t in task_configs(config).items():
    if name in RESERVED_SOURCES:
      problems.append(f"tasks.{name}: {' and '.join(RESERVED_SOURCES)} name the main pairs and "
                      f"unlabelled texts; call the task something else")
    if t.kind not in TASK_KINDS:
      problems.append(f"tasks.{name}.kind={t.kind!r}: choose from {', '.join(TASK_KINDS)}")
      continue
    if t.loss not in TASK_KINDS[t.kind]:
      problems.append(f"tasks.{name}.loss={t.loss!r}: a {t.kind} task takes "
                      f"{' or '.join(TASK_KINDS[t.kind])}")
    if t.batch_size < 2 or t.batch_size % num_devices:
      problems.append(f"tasks.{name}.batch_size={t.batch_size} must be >= 2 and a multiple of "
                      f"the {num_devices} devices")
    if t.weight < 0:
      problems.append(f"tasks.{name}.weight={t.weight} must be >= 0")
    if t.kind == "mlm" and not 0 < t.rate < 1:
      problems.append(f"tasks.{name}.rate={t.rate} must be in (0, 1)")
    if t.kind == "mlm" and not 0 <= t.heldout_fraction < 0.5:
      problems.append(f"tasks.{name}.heldout_fraction={t.heldout_fraction} must be in [0, 0.5)")
  return problems


# ----------------------------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Task:
  name: str
  cfg: ml_collections.ConfigDict
  loader: TupleLoader
  spec: MaskingSpec | None = None  # mlm
  heldout: TupleLoader | None = None  # mlm: held-out windows

  @property
  def groups(self) -> tuple[str, ...]:
    return tuple(f"{self.name}.{g}" for g in
                 {"pairs": "qp", "sts": "ab", "triplets": "qpn", "mlm": "x"}[self.cfg.kind])

  def heads(self) -> dict:
    """Text groups with another head than the representation: an MLM task's masked texts."""
    return {self.groups[0]: MaskedLM(self.spec)} if self.spec is not None else {}

  def terms(self, rep) -> list[Term]:
    """The task's loss term over its groups' outputs (`rep`: the model's representation)."""
    c, groups = self.cfg, self.groups
    prefixes = dict(dims=tuple(c.matryoshka_dims))
    if c.kind == "mlm":
      return [Term(self.name, c.weight, groups, self.name, _mlm_loss, metrics=_mlm_accuracy)]
    if c.kind == "sts" and c.loss == "cosent":
      def cosent(a, b, *, inputs):
        return losses.cosent(a, b, inputs["labels_B"], scale=c.scale, valid_B=inputs["valid_B"],
                             score=rep.score)
      return [Term(self.name, c.weight, groups, self.name, cosent, **prefixes)]
    loss = ranking_loss(c.loss, scale=c.scale, margin=c.margin, score=rep.score)
    if c.kind == "triplets":  # one negative per row [B, E]: the ranking losses take [B, N, E]
      base = loss
      loss = lambda q, p, n, *, inputs: base(q, p, n[:, None], inputs=inputs)  # noqa: E731
    return [Term(self.name, c.weight, groups, self.name, loss, **prefixes)]


def _mlm_sums(rows_Bx3, inputs):
  """Cross-entropy, masked tokens and correct predictions over the valid rows."""
  rows_Bx3 = rows_Bx3 * inputs["valid_B"][:, None]
  ce, count, correct = (rows_Bx3[:, i].sum() for i in range(3))
  return ce, jnp.maximum(count, 1.0), correct


def _mlm_loss(rows_Bx3, *, inputs):
  ce, count, _ = _mlm_sums(rows_Bx3, inputs)
  return ce / count


def _mlm_accuracy(rows_Bx3, *, inputs):
  _, count, correct = _mlm_sums(rows_Bx3, inputs)
  return {"accuracy": correct / count}


def _text_ids(texts: list[str]) -> np.ndarray:
  """A row's text identity (equal texts, equal id): MNRL masks a duplicate positive."""
  index: dict[str, int] = {}
  return np.array([index.setdefault(t, len(index)) for t in texts], np.int32)


def mlm_windows(token_lists, cls_id: int, sep_id: int, max_len: int) -> list[list[int]]:
  """Each document's tokens cut into windows of max_len - 2, each wrapped in [CLS] ... [SEP]."""
  body = max_len - 2
  return [[cls_id, *toks[i:i + body], sep_id] for toks in token_lists
          for i in range(0, max(len(toks), 1), body)]


def build_task(name: str, t, config, tokenizer, model_config, dataset) -> Task:
  seed, pad = config.seed, model_config.pad_token_id
  salt = 100 + sum(map(ord, name))  # decorrelates each task's order from the others'
  if t.kind == "pairs":
    from embed_jax.data import load_beir
    from embed_jax.data.pairs import build_pairs
    source = load_beir(t.dataset) if t.dataset else dataset
    pairs = build_pairs(source, t.split)
    q_idx, d_idx = pairs.pairs_Px2.T
    queries = [source.queries[pairs.query_ids[i]] for i in q_idx]
    docs = source.corpus_texts(" ")
    cols = {f"{name}.q": tokenize_texts(tokenizer, model_config, queries, t.max_seq_length),
            f"{name}.p": tokenize_texts(tokenizer, model_config, [docs[i] for i in d_idx],
                                   config.max_seq_length)}
    loader = TupleLoader(cols, batch_size=t.batch_size, seed=seed, max_len=config.max_seq_length,
                         pad_id=pad, source=name, salt=salt,
                         arrays={"q_ids_B": q_idx.astype(np.int32), "p_ids_B": d_idx.astype(np.int32)})
    log.info("task %s: %d pairs from %s %s", name, len(q_idx), source.name, t.split)
    return Task(name, t, loader)
  if t.kind == "sts":
    from embed_jax.data.sentences import load_sts
    a, b, scores = load_sts(t.dataset or "stsb").split(t.split)
    cols = {f"{name}.a": tokenize_texts(tokenizer, model_config, a, t.max_seq_length),
            f"{name}.b": tokenize_texts(tokenizer, model_config, b, t.max_seq_length)}
    loader = TupleLoader(cols, batch_size=t.batch_size, seed=seed, max_len=t.max_seq_length,
                         pad_id=pad, source=name, salt=salt,
                         arrays={"labels_B": scores.astype(np.float32), "q_ids_B": _text_ids(a),
                                 "p_ids_B": _text_ids(b)})
    log.info("task %s: %d STS pairs from %s %s", name, len(a), t.dataset or "stsb", t.split)
    return Task(name, t, loader)
  if t.kind == "triplets":
    from embed_jax.data.sentences import load_triplets
    q, p, n = load_triplets(t.dataset or "snli").split(t.split)
    docs = _text_ids(list(p) + list(n))  # positives and negatives share one id space
    cols = {f"{name}.{g}": tokenize_texts(tokenizer, model_config, texts, t.max_seq_length)
            for g, texts in (("q", q), ("p", p), ("n", n))}
    loader = TupleLoader(cols, batch_size=t.batch_size, seed=seed, max_len=t.max_seq_length,
                         pad_id=pad, source=name, salt=salt,
                         arrays={"q_ids_B": _text_ids(q), "p_ids_B": docs[:len(p)],
                                 "neg_ids_BxN": docs[len(p):, None]})
    log.info("task %s: %d triplets from %s %s", name, len(q), t.dataset or "snli", t.split)
    return Task(name, t, loader)
  # mlm: windows of the dataset's texts; whole documents held out by a seeded draw
  from embed_jax.data.teacher import dataset_texts
  _, texts = dataset_texts(dataset, t.texts.split("+"))
  heldout = np.random.default_rng([seed, 11]).random(len(texts)) < t.heldout_fraction
  max_len = config.max_seq_length
  raw = tokenize_texts(tokenizer, model_config, texts, max_len, special=False)
  cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
  if cls_id is None or sep_id is None or tokenizer.mask_token_id is None:
    raise ValueError(f"tasks.{name}: MLM needs a tokenizer with [CLS], [SEP] and [MASK] tokens")

  def loader_of(docs, drop_last):
    windows = mlm_windows(docs, cls_id, sep_id, max_len)
    pieces = [tokenizer.convert_ids_to_tokens(w) for w in windows]
    cont = [[tok.startswith("##") for tok in toks] for toks in pieces]
    return TupleLoader({f"{name}.x": windows}, batch_size=t.batch_size, seed=seed, max_len=max_len,
                       pad_id=pad, source=name, salt=salt, drop_last=drop_last,
                       continuation={f"{name}.x": cont} if t.whole_word else None)

  loader = loader_of([r for r, h in zip(raw, heldout) if not h], drop_last=True)
  held = loader_of([r for r, h in zip(raw, heldout) if h], drop_last=False) if heldout.any() else None
  spec = MaskingSpec(mask_token_id=tokenizer.mask_token_id,
                     special_ids=tuple(sorted(set(tokenizer.all_special_ids))),
                     vocab_size=model_config.vocab_size, rate=t.rate, whole_word=t.whole_word)
  log.info("task %s: MLM on %d windows of %d tokens from %d %s texts (%d held out)", name,
           loader.n, max_len, int((~heldout).sum()), dataset.name, int(heldout.sum()))
  return Task(name, t, loader, spec, held)


def build_tasks(config, tokenizer, model_config, dataset) -> list[Task]:
  return [build_task(name, t, config, tokenizer, model_config, dataset)
          for name, t in task_configs(config).items()]


class SampledLoader:
  """One loader's batch per step: round_robin cycles through them; proportional draws each step's
  loader with probability proportional to its weight, from (seed, step). Each loader counts its
  own steps, so every loader sees its data in its own deterministic order."""

  def __init__(self, loaders, weights, mode: str, seed: int):
    self.loaders, self.mode, self.seed = loaders, mode, seed
    total = float(sum(weights))
    self.p = np.asarray(weights, np.float64) / total if total > 0 else None
    self.steps_per_epoch = sum(loader.steps_per_epoch for loader in loaders)
    self._picks = np.zeros(0, np.int64)

  def pick(self, step: int) -> tuple[int, int]:
    """(loader index, that loader's own step) for global `step`."""
    if self.mode == "round_robin":
      return step % len(self.loaders), step // len(self.loaders)
    if len(self._picks) <= step:  # the draws so far, extended as the run goes (deterministic)
      n = max(step + 1, 2 * len(self._picks), 1024)
      self._picks = np.random.default_rng([self.seed, 13]).choice(len(self.loaders), n, p=self.p)
    which = int(self._picks[step])
    return which, int(np.sum(self._picks[:step] == which))

  def batch(self, step: int):
    which, own = self.pick(step)
    return self.loaders[which].batch(own)


# ----------------------------------------------------------------------------------------------
# MLM evaluation: masked-token accuracy and perplexity on the held-out windows.
# ----------------------------------------------------------------------------------------------


def mlm_evaluate(module, params, t: Task, seed: int = 0) -> dict:
  """Accuracy and perplexity over every held-out window, with masks fixed by `seed` (the same
  positions before and after training), no dropout."""
  import jax
  fn = jax.jit(lambda p, ids, mask, words, key: mlm_rows(module, p, ids, mask, key, t.spec,
                                                         deterministic=True, words_BxL=words))
  sums = np.zeros(3)
  for step in range(t.heldout.steps_per_epoch):
    b = t.heldout.batch(step)
    x = b["groups"][t.groups[0]]
    rows = np.asarray(fn(params, x["ids"], x["mask"], x.get("words"),
                         jax.random.fold_in(jax.random.key(seed), step)))
    sums += (rows * b["inputs"][t.name]["valid_B"][:, None]).sum(0)
  ce, count, correct = sums
  return {"mlm_heldout_accuracy": correct / max(count, 1),
          "mlm_heldout_perplexity": float(np.exp(ce / max(count, 1))),
          "mlm_heldout_tokens": int(count)}
