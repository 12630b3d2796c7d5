"""Hard-negative mining: selection on hand-made search results, mining with a fake encoder of
known geometry and with the tiny random model, the negatives files and the `mine` CLI."""

import argparse
import json
import logging
import tempfile

import numpy as np
import pytest

import embed_jax
from embed_jax.data import load_beir
from embed_jax.data import mining
from tests.test_beir_data import write_beir


@pytest.fixture(scope="module", autouse=True)
def _tfds_tempdir(tmp_path_factory):
  # Each first TFDS build leaves an empty temp dir behind (DatasetInfo): keep them in pytest's.
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(tempfile, "tempdir", str(tmp_path_factory.mktemp("tmp")))
    yield


# ---- select_negatives on search results ----


def test_select_drops_positives_padding_skips_and_guards():
  scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, -np.inf]])
  indices = np.array([[3, 5, 1, 8, 2, 7, -1]])  # -1: padding from a short search
  select = lambda **kw: [i.tolist() for i, _ in mining.select_negatives(  # noqa: E731
      scores, indices, [{5}], [[0.8]], sampling="top", **kw)]
  # Guard at margin 0: 0.9 (>= the positive's 0.8) goes; so does the positive itself.
  assert select(margin=0.0, num_negatives=3) == [[1, 8, 2]]
  assert select(margin=0.15, num_negatives=3) == [[8, 2, 7]]       # drops >= 0.65
  assert select(margin=None, num_negatives=3) == [[3, 1, 8]]       # no guard
  # skip_top counts ranks after the positives, before the guard.
  assert select(margin=None, skip_top=2, num_negatives=3) == [[8, 2, 7]]
  assert select(margin=0.0, skip_top=1, num_negatives=3) == [[1, 8, 2]]  # 3 skipped, guard idle
  assert select(margin=0.0, skip_top=2, num_negatives=3) == [[8, 2, 7]]
  assert select(margin=0.0, num_negatives=10) == [[1, 8, 2, 7]]    # fewer: what there is
  idx, s = mining.select_negatives(scores, indices, [{5}], [[0.8]], num_negatives=10)[0]
  assert s.tolist() == pytest.approx([0.7, 0.6, 0.5, 0.4])  # scores follow their documents
  # Several positives: the guard is below the lowest one.
  assert [i.tolist() for i, _ in mining.select_negatives(
      scores, indices, [{5, 2}], [[0.8, 0.5]], sampling="top")] == [[7]]


def test_random_sampling_is_seeded_per_query_and_rank_ordered():
  rng = np.random.default_rng(0)
  scores = -np.sort(-rng.random((4, 50)), axis=1)
  indices = np.stack([rng.permutation(100)[:50] for _ in range(4)])
  positives = [set(indices[q, :3].tolist()) for q in range(4)]
  pos_scores = [[1.0]] * 4
  run = lambda seed, q=slice(None): mining.select_negatives(  # noqa: E731
      scores[q], indices[q], positives[q], pos_scores[q], num_negatives=5, seed=seed)
  a, b, c = run(0), run(0), run(1)
  for q, ((ia, sa), (ib, _)) in enumerate(zip(a, b)):
    assert ia.tolist() == ib.tolist() and len(ia) == 5 and len(set(ia.tolist())) == 5
    assert (np.diff(sa) <= 0).all()  # best first
    assert not set(ia.tolist()) & positives[q]
  assert any(ia.tolist() != ic.tolist() for (ia, _), (ic, _) in zip(a, c))
  assert [i.tolist() for i, _ in a] != [i.tolist() for i, _ in mining.select_negatives(
      scores, indices, positives, pos_scores, num_negatives=5, sampling="top")]
  # Query 2's sample does not depend on the other queries being there.
  alone = mining.select_negatives(scores[:3], indices[:3], positives[:3], pos_scores[:3],
                                  num_negatives=5, seed=0)
  assert alone[2][0].tolist() == a[2][0].tolist()


def test_select_rejects_bad_arguments():
  s, i = np.zeros((1, 3)), np.arange(3)[None]
  with pytest.raises(ValueError, match="positive_scores"):
    mining.select_negatives(s, i, [set()], None, margin=0.0)
  with pytest.raises(ValueError, match="sampling"):
    mining.select_negatives(s, i, [set()], None, margin=None, sampling="hardest")
  with pytest.raises(ValueError, match="num_negatives"):
    mining.select_negatives(s, i, [set()], None, margin=None, num_negatives=0)
  with pytest.raises(ValueError, match="shape"):
    mining.select_negatives(s, i[:, :2], [set()], None, margin=None)


# ---- mining a BEIR folder ----


class FakeEncoder:
  """Encodes by table lookup: each text's vector is chosen, so every score is known."""

  def __init__(self, table: dict[str, np.ndarray]):
    self.table, self.source, self.calls = table, "fake", 0

  def encode(self, texts, batch_size=32, normalize=None, show_progress=None):
    self.calls += 1
    return np.stack([self.table[t] for t in texts]).astype(np.float32)


# Query q0 = e0. Document i = c_i e0 + s_i e1 (scaled: cosine ignores length), so cos = c_i.
COS = {"d0": 0.8, "d1": 0.5, "d2": 0.95, "d3": 0.8, "d4": 0.7, "d5": 0.6, "d6": 0.4, "d7": 0.1}


@pytest.fixture(scope="module")
def geometry(tmp_path_factory):
  root = tmp_path_factory.mktemp("geometry")
  corpus = [{"_id": d, "title": "", "text": f"text of {d}"} for d in COS]
  queries = [{"_id": "q0", "text": "query zero"}, {"_id": "q1", "text": "query one"},
             {"_id": "q2", "text": "query two"}]
  # d0 is q0's positive and d3 an unlabelled copy of it; d1 is judged not relevant (0), so a
  # fair negative. q1's positive is d7; q2 is judged, with nothing relevant.
  qrels = {"train": ["q0\td0\t1", "q0\td1\t0", "q1\td7\t2", "q2\td5\t0"],
           "test": ["q0\td4\t1"]}
  dataset = load_beir(write_beir(root / "geo", corpus, queries, qrels), data_dir=root / "tfds")
  table = {f"text of {d}": 3.0 * np.array([c, np.sqrt(1 - c * c), 0.0]) for d, c in COS.items()}
  table["text of d3"] = table["text of d0"].copy()  # bit-identical to the positive
  table.update({"query zero": np.array([1.0, 0.0, 0.0]), "query one": np.array([0.0, 0.0, 1.0]),
                "query two": np.array([0.0, 1.0, 0.0])})
  return dataset, FakeEncoder(table)


def _negatives(rows):
  return {r["query_id"]: r["negatives"] for r in rows}


def test_mining_with_known_geometry(geometry, caplog):
  dataset, model = geometry
  mine = lambda **kw: mining.mine_hard_negatives(  # noqa: E731
      model, dataset, "train", **{"sampling": "top", "num_negatives": 3, **kw})
  calls = model.calls
  with caplog.at_level(logging.WARNING, logger="embed_jax.data.mining"):
    rows = mine()
  assert model.calls == calls + 2  # the corpus once, the queries once
  assert "1 of 3 judged queries" in caplog.text  # q2: nothing relevant, no row
  assert [r["query_id"] for r in rows] == ["q0", "q1"]
  q0 = rows[0]
  # d2 (0.95) and d3 (0.80, a copy of the positive) fail the guard; d1, judged 0, is a negative.
  assert q0["negatives"] == ["d4", "d5", "d1"] and q0["positives"] == ["d0"]
  assert q0["negative_scores"] == pytest.approx([0.7, 0.6, 0.5], abs=1e-6)
  assert q0["positive_scores"] == pytest.approx([0.8], abs=1e-6)
  assert rows.settings == {
      "model": "fake", "model_fingerprint": None, "max_seq_length": None, "dataset": "geo",
      "dataset_checksum": dataset.checksum, "split": "train", "text": 'title + " " + text',
      "similarity": "cosine", "top_k": 100, "skip_top": 0, "margin": 0.0, "num_negatives": 3,
      "sampling": "top", "seed": 0}
  assert _negatives(mine(margin=0.15))["q0"] == ["d5", "d1", "d6"]
  assert _negatives(mine(margin=None))["q0"] == ["d2", "d3", "d4"]
  assert _negatives(mine(margin=None, skip_top=2))["q0"] == ["d4", "d5", "d1"]
  assert _negatives(mine(skip_top=3))["q0"] == ["d5", "d1", "d6"]  # d2, d3, d4 skipped
  # q1 = e2 is orthogonal to every document: all score 0 = its positive's score, all guarded.
  assert rows[1]["positives"] == ["d7"] and rows[1]["negatives"] == []
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="embed_jax.data.mining"):
    rows = mine(top_k=4)  # d2, d0, d3, d4: only d4 survives
  assert _negatives(rows)["q0"] == ["d4"]
  # q1's positive d7 ties with all (score 0) and is not retrieved: its score is computed.
  assert rows[1]["positive_scores"] == [0.0] and rows[1]["negatives"] == []
  assert sum("fewer than 3 negatives" in r.getMessage() for r in caplog.records) == 1  # once
  assert "2 of 2 queries have fewer than 3 negatives (1 have none)" in caplog.text
  with pytest.raises(ValueError, match="has no qrels split 'dev'.*train, test"):
    mining.mine_hard_negatives(model, dataset, "dev")
  with pytest.raises(ValueError, match="top_k"):
    mine(top_k=0)


def test_the_query_itself_is_never_a_negative(tmp_path):
  # As in Quora: the query is also a document, with the same id and text.
  corpus = [{"_id": "x", "title": "", "text": "same"}, {"_id": "p", "title": "", "text": "pos"},
            {"_id": "n", "title": "", "text": "neg"}]
  dataset = load_beir(write_beir(tmp_path / "quora", corpus, [{"_id": "x", "text": "same"}],
                                 {"dev": ["x\tp\t1"]}), data_dir=tmp_path / "tfds")
  model = FakeEncoder({"same": np.array([1.0, 0.0]), "pos": np.array([0.6, 0.8]),
                       "neg": np.array([0.0, 1.0])})
  rows = mining.mine_hard_negatives(model, dataset, "dev", margin=None, sampling="top")
  assert rows[0]["negatives"] == ["n"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny_beir")
  words = "the cell protein cancer risk patients mouse gene expression blood level hello world " \
          "treatment effect study human mice increase decrease".split()
  rng = np.random.default_rng(0)
  queries = [{"_id": f"q{i}", "text": " ".join(rng.choice(words, 3))} for i in range(8)]
  texts = [" ".join(rng.choice(words, 6)) for _ in range(40)]
  for i in range(8):  # q_i's positives d_i and d_{i+10} hold its words, so they score high
    for j in (i, i + 10):
      texts[j] = queries[i]["text"] + " " + " ".join(rng.choice(words, 3))
  corpus = [{"_id": f"d{i}", "title": f"doc {i}", "text": t} for i, t in enumerate(texts)]
  qrels = {"train": [f"q{i}\td{j}\t1" for i in range(8) for j in (i, i + 10)],
           "test": ["q0\td1\t1"]}
  folder = write_beir(root / "tiny", corpus, queries, qrels)
  return load_beir(folder, data_dir=root / "tfds"), ["--dataset", str(folder),
                                                     "--data_dir", str(root / "tfds")]


def test_mining_with_the_tiny_model(tiny_model_dir, tiny):
  tiny, _ = tiny
  model = embed_jax.load(tiny_model_dir)
  kw = dict(top_k=20, skip_top=2, margin=0.0, num_negatives=4, seed=3, batch_size=16)
  rows = mining.mine_hard_negatives(model, tiny, "train", **kw)
  assert [r["query_id"] for r in rows] == [f"q{i}" for i in range(8)]
  qrels = tiny.qrels("train")
  for r in rows:
    assert set(r) == {"query_id", "positives", "negatives", "negative_scores", "positive_scores"}
    assert r["positives"] == list(qrels[r["query_id"]])
    assert not set(r["negatives"]) & set(r["positives"])
    assert len(r["negatives"]) == len(set(r["negatives"])) <= 4
    assert len(r["negative_scores"]) == len(r["negatives"])
    assert all(s < min(r["positive_scores"]) for s in r["negative_scores"])
    assert r["negative_scores"] == sorted(r["negative_scores"], reverse=True)
  assert sum(len(r["negatives"]) for r in rows) >= 8  # the checks above are not vacuous
  assert mining.mine_hard_negatives(model, tiny, "train", **kw) == rows  # deterministic
  other = mining.mine_hard_negatives(model, tiny, "train", **{**kw, "seed": 4})
  assert _negatives(other) != _negatives(rows)


# ---- negatives files ----


def test_write_and_read_negatives(geometry, tmp_path, caplog):
  dataset, model = geometry
  rows = mining.mine_hard_negatives(model, dataset, "train", num_negatives=2, sampling="top")
  path = tmp_path / "deep" / "neg.jsonl"  # parents are created
  assert mining.write_negatives(rows, path) == path
  assert [json.loads(x) for x in path.read_text().splitlines()] == list(rows)
  meta = mining.read_meta(path)  # the settings the rows carry, the count and the file's sha256
  assert meta == {**rows.settings, "rows": 2, "sha256": meta["sha256"]}
  assert len(meta["sha256"]) == 64
  assert sorted(p.name for p in path.parent.iterdir()) == ["neg.jsonl", "neg.jsonl.meta.json"]
  expected = {"q0": ["d4", "d5"], "q1": []}
  assert mining.read_negatives(path) == expected
  assert mining.read_negatives(path, dataset) == expected
  # Explicit settings add to (and override) the rows' own; plain rows have only these.
  mining.write_negatives(rows, path, {"seed": 5, "note": "by hand"})
  assert mining.read_meta(path) == {**rows.settings, "seed": 5, "note": "by hand", "rows": 2,
                                    "sha256": meta["sha256"]}
  mining.write_negatives(list(rows), path)
  assert set(mining.read_meta(path)) == {"rows", "sha256"}
  with caplog.at_level(logging.WARNING, logger="embed_jax.data.mining"):
    assert mining.read_negatives(path, dataset) == expected
  assert "names no dataset checksum" in caplog.text


def _write_raw(path, lines, meta=None):
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  if meta is not None:
    mining.meta_path(path).write_text(json.dumps(meta))
  return path


def test_read_negatives_errors_name_the_file_and_line(geometry, tmp_path, caplog):
  dataset, _ = geometry
  good = json.dumps({"query_id": "q0", "negatives": ["d4"]})
  path = tmp_path / "n.jsonl"
  cases = [
      (['{"query_id": "q0", "negatives": ["d4"]', good], r"n.jsonl:1: not valid JSON"),
      ([good, '["q1", "d4"]'], r"n.jsonl:2: expected a JSON object"),
      ([good, '{"query_id": 3, "negatives": []}'], r"n.jsonl:2: 'query_id' must be a string"),
      ([good, '{"query_id": "q1", "negatives": "d4"}'], r"n.jsonl:2: 'negatives' must be a list"),
      ([good, "", good], r"n.jsonl:3: query 'q0' again \(first on line 1\)"),
      ([good, '{"query_id": "q9", "negatives": ["d4"]}'],
       r"n.jsonl:2: query id 'q9' is not in geo"),
      ([good, '{"query_id": "q1", "negatives": ["d4", "zz"]}'],
       r"n.jsonl:2: document id 'zz' is not in geo's corpus"),
  ]
  for lines, message in cases:
    with pytest.raises(ValueError, match=message):
      mining.read_negatives(_write_raw(path, lines), dataset)
  # Unknown ids are only errors against a dataset; without a sidecar a warning says so.
  with caplog.at_level(logging.WARNING, logger="embed_jax.data.mining"):
    unknown = '{"query_id": "q9", "negatives": ["zz"]}'
    assert mining.read_negatives(_write_raw(path, [good, unknown]))
  assert "no .meta.json sidecar" in caplog.text
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    mining.read_negatives(tmp_path / "missing.jsonl")

  # Sidecar checks: the dataset it was mined from, and that it describes this very file.
  rows = [{"query_id": "q0", "negatives": ["d4"]}]
  mining.write_negatives(rows, path, {"dataset": "scifact", "dataset_checksum": "ab" * 32})
  with pytest.raises(ValueError, match=r"from 'scifact' \(sha256 abababab.*not from this 'geo'"):
    mining.read_negatives(path, dataset)
  assert mining.read_negatives(path)  # without a dataset there is nothing to compare
  with path.open("a") as f:
    f.write(good.replace("q0", "q2") + "\n")
  with pytest.raises(ValueError, match="describes another file than .*n.jsonl"):
    mining.read_negatives(path)
  mining.meta_path(path).write_text("{not json")
  with pytest.raises(ValueError, match=r"n.jsonl.meta.json: not valid JSON"):
    mining.read_negatives(path)


# ---- CLI ----


def _parse(argv):
  parser = argparse.ArgumentParser(prog="embed-jax")
  from embed_jax.cli import add_mine_parser
  add_mine_parser(parser.add_subparsers(dest="command", required=True))
  return parser.parse_args(argv)


def test_cmd_mine(tiny_model_dir, tiny, tmp_path, capsys):
  tiny, data_args = tiny
  out = tmp_path / "new" / "dir" / "neg.jsonl"  # parents are created
  args = _parse(["mine", "--model", str(tiny_model_dir), *data_args, "--out", str(out),
                 "--top_k", "15", "--skip_top", "1", "--margin", "none", "--num_negatives", "3",
                 "--sampling", "top", "--seed", "7", "--batch_size", "8"])
  args.func(args)
  assert "wrote" in capsys.readouterr().out
  meta = mining.read_meta(out)
  assert {k: meta[k] for k in ("dataset", "dataset_checksum", "split", "top_k", "skip_top",
                               "margin", "num_negatives", "sampling", "seed", "rows")} == {
      "dataset": "tiny", "dataset_checksum": tiny.checksum, "split": "train", "top_k": 15,
      "skip_top": 1, "margin": None, "num_negatives": 3, "sampling": "top", "seed": 7, "rows": 8}
  assert meta["model"] == str(tiny_model_dir) and len(meta["model_fingerprint"]) == 64
  negatives = mining.read_negatives(out, tiny)
  assert len(negatives) == 8 and all(len(v) == 3 for v in negatives.values())
  assert _parse(["mine", "--out", "x.jsonl", "--margin", "-0.5"]).margin == -0.5
  with pytest.raises(SystemExit):
    _parse(["mine", "--out", "x.jsonl", "--margin", "big"])


@pytest.mark.parametrize("extra, error, message", [
    (["--split", "dev"], ValueError, r"split 'dev' not in tiny; it has train, test"),
    (["--num_negatives", "0"], ValueError, "num_negatives must be >= 1"),
    (["--top_k", "0"], ValueError, "top_k must be >= 1"),
    (["--skip_top", "-1"], ValueError, "skip_top must be >= 0"),
    (["--out", "neg.txt"], ValueError, "expected a .jsonl path"),
    (["--sampling", "hardest"], ValueError, "sampling='hardest'; expected one of"),
])
def test_cmd_mine_errors(tiny, tmp_path, extra, error, message):
  argv = ["mine", "--model", str(tmp_path / "never-loaded"), *tiny[1],
          "--out", str(tmp_path / "n.jsonl")]
  with pytest.raises(error, match=message):
    mining.cmd_mine(_parse(argv + extra))  # all raised before the model is loaded


def test_cmd_mine_missing_dataset(tmp_path):
  with pytest.raises(FileNotFoundError):
    mining.cmd_mine(_parse(["mine", "--dataset", str(tmp_path / "nowhere"),
                            "--out", str(tmp_path / "n.jsonl")]))
