"""Training-step throughput: embed_jax vs sentence-transformers (PyTorch, MNRL), in one run.

    python benchmarks/train_step.py [--batch_size 32] [--seq_len 128] [--steps 4] [--rounds 2]
    python benchmarks/train_step.py --jax_only [--dtype bfloat16] [--fsdp 4]   # any backend

Both take AdamW steps of all-MiniLM-L6-v2 on the same (query, positive) pairs with in-batch
negatives (MultipleNegativesRankingLoss, scale 20), queries and positives padded to seq_len, once
with dropout on and once with it off; the four set-ups alternate over rounds and each keeps its
best. Prints pairs/s for each, the ratio, and the model FLOPs
utilisation against the float32 matmul peak measured in the same run. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np

from benchmarks.encode import matmul_peak, model_flops, scifact_texts


def jax_stepper(model_dir: str, texts_q, texts_p, seq_len: int, dropout: bool, devices=None,
                dtype: str = "float32", fsdp: int = 1):
  """Sets up and compiles an embed_jax train step (over `devices`, default one); returns
  run(n) -> seconds per step."""
  from configs import scifact_mnrl
  from embed_jax import hf, train
  from embed_jax.embedder import load_tokenizer
  from embed_jax.models import SentenceEncoder
  from embed_jax.objective import build_objective
  cfg, params = hf.load(model_dir, max_seq_length=seq_len, dtype=dtype)
  if not dropout:
    cfg = cfg.replace(hidden_dropout=0.0, attention_dropout=0.0)
  c = scifact_mnrl.get_config()
  c.dropout = dropout
  tok = load_tokenizer(model_dir)
  enc = lambda t: tok(t, truncation=True, max_length=seq_len, padding="max_length", return_tensors="np")
  q, p = enc(texts_q), enc(texts_p)
  b = len(texts_q)
  text = lambda e: {"ids": e["input_ids"].astype(np.int32), "mask": e["attention_mask"].astype(np.int32)}  # noqa: E731
  batch = {"groups": {"q": text(q), "p": text(p)},
           "inputs": {"pairs": {"q_ids_B": np.arange(b, dtype=np.int32),
                                "p_ids_B": np.arange(b, dtype=np.int32), "valid_B": np.ones(b, bool)}}}
  tx, schedule = train.make_optimizer(c.optim, 1000)
  devices = devices or jax.devices()[:1]
  step = train.make_train_step(SentenceEncoder(cfg), build_objective(c), c, tx, schedule,
                               batch_shards=len(devices))
  runner = train.JitRunner(step, devices, fsdp=fsdp)
  holder = [train.start_state(runner, params, tx, 0)[0]]

  def run(n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
      holder[0], m = runner.step(holder[0], batch)
    jax.block_until_ready(m)
    return (time.perf_counter() - t) / n

  run(1)  # compile
  return run


def torch_stepper(model_dir: str, texts_q, texts_p, seq_len: int, dropout: bool):
  """The same step in sentence-transformers; returns run(n) -> seconds per step."""
  import torch
  from sentence_transformers import SentenceTransformer, losses
  model = SentenceTransformer(model_dir, device="cpu")
  model.max_seq_length = seq_len
  model.train(dropout)
  loss_fn = losses.MultipleNegativesRankingLoss(model, scale=20.0)
  opt = torch.optim.AdamW(model.parameters(), lr=5e-5, eps=1e-6, weight_decay=0.01)
  tok = model.tokenizer
  enc = lambda t: dict(tok(t, truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt"))
  features = [enc(texts_q), enc(texts_p)]
  labels = torch.arange(len(texts_q))

  def step():
    opt.zero_grad()
    loss = loss_fn([dict(f) for f in features], labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  def run(n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
      step()
    return (time.perf_counter() - t) / n

  run(1)  # warm-up
  return run


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--steps", type=int, default=4, help="timed steps per round")
  p.add_argument("--rounds", type=int, default=2, help="alternating rounds; each keeps its best")
  p.add_argument("--jax_only", action="store_true",
                 help="embed_jax alone on every device JAX finds (CPU, GPU or TPU): pairs/s and "
                      "MFU per device; --batch_size is then per device")
  p.add_argument("--dtype", default="float32", help="--jax_only: compute dtype (bfloat16 on TPU/GPU)")
  p.add_argument("--fsdp", type=int, default=1, help="--jax_only: devices on the fsdp mesh axis")
  args = p.parse_args()
  if args.jax_only:
    return per_device(args)
  from embed_jax import hf
  model_dir = str(hf.resolve(args.model))
  texts = scifact_texts(2 * args.batch_size)
  texts_q, texts_p = texts[:args.batch_size], texts[args.batch_size:]
  cfg, _ = hf.load(model_dir)
  # Forward + backward = 3x forward FLOPs, on 2 * batch sequences of seq_len (padded, as both run).
  flops = 3 * model_flops(np.full(2 * args.batch_size, args.seq_len), cfg.hidden_size,
                          cfg.intermediate_size, cfg.num_layers)
  peak = max(matmul_peak().values())
  print(f"batch {args.batch_size} pairs, seq_len {args.seq_len}, {args.steps} timed steps, "
        f"float32 matmul peak {peak:.0f} GFLOP/s, {os.cpu_count()} cores")
  engines = {}
  for dropout in (True, False):
    for name, make in (("embed_jax", jax_stepper), ("sentence-transformers", torch_stepper)):
      engines[(name, dropout)] = make(model_dir, texts_q, texts_p, args.seq_len, dropout)
  best = {}
  for r in range(args.rounds):  # alternate, so a slow stretch of the machine hits both
    for key, run in engines.items():
      best[key] = min(best.get(key, float("inf")), run(args.steps))
  print(f"\n{'':34}{'s/step':>8}{'pairs/s':>9}{'GFLOP/s':>9}{'MFU':>7}")
  for dropout in (True, False):
    for name in ("embed_jax", "sentence-transformers"):
      secs = best[(name, dropout)]
      label = f"{name} (dropout {'on' if dropout else 'off'})"
      print(f"{label:34}{secs:8.2f}{args.batch_size / secs:9.2f}{flops / secs / 1e9:9.1f}"
            f"{flops / secs / 1e9 / peak:7.1%}")
    ratio = best[("sentence-transformers", dropout)] / best[("embed_jax", dropout)]
    print(f"  ratio embed_jax / sentence-transformers, dropout {'on' if dropout else 'off'}: "
          f"{ratio:.2f}x pairs/s")


def per_device(args) -> None:
  """embed_jax's step on all local devices: pairs/s and MFU per device, against the matmul peak
  of one device at the compute dtype measured in the same run."""
  import jax.numpy as jnp

  from embed_jax import hf
  devices = jax.devices()
  n = len(devices)
  model_dir = str(hf.resolve(args.model))
  texts = scifact_texts(2 * args.batch_size * n)
  texts_q, texts_p = texts[:args.batch_size * n], texts[args.batch_size * n:]
  cfg, _ = hf.load(model_dir)
  flops = 3 * model_flops(np.full(2 * args.batch_size * n, args.seq_len), cfg.hidden_size,
                          cfg.intermediate_size, cfg.num_layers)
  a = jnp.ones((4096, 4096), args.dtype)
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()
  t = min(_timed(lambda: mm(a).block_until_ready()) for _ in range(5))
  peak = 2 * 4096 ** 3 / t / 1e9
  run = jax_stepper(model_dir, texts_q, texts_p, args.seq_len, False, devices, args.dtype, args.fsdp)
  secs = min(run(args.steps) for _ in range(args.rounds))
  kind = devices[0].device_kind
  print(f"{n} x {kind} ({jax.default_backend()}), {args.dtype}, fsdp {args.fsdp}: batch "
        f"{args.batch_size} pairs per device, seq_len {args.seq_len}, dropout off")
  print(f"{secs:.3f} s/step, {args.batch_size * n / secs:.1f} pairs/s in all, "
        f"{args.batch_size / secs:.1f} pairs/s per device; {flops / secs / n / 1e9:.1f} GFLOP/s "
        f"per device = MFU {flops / secs / n / 1e9 / peak:.1%} of the measured {args.dtype} "
        f"matmul peak ({peak:.0f} GFLOP/s)")


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


if __name__ == "__main__":
  main()
