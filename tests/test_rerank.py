"""Cross-encoders: sentence-transformers' CrossEncoder folders in and out, identical scores."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import embed_jax
from tests.conftest import slow_variant

MAX_LEN = 48


def _texts() -> list[str]:
  return ["", "hello", "the cell protein level", "Hello World! Hello world?",
          "Größe café 日本語 ∑ unknown tokens", "cancer risk in patients " * 12,
          "the mouse gene expression study of human blood cells and the effect of treatment",
          "word " * 300]


def varied_pairs(n: int = 64) -> list[tuple[str, str]]:
  """Short, long (truncated longest-first), empty and unknown-token texts on both sides."""
  pairs = list(itertools.product(_texts(), repeat=2))
  return pairs[:n]


def _write_st_cross_encoder(root, arch: str):
  """A random tiny transformers *ForSequenceClassification (num_labels 1) saved by
  sentence-transformers' CrossEncoder; weights perturbed away from the init so that a wrong
  name or a missed bias shows."""
  import torch
  from sentence_transformers import CrossEncoder
  from transformers import (BertConfig, BertForSequenceClassification, MPNetConfig,
                            MPNetForSequenceClassification)
  from embed_jax.testing import tiny_mpnet_tokenizer, tiny_tokenizer
  tok = tiny_tokenizer() if arch == "bert" else tiny_mpnet_tokenizer()
  shape = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, pad_token_id=tok.pad_token_id, num_labels=1)
  if arch == "bert":
    model = BertForSequenceClassification(BertConfig(max_position_embeddings=64, **shape))
  else:
    model = MPNetForSequenceClassification(MPNetConfig(max_position_embeddings=66, **shape))
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_(torch.randn_like(p) * (1.0 if "relative_attention_bias" in name else 0.1))
  model.eval().save_pretrained(root / "hf")
  tok.save_pretrained(root / "hf")
  ce = CrossEncoder(str(root / "hf"), max_length=MAX_LEN, device="cpu")
  ce.save(str(root / "st"))
  return root / "st"


@pytest.fixture(scope="module", params=["bert", "mpnet"])
def st_cross_encoder(request, tmp_path_factory):
  return _write_st_cross_encoder(tmp_path_factory.mktemp(f"ce_{request.param}"), request.param)


def _st_scores(folder, pairs, identity=False):
  import torch
  from sentence_transformers import CrossEncoder
  ce = CrossEncoder(str(folder), device="cpu")
  kw = {"activation_fn": torch.nn.Identity()} if identity else {}
  return np.asarray(ce.predict(pairs, batch_size=16, **kw), np.float32)


def test_a_cross_encoder_folder_scores_as_sentence_transformers(st_cross_encoder):
  model = embed_jax.load(st_cross_encoder)
  assert model.config.classifier is not None and model.config.max_seq_length == MAX_LEN
  pairs = varied_pairs()
  assert len(pairs) == 64
  ours = model.predict(pairs, batch_size=16)
  want = _st_scores(st_cross_encoder, pairs)
  assert np.abs(ours - want).max() <= 1e-5
  logits = model.predict(pairs, activation=False)
  assert np.abs(logits - _st_scores(st_cross_encoder, pairs, identity=True)).max() <= 1e-5
  assert logits.std() > 0.01  # the pairs are told apart: the check can fail
  with pytest.raises(ValueError, match="cross-encoder"):
    model.encode(["a text"])


def test_our_export_loads_in_sentence_transformers_and_scores_the_same(st_cross_encoder, tmp_path):
  from safetensors.numpy import load_file
  model = embed_jax.load(st_cross_encoder)
  out = model.save(tmp_path / "export")
  pairs = varied_pairs()
  assert np.abs(_st_scores(out, pairs) - model.predict(pairs)).max() <= 1e-5
  a, b = load_file(str(st_cross_encoder / "model.safetensors")), load_file(str(out / "model.safetensors"))
  assert set(a) - {"bert.embeddings.position_ids"} == set(b)
  assert all(np.array_equal(a[k], b[k]) for k in b)
  again = embed_jax.load(out)
  assert np.array_equal(again.predict(pairs, activation=False), model.predict(pairs, activation=False))


def test_rank_orders_documents_and_rerank_keeps_the_top(st_cross_encoder):
  from embed_jax.rerank import rerank
  model = embed_jax.load(st_cross_encoder)
  docs = {f"d{i}": t for i, t in enumerate(_texts())}
  ranked = model.rank("the cell protein", list(docs.values()))
  scores = model.predict([("the cell protein", t) for t in docs.values()])
  assert [r["corpus_id"] for r in ranked] == list(np.argsort(-scores, kind="stable"))
  first = {"q": {d: float(-i) for i, d in enumerate(docs)}}  # d0 best ... d7 worst
  run, timing = rerank(model, first, {"q": "the cell protein"}, docs, top=5)
  assert set(run["q"]) == {"d0", "d1", "d2", "d3", "d4"} and timing["pairs"] == 5
  logits = model.predict([("the cell protein", docs[d]) for d in run["q"]], activation=False)
  assert np.allclose([run["q"][d] for d in run["q"]], logits)


# ---- losses ----

def test_candidate_group_losses_by_hand():
  from embed_jax import losses
  s = np.array([[2.0, 1.0, 0.5], [0.0, 3.0, -9.0], [5.0, 5.0, 5.0]], np.float32)
  allowed = np.array([[True, True, True], [True, True, False], [True, True, True]])
  valid = np.array([True, True, False])
  ce = lambda row, ok: np.log(np.exp(row[ok]).sum()) - row[0]  # noqa: E731
  want = (ce(s[0], allowed[0]) + ce(s[1], allowed[1])) / 2
  np.testing.assert_allclose(losses.listwise_ce(s, allowed, valid), want, rtol=1e-6)
  sp = lambda x: np.log1p(np.exp(x))  # noqa: E731
  bce = [sp(-2.0), sp(1.0), sp(0.5), sp(0.0), sp(3.0)]  # the padded negative and row 2 left out
  np.testing.assert_allclose(losses.pointwise_bce(s, allowed, valid), np.mean(bce), rtol=1e-6)
  t = np.array([[1.0, 0.0, 0.0], [2.0, 0.0, 7.0], [0.0, 0.0, 0.0]], np.float32)
  mm = [((2 - 1) - 1) ** 2, ((2 - .5) - 1) ** 2, ((0 - 3) - 2) ** 2]
  np.testing.assert_allclose(losses.group_margin_mse(s, t, allowed, valid), np.mean(mm), rtol=1e-6)
  def kl(srow, trow, ok):
    ls = srow[ok] - np.log(np.exp(srow[ok]).sum())
    lt = trow[ok] - np.log(np.exp(trow[ok]).sum())
    return float(np.sum(np.exp(lt) * (lt - ls)))
  want = (kl(s[0], t[0], allowed[0]) + kl(s[1], t[1], allowed[1])) / 2
  np.testing.assert_allclose(losses.listwise_kl(s, t, allowed, valid), want, rtol=1e-5)
  assert float(losses.listwise_kl(t, t, allowed, valid)) == pytest.approx(0.0, abs=1e-7)


# ---- training ----

def _cross_model(arch="bert"):
  from embed_jax.models import heads
  from embed_jax.representations import Cross
  from embed_jax.testing import init_params, tiny_mpnet_tokenizer, tiny_tokenizer
  from tests.test_train import runner_model_config
  cfg = runner_model_config()
  tok = tiny_tokenizer()
  if arch == "mpnet":
    tok = tiny_mpnet_tokenizer()
    cfg = cfg.replace(architecture="mpnet", pad_token_id=tok.pad_token_id,
                      max_position_embeddings=cfg.max_position_embeddings + 2)
  cfg, params = heads.add_classifier_head(cfg, init_params(cfg, seed=3), "tiny", seed=0)
  return cfg, params, tok, Cross().bind(cfg, tok)


def cross_batch(tok, seed, b=14, n=3, max_len=24):
  """b random queries, each with a positive and n negatives joined into pairs, a batch of b + 2
  (the last two rows padding; every other query lacks its last negative: doc id -1)."""
  from embed_jax.data.pairs import CrossPairLoader, Pairs
  from embed_jax.rerank import tokenize_pairs
  r = np.random.default_rng(seed)
  words = ["cell", "protein", "gene", "mouse", "risk", "study", "the", "blood", "level", "hello"]
  text = lambda k: " ".join(r.choice(words, k))  # noqa: E731
  queries = [text(r.integers(1, 6)) for _ in range(b)]
  docs = [text(r.integers(1, 14)) for _ in range(b * (n + 1))]
  negs = [np.arange(b + i * n, b + (i + 1) * n - (i % 2), dtype=np.int32) for i in range(b)]
  pairs = Pairs([f"q{i}" for i in range(b)], [f"d{i}" for i in range(len(docs))],
                np.stack([np.arange(b), np.arange(b)], 1).astype(np.int32), negs)
  tokens = lambda q, d: tuple(x[0] for x in tokenize_pairs(tok, max_len, [queries[q]], [docs[d]]))  # noqa: E731
  loader = CrossPairLoader(pairs, tokens, max_len=max_len, batch_size=b + 2, seed=seed,
                           num_negatives=n, pad_id=tok.pad_token_id)
  batch = loader.batch(0)
  return batch


def _cross_config(chunk=0, runner="jit", loss="listwise"):
  from configs import scifact_reranker
  c = scifact_reranker.get_config("smoke")
  c.dropout = False
  c.loss.name = loss
  if loss == "listwise":
    # Listwise cross-entropy is blind to a shift of every logit: the classifier's bias gets only
    # float noise as its gradient, which Adam scales up to a full step; freeze it.
    c.optim.freeze = "classifier/bias"
  c.train.grad_cache_chunk, c.train.runner = chunk, runner
  return c


def _run_cross(runner_name, devices, chunk=0, loss="listwise", arch="bert"):
  from tests.test_train import run_objective
  cfg, params, tok, rep = _cross_model(arch)
  return run_objective(_cross_config(chunk, runner_name, loss), cfg, params, rep,
                       [cross_batch(tok, s) for s in range(3)], runner_name, devices)


needs_8 = pytest.mark.skipif(__import__("jax").device_count() < 8, reason="needs 8 (simulated) devices")


@needs_8
@pytest.mark.parametrize("loss,arch", [("listwise", "bert"),
                                       pytest.param("bce", "mpnet", marks=slow_variant)])
def test_cross_encoder_training_agrees_across_runners_and_grad_cache(loss, arch):
  import jax
  from tests.test_train import _assert_same
  one = _run_cross("jit", jax.devices()[:1], loss=loss, arch=arch)
  _assert_same(one, _run_cross("jit", jax.devices()[:8], loss=loss, arch=arch))
  _assert_same(one, _run_cross("pmap", jax.devices()[:8], loss=loss, arch=arch))
  _assert_same(one, _run_cross("jit", jax.devices()[:1], chunk=4, loss=loss, arch=arch))


def test_the_cross_step_loss_is_the_listwise_cross_entropy_of_the_pair_logits():
  import jax
  from embed_jax import losses
  from embed_jax import train as T
  from embed_jax.models import SentenceEncoder
  from embed_jax.objective import build_objective
  from embed_jax.rerank import CrossEncoder
  c = _cross_config()
  cfg, params, tok, rep = _cross_model()
  batch = cross_batch(tok, 0)
  g = batch["groups"]
  assert g["qp"]["ids"].shape[0] == 16 and g["qn"]["ids"].shape[:2] == (16, 3)
  assert g["qp"]["types"].max() == 1  # the document's tokens are type 1 (BERT)
  # The logits of the step's pair groups are CrossEncoder.predict's on the same texts.
  model = CrossEncoder(cfg, params, tok)
  module = SentenceEncoder(cfg)
  objective = build_objective(c, representation=rep)
  out = objective.embed(module, params, g, jax.random.key(0), train=False)
  ids = g["qp"]["ids"][0][g["qp"]["mask"][0] > 0]
  sep = list(ids).index(tok.sep_token_id)
  q_text = tok.decode(ids[1:sep])
  d_text = tok.decode(ids[sep + 1:-1])
  np.testing.assert_allclose(out["qp"][0], model.predict([(q_text, d_text)], activation=False)[0],
                             atol=1e-5)
  pairs = batch["inputs"]["pairs"]
  allowed = losses.group_allowed(pairs["neg_ids_BxN"], 3, 16)
  assert np.array_equal(np.asarray(allowed)[:, 1:], pairs["neg_ids_BxN"] >= 0)
  assert 0 < np.asarray(allowed)[:14, 3].sum() < 14  # padding negatives are left out
  scores = np.concatenate([np.asarray(out["qp"])[:, None], np.asarray(out["qn"])], 1)
  want = losses.listwise_ce(scores, allowed, pairs["valid_B"])
  tx, schedule = T.make_optimizer(c.optim, 10)
  m = jax.jit(T.make_train_step(module, objective, c, tx, schedule))(T.init_state(params, tx, 0),
                                                                      batch)[1]
  np.testing.assert_allclose(m["loss"], want, rtol=1e-5)
  assert 0 <= m["pairs_accuracy"] <= 1


def test_reranker_smoke_config_trains_exports_and_reranks(tiny_beir, tmp_path):
  import json
  from sentence_transformers import CrossEncoder as STCrossEncoder
  from embed_jax import train as T
  from configs import scifact_reranker
  c = scifact_reranker.get_config("smoke")
  c.data.dataset = str(tiny_beir)
  c.data.negatives = str(tmp_path / "negatives.jsonl")
  c.data.mine.num_negatives, c.data.mine.skip_top, c.data.num_negatives = 4, 0, 2
  out = T.train(c, tmp_path / "run")
  export = tmp_path / "run" / "export"
  model = embed_jax.load(export)
  assert model.config.classifier is not None
  pairs = [("protein of the cell", "the cell protein"), ("risk of cancer", "hello world")]
  st = STCrossEncoder(str(export), device="cpu").predict(pairs)
  assert np.abs(np.asarray(st) - model.predict(pairs)).max() <= 1e-5
  result = json.loads((tmp_path / "run" / "results.json").read_text())
  reranked, first = result["results"]
  assert reranked["representation"] == "reranked top 10" and first["representation"] == "bm25 (bm25)"
  assert reranked["pairs"] == 4 * 10 and 0 <= out["test_ndcg@10"] <= 1
  assert result["settings"]["first_stage"] == "bm25"


def test_cross_configs_are_refused_with_what_to_change():
  from embed_jax.objective import objective_problems
  c = _cross_config()
  c.loss.name = "mnrl"
  c.data.num_negatives = 0
  c.matryoshka.dims = (16,)
  problems = " | ".join(objective_problems(c, 1))
  assert "listwise or bce" in problems and "data.num_negatives >= 1" in problems
  assert "matryoshka.dims=(16,)" in problems


def test_eval_reranks_a_first_stage_and_refuses_misuse(tiny_beir, tmp_path, capsys):
  import json
  from embed_jax.cli import main
  folder = _write_st_cross_encoder(tmp_path / "ce", "bert")
  out = tmp_path / "eval.json"
  assert main(["eval", "--model", "bm25", "--dataset", str(tiny_beir), "--rerank", str(folder),
               "--rerank_top", "5", "--output", str(out)]) == 0
  result = json.loads(out.read_text())
  first, reranked = result["results"]
  assert first["representation"] == "bm25" and "run" not in first
  assert reranked["representation"].startswith("bm25 + rerank top 5") and reranked["pairs"] == 4 * 5
  assert reranked["ms_per_query"] > 0 and result["settings"]["rerank_top"] == 5
  assert "rerank top 5" in out.with_suffix(".md").read_text()
  assert main(["eval", "--model", str(folder), "--dataset", str(tiny_beir)]) != 0
  assert "is a cross-encoder" in capsys.readouterr().err
  assert main(["eval", "--model", "bm25", "--model", "bm25", "--dataset", str(tiny_beir),
               "--rerank", str(folder)]) != 0
  assert "give --model once" in capsys.readouterr().err


def test_a_cross_encoder_where_a_bi_encoder_belongs_and_the_reverse_are_refused(
    st_cross_encoder, tiny_model_dir, tiny_beir, tmp_path, capsys):
  from configs import scifact_mnrl
  from embed_jax import train as T
  from embed_jax.cli import main
  texts = tmp_path / "texts.txt"
  texts.write_text("a text\n")
  assert main(["encode", "--model", str(st_cross_encoder), "--input", str(texts), "--output",
               str(tmp_path / "e.npy")]) != 0
  assert "cross-encoder" in capsys.readouterr().err and not (tmp_path / "e.npy").exists()
  assert main(["eval", "--model", "bm25", "--dataset", str(tiny_beir), "--rerank",
               str(tiny_model_dir)]) != 0
  assert "is not a cross-encoder" in capsys.readouterr().err
  c = scifact_mnrl.get_config()
  c.model, c.data.dataset = str(st_cross_encoder), str(tiny_beir)
  c.max_seq_length, c.query_max_seq_length = 32, 16
  with pytest.raises(ValueError, match="is a cross-encoder; set representation='cross'"):
    T.train(c, tmp_path / "run")
