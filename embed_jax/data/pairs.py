"""Training pairs from a BEIR split: (query, positive[, hard negatives]) in fixed-shape batches.

The order is a function of (seed, epoch) and the batch of a step is a function of the step alone,
so the iterator position saved with a checkpoint is just the step number: a resumed run sees the
same batches as an uninterrupted one. Texts are tokenised once; each batch is padded to bucketed
lengths (few compiled shapes) and to the full batch size, with `valid_B` marking real rows.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from embed_jax.embedder import bucket_for, length_buckets


def carve_dev(query_ids: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
  """Splits query ids into (train, dev) by a seeded permutation; `fraction` goes to dev."""
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"dev_fraction must be in [0, 1), got {fraction}")
  ids = sorted(query_ids)
  perm = np.random.default_rng(seed).permutation(len(ids))
  n_dev = int(round(fraction * len(ids)))
  dev = {ids[i] for i in perm[:n_dev]}
  return [q for q in query_ids if q not in dev], [q for q in query_ids if q in dev]


@dataclasses.dataclass
class Pairs:
  """Index form of the training pairs; ids index `query_texts` and `doc_texts`."""
  query_ids: list[str]
  doc_ids: list[str]
  pairs_Px2: np.ndarray  # (query index, positive doc index), one row per relevant pair
  negatives: list[np.ndarray]  # per query index: candidate hard-negative doc indices


def build_pairs(dataset, split: str, *, query_subset: Sequence[str] | None = None,
                negatives: dict[str, list[str]] | None = None) -> Pairs:
  """Pairs from the qrels of `split` (relevance > 0), restricted to `query_subset` if given."""
  qrels = dataset.qrels(split)
  keep = set(query_subset) if query_subset is not None else None
  query_ids = [q for q in dataset.queries if q in qrels and (keep is None or q in keep)]
  doc_index = {d: i for i, d in enumerate(dataset.corpus_ids)}
  q_index = {q: i for i, q in enumerate(query_ids)}
  rows = []
  for q in query_ids:
    for d, rel in qrels[q].items():
      if rel > 0 and d in doc_index:
        rows.append((q_index[q], doc_index[d]))
  if not rows:
    raise ValueError(f"{dataset.name} {split}: no (query, relevant document) pair to train on")
  negs = [np.array([doc_index[d] for d in (negatives or {}).get(q, []) if d in doc_index], np.int32)
          for q in query_ids]
  return Pairs(query_ids, list(dataset.corpus_ids), np.array(rows, np.int32), negs)


class PairLoader:
  """batch(step) -> a batch (embed_jax.objective) of numpy arrays with static shapes (per length
  bucket): text groups q [B, Lq], p [B, Ld] and, with negatives, n [B, N, Ld]; inputs "pairs":
  valid_B, q_ids_B (query index, for masking a query's other positives), p_ids_B, neg_ids_BxN
  (doc indices, -1 = padding, for duplicate masking) and, with teacher vectors (rows aligned with
  `pairs.query_ids` and `pairs.doc_ids`), q_teacher_BxT, p_teacher_BxT and n_teacher_BxNxT.
  """

  def __init__(self, pairs: Pairs, q_tokens: list[list[int]], d_tokens: list[list[int]], *,
               batch_size: int, seed: int, num_negatives: int = 0, q_max_len: int, d_max_len: int,
               pad_id: int = 0, drop_last: bool = False,
               teacher_queries_QxT: np.ndarray | None = None,
               teacher_docs_NxT: np.ndarray | None = None,
               teacher_pos_P: np.ndarray | None = None,
               teacher_neg: list[np.ndarray] | None = None):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_negatives and not any(len(n) for n in pairs.negatives):
      raise ValueError(f"num_negatives={num_negatives} but no query has hard negatives: "
                       f"set config.data.negatives to a file from `embed-jax mine`")
    self.pairs, self.q_tokens, self.d_tokens = pairs, q_tokens, d_tokens
    self.batch_size, self.seed, self.num_negatives = batch_size, seed, num_negatives
    self.q_buckets, self.d_buckets = length_buckets(q_max_len), length_buckets(d_max_len)
    self.pad_id, self.drop_last = pad_id, drop_last
    self.teacher_q, self.teacher_d = teacher_queries_QxT, teacher_docs_NxT
    # Teacher scores (embed_jax.data.scores): of each pair's positive, of each query's negatives.
    self.teacher_pos, self.teacher_neg = teacher_pos_P, teacher_neg
    n = len(pairs.pairs_Px2)
    self.steps_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
    if self.steps_per_epoch == 0:
      raise ValueError(f"{n} pairs do not fill one batch of {batch_size} with drop_last")

  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs.pairs_Px2))

  def _pad(self, seqs: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(seqs), length), self.pad_id, np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for r, s in enumerate(seqs):
      ids[r, :len(s)], mask[r, :len(s)] = s, 1
    return ids, mask

  def _groups(self, query_B, pos_B, neg_BxN, valid) -> dict:
    """The text groups q [B, Lq], p [B, Ld] and n [B, N, Ld] of the batch's rows. Padding rows
    and missing negatives repeat the first real row's texts (real text keeps every gradient
    finite); valid_B and the -1 doc ids mask them out of the loss."""
    b, n = neg_BxN.shape
    q_tok = [self.q_tokens[query_B[r] if valid[r] else query_B[0]] for r in range(b)]
    p_tok = [self.d_tokens[pos_B[r] if valid[r] else pos_B[0]] for r in range(b)]
    n_tok = [self.d_tokens[d] if d >= 0 else p_tok[0] for d in neg_BxN.reshape(-1)]
    lq = bucket_for(max(map(len, q_tok)), self.q_buckets)
    ld = bucket_for(max(map(len, p_tok + n_tok)), self.d_buckets)
    groups = {"q": dict(zip(("ids", "mask"), self._pad(q_tok, lq))),
              "p": dict(zip(("ids", "mask"), self._pad(p_tok, ld)))}
    if n:
      ids, mask = self._pad(n_tok, ld)
      groups["n"] = {"ids": ids.reshape(b, n, ld), "mask": mask.reshape(b, n, ld)}
    return groups

  def batch(self, step: int) -> dict:
    epoch, i = divmod(step, self.steps_per_epoch)
    rows = self._order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
    b, n = self.batch_size, self.num_negatives
    q_idx, p_idx = self.pairs.pairs_Px2[rows].T
    valid = np.zeros(b, bool)
    valid[:len(rows)] = True
    query_B = np.full(b, -1, np.int32)
    pos_B = np.full(b, -1, np.int32)
    query_B[:len(rows)], pos_B[:len(rows)] = q_idx, p_idx
    neg_BxN = np.full((b, n), -1, np.int32)
    t_neg_BxN = np.zeros((b, n), np.float32)
    rng = np.random.default_rng([self.seed, epoch, i, 1])
    for r, q in enumerate(q_idx):
      cands = self.pairs.negatives[q]
      if n and len(cands):
        take = rng.choice(len(cands), size=min(n, len(cands)), replace=False)
        neg_BxN[r, :len(take)] = cands[take]
        if self.teacher_neg is not None:
          t_neg_BxN[r, :len(take)] = self.teacher_neg[q][take]
    groups = self._groups(query_B, pos_B, neg_BxN, valid)
    inputs = {"valid_B": valid, "q_ids_B": query_B, "p_ids_B": pos_B, "neg_ids_BxN": neg_BxN}
    if self.teacher_pos is not None:  # padding rows and negatives score 0 (masked out)
      t_pos_B = np.zeros(b, np.float32)
      t_pos_B[:len(rows)] = self.teacher_pos[rows]
      inputs["teacher_p_B"], inputs["teacher_n_BxN"] = t_pos_B, t_neg_BxN
    if self.teacher_q is not None:  # padding rows repeat row 0, as their texts do
      row = lambda idx: np.where(idx >= 0, idx, idx[0] if idx[0] >= 0 else 0)  # noqa: E731
      inputs["q_teacher_BxT"] = self.teacher_q[row(query_B)].astype(np.float32)
      inputs["p_teacher_BxT"] = self.teacher_d[row(pos_B)].astype(np.float32)
      if n:
        neg = np.where(neg_BxN >= 0, neg_BxN, pos_B[0])
        inputs["n_teacher_BxNxT"] = self.teacher_d[neg].astype(np.float32)
    return {"groups": groups, "inputs": {"pairs": inputs}}


class CrossPairLoader(PairLoader):
  """A cross-encoder's batches: the same rows, negatives and inputs as PairLoader, but each
  (query, document) pair joined into one sequence: text groups qp [B, L] (query + positive) and
  qn [B, N, L] (query + each hard negative), {"ids", "mask", "types"}. `pair_tokens(q_idx,
  d_idx)` gives a pair's (token ids, token types), truncated to `max_len` (memoised)."""

  def __init__(self, pairs: Pairs, pair_tokens, *, max_len: int, **kw):
    super().__init__(pairs, [], [], q_max_len=max_len, d_max_len=max_len, **kw)
    self.pair_tokens, self.buckets, self._memo = pair_tokens, length_buckets(max_len), {}

  def _pair(self, q: int, d: int):
    if (q, d) not in self._memo:
      self._memo[(q, d)] = self.pair_tokens(q, d)
    return self._memo[(q, d)]

  def _groups(self, query_B, pos_B, neg_BxN, valid) -> dict:
    b, n = neg_BxN.shape
    q_B = np.where(valid, query_B, query_B[0])
    qp = [self._pair(q, d) for q, d in zip(q_B, np.where(valid, pos_B, pos_B[0]))]
    qn = [self._pair(q, d) if d >= 0 else qp[0] for q, row in zip(q_B, neg_BxN) for d in row]
    length = bucket_for(max(len(t[0]) for t in qp + qn), self.buckets)

    def group(rows, shape):
      ids, mask = self._pad([t[0] for t in rows], length)
      types, _ = self._pad([t[1] for t in rows], length)
      types = np.where(mask > 0, types, 0)
      return {k: v.reshape(*shape, length) for k, v in
              (("ids", ids), ("mask", mask), ("types", types))}

    groups = {"qp": group(qp, (b,))}
    if n:
      groups["qn"] = group(qn, (b, n))
    return groups


class TupleLoader:
  """batch(step) -> fixed-shape batches of rows of texts (embed_jax.objective): each column is a
  text group {"ids": [B, L], "mask": [B, L]} (and "words", each token's word index in its row,
  when `continuation` flags WordPiece continuations); inputs[source] holds valid_B, marking real
  rows, and each `arrays` entry's rows.

  An epoch is a (seed, epoch, salt) permutation of the rows; the final partial batch is padded
  with the first row and masked (valid_B), or dropped with `drop_last`. The batch of a step is
  a function of the step alone.
  """

  def __init__(self, columns: dict[str, list[list[int]]], *, source: str, batch_size: int,
               seed: int, max_len: int, pad_id: int = 0,
               arrays: dict[str, np.ndarray] | None = None, salt: int = 0,
               drop_last: bool = False, continuation: dict[str, list[list[bool]]] | None = None):
    n = len(next(iter(columns.values())))
    if any(len(c) != n for c in columns.values()):
      raise ValueError("every column needs one token list per row")
    for name, rows in (arrays or {}).items():
      if len(rows) != n:
        raise ValueError(f"{len(rows)} rows of {name} for {n} texts")
    if n < (batch_size if drop_last else 1):
      raise ValueError(f"{n} rows do not fill one batch of {batch_size}")
    self.columns, self.arrays, self.n = columns, dict(arrays or {}), n
    self.batch_size, self.seed, self.salt, self.source = batch_size, seed, salt, source
    self.buckets, self.pad_id = length_buckets(max_len), pad_id
    self.continuation = continuation or {}
    self.steps_per_epoch = n // batch_size if drop_last else -(-n // batch_size)

  def batch(self, step: int) -> dict:
    epoch, i = divmod(step, self.steps_per_epoch)
    order = np.random.default_rng([self.seed, epoch, self.salt]).permutation(self.n)
    rows = order[i * self.batch_size:(i + 1) * self.batch_size]
    valid = np.arange(self.batch_size) < len(rows)
    rows = np.concatenate([rows, np.full(self.batch_size - len(rows), rows[0])]).astype(np.int64)
    groups, inputs = {}, {"valid_B": valid}
    for name, tokens in self.columns.items():
      seqs = [tokens[r] for r in rows]
      length = bucket_for(max(map(len, seqs)), self.buckets)
      ids = np.full((len(seqs), length), self.pad_id, np.int32)
      mask = np.zeros((len(seqs), length), np.int32)
      for r, seq in enumerate(seqs):
        ids[r, :len(seq)], mask[r, :len(seq)] = seq, 1
      groups[name] = {"ids": ids, "mask": mask}
      if name in self.continuation:
        words = np.zeros((len(seqs), length), np.int32)
        for r, row in enumerate(rows):
          cont = np.asarray(self.continuation[name][row], bool)
          words[r, :len(cont)] = np.cumsum(~cont) - 1
        groups[name]["words"] = words
    for name, values in self.arrays.items():
      inputs[name] = np.asarray(values[rows])
    return {"groups": groups, "inputs": {self.source: inputs}}


def TextLoader(tokens: list[list[int]], *, batch_size: int, seed: int, max_len: int,
               pad_id: int = 0, extras: dict[str, np.ndarray] | None = None) -> TupleLoader:
  """Unlabelled texts: text group u; inputs "u" with valid_B and each `extras` entry (a row per
  text, e.g. a frozen model's or a teacher's embeddings) with the batch's rows. Always full
  batches (the remainder waits for the next epoch's order)."""
  if len(tokens) < batch_size:
    raise ValueError(f"{len(tokens)} unlabelled texts do not fill one batch of {batch_size}")
  return TupleLoader({"u": tokens}, source="u", batch_size=batch_size, seed=seed,
                     max_len=max_len, pad_id=pad_id, salt=2, drop_last=True,
                     arrays={k: np.asarray(v, np.float32) for k, v in (extras or {}).items()})


class MergedLoader:
  """The batches of several loaders (their groups and inputs) merged into one; epochs count the
  first loader's."""

  def __init__(self, *loaders):
    self.loaders = loaders
    self.steps_per_epoch = loaders[0].steps_per_epoch

  def batch(self, step: int) -> dict:
    out = {"groups": {}, "inputs": {}}
    for loader in self.loaders:
      b = loader.batch(step)
      for part in out:
        clash = out[part].keys() & b[part].keys()
        if clash:
          raise ValueError(f"two loaders fill {part} {sorted(clash)}")
        out[part].update(b[part])
    return out
