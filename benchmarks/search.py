"""Search speed per representation and index, on SciFact and at scale.

    EMBED_JAX_DATA=../shared/data python benchmarks/search.py [--reps 5]
    EMBED_JAX_DATA=../shared/data python benchmarks/search.py --scale 10000,100000,1000000

Without --scale: exact numpy search (embed_jax.evaluate) of float32, int8, uint8, binary and
binary with the top 100 re-scored, 300 SciFact test queries over the 5,183-document corpus.

--scale: the FAISS indexes of embed_jax.index (flat, HNSW, int8, binary, binary HNSW, re-scoring
and funnel settings) over corpora of N vectors: the SciFact corpus embeddings plus N - 5,183
generated vectors (unit-normalised, as the real ones are), searched by the SciFact test queries.
Generators (--generators, sampler()): "gmm" (the default) samples a Gaussian mixture fitted to
the corpus (128 k-means clusters, each its members' mean and covariance shrunk 10% towards the
corpus covariance); "gaussian" one Gaussian with the corpus mean and covariance (no cluster
structure: a query's neighbours are far less distinct than in the real corpus, the hard case for
approximate search); "kde" a real document plus noise (at 1M, ~190 jittered copies of each
document: clumps that real corpora do not have). neighbours() compares each with the real corpus
at its size (queries' best cosines, each document's nearest other document, ANN recalls): the
mixture is the closest, slightly harder for ANN than the real vectors. Per index: ms per query
alone (one thread) and in one batch of 300 (--threads), recall@10 against exact float32 search,
bytes per document, build seconds and the process's peak RSS; speed-ups are against flat float32
in the same run. Each size and generator runs in its own process. The MRL model's funnels
(--funnel_models) are measured on SciFact itself (nDCG@10). Writes experiments/results/search/scale.{md,json,png}.

All embeddings are all-MiniLM-L6-v2's (--model), computed once and cached in runs/cache/.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np


def embeddings(model_name: str, cache: Path):
  """(queries_QxD, docs_NxD) of SciFact test, computed once and cached as .npy."""
  from embed_jax.data import load_beir
  ds = load_beir(Path(os.environ.get("EMBED_JAX_DATA", REPO.parent / "shared" / "data")) / "beir" / "scifact")
  q_file, d_file = cache / "scifact_test_queries.npy", cache / "scifact_docs.npy"
  if not (q_file.exists() and d_file.exists()):
    import embed_jax
    model = embed_jax.load(model_name)
    cache.mkdir(parents=True, exist_ok=True)
    queries = ds.split_queries("test")
    np.save(q_file, model.encode(list(queries.values()), normalize=False))
    np.save(d_file, model.encode(ds.corpus_texts(" "), normalize=False, show_progress=True))
  return np.load(q_file), np.load(d_file)


def main():
  from embed_jax import evaluate
  p = argparse.ArgumentParser()
  p.add_argument("--scale", default=None, help="comma-separated corpus sizes, e.g. 10000,100000")
  p.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)  # one size, in-process
  p.add_argument("--generator", default="gmm", help=argparse.SUPPRESS)
  p.add_argument("--quality_only", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--quality", default=None,
                 help="comma-separated corpus sizes: recall@10 and SciFact nDCG@10 of every setting "
                      "(and HNSW ef 1024, binary + rescore 500), no timing; any machine load")
  p.add_argument("--generators", default="gmm,gaussian",
                 help="--scale: how the vectors beyond the corpus are drawn (module docstring)")
  p.add_argument("--funnel_models", default="runs/mrl_ablation/mrl_pca/export",
                 help="--scale: more models (exported folders) whose SciFact funnels to measure; "
                      "missing folders are skipped")
  p.add_argument("--threads", type=int, default=2, help="--scale: FAISS threads")
  p.add_argument("--single", type=int, default=100, help="--scale: queries timed one at a time")
  p.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
  p.add_argument("--reps", type=int, default=5, help="timed repetitions; the best is kept")
  p.add_argument("--k", type=int, default=100)
  p.add_argument("--rescore", type=int, default=100)
  args = p.parse_args()
  queries, docs = embeddings(args.model, REPO / "runs" / "cache" / args.model.replace("/", "__"))
  if args.size:
    return scale_one(args, queries, docs)
  if args.scale:
    return scale(args)
  if args.quality:
    return quality(args)
  print(f"{len(queries)} queries x {len(docs)} documents, {docs.shape[1]} dims, top {args.k}, "
        f"best of {args.reps}, {os.cpu_count()} cores")
  reps = [evaluate.Float32(), evaluate.Scalar("int8"), evaluate.Scalar("uint8"),
          evaluate.Binary(), evaluate.Binary(args.rescore)]
  rows = []
  for rep in reps:
    rep.index(docs)
    rep.search(queries[:8], args.k)  # warm-up
    best = min(_timed(lambda: rep.search(queries, args.k)) for _ in range(args.reps))
    rows.append((rep.name, best * 1e3 / len(queries), rep.bytes_per_doc))
  ref = rows[0][1]
  print(f"\n{'representation':16}{'ms/query':>10}{'bytes/doc':>11}{'speed-up':>10}")
  for name, ms, nbytes in rows:
    print(f"{name:16}{ms:10.3f}{nbytes:11g}{ref / ms:9.2f}x")


# ---- the scale sweep ----

OUT = REPO / "experiments" / "results" / "search"
# (label, kind, indexed dims, rescore shortlist, funnel chain, HNSW efSearch)
SETTINGS = [
    ("flat float32", "flat", None, 0, (), None),
    ("hnsw ef=64", "hnsw", None, 0, (), 64),
    ("hnsw ef=128", "hnsw", None, 0, (), 128),
    ("hnsw ef=256", "hnsw", None, 0, (), 256),
    ("hnsw ef=512", "hnsw", None, 0, (), 512),
    ("int8 flat", "int8", None, 0, (), None),
    ("int8 + rescore 100", "int8", None, 100, (), None),
    ("binary flat", "binary", None, 0, (), None),
    ("binary + rescore 100", "binary", None, 100, (), None),
    ("binary + rescore 200", "binary", None, 200, (), None),
    ("binary + rescore 1000", "binary", None, 1000, (), None),
    ("binary hnsw + rescore 100", "binary_hnsw", None, 100, (), 128),
    ("funnel 64d float, 200 -> 384d", "flat", 64, 200, (), None),
    ("funnel 64d binary, 1000 -> 128d 200 -> 384d", "binary", 64, 1000, ((128, 200),), None),
]


GENERATORS = ("gmm", "gaussian", "kde")
GMM_CLUSTERS, GMM_SHRINK = 128, 0.1
KDE_BANDWIDTH = 0.5


def _gmm(real_NxD: np.ndarray):
  """k-means (GMM_CLUSTERS, FAISS, seed 0) of the corpus: each cluster's weight, mean and
  centred members."""
  import faiss
  km = faiss.Kmeans(real_NxD.shape[1], GMM_CLUSTERS, niter=20, seed=0)
  km.train(real_NxD)
  _, assign = km.index.search(real_NxD, 1)
  members = [real_NxD[assign[:, 0] == j] for j in range(GMM_CLUSTERS)]
  weights = np.array([len(x) for x in members], np.float64)
  return weights / weights.sum(), [(x.mean(axis=0), x - x.mean(axis=0)) for x in members]


def sampler(real_NxD: np.ndarray, generator: str):
  """draw(m, rng) -> m unit vectors drawn like the (unit) corpus vectors, the corpus statistics
  fitted once:
  "gmm": a Gaussian mixture fitted to the corpus: a k-means cluster by its share of the
    corpus, then its mean plus N(0, (1 - s) C_j + s C) noise (C_j the cluster's covariance,
    shrunk towards the corpus covariance C by s = GMM_SHRINK);
  "gaussian": N(mean, C), one Gaussian;
  "kde": a random corpus vector plus N(0, h^2 C) noise, h = KDE_BANDWIDTH."""
  from embed_jax.index import unit_prefix
  if generator not in GENERATORS:
    raise ValueError(f"generator {generator!r}: choose from {', '.join(GENERATORS)}")
  chol_DxD = np.linalg.cholesky(np.cov(real_NxD, rowvar=False)
                                + 1e-6 * np.eye(real_NxD.shape[1])).T.astype(np.float32)
  weights, clusters = _gmm(real_NxD) if generator == "gmm" else (None, None)

  def draw(m: int, rng) -> np.ndarray:
    z = rng.standard_normal((m, real_NxD.shape[1]), dtype=np.float32) @ chol_DxD
    if generator == "kde":
      return unit_prefix(real_NxD[rng.integers(0, len(real_NxD), m)] + KDE_BANDWIDTH * z)
    if generator == "gaussian":
      return unit_prefix(real_NxD.mean(axis=0) + z)
    draw_j = rng.choice(len(weights), m, p=weights)
    out = np.sqrt(GMM_SHRINK, dtype=np.float32) * z
    for j in np.unique(draw_j):
      rows = np.flatnonzero(draw_j == j)
      mean, centred = clusters[j]
      w = rng.standard_normal((len(rows), len(centred)), dtype=np.float32)
      w *= np.sqrt((1 - GMM_SHRINK) / max(len(centred) - 1, 1), dtype=np.float32)
      out[rows] += mean + w @ centred  # members' combinations: covariance C_j
    return unit_prefix(out)
  return draw


def synthetic(docs_NxD: np.ndarray, n: int, generator: str = "gmm", seed: int = 0,
              chunk: int = 100_000):
  """The corpus followed by n - len(corpus) generated vectors."""
  from embed_jax.index import unit_prefix
  real = unit_prefix(docs_NxD)
  out = np.empty((n, real.shape[1]), np.float32)
  out[:len(real)] = real[:n]
  rng = np.random.default_rng(seed)
  draw = sampler(real, generator) if n > len(real) else None
  for a in range(len(real), n, chunk):
    b = min(a + chunk, n)
    out[a:b] = draw(b - a, rng)
  return out


def neighbours(queries_QxD: np.ndarray, docs_NxD: np.ndarray, seed: int = 1) -> list[dict]:
  """How like the real corpus each generator's vectors are, at the corpus size: the queries'
  mean 1st, 10th and 100th best cosine and the median, a document's mean cosine with its nearest
  other document (2,000 of them), and the recall@10 against exact of
  binary + rescore 100 and of HNSW (M 32, efSearch 16), for the real corpus and for as many
  generated vectors."""
  import faiss
  from embed_jax.index import unit_prefix
  q, real = unit_prefix(queries_QxD), unit_prefix(docs_NxD)
  rows = []
  for name in ("real corpus",) + GENERATORS:
    d = real if name == "real corpus" else sampler(real, name)(len(real),
                                                               np.random.default_rng(seed))
    sims_QxN = q @ d.T
    best = -np.sort(-sims_QxN, axis=1)
    exact = np.argsort(-sims_QxN, axis=1, kind="stable")[:, :10]
    ham_QxN = np.bitwise_count(np.packbits(q > 0, axis=1)[:, None, :]
                               ^ np.packbits(d > 0, axis=1)[None]).sum(axis=2)
    short = np.argsort(ham_QxN, axis=1, kind="stable")[:, :100]
    rescored = np.take_along_axis(sims_QxN, short, axis=1)
    binary = np.take_along_axis(short, np.argsort(-rescored, axis=1)[:, :10], axis=1)
    hnsw = faiss.IndexHNSWFlat(d.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.add(d)
    hnsw.hnsw.efSearch = 16
    _, found = hnsw.search(q, 10)
    recall = lambda f: float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(f, exact)]))  # noqa: E731
    docs_nn = d[:2000] @ d.T  # each document's nearest other document
    docs_nn[np.arange(2000), np.arange(2000)] = -1
    rows.append({"corpus": name, "n": len(d), "top1": round(float(best[:, 0].mean()), 3),
                 "doc_nn": round(float(docs_nn.max(axis=1).mean()), 3),
                 "top10": round(float(best[:, 9].mean()), 3),
                 "top100": round(float(best[:, 99].mean()), 3),
                 "median": round(float(np.median(best, axis=1).mean()), 3),
                 "binary_rescore100_recall@10": round(recall(binary), 3),
                 "hnsw_ef16_recall@10": round(recall(found), 3)})
  return rows


def peak_rss_gib() -> float:
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# --quality adds these (recall and nDCG only, no timing)
QUALITY_EXTRA = {"hnsw ef=512": ("hnsw ef=1024", "hnsw", None, 0, (), 1024),
                 "binary + rescore 200": ("binary + rescore 500", "binary", None, 500, (), None)}


def scale_one(args, queries, docs) -> None:
  """One corpus size in this process: build each index once, time each setting (not with
  --quality), take its recall@10 against exact search and the SciFact test nDCG@10 of what it
  finds (the real documents among the generated ones, which are never relevant); print JSON."""
  import json
  import shutil
  import tempfile

  import faiss

  from embed_jax.index import VectorIndex, build_index
  from embed_jax.data import load_beir
  from embed_jax.evaluate import ir_metrics, run_from_topk
  faiss.omp_set_num_threads(args.threads)
  ds = load_beir(Path(os.environ.get("EMBED_JAX_DATA", REPO.parent / "shared" / "data")) / "beir" / "scifact")
  qids, qrels = list(ds.split_queries("test")), ds.qrels("test")
  corpus = synthetic(docs, args.size, args.generator)
  ids = list(ds.corpus_ids)[:args.size] + [f"generated-{i}" for i in range(len(docs), args.size)]
  settings = SETTINGS if not args.quality_only else [
      x for s in SETTINGS for x in ((s, QUALITY_EXTRA[s[0]]) if s[0] in QUALITY_EXTRA else (s,))]
  rows, built, exact = [], {}, None
  tmp = Path(tempfile.mkdtemp(prefix="scale-", dir=REPO / "runs"))
  try:
    for label, kind, dims, rescore, chain, ef in settings:
      key = (kind, dims)
      if key not in built:
        for old in built.values():  # one index in memory at a time
          old["index"] = None
        rss0 = peak_rss_gib()
        t = time.perf_counter()
        path = build_index(corpus, ids, tmp / f"{kind}_{dims}", kind=kind, dims=dims,
                           fingerprint="benchmark", corpus_checksum=f"synthetic-{args.size}")
        build_s = time.perf_counter() - t
        built[key] = {"index": VectorIndex(path, verify=False), "build_s": build_s,
                      "rss_after_build": peak_rss_gib(), "rss_before": rss0}
      entry = built[key]
      idx = entry["index"]
      if idx is None:
        idx = entry["index"] = VectorIndex(tmp / f"{kind}_{dims}", verify=False)
      if ef:
        idx.set_ef_search(ef)
      search = lambda q, k=10: idx.search(q, k, rescore=rescore, chain=chain)  # noqa: E731
      batch = one = float("nan")
      if not args.quality_only:
        search(queries[:4])  # warm-up
        batch = min(_timed(lambda: search(queries)) for _ in range(args.reps)) / len(queries)
        faiss.omp_set_num_threads(1)  # a query alone: one thread (as a server handles one request)
        one = min(_timed(lambda: [search(queries[i:i + 1]) for i in range(args.single)])
                  for _ in range(max(1, args.reps // 2))) / args.single
        faiss.omp_set_num_threads(args.threads)
      scores, found = search(queries)
      ndcg = ir_metrics(qrels, run_from_topk(qids, ids, scores, found), (10,))["ndcg@10"]
      if exact is None:
        exact = found  # flat float32 comes first: the exact top 10
      recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)]))
      rows.append({"setting": label, "kind": kind, "dims": dims or docs.shape[1],
                   "rescore": rescore, "chain": [list(c) for c in chain], "ef_search": ef,
                   "ms_single": round(one * 1e3, 4), "ms_batched": round(batch * 1e3, 4),
                   "recall@10": round(recall, 4), "ndcg@10": round(ndcg, 4),
                   "bytes_per_doc": round(idx.bytes_per_doc, 2),
                   "build_s": round(entry["build_s"], 2),
                   "peak_rss_gib_after_build": round(entry["rss_after_build"], 2)})
      print(f"  {label:46} single {rows[-1]['ms_single']:9.3f} ms  batched "
            f"{rows[-1]['ms_batched']:9.3f} ms  recall@10 {recall:.3f}  nDCG@10 {ndcg:.4f}",
            file=sys.stderr, flush=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  print(json.dumps({"size": args.size, "generator": args.generator, "threads": args.threads,
                    "rows": rows,
                    "peak_rss_gib": round(peak_rss_gib(), 2)}))


def funnel_quality(model: str, queries, docs, rotate: bool = True,
                   chains=((64, 200), (128, 200), (64, 1000))) -> list[dict]:
  """SciFact test nDCG@10 of exact full-dims search against funnels (flat float at d dims,
  shortlist K, re-ranked at full dims), for the model as it is and (rotate) rotated onto the
  principal axes of its corpus embeddings (an orthogonal map fitted without labels: full-dims
  scores unchanged, the leading dims carry the most variance, as a Matryoshka model's do)."""
  import shutil
  import tempfile

  from embed_jax.data import load_beir
  from embed_jax.evaluate import ir_metrics, run_from_topk
  from embed_jax.index import VectorIndex, build_index, unit_prefix
  ds = load_beir(Path(os.environ.get("EMBED_JAX_DATA", REPO.parent / "shared" / "data")) / "beir" / "scifact")
  qids, qrels = list(ds.split_queries("test")), ds.qrels("test")
  unit_docs = unit_prefix(docs)
  _, _, rot_DxD = np.linalg.svd(unit_docs - unit_docs.mean(axis=0), full_matrices=False)
  rows = []
  tmp = Path(tempfile.mkdtemp(prefix="funnel-", dir=REPO / "runs"))
  try:
    for name, rot in (("as trained", None),) + ((("PCA-rotated", rot_DxD.T),) if rotate else ()):
      q, d = (unit_prefix(queries), unit_docs) if rot is None else (unit_prefix(queries) @ rot,
                                                                   unit_docs @ rot)

      def ndcg(dims, rescore, k=10):
        path = tmp / f"{name}_{dims}"
        if not path.exists():
          build_index(d, ds.corpus_ids, path, dims=dims, fingerprint="b", corpus_checksum="c")
        s, r = VectorIndex(path, verify=False).search(q, 100, rescore=rescore)
        return ir_metrics(qrels, run_from_topk(qids, ds.corpus_ids, s, r), (k,))[f"ndcg@{k}"]

      full = ndcg(None, 0)
      rows.append({"model": f"{model} ({name})", "setting": "exact, full dims",
                   "ndcg@10": round(full, 4), "kept": 1.0})
      for dims, k in chains:
        rows.append({"model": f"{model} ({name})", "setting": f"{dims}d shortlist {k} -> full",
                     "ndcg@10": round(ndcg(dims, k), 4)})
        rows[-1]["kept"] = round(rows[-1]["ndcg@10"] / full, 4)
        if not any(r["setting"] == f"{dims}d alone" and r["model"] == f"{model} ({name})"
                   for r in rows):
          rows.append({"model": f"{model} ({name})", "setting": f"{dims}d alone",
                       "ndcg@10": round(ndcg(dims, 0), 4)})
          rows[-1]["kept"] = round(rows[-1]["ndcg@10"] / full, 4)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return rows


def per_size(args, sizes: str, *flags: str) -> list[dict]:
  """scale_one for each generator and size (comma-separated), each in its own process (fresh
  memory, a peak RSS of its own): their JSON results."""
  import json
  import subprocess
  results = []
  for generator in args.generators.split(","):
    for n in [int(x) for x in sizes.split(",")]:
      print(f"{n} vectors ({generator}) ...", flush=True)
      out = subprocess.run([sys.executable, __file__, "--size", str(n), "--model", args.model,
                            "--generator", generator, *flags],
                           check=True, stdout=subprocess.PIPE, text=True)
      results.append(json.loads(out.stdout.strip().splitlines()[-1]))
  return results


def scale(args) -> None:
  """Each size in its own process (fresh memory, a peak RSS per size), then table and plot."""
  import json
  results = per_size(args, args.scale, "--reps", str(args.reps), "--threads", str(args.threads),
                     "--single", str(args.single))
  for r in results:
    flat = r["rows"][0]
    for row in r["rows"]:
      row["speedup_single"] = round(flat["ms_single"] / row["ms_single"], 2)
      row["speedup_batched"] = round(flat["ms_batched"] / row["ms_batched"], 2)
      row["memory_ratio"] = round(row["bytes_per_doc"] / flat["bytes_per_doc"], 4)
  OUT.mkdir(parents=True, exist_ok=True)
  meta = {"model": args.model, "queries": 300, "k": 10, "threads": args.threads,
          "cores": os.cpu_count(), "reps": args.reps, "single_queries": args.single,
          "kde_bandwidth": KDE_BANDWIDTH}
  queries, docs = embeddings(args.model, REPO / "runs" / "cache" / args.model.replace("/", "__"))
  stats = neighbours(queries, docs)
  funnel = funnel_quality(args.model, queries, docs)
  for model in [m for m in args.funnel_models.split(",") if m and Path(m).exists()]:
    funnel += funnel_quality(model, *embeddings(model, REPO / "runs" / "cache" / model.replace("/", "__")),
                             rotate=False)
  (OUT / "scale.json").write_text(json.dumps({"settings": meta, "generators": stats,
                                              "sizes": results, "funnel_ndcg": funnel},
                                             indent=2) + "\n")
  lines = ["SciFact test nDCG@10 through funnels (5,183 documents):\n",
           "| model | setting | nDCG@10 | kept |", "|---|---|---|---|"]
  lines += [f"| {r['model']} | {r['setting']} | {r['ndcg@10']:.4f} | {100 * r['kept']:.1f}% |"
            for r in funnel]
  lines += ["\nGenerated vectors against the real corpus at its size (5,183; SciFact test queries):\n",
            "| corpus | best cosine | 10th | 100th | median | binary + rescore 100 recall@10 | "
            "HNSW ef 16 recall@10 |", "|---|---|---|---|---|---|---|"]
  lines += [f"| {r['corpus']} | {r['top1']:.3f} | {r['top10']:.3f} | {r['top100']:.3f} | "
            f"{r['median']:.3f} | {r['binary_rescore100_recall@10']:.3f} | "
            f"{r['hnsw_ef16_recall@10']:.3f} |" for r in stats]
  for r in results:
    lines += [f"\n### {r['size']:,} vectors, {r['generator']} (peak RSS of the process "
              f"{r['peak_rss_gib']} GiB)\n",
              "| index | ms/query alone | speed-up | ms/query in a batch | speed-up | recall@10 | "
              "bytes/doc | memory | build s |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {x['setting']} | {x['ms_single']:.3f} | {x['speedup_single']:.2f}x | "
              f"{x['ms_batched']:.3f} | {x['speedup_batched']:.2f}x | {x['recall@10']:.3f} | "
              f"{x['bytes_per_doc']:g} | {x['memory_ratio']:.3f} | {x['build_s']:.1f} |"
              for x in r["rows"]]
  table = "\n".join(lines)
  (OUT / "scale.md").write_text(table + "\n")
  print(table)
  plot(results)


def quality(args) -> None:
  """--quality: each size and generator in its own process, no timing; writes
  experiments/results/search/scale_quality.{md,json}."""
  import json
  results = per_size(args, args.quality, "--quality_only")
  OUT.mkdir(parents=True, exist_ok=True)
  (OUT / "scale_quality.json").write_text(json.dumps({"model": args.model, "sizes": results},
                                                     indent=2) + "\n")
  lines = []
  for r in results:
    flat = r["rows"][0]["ndcg@10"]
    lines += [f"\n### {r['size']:,} vectors, {r['generator']}: SciFact test nDCG@10 of the 5,183 "
              "real documents among the generated ones\n",
              "| index | recall@10 against exact | nDCG@10 | kept |", "|---|---|---|---|"]
    lines += [f"| {x['setting']} | {x['recall@10']:.3f} | {x['ndcg@10']:.4f} | "
              f"{100 * x['ndcg@10'] / flat:.1f}% |" for x in r["rows"]]
  (OUT / "scale_quality.md").write_text("\n".join(lines).lstrip() + "\n")
  print("\n".join(lines))


def plot(results) -> None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib missing (pip install -e .[plots]): no plot")
    return
  generators = list(dict.fromkeys(r["generator"] for r in results))
  sizes = list(dict.fromkeys(r["size"] for r in results))
  fig, axes = plt.subplots(len(generators), len(sizes), figsize=(5 * len(sizes), 4.5 * len(generators)),
                           squeeze=False)
  for r in results:
    ax = axes[generators.index(r["generator"])][sizes.index(r["size"])]
    for row in r["rows"]:
      ax.scatter(row["speedup_batched"], row["recall@10"])
      ax.annotate(row["setting"], (row["speedup_batched"], row["recall@10"]), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("speed-up over flat float32 (batch of 300)")
    ax.set_ylabel("recall@10 against exact")
    ax.set_title(f"{r['size']:,} vectors ({r['generator']})")
  fig.tight_layout()
  fig.savefig(OUT / "scale.png", dpi=120)


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


if __name__ == "__main__":
  main()
