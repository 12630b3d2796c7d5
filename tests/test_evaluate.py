"""Representations and the retrieval evaluator, on embeddings with known geometry."""

import json

import numpy as np
import pytest

import embed_jax
from embed_jax import evaluate
from embed_jax.cli import main
from embed_jax.data import load_beir


def _clusters(num_docs=300, num_queries=40, dim=64, noise=0.3, seed=0):
  """Each query is a noisy copy of one document: that document is its only relevant one."""
  rng = np.random.default_rng(seed)
  docs = rng.standard_normal((num_docs, dim)).astype(np.float32)
  targets = rng.choice(num_docs, num_queries, replace=False)
  queries = docs[targets] + noise * rng.standard_normal((num_queries, dim)).astype(np.float32)
  qids = [f"q{i}" for i in range(num_queries)]
  dids = [f"d{i}" for i in range(num_docs)]
  qrels = {q: {dids[t]: 1} for q, t in zip(qids, targets)}
  return queries, qids, docs, dids, qrels


def test_topk_search_matches_a_full_sort_across_chunks():
  rng = np.random.default_rng(1)
  scores_QxN = rng.standard_normal((7, 1000))
  s, i = evaluate.topk_search(lambda a, b: scores_QxN[:, a:b], 1000, 25, chunk=64)
  order = np.argsort(-scores_QxN, axis=1)[:, :25]
  np.testing.assert_array_equal(i, order)
  np.testing.assert_array_equal(s, np.take_along_axis(scores_QxN, order, 1))
  # With ties, the kept scores are still the top 25, sorted, and lower indices come first.
  tied_QxN = np.round(scores_QxN, 1)
  s, i = evaluate.topk_search(lambda a, b: tied_QxN[:, a:b], 1000, 25, chunk=64)
  np.testing.assert_array_equal(s, -np.sort(-tied_QxN, axis=1)[:, :25])
  np.testing.assert_array_equal(s, np.take_along_axis(tied_QxN, i, 1))
  same = s[:, 1:] == s[:, :-1]
  assert (i[:, 1:][same] > i[:, :-1][same]).all()
  s, i = evaluate.topk_search(lambda a, b: tied_QxN[:, a:b], 1000, 5000)  # k > corpus
  assert i.shape == (7, 1000)


def test_float32_is_exact_and_truncation_renormalises():
  q, qids, d, dids, qrels = _clusters(noise=0.0)
  res = evaluate.evaluate_embeddings(q, qids, d, dids, qrels, dims=[64, 16])
  assert [r["dims"] for r in res] == [64, 16]
  assert res[0]["metrics"]["ndcg@10"] == pytest.approx(1.0)
  assert res[0]["bytes_per_doc"] == 256 and res[1]["bytes_per_doc"] == 64
  rep = evaluate.Float32()
  rep.index(d[:, :16] * 5.0)  # scale does not matter: cosine
  s, i = rep.search(q[:, :16], 3)
  assert (i[:, 0] == [dids.index(next(iter(qrels[x]))) for x in qids]).all()


def test_scalar_quantisation_codes_and_quality():
  q, qids, d, dids, qrels = _clusters()
  for precision, dtype, lo, hi in (("int8", np.int8, -128, 127), ("uint8", np.uint8, 0, 255)):
    rep = evaluate.Scalar(precision)
    rep.index(d)
    assert rep.codes_NxD.dtype == dtype and rep.bytes_per_doc == 64
    assert rep.codes_NxD.min() == lo and rep.codes_NxD.max() == hi  # ranges from the corpus
  res = evaluate.evaluate_embeddings(q, qids, d, dids, qrels, precisions=["float32", "int8", "uint8"])
  ndcg = {r["representation"]: r["metrics"]["ndcg@10"] for r in res}
  assert ndcg["int8"] >= 0.95 * ndcg["float32"]


def test_binary_hamming_and_rescoring():
  q, qids, d, dids, qrels = _clusters(noise=0.6)
  rep = evaluate.Binary()
  rep.index(d)
  assert rep.bytes_per_doc == 8
  s, i = rep.search(q[:3], 300)
  bits_q, bits_d = q[:3] > 0, d > 0
  hamming = (bits_q[:, None, :] != bits_d[None]).sum(-1)
  np.testing.assert_array_equal(-s, np.take_along_axis(hamming, i, 1))
  assert (np.diff(s, axis=1) <= 0).all()
  res = evaluate.evaluate_embeddings(q, qids, d, dids, qrels, precisions=["float32", "binary"],
                                     rescore=50)
  ndcg = {r["representation"]: r["metrics"]["ndcg@10"] for r in res}
  assert set(ndcg) == {"float32", "binary", "binary+rescore"}
  assert ndcg["binary+rescore"] >= ndcg["binary"]


def test_bad_arguments():
  q, qids, d, dids, qrels = _clusters()
  with pytest.raises(ValueError, match="dims"):
    evaluate.evaluate_embeddings(q, qids, d, dids, qrels, dims=[65])
  with pytest.raises(ValueError, match="float16"):
    evaluate.evaluate_embeddings(q, qids, d, dids, qrels, precisions=["float16"])


def test_evaluate_retrieval_and_cli(tiny_model_dir, tiny_beir, tmp_path, capsys):
  model = embed_jax.load(tiny_model_dir)
  out = evaluate.evaluate_retrieval(model, load_beir(tiny_beir), "test", dims=[32, 8],
                                    precisions=["float32", "int8", "binary"], rescore=3)
  s = out["settings"]
  assert len(s["model_fingerprint"]) == 64 and len(s["dataset_checksum"]) == 64
  assert s["num_queries"] == 4 and s["num_docs"] == 12 and s["max_seq_length"] == 64
  assert {(r["representation"], r["dims"]) for r in out["results"]} == {
      (p, d) for p in ("float32", "int8", "binary", "binary+rescore") for d in (32, 8)}
  for r in out["results"]:
    assert 0 <= r["metrics"]["ndcg@10"] <= 1 and r["ms_per_query"] >= 0

  path = tmp_path / "res.json"
  assert main(["eval", "--model", str(tiny_model_dir), "--dataset", str(tiny_beir), "--dims", "8",
               "--precision", "float32,binary", "--rescore", "4", "--output", str(path)]) == 0
  printed = capsys.readouterr().out
  assert "| binary+rescore | 8 |" in printed
  saved = json.loads(path.read_text())
  assert saved["settings"]["text"] == 'title + " " + text'
  assert main(["eval", "--model", str(tiny_model_dir), "--dataset", str(tiny_beir),
               "--split", "dev"]) == 2
  assert "it has train, test" in capsys.readouterr().err
  assert main(["eval", "--model", str(tiny_model_dir), "--dataset", str(tiny_beir),
               "--precision", "float16"]) == 2
  assert main(["eval", "--model", str(tiny_model_dir), "--dataset", str(tmp_path / "nope")]) == 2
