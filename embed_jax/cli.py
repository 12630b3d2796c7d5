"""`embed-jax <command>`: encode (and, as they land, eval, train, export, mine, teacher, index)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np


class CliError(Exception):
  """A user error: printed as one line, exit code 2."""


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


def atomic_write(path: Path, write, mode: str = "wb") -> None:
  """Calls write(file) on a temp file beside `path`, then renames it over `path`."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def cmd_encode(args) -> None:
  import embed_jax
  texts = read_texts(Path(args.input), args.field)
  output = Path(args.output)
  if output.suffix != ".npy":
    raise CliError(f"--output {output}: expected a .npy path")
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
  import embed_jax
  from embed_jax import evaluate
  from embed_jax.data import load_beir
  bad = [p for p in args.precision if p not in evaluate.PRECISIONS]
  if bad:
    raise CliError(f"--precision {','.join(bad)}: choose from {','.join(evaluate.PRECISIONS)}")
  if args.rescore and "binary" not in args.precision:
    raise CliError("--rescore re-ranks binary candidates: add binary to --precision")
  dataset = load_beir(args.dataset, data_dir=args.data_dir)
  if args.split not in dataset.qrels_splits:
    raise CliError(f"split {args.split!r} not in {dataset.name}; it has {', '.join(dataset.qrels_splits)}")
  model = embed_jax.load(args.model, max_seq_length=args.max_seq_length)
  if args.dims and max(args.dims) > model.dim:
    raise CliError(f"--dims {max(args.dims)} exceeds the model's {model.dim} dimensions")
  dims = sorted(set(args.dims or []) | {model.dim}, reverse=True)
  out = evaluate.evaluate_retrieval(model, dataset, args.split, dims=dims, precisions=args.precision,
                                    rescore=args.rescore, batch_size=args.batch_size,
                                    show_progress=True)
  s = out["settings"]
  print(f"\n{s['model']} on {s['dataset']} {s['split']}: {s['num_queries']} queries, "
        f"{s['num_docs']} documents, max_seq_length {s['max_seq_length']}\n")
  print(evaluate.format_table(out["results"]))
  if args.output:
    atomic_write(Path(args.output), lambda f: f.write(json.dumps(out, indent=2) + "\n"), "w")
    print(f"\nwrote {args.output}")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="embed-jax", description=__doc__)
  sub = p.add_subparsers(dest="command", required=True)

  e = sub.add_parser("encode", help="embed texts into a .npy matrix (rows in input order)")
  e.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2",
                 help="local folder or hub id")
  e.add_argument("--input", required=True, help=".jsonl (objects with a 'text' field) or .txt")
  e.add_argument("--output", required=True, help="output .npy path")
  e.add_argument("--field", default="text", help="JSON field holding the text")
  e.add_argument("--batch_size", type=int, default=32)
  e.add_argument("--max_seq_length", type=int, default=None, help="default: the model's")
  e.add_argument("--truncate_dim", type=int, default=None, help="keep the first d dims")
  e.add_argument("--normalize", choices=("model", "yes", "no"), default="model",
                 help="unit-length output: as the model's modules.json says, always, or never")
  e.set_defaults(func=cmd_encode)

  v = sub.add_parser("eval", help="BEIR retrieval evaluation for several representations")
  v.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2",
                 help="local folder or hub id")
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
  v.add_argument("--batch_size", type=int, default=32)
  v.add_argument("--max_seq_length", type=int, default=None, help="default: the model's")
  v.add_argument("--output", default=None, help="write settings and results as JSON")
  v.set_defaults(func=cmd_eval)
  return p


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  try:
    args.func(args)
  except (CliError, FileNotFoundError, FileExistsError, ValueError, TypeError) as e:
    print(f"embed-jax {args.command}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
