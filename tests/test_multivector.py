"""Multi-vector (ColBERT) models: MaxSim against PyLate's scores, parity and round trip of
folders with PyLate, token pooling, exact search, training under every runner, and bad input."""

import json
import shutil

import jax
import numpy as np
import pytest

from embed_jax import losses

RNG = np.random.default_rng(0)

TEXTS = ["Vitamin D deficiency raises the risk of fractures.", "hello world", "x",
         "Proteins fold; genes express... and cells divide!", "The mouse gene (Ptf1a) is 50% smaller.",
         "cancer risk in patients treated with 5 mg/kg", "a b c d e f g h i j k l m n o p",
         "UPPER case Text, with punctuation: commas, colons; and 'quotes'."] * 8  # 64 texts


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _ragged(n, lo, hi, d=8):
  return [_unit(RNG.normal(size=(RNG.integers(lo, hi), d))).astype(np.float32) for _ in range(n)]


def _padded(vectors):
  from embed_jax.multivector import _pad
  return _pad(vectors, max(len(v) for v in vectors))


def test_maxsim_equals_pylate_on_unpadded_pairs():
  """Our padded, masked MaxSim equals PyLate's score of each unpadded (query, document) pair."""
  scores = pytest.importorskip("pylate.scores")
  import torch
  queries, docs = _ragged(5, 3, 9), _ragged(7, 1, 12)
  ours = np.asarray(losses.maxsim_matrix(_padded(queries), _padded(docs)))
  theirs = np.array([[float(scores.colbert_scores_pairwise(torch.tensor(q[None]), torch.tensor(d[None]))[0])
                      for d in docs] for q in queries])
  np.testing.assert_allclose(ours, theirs, atol=1e-5)
  pairs = np.asarray(losses.maxsim_pairs(_padded(queries[:5]), _padded(docs[:5])))
  np.testing.assert_allclose(pairs, np.diag(theirs[:, :5]), atol=1e-5)


def test_a_masked_document_token_never_wins_and_an_empty_document_scores_zero():
  q = {"vectors": np.array([[[1.0, 0.0]]], np.float32), "mask": np.ones((1, 1), np.float32)}
  d = {"vectors": np.array([[[-1.0, 0.0], [0.0, 0.0]], [[5.0, 0.0], [1.0, 0.0]]], np.float32),
       "mask": np.array([[1, 0], [0, 0]], np.float32)}
  # Doc 0: its only kept token scores -1 (a zeroed masked token would have won with 0).
  np.testing.assert_allclose(np.asarray(losses.maxsim_matrix(q, d)), [[-1.0, 0.0]])


def test_exact_search_equals_the_full_score_matrix_and_pooling_shrinks_the_store():
  from embed_jax.multivector import ExactMaxSim, pool_tokens
  queries, docs = _ragged(6, 4, 5), _ragged(150, 2, 40)
  index = ExactMaxSim()
  index.index(docs)
  full = np.asarray(losses.maxsim_matrix(_padded(queries), _padded(docs)))
  np.testing.assert_allclose(index.score_all(queries), full, atol=1e-5)
  s, i = index.search(queries, 10)
  np.testing.assert_array_equal(i, np.argsort(-full, axis=1, kind="stable")[:, :10])
  pooled = ExactMaxSim(2)
  pooled.index(docs)
  assert pooled.bytes_per_doc < 0.6 * index.bytes_per_doc
  doc = docs[int(np.argmax([len(d) for d in docs]))]
  out = pool_tokens(doc, 2)
  assert len(out) == 1 + (len(doc) - 1) // 2 and np.allclose(out[0], doc[0])


def test_pooling_matches_pylate():
  pytest.importorskip("pylate")
  import torch
  from pylate.models import ColBERT
  from embed_jax.multivector import pool_tokens
  docs = _ragged(4, 10, 30, d=16)
  theirs = ColBERT.pool_embeddings_hierarchical(None, [torch.tensor(d) for d in docs], pool_factor=3)
  for d, t in zip(docs, theirs):
    np.testing.assert_allclose(pool_tokens(d, 3), t.numpy(), atol=1e-5)


# ---- folders: PyLate's and ours ----

@pytest.fixture(scope="module")
def pylate_folder(tmp_path_factory):
  """A PyLate ColBERT made by PyLate from the tiny random BERT (markers added, a random
  projection to 128 dims), saved as PyLate saves it."""
  pytest.importorskip("pylate")
  from pylate import models
  from embed_jax.testing import make_tiny_model
  root = tmp_path_factory.mktemp("pylate")
  tiny = make_tiny_model(root / "tiny")
  plain = root / "plain"  # the encoder alone: PyLate adds its own head
  plain.mkdir()
  for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
    shutil.copy(tiny / name, plain / name)
  model = models.ColBERT(str(plain), device="cpu")
  model.save(str(root / "colbert"))
  return root / "colbert"


def _pylate_encode(folder, texts, is_query):
  from pylate import models
  model = models.ColBERT(str(folder), device="cpu")
  return model.encode(texts, is_query=is_query, batch_size=16, convert_to_numpy=True)


def _ours(folder, texts, role):
  import embed_jax
  from embed_jax.representations import of_model
  model = embed_jax.load(folder)
  return of_model(model, truncate_queries=True).encode(model, texts, role=role, batch_size=16)


def _max_diff(a, b):
  assert [len(x) for x in a] == [len(x) for x in b]
  return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


@pytest.mark.parametrize("is_query", [True, False])
def test_a_pylate_folder_loads_and_encodes_as_pylate_does(pylate_folder, is_query):
  ours = _ours(pylate_folder, TEXTS, "query" if is_query else "document")
  theirs = _pylate_encode(pylate_folder, TEXTS, is_query)
  assert _max_diff(ours, theirs) <= 1e-5


def test_our_export_loads_in_pylate_and_encodes_the_same(pylate_folder, tmp_path):
  import embed_jax
  model = embed_jax.load(pylate_folder)
  out = model.save(tmp_path / "export")
  cfg = json.loads((out / "config_sentence_transformers.json").read_text())
  assert cfg["similarity_fn_name"] == "MaxSim" and cfg["query_length"] == 32
  for role, is_query in (("query", True), ("document", False)):
    assert _max_diff(_ours(out, TEXTS, role), _pylate_encode(out, TEXTS, is_query)) <= 1e-5


# ---- training ----

def _config(chunk=0, runner="jit"):
  from configs import scifact_colbert
  c = scifact_colbert.get_config("smoke")
  c.dropout = False
  c.train.grad_cache_chunk, c.train.runner = chunk, runner
  return c


def _multivector_model(c):
  """The tiny BERT with a multi-vector head (random projection), its tokenizer and rep."""
  from embed_jax.models import heads
  from embed_jax.models.config import LateInteraction
  from embed_jax.representations import MultiVector
  from embed_jax.testing import init_params, tiny_tokenizer
  from tests.test_train import runner_model_config
  cfg = runner_model_config()
  tok = tiny_tokenizer()
  cfg, params = heads.add_prefix_tokens(cfg, init_params(cfg), tok, ["[Q] ", "[D] "])
  cfg = cfg.replace(late_interaction=LateInteraction(dims=16, query_length=12, document_length=20))
  params["token_dense"] = {"kernel": np.random.default_rng(7).normal(0, 0.2, (32, 16)).astype(np.float32)}
  return cfg, params, tok, MultiVector().bind(cfg, tok)


def pair_batch(tokenize, seed, b=16, suffix=" ."):
  """A batch of b random (query, positive, hard negative) texts from a small vocabulary, through
  `tokenize(texts, role)`, padded to 12 (queries) and 20 (documents) tokens; the last two rows
  are padding. Positives end with `suffix` (a skiplist token for multi-vector models)."""
  r = np.random.default_rng(seed)
  words = ["cell", "protein", "gene", "mouse", "risk", "study", "the", "blood", "level", "hello"]
  text = lambda n: " ".join(r.choice(words, n))  # noqa: E731
  q = tokenize([text(r.integers(1, 6)) for _ in range(b)], "query")
  p = tokenize([text(r.integers(1, 12)) + suffix for _ in range(b)], "document")
  n = tokenize([text(r.integers(1, 12)) for _ in range(b)], "document")

  def pad(rows, length):
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
      ids[i, :len(row)], mask[i, :len(row)] = row, 1
    return {"ids": ids, "mask": mask}

  dn = pad(p + n, 20)
  groups = {"q": pad(q, 12), "p": {k: v[:b] for k, v in dn.items()},
            "n": {k: v[b:, None] for k, v in dn.items()}}
  pairs = {"valid_B": np.arange(b) < b - 2, "q_ids_B": np.arange(b, dtype=np.int32),
           "p_ids_B": np.arange(b, dtype=np.int32),
           "neg_ids_BxN": (100 + np.arange(b, dtype=np.int32))[:, None]}
  return {"groups": groups, "inputs": {"pairs": pairs}}


def _batch(rep, tok, cfg, seed):
  return pair_batch(lambda texts, role: rep.tokenize(tok, cfg, texts, role), seed)


def _run(runner_name, devices, chunk=0):
  from tests.test_train import run_objective
  c = _config(chunk, runner_name)
  cfg, params, tok, rep = _multivector_model(c)
  return run_objective(c, cfg, params, rep, [_batch(rep, tok, cfg, s) for s in range(2)],
                       runner_name, devices)


needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


@needs_8
def test_multivector_training_agrees_across_runners_and_grad_cache():
  from tests.test_train import _assert_same
  one = _run("jit", jax.devices()[:1])
  _assert_same(one, _run("jit", jax.devices()[:8]))
  _assert_same(one, _run("pmap", jax.devices()[:8]))
  _assert_same(one, _run("jit", jax.devices()[:1], chunk=4))


def test_the_step_loss_is_mnrl_over_maxsim_of_the_outputs():
  from embed_jax import train as T
  from embed_jax.models import SentenceEncoder
  from embed_jax.objective import build_objective
  c = _config()
  cfg, params, tok, rep = _multivector_model(c)
  objective = build_objective(c, representation=rep)
  batch = _batch(rep, tok, cfg, 0)
  module = SentenceEncoder(cfg)
  out = objective.embed(module, params, batch["groups"], jax.random.key(0), train=False)
  assert out["q"]["mask"].all()  # every query position is scored, [MASK]s included
  d_ids = batch["groups"]["p"]["ids"]
  skip = np.isin(d_ids, rep.ids["skiplist"]) & (batch["groups"]["p"]["mask"] > 0)
  assert skip.any() and not np.asarray(out["p"]["mask"])[skip].any()  # "." is not scored
  pairs = batch["inputs"]["pairs"]
  want = losses.mnrl(out["q"], out["p"], out["n"], scale=1.0, score=losses.MAXSIM,
                     valid_B=pairs["valid_B"], p_ids_B=pairs["p_ids_B"],
                     neg_ids_BxN=pairs["neg_ids_BxN"], q_ids_B=pairs["q_ids_B"])
  tx, schedule = T.make_optimizer(c.optim, 10)
  m = jax.jit(T.make_train_step(module, objective, c, tx, schedule))(
      T.init_state(params, tx, 0), batch)[1]
  np.testing.assert_allclose(m["pairs_loss"], want, rtol=1e-5)


def test_colbert_smoke_config_trains_exports_a_pylate_folder_and_evaluates(tiny_beir, tmp_path):
  from embed_jax import train as T
  c = _config()
  c.data.dataset = str(tiny_beir)
  out = T.train(c, tmp_path / "run")
  export = tmp_path / "run" / "export"
  modules = json.loads((export / "modules.json").read_text())
  assert [m["type"] for m in modules] == ["sentence_transformers.models.Transformer",
                                          "pylate.models.Dense.Dense"]
  rows = json.loads((tmp_path / "run" / "results.json").read_text())["results"]
  assert rows[0]["representation"] == "multivector" and rows[0]["dims"] == 16
  assert 0 <= out["test_ndcg@10"] <= 1
  assert (tmp_path / "run" / "multivector_projection.npy").exists()


# ---- bad input ----

def test_dense_and_multivector_models_are_not_mixed_up(tiny_model_dir, pylate_folder):
  import embed_jax
  from embed_jax.representations import MultiVector
  dense = embed_jax.load(tiny_model_dir)
  with pytest.raises(ValueError, match="this is a dense model"):
    MultiVector().bind(dense.config, dense.tokenizer)
  colbert = embed_jax.load(pylate_folder)
  with pytest.raises(ValueError, match="multi-vector \\(ColBERT\\) model: it gives token vectors"):
    colbert.encode(["a text"])


def test_long_queries_and_empty_documents_are_refused(pylate_folder):
  import embed_jax
  from embed_jax.representations import of_model
  model = embed_jax.load(pylate_folder)
  rep = of_model(model)
  with pytest.raises(ValueError, match=r"1 of 2 queries are longer than query_length=32 tokens"):
    rep.encode(model, ["short", " ".join(["cell"] * 40)], role="query")
  with pytest.raises(ValueError, match="1 text\\(s\\) are empty"):
    rep.encode(model, ["a document", "  "], role="document")


def test_plaid_with_every_centroid_probed_is_exact_and_its_ids_are_documents():
  pytest.importorskip("faiss")
  from embed_jax.multivector import ExactMaxSim, Plaid
  queries, docs = _ragged(5, 4, 6, d=16), _ragged(400, 3, 30, d=16)
  exact = ExactMaxSim()
  exact.index(docs)
  want_s, want_i = exact.search(queries, 10)
  full = Plaid(nprobe=10**6, ncandidates=10**6)
  full.index(docs)
  s, i = full.search(queries, 10)
  np.testing.assert_array_equal(i, want_i)
  np.testing.assert_allclose(s, want_s, atol=1e-5)
  pruned = Plaid(nprobe=2, ncandidates=50)
  pruned.index(docs)
  s, i = pruned.search(queries, 10)
  assert (i >= 0).all() and (i < 400).all() and (np.diff(s, axis=1) <= 1e-6).all()


def test_a_plaid_index_built_by_another_model_is_refused(tmp_path):
  pytest.importorskip("faiss")
  from embed_jax.multivector import Plaid
  queries, docs = _ragged(3, 4, 6, d=16), _ragged(100, 3, 20, d=16)
  index = Plaid()
  index.index(docs)
  folder = index.save(tmp_path / "plaid", model_fingerprint="a" * 64, corpus_checksum="c")
  again = Plaid.load(folder, "a" * 64, "c")
  for x, y in zip(index.search(queries, 5), again.search(queries, 5)):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(ValueError, match=r"built by another model \(fingerprint aaaaaaaaaaaa, this "
                                       r"model's bbbbbbbbbbbb\)"):
    Plaid.load(folder, "b" * 64)
  with pytest.raises(ValueError, match="another corpus"):
    Plaid.load(folder, "a" * 64, "other")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["plaid"]  # no temporary folder left
