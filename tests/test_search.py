"""Exact top-k on the devices (embed_jax.search) against the numpy search, on 8 simulated CPUs."""

from types import SimpleNamespace

import jax
import numpy as np
import pytest

from embed_jax import evaluate, search
from embed_jax.representations import Dense


def _both(docs_NxD, **kw):
  """evaluate.Float32 and ShardedFloat32 over the same corpus."""
  ref, sharded = evaluate.Float32(), search.ShardedFloat32(**kw)
  ref.index(docs_NxD)
  sharded.index(docs_NxD)
  return ref, sharded


def _assert_same(ref_out, out):
  (ref_s, ref_i), (s, i) = ref_out, out
  np.testing.assert_array_equal(i, ref_i)
  np.testing.assert_allclose(s, ref_s, atol=1e-5)


def _stable_topk(q_QxD, docs_NxD, k):
  """Top-k by a full sort: score descending, then document index ascending."""
  q_QxD, docs_NxD = (evaluate.unit(x).astype(np.float32) for x in (q_QxD, docs_NxD))
  scores_QxN = q_QxD @ docs_NxD.T
  idx_QxN = np.broadcast_to(np.arange(len(docs_NxD)), scores_QxN.shape)
  return np.lexsort((idx_QxN, -scores_QxN), axis=1)[:, :k]


def test_matches_numpy_on_a_corpus_not_a_multiple_of_the_devices():
  assert jax.device_count() == 8
  rng = np.random.default_rng(0)
  docs_NxD = rng.standard_normal((1003, 32)).astype(np.float32) * 3.0  # cosine: scale is moot
  q_QxD = rng.standard_normal((37, 32)).astype(np.float32)
  ref, sharded = _both(docs_NxD)
  assert sharded.name == "float32" and sharded.bytes_per_doc == ref.bytes_per_doc == 128
  assert sharded.stats() == {"search_devices": 8}
  assert sharded.docs_PxD.shape == (1008, 32)
  for k in (10, 100):
    s, i = sharded.search(q_QxD, k)
    assert s.shape == i.shape == (37, k) and i.dtype == np.int64 and s.dtype == np.float32
    _assert_same(ref.search(q_QxD, k), (s, i))
  s, i = sharded.search(q_QxD, 5000)  # k past the corpus: every document, none of the padding
  assert i.shape == (37, 1003) and (np.sort(i, axis=1) == np.arange(1003)).all()
  _assert_same(ref.search(q_QxD, 5000), (s, i))


def test_query_batches_are_padded_and_compiled_once():
  rng = np.random.default_rng(1)
  docs_NxD = rng.standard_normal((203, 16)).astype(np.float32)
  q_QxD = rng.standard_normal((37, 16)).astype(np.float32)
  ref, sharded = _both(docs_NxD, query_batch=16)  # batches of 16, 16 and 5 padded to 16
  _assert_same(ref.search(q_QxD, 10), sharded.search(q_QxD, 10))
  compiled = search._sharded_topk(sharded.mesh, 10)._cache_size()
  _assert_same(ref.search(q_QxD[:20], 10), sharded.search(q_QxD[:20], 10))
  assert search._sharded_topk(sharded.mesh, 10)._cache_size() == compiled
  assert sharded.search(q_QxD[:0], 10)[1].shape == (0, 0)


def test_duplicate_documents_keep_the_lower_index_first():
  rng = np.random.default_rng(2)
  base_NxD = rng.standard_normal((50, 16)).astype(np.float32)
  docs_NxD = np.concatenate([base_NxD, base_NxD, 2 * base_NxD])  # copies on different devices
  q_QxD = rng.standard_normal((37, 16)).astype(np.float32)
  ref, sharded = _both(docs_NxD)
  _assert_same(ref.search(q_QxD, 9), sharded.search(q_QxD, 9))  # whole groups of three
  s, i = sharded.search(q_QxD, 9)
  assert (i.reshape(37, 3, 3) == i[:, ::3, None] + [0, 50, 100]).all()
  # A group cut by k keeps its lowest indices, on the devices and in numpy's search (whose
  # argpartition alone need not: tied rows are re-selected by index), as a full sort does.
  for k in (10, 11, 100):
    np.testing.assert_array_equal(sharded.search(q_QxD, k)[1], _stable_topk(q_QxD, docs_NxD, k))
    np.testing.assert_array_equal(ref.search(q_QxD, k)[1], _stable_topk(q_QxD, docs_NxD, k))


def test_corpus_smaller_than_the_devices():
  rng = np.random.default_rng(3)
  docs_NxD = rng.standard_normal((5, 8)).astype(np.float32)
  q_QxD = rng.standard_normal((7, 8)).astype(np.float32)
  ref, sharded = _both(docs_NxD)
  assert sharded.docs_PxD.shape == (8, 8)  # one row per device, three of them padding
  for k in (3, 5, 10):
    s, i = sharded.search(q_QxD, k)
    assert i.shape == (7, min(k, 5)) and np.isfinite(s).all()
    _assert_same(ref.search(q_QxD, k), (s, i))


def _retrieval_problem(num_docs=301, num_queries=24, dim=32, seed=4):
  """Each query a noisy copy of one document, its only relevant one."""
  rng = np.random.default_rng(seed)
  docs_NxD = rng.standard_normal((num_docs, dim)).astype(np.float32)
  targets = rng.choice(num_docs, num_queries, replace=False)
  q_QxD = docs_NxD[targets] + 0.8 * rng.standard_normal((num_queries, dim)).astype(np.float32)
  qids = [f"q{i}" for i in range(num_queries)]
  dids = [f"d{i}" for i in range(num_docs)]
  return q_QxD, qids, docs_NxD, dids, {q: {dids[t]: 1} for q, t in zip(qids, targets)}


def test_evaluate_embeddings_same_metrics_on_devices():
  problem = _retrieval_problem()
  kw = dict(dims=[32, 16], precisions=["float32", "int8"], k_values=(1, 10, 100))
  off = evaluate.evaluate_embeddings(*problem, device_search="off", **kw)
  on = evaluate.evaluate_embeddings(*problem, device_search="on", **kw)
  assert [(r["representation"], r["dims"]) for r in on] == [
      (r["representation"], r["dims"]) for r in off]
  assert 0 < off[0]["metrics"]["ndcg@10"] < 1  # not trivially perfect
  for a, b in zip(off, on):
    assert b["metrics"] == pytest.approx(a["metrics"], abs=1e-12)
    assert a["bytes_per_doc"] == b["bytes_per_doc"] and "search_devices" not in a
    assert b.get("search_devices") == (8 if b["representation"] == "float32" else None)
  # On CPU the simulated devices share the cores: "auto" keeps the numpy search.
  assert not search.use_devices("auto")
  auto = evaluate.evaluate_embeddings(*problem, **kw)
  assert all("search_devices" not in r for r in auto)


class _FixedDense(Dense):
  """A dense representation whose 'encoder' looks the vectors up by text."""

  def __init__(self, vectors):
    super().__init__()
    self.vectors = vectors

  def encode(self, model, texts, **_):
    return np.stack([self.vectors[t] for t in texts])


def test_evaluate_retrieval_records_the_choice():
  q_QxD, qids, docs_NxD, dids, qrels = _retrieval_problem(num_docs=40, num_queries=6)
  vectors = {**{f"query {q}": v for q, v in zip(qids, q_QxD)},
             **{f"doc {d}": v for d, v in zip(dids, docs_NxD)}}
  dataset = SimpleNamespace(
      name="fixed", checksum="0", corpus_ids=dids, queries={q: f"query {q}" for q in qids},
      qrels=lambda split: qrels, corpus_texts=lambda sep: [f"doc {d}" for d in dids])
  model = SimpleNamespace(source="fixed", fingerprint="0")
  rows = {}
  for choice in ("on", "off", "auto"):
    out = evaluate.evaluate_retrieval(model, dataset, representation=_FixedDense(vectors),
                                      k_values=(1, 10), device_search=choice)
    assert out["settings"]["device_search"] is (choice == "on")
    rows[choice] = out["results"][0]
  assert rows["on"]["search_devices"] == 8 and "search_devices" not in rows["auto"]
  assert rows["on"]["metrics"] == pytest.approx(rows["off"]["metrics"], abs=1e-12)


def test_bad_device_search_value():
  problem = _retrieval_problem(num_docs=20, num_queries=3)
  with pytest.raises(ValueError, match="'auto', 'on', 'off'"):
    evaluate.evaluate_embeddings(*problem, device_search="gpu")
  with pytest.raises(ValueError, match="device_search"):
    evaluate.evaluate_retrieval(None, None, device_search=True)


def test_eval_command_searches_on_the_devices_when_asked(tiny_beir, tiny_model_dir, tmp_path):
  import json

  from embed_jax.cli import main
  out = {}
  for choice in ("on", "off"):
    path = tmp_path / f"{choice}.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--dataset", str(tiny_beir),
                 "--device_search", choice, "--output", str(path)]) == 0
    out[choice] = json.loads(path.read_text())
  assert out["on"]["settings"]["device_search"] is True
  assert out["on"]["results"][0]["search_devices"] == 8
  assert out["on"]["results"][0]["metrics"] == pytest.approx(out["off"]["results"][0]["metrics"],
                                                             abs=1e-6)
