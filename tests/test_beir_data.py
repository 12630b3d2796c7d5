"""BEIR datasets through TFDS (array_record, no TensorFlow): tiny folders and zips, then SciFact."""

import functools
import hashlib
import http.server
import json
import logging
import os
import tempfile
import threading
import zipfile
from pathlib import Path

import pytest

from embed_jax.data import BeirFormatError, beir, load_beir, resolve_beir
from tests.conftest import data_root

CORPUS = [
    {"_id": "d1", "title": "Title one", "text": "Text  one,\n  spaced."},
    {"_id": "d2", "title": "", "text": " body two "},
    {"_id": "d3", "title": "T3", "text": "three"},
    {"_id": "d4", "title": None, "text": "four"},
]
QUERIES = [{"_id": "q1", "text": "first?"}, {"_id": "q2", "text": "second?"},
           {"_id": "q3", "text": "third?", "metadata": {}}]
HEADER = "query-id\tcorpus-id\tscore"
QRELS = {"train": ["q1\td1\t1", "q2\td2\t1"],
         "test": ["q1\td3\t2", "q3\td4\t0", "q3\td1\t1"]}


def write_beir(root: Path, corpus=CORPUS, queries=QUERIES, qrels=QRELS) -> Path:
  """A BEIR folder; rows are dicts (written as JSON) or raw strings (written as they are)."""
  (root / "qrels").mkdir(parents=True, exist_ok=True)
  for name, rows in (("corpus.jsonl", corpus), ("queries.jsonl", queries)):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (root / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  for split, lines in qrels.items():
    (root / "qrels" / f"{split}.tsv").write_text(
        "".join(line + "\n" for line in [HEADER] + lines), encoding="utf-8")
  return root


def zip_folder(folder: Path, dest: Path, inner: str) -> Path:
  with zipfile.ZipFile(dest, "w") as zf:
    for path in sorted(folder.rglob("*")):
      if path.is_file():
        zf.write(path, f"{inner}/{path.relative_to(folder)}" if inner else
                 str(path.relative_to(folder)))
  return dest


@pytest.fixture(autouse=True)
def _tfds_tempdir(tmp_path, monkeypatch):
  # Each first build makes (and leaves) an empty temp dir in tfds' DatasetInfo: keep it here.
  (tmp_path / "tmp").mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))


@pytest.fixture
def env(tmp_path, monkeypatch):
  """Offline, no EMBED_JAX_DATA, a cache dir per test; returns that cache dir."""
  monkeypatch.setenv("EMBED_JAX_OFFLINE", "1")
  monkeypatch.delenv("EMBED_JAX_DATA", raising=False)
  monkeypatch.setenv("EMBED_JAX_CACHE", str(tmp_path / "cache"))
  return tmp_path / "cache"


def prepared_dirs(cache: Path) -> list[Path]:
  return sorted(cache.glob(f"{beir.BeirBuilder.name}/*/{beir.BeirBuilder.VERSION}"))


# ---- reading ----


def test_folder_splits_counts_and_joining(tmp_path, env):
  ds = load_beir(write_beir(tmp_path / "tiny"))
  assert ds.name == "tiny"
  assert ds.splits == ("corpus", "queries", "train", "test")
  assert ds.qrels_splits == ("train", "test")
  assert ds.corpus_ids == ["d1", "d2", "d3", "d4"]  # file order
  # MTEB: title + " " + text, stripped; the text alone without a title; inner whitespace kept.
  assert ds.corpus_texts() == ["Title one Text  one,\n  spaced.", "body two", "T3 three", "four"]
  assert ds.corpus_texts(join=". ")[:2] == ["Title one. Text  one,\n  spaced.", "body two"]
  assert ds.corpus_texts(join=None)[:2] == ["Text  one,\n  spaced.", "body two"]
  assert ds.queries == {"q1": "first?", "q2": "second?", "q3": "third?"}
  assert ds.qrels("train") == {"q1": {"d1": 1}, "q2": {"d2": 1}}
  assert ds.qrels("test") == {"q1": {"d3": 2}, "q3": {"d4": 0, "d1": 1}}  # relevance 0 is kept
  assert ds.split_queries("test") == {"q1": "first?", "q3": "third?"}
  # The raw TFDS data source: one feature dict for all splits, bytes for text.
  source = ds.data_source("test")
  assert len(source) == 3 and len(ds.data_source("corpus")) == 4
  assert source[0]["query_id"] == b"q1" and source[0]["corpus_id"] == b"d3"
  assert int(source[0]["score"]) == 2
  assert len(prepared_dirs(env)) == 1  # written under $EMBED_JAX_CACHE


def test_zip_reads_like_the_folder_and_shares_its_cache(tmp_path, env):
  folder = write_beir(tmp_path / "tiny")
  from_folder = load_beir(folder)
  for inner in ("tiny", ""):  # the folder inside the zip, or the files at its top level
    ds = load_beir(zip_folder(folder, tmp_path / f"z{inner}.zip", inner))
    assert ds.checksum == from_folder.checksum
    assert ds.corpus_texts() == from_folder.corpus_texts()
    assert ds.qrels("test") == from_folder.qrels("test")
  # Same content and name: the folder and tiny/ in z.zip share a cache; z.zip's top level is "z".
  assert len(prepared_dirs(env)) == 2


def test_first_qrels_line_is_data_when_it_has_an_integer_score(tmp_path, env):
  folder = write_beir(tmp_path / "tiny")
  (folder / "qrels" / "test.tsv").write_text("q1\td1\t1\nq2\td2\t1\n")  # no header
  assert load_beir(folder).qrels("test") == {"q1": {"d1": 1}, "q2": {"d2": 1}}


def test_lone_surrogate_becomes_replacement_character(tmp_path, env):
  corpus = CORPUS + ['{"_id": "d5", "title": "", "text": "bad \\ud800 char"}']
  ds = load_beir(write_beir(tmp_path / "tiny", corpus=corpus))
  assert ds.corpus_texts()[-1] == "bad \ufffd char"


# ---- checksum and cache ----


def test_checksum_is_the_manifest_of_file_digests(tmp_path, env):
  folder = write_beir(tmp_path / "tiny")
  manifest = "".join(
      f"{hashlib.sha256((folder / rel).read_bytes()).hexdigest()}  {rel}\n"
      for rel in ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv"))
  assert load_beir(folder).checksum == hashlib.sha256(manifest.encode()).hexdigest()


def test_changed_file_gets_a_new_checksum_and_a_new_cache(tmp_path, env):
  folder = write_beir(tmp_path / "tiny")
  before = load_beir(folder)
  write_beir(folder, qrels={**QRELS, "test": ["q2\td3\t1"]})
  after = load_beir(folder)
  assert after.checksum != before.checksum
  assert after.qrels("test") == {"q2": {"d3": 1}}  # not the stale cache
  write_beir(folder, corpus=CORPUS[:3] + [{"_id": "d4", "title": "", "text": "FOUR"}])
  assert load_beir(folder).corpus_texts()[-1] == "FOUR"
  assert len(prepared_dirs(env)) == 3


def test_cache_is_reused(tmp_path, env, monkeypatch):
  folder = write_beir(tmp_path / "tiny")
  first = load_beir(folder)
  files = {p: p.stat().st_mtime_ns for p in Path(first.builder.data_dir).iterdir()}

  def fail(*args, **kwargs):
    raise AssertionError("the cached dataset was generated again")

  monkeypatch.setattr(beir.BeirBuilder, "_split_generators", fail)
  again = load_beir(folder, data_dir=env)  # the same dir, given explicitly
  assert again.builder.data_dir == first.builder.data_dir
  assert again.corpus_ids == first.corpus_ids and again.qrels("test") == first.qrels("test")
  assert {p: p.stat().st_mtime_ns for p in Path(again.builder.data_dir).iterdir()} == files


def test_processes_sharing_a_cache_prepare_it_once_and_all_read_it(tmp_path, env):
  """Two processes loading one new folder at once (test workers, hosts of one run): one prepares
  it under the lock, the other waits and reads it; without the lock TFDS' final rename races."""
  import subprocess
  import sys
  folder = write_beir(tmp_path / "tiny")
  code = ("import sys; from embed_jax.data import load_beir; "
          "print(','.join(load_beir(sys.argv[1]).corpus_ids))")
  procs = [subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy())
           for _ in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
  assert [out.strip() for out, _ in outs] == ["d1,d2,d3,d4"] * 2
  assert len(prepared_dirs(env)) == 1


def test_data_dir_argument_beats_the_environment(tmp_path, env):
  ds = load_beir(write_beir(tmp_path / "tiny"), data_dir=tmp_path / "elsewhere")
  assert Path(ds.builder.data_dir).is_relative_to(tmp_path / "elsewhere")
  assert not prepared_dirs(env)


# ---- bad input ----


def test_qrels_naming_unknown_ids_are_counted_skipped_and_warned_once(tmp_path, env, caplog):
  qrels = {"test": ["q1\td1\t1", "q9\td1\t1", "q1\td9\t1", "q9\td9\t1", "q2\td2\t1"]}
  folder = write_beir(tmp_path / "tiny", qrels=qrels)
  with caplog.at_level(logging.WARNING, logger="embed_jax.data.beir"):
    ds = load_beir(folder)
  warnings = [r.getMessage() for r in caplog.records if r.name == "embed_jax.data.beir"]
  assert len(warnings) == 1
  assert str(folder / "qrels" / "test.tsv") in warnings[0]
  assert "skipped 3 of 5" in warnings[0] and "2 name a query" in warnings[0]
  assert "2 a document" in warnings[0]
  assert ds.qrels("test") == {"q1": {"d1": 1}, "q2": {"d2": 1}}
  assert ds.builder.info.metadata["qrels"]["test"] == {"pairs": 2, "skipped": 3}


def test_qrels_file_without_usable_pairs_gives_no_split(tmp_path, env):
  ds = load_beir(write_beir(tmp_path / "tiny", qrels={**QRELS, "dev": ["q9\td9\t1"]}))
  assert ds.qrels_splits == ("train", "test")


@pytest.mark.parametrize("line, message", [
    ("q1\td1", "expected 3 tab-separated fields"),
    ("q1 d1 1", "expected 3 tab-separated fields"),
    ("q1\td1\thigh", "score 'high' is not an integer"),
])
def test_malformed_qrels_line_names_file_and_line(tmp_path, env, line, message):
  folder = write_beir(tmp_path / "tiny", qrels={"test": ["q1\td1\t1", line]})
  with pytest.raises(BeirFormatError, match=f"qrels/test.tsv: line 3: {message}"):
    load_beir(folder)
  assert not prepared_dirs(env)  # nothing half-written is left to be read later


@pytest.mark.parametrize("file, rows, message", [
    ("corpus", ['{"_id": "d1", "text": "unterminated'], "corpus.jsonl: line 1: not valid JSON"),
    ("corpus", CORPUS[:1] + ['["d2", "text"]'], "corpus.jsonl: line 2: expected a JSON object"),
    ("corpus", CORPUS[:2] + ['{"text": "x"}'], "corpus.jsonl: line 3: `_id` is missing"),
    ("queries", QUERIES[:2] + ['{"_id": "q3", "text": 3}'], "queries.jsonl: line 3: `text`"),
    ("queries", QUERIES[:1] + ["{not json}"], "queries.jsonl: line 2: not valid JSON"),
])
def test_malformed_json_line_names_file_and_line(tmp_path, env, file, rows, message):
  folder = write_beir(tmp_path / "tiny", **{file: rows})
  with pytest.raises(BeirFormatError, match=message):
    load_beir(folder)


def test_empty_corpus_is_an_error(tmp_path, env):
  folder = write_beir(tmp_path / "tiny", corpus=[])
  with pytest.raises(BeirFormatError, match="corpus.jsonl is empty"):
    load_beir(folder)


@pytest.mark.parametrize("file, rows", [
    ("corpus", CORPUS + [{"_id": "d2", "title": "", "text": "again"}]),
    ("queries", QUERIES + [{"_id": "q2", "text": "again"}]),
])
def test_duplicate_ids_are_an_error(tmp_path, env, file, rows):
  folder = write_beir(tmp_path / "tiny", **{file: rows})
  with pytest.raises(BeirFormatError, match=rf"{file}.jsonl: line \d: duplicate _id '(d2|q2)'"):
    load_beir(folder)


def test_missing_split_says_which_exist(tmp_path, env):
  ds = load_beir(write_beir(tmp_path / "tiny"))
  with pytest.raises(ValueError, match="no qrels split 'dev'; it has: train, test"):
    ds.qrels("dev")
  with pytest.raises(ValueError, match="no qrels split 'corpus'"):
    ds.qrels("corpus")
  with pytest.raises(ValueError, match="no split 'validation'; it has: corpus, queries, train"):
    ds.data_source("validation")


# ---- where a dataset comes from ----


def test_name_is_found_under_embed_jax_data(tmp_path, env, monkeypatch):
  data = tmp_path / "data"
  write_beir(data / "beir" / "tiny")
  zip_folder(write_beir(tmp_path / "src"), data / "zipped.zip", "zipped")
  monkeypatch.setenv("EMBED_JAX_DATA", str(data))
  assert resolve_beir("tiny") == beir.BeirSource((data / "beir" / "tiny").resolve())
  ds = load_beir("zipped")  # $EMBED_JAX_DATA/<name>.zip
  assert ds.name == "zipped" and ds.corpus_ids == ["d1", "d2", "d3", "d4"]


def test_sub_datasets_in_one_zip(tmp_path, env, monkeypatch):
  data = tmp_path / "data"
  (data / "beir").mkdir(parents=True)
  with zipfile.ZipFile(data / "beir" / "cqadupstack.zip", "w") as zf:
    for sub in ("android", "english"):
      folder = write_beir(tmp_path / sub, corpus=CORPUS + [{"_id": sub, "text": sub}])
      for path in folder.rglob("*.*"):
        zf.write(path, f"cqadupstack/{sub}/{path.relative_to(folder)}")
  monkeypatch.setenv("EMBED_JAX_DATA", str(data))
  ds = load_beir("cqadupstack/english")
  assert ds.name == "cqadupstack/english" and ds.corpus_ids[-1] == "english"
  with pytest.raises(FileNotFoundError, match="holds 2 BEIR folders"):
    load_beir("cqadupstack")


def test_not_found_offline_says_where_it_looked_and_what_to_do(tmp_path, env, monkeypatch):
  monkeypatch.setenv("EMBED_JAX_DATA", str(tmp_path / "data"))
  with pytest.raises(FileNotFoundError) as e:
    load_beir("scifact")
  message = str(e.value)
  assert str(tmp_path / "data" / "beir" / "scifact") in message
  assert "EMBED_JAX_OFFLINE" in message and "Point EMBED_JAX_DATA" in message
  with pytest.raises(FileNotFoundError, match="not a public BEIR dataset"):
    load_beir("no-such-set")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_beir(str(tmp_path / "no" / "such" / "folder"))


def test_folder_without_corpus_is_explained(tmp_path, env):
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="holds no corpus.jsonl"):
    load_beir(tmp_path / "empty")


@pytest.fixture
def http_dir(tmp_path):
  """Serves tmp_path/www on localhost: the BEIR download without the internet."""
  www = tmp_path / "www"
  www.mkdir()
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
  handler.log_message = lambda *args: None
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  yield www, f"http://127.0.0.1:{server.server_port}"
  server.shutdown()
  server.server_close()


def test_download_when_online(tmp_path, env, monkeypatch, http_dir):
  www, url = http_dir
  zip_folder(write_beir(tmp_path / "src"), www / "scifact.zip", "scifact")
  monkeypatch.setattr(beir, "BEIR_URL", url + "/{name}.zip")
  monkeypatch.delenv("EMBED_JAX_OFFLINE")
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  ds = load_beir("scifact")
  assert ds.corpus_ids == ["d1", "d2", "d3", "d4"]
  assert (env / "downloads" / "beir" / "scifact.zip").is_file()
  (www / "scifact.zip").unlink()
  assert load_beir("scifact").checksum == ds.checksum  # the earlier download, not the server
  with pytest.raises(FileNotFoundError, match="downloading .*fiqa.zip failed"):
    load_beir("fiqa")  # 404
  assert sorted(p.name for p in (env / "downloads" / "beir").iterdir()) == ["scifact.zip"]


# ---- the real SciFact ----


@pytest.mark.skipif(data_root() is None, reason="no EMBED_JAX_DATA and no ../shared/data")
def test_scifact(tmp_path, monkeypatch):
  data = data_root()
  monkeypatch.setenv("EMBED_JAX_DATA", str(data))
  monkeypatch.setenv("EMBED_JAX_OFFLINE", "1")
  ds = load_beir("scifact", data_dir=tmp_path / "cache")
  assert ds.splits == ("corpus", "queries", "train", "test")
  assert len(ds.corpus_ids) == 5183 and len(ds.queries) == 1109
  for split, queries, pairs in (("train", 809, 919), ("test", 300, 339)):
    qrels = ds.qrels(split)
    assert (len(qrels), sum(len(d) for d in qrels.values())) == (queries, pairs)
  # The text is the file's, whitespace included.
  folder = data / "beir" / "scifact"
  with open(folder / "corpus.jsonl", encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  assert ds.corpus_ids == [r["_id"] for r in rows]
  assert ds.corpus_texts() == [(r["title"] + " " + r["text"]).strip() for r in rows]
  # Checksum: the manifest of the per-file sha256 listed in shared/data/README.md.
  manifest = (
      "d289bf5d711d1d6b0c9fba52b90e45a76e0b0e9f173fd3ff49cd098588de2581  corpus.jsonl\n"
      "4816ec1e0b1e4a3beed2b701eee2ece822626128c17564f315279af1ad25cd23  queries.jsonl\n"
      "a53f2114831916c096b6c37d9e54da68cef4efdcdbd5ed46533601af972acf1d  qrels/train.tsv\n"
      "0864bb985e0ca2367ba217977e72004d549054b2b06666ed9d4825ac7c21284c  qrels/test.tsv\n")
  assert ds.checksum == hashlib.sha256(manifest.encode()).hexdigest()


def test_builds_and_reads_with_tensorflow_blocked(tmp_path):
  """In a fresh interpreter where `import tensorflow` fails, the builder writes and reads."""
  import importlib.util
  if importlib.util.find_spec("tensorflow") is not None:
    pytest.skip("tensorflow is installed here; embed_jax does not depend on it")
  import subprocess
  import sys
  folder = write_beir(tmp_path / "tiny")
  code = f"""
import importlib.util
# tfds probes for tensorflow itself, so it is hidden only by not being installed (as here).
if importlib.util.find_spec("tensorflow") is not None:
  raise SystemExit("tensorflow is installed: this check needs an environment without it")
from embed_jax.data import load_beir
ds = load_beir({str(folder)!r}, data_dir={str(tmp_path / "cache")!r})
assert len(ds.corpus_ids) == 4 and ds.qrels("test")
try:
  import tensorflow
except ImportError:
  print("ok: no tensorflow")
"""
  env = {**os.environ, "EMBED_JAX_OFFLINE": "1"}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=Path(__file__).resolve().parents[1], timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "ok: no tensorflow" in out.stdout


def test_a_builder_made_before_another_process_prepared_the_folder_reads_it(tmp_path, env,
                                                                            monkeypatch):
  """The race behind an intermittent failure of the test above: a process makes its builder, a
  second one finishes preparing the folder, then the first finds dataset_info.json and skips the
  lock. Its builder still holds the code's info (no checksum); it must be made again."""
  from embed_jax.data import beir
  folder = write_beir(tmp_path / "tiny")
  config = beir.beir_config(beir.resolve_beir(folder, None))
  stale = beir.quiet_builder(beir.BeirBuilder, config, None)  # before the folder exists
  assert stale.info.metadata is None or "checksum" not in stale.info.metadata
  load_beir(folder)  # the other process
  made = []
  real = beir.quiet_builder

  def first_is_stale(*args):
    made.append(args)
    return stale if len(made) == 1 else real(*args)

  monkeypatch.setattr(beir, "quiet_builder", first_is_stale)
  assert load_beir(folder).corpus_ids == ["d1", "d2", "d3", "d4"]
  assert len(made) == 2
