"""Vector indexes (embed_jax.index, `embed-jax index`): each FAISS kind against the numpy search,
re-scoring and funnel stages, the folder's checks, and the CLI on a tiny model and corpus."""

import json

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from embed_jax import evaluate  # noqa: E402
from embed_jax.index import VectorIndex, VectorIndexError, build_index, unit_prefix  # noqa: E402

faiss.omp_set_num_threads(1)  # one thread: the test workers share the cores with XLA


def corpus(n=600, d=64, seed=0):
  rng = np.random.default_rng(seed)
  docs = rng.normal(size=(n, d)).astype(np.float32)
  queries = docs[rng.choice(n, 20, replace=False)] + 0.3 * rng.normal(size=(20, d)).astype(np.float32)
  return docs, queries, [f"d{i}" for i in range(n)]


def build(tmp_path, docs, ids, name="idx", **kw):
  kw.setdefault("fingerprint", "fp-a")
  kw.setdefault("corpus_checksum", "corpus-a")
  return build_index(docs, ids, tmp_path / name, **kw)


@pytest.mark.parametrize("dims", [None, 32])
def test_flat_equals_numpy_exact_search_at_each_prefix(tmp_path, dims):
  docs, queries, ids = corpus()
  idx = VectorIndex(build(tmp_path, docs, ids, dims=dims), fingerprint="fp-a")
  scores, rows = idx.search(queries, 10)
  ref = evaluate.Float32()
  ref.index(docs[:, :dims] if dims else docs)
  want_s, want_i = ref.search(queries[:, :dims] if dims else queries, 10)
  np.testing.assert_array_equal(rows, want_i)
  np.testing.assert_allclose(scores, want_s, atol=1e-5)
  assert idx.meta["dims"] == (dims or 64) and idx.meta["full_dims"] == 64


def test_binary_equals_numpy_hamming_and_rescore_equals_the_float_reranking(tmp_path):
  docs, queries, ids = corpus()
  idx = VectorIndex(build(tmp_path, docs, ids, kind="binary"))
  scores, rows = idx.search(queries, 50)
  ref = evaluate.Binary()
  ref.index(docs)
  want_s, _ = ref.search(queries, 50)
  np.testing.assert_array_equal(scores, want_s)  # minus Hamming distances, rank by rank
  assert idx.bytes_per_doc == pytest.approx(8, abs=1)  # 64 bits, plus FAISS's small header
  # Re-scoring the top 200 by the stored float vectors: the exact cosine of those candidates.
  s, r = idx.search(queries, 10, rescore=200)
  cand = idx.search(queries, 200)[1]
  exact = unit_prefix(queries) @ unit_prefix(docs).T
  for q in range(len(queries)):
    best = cand[q][np.argsort(-exact[q, cand[q]], kind="stable")[:10]]
    np.testing.assert_array_equal(r[q], best)
    np.testing.assert_allclose(s[q], exact[q, best], atol=1e-5)


def test_hnsw_int8_and_binary_hnsw_find_most_exact_neighbours(tmp_path):
  docs, queries, ids = corpus()
  exact = np.argsort(-(unit_prefix(queries) @ unit_prefix(docs).T), axis=1)[:, :10]

  def recall(rows):
    return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, exact)])

  for kind, floor in (("hnsw", 0.95), ("int8", 0.9), ("binary_hnsw", 0.0)):
    idx = VectorIndex(build(tmp_path, docs, ids, name=kind, kind=kind))
    idx.set_ef_search(128)
    _, rows = idx.search(queries, 10, rescore=0 if kind != "binary_hnsw" else 100)
    assert recall(rows) >= max(floor, 0.7), kind
  assert VectorIndex(tmp_path / "int8").bytes_per_doc == pytest.approx(64, abs=2)


def test_funnel_chain_reranks_through_each_prefix(tmp_path):
  docs, queries, ids = corpus()
  idx = VectorIndex(build(tmp_path, docs, ids, kind="binary", dims=16))
  assert idx.dims == 16
  s, r = idx.search(queries, 5, rescore=300, chain=[(32, 50)])
  # The final stage is the full-dims cosine over what the 32-dims stage kept.
  kept = idx.search(queries, 50, rescore=300, chain=[])[1]  # a full-dims stage of 300
  assert r.shape == (20, 5)
  exact = unit_prefix(queries) @ unit_prefix(docs).T
  np.testing.assert_allclose(s, np.take_along_axis(exact, r, 1), atol=1e-5)
  assert np.mean([len(set(a) & set(b)) for a, b in zip(r, kept)]) > 3


def test_refusals_name_the_problem(tmp_path):
  docs, queries, ids = corpus(n=50)
  path = build(tmp_path, docs, ids, dims=32)
  with pytest.raises(VectorIndexError, match="another model"):
    VectorIndex(path, fingerprint="fp-b")
  with pytest.raises(VectorIndexError, match="indexes 32 dims, not 64"):
    VectorIndex(path, dims=64)
  idx = VectorIndex(path)
  with pytest.raises(VectorIndexError, match="k=51 but the index holds 50"):
    idx.search(queries, 51)
  bad = queries.copy()
  bad[3, 5] = np.nan
  with pytest.raises(VectorIndexError, match="1 row.*NaN"):
    idx.search(bad, 5)
  with pytest.raises(VectorIndexError, match=r"expected \[n, 64\]"):
    idx.search(queries[:, :32], 5)
  with pytest.raises(VectorIndexError, match="dims must be in 1..64"):
    idx.search(queries, 5, rescore=20, chain=[(65, 10)])
  with pytest.raises(VectorIndexError, match="give rescore"):
    idx.search(queries, 5, chain=[(48, 10)])
  with pytest.raises(VectorIndexError, match="corpus is empty"):
    build(tmp_path, docs[:0], [], name="empty")
  with pytest.raises(VectorIndexError, match="divisible by 8"):
    build(tmp_path, docs, ids, name="b", kind="binary", dims=20)
  with pytest.raises(VectorIndexError, match="NaN"):
    build(tmp_path, np.where(np.arange(64) == 3, np.nan, docs), ids, name="nan")
  with pytest.raises(VectorIndexError, match="not an index folder"):
    VectorIndex(tmp_path)


def test_corrupt_or_truncated_files_are_refused(tmp_path):
  docs, _, ids = corpus(n=50)
  path = build(tmp_path, docs, ids)
  f = path / "vectors.npy"
  data = bytearray(f.read_bytes())
  data[-3] ^= 0xFF
  f.write_bytes(bytes(data))
  with pytest.raises(VectorIndexError, match="vectors.npy is corrupt"):
    VectorIndex(path)
  (path / "index.faiss").write_bytes((path / "index.faiss").read_bytes()[:100])
  with pytest.raises(VectorIndexError, match="index.faiss is truncated"):
    VectorIndex(path)


def test_a_crash_during_build_leaves_the_old_index_and_no_partial_folder(tmp_path, monkeypatch):
  docs, queries, ids = corpus(n=50)
  path = build(tmp_path, docs, ids)
  before = (path / "index.json").read_text()
  def boom(*a, **k):
    raise RuntimeError("disk full")

  monkeypatch.setattr(faiss, "write_index", boom)
  with pytest.raises(RuntimeError, match="disk full"):
    build(tmp_path, docs[::-1].copy(), ids)
  with pytest.raises(RuntimeError, match="disk full"):
    build(tmp_path, docs, ids, name="new")
  assert (path / "index.json").read_text() == before
  assert not (tmp_path / "new").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temporary folders left
  # A folder that is not an index is never replaced.
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "a.txt").write_text("mine")
  monkeypatch.undo()
  with pytest.raises(FileExistsError, match="not an index folder"):
    build(tmp_path, docs, ids, name="notes")
  assert (tmp_path / "notes" / "a.txt").read_text() == "mine"


def test_cli_builds_searches_and_refuses_another_model(tiny_beir, tiny_model_dir, tmp_path,
                                                       capsys):
  from embed_jax.cli import main
  from embed_jax.testing import make_tiny_model
  out = tmp_path / "idx"
  assert main(["index", "build", "--model", str(tiny_model_dir), "--dataset", str(tiny_beir),
               "--kind", "binary", "--dims", "16", "--out", str(out)]) == 0
  assert (tmp_path / "idx.embeddings" / "manifest.json").exists()  # the resumable encoding
  capsys.readouterr()
  assert main(["index", "search", "--index", str(out), "--model", str(tiny_model_dir),
               "--dataset", str(tiny_beir), "--k", "5", "--rescore", "12",
               "--output", str(tmp_path / "r.json")]) == 0
  result = json.loads((tmp_path / "r.json").read_text())
  assert result["num_queries"] == 4 and result["kind"] == "binary" and result["dims"] == 16
  # Re-scoring every document at full dims is the exact float32 search: the same metrics.
  import embed_jax
  from embed_jax.data import load_beir
  data = load_beir(str(tiny_beir))
  exact = evaluate.evaluate_retrieval(embed_jax.load(tiny_model_dir), data, "test",
                                      k_values=(1, 3, 5))["results"][0]["metrics"]
  for key in ("ndcg@5", "recall@5"):
    assert result["metrics"][key] == pytest.approx(exact[key], abs=1e-6)
  capsys.readouterr()
  assert main(["index", "search", "--index", str(out), "--model", str(tiny_model_dir),
               "--query", "protein of the cell", "--k", "3"]) == 0
  printed = capsys.readouterr().out
  hits = json.JSONDecoder().raw_decode(printed[printed.index("{"):])[0]["queries"][0]["hits"]
  assert len(hits) == 3 and hits[0]["score"] >= hits[-1]["score"]
  other = make_tiny_model(tmp_path / "other", seed=1)
  assert main(["index", "search", "--index", str(out), "--model", str(other),
               "--dataset", str(tiny_beir)]) == 2
  assert "built with another model" in capsys.readouterr().err
