"""Peak memory of a train step with and without gradient caching, from XLA's buffer assignment.

    python benchmarks/grad_cache_memory.py [--batch_size 512] [--chunk 32] [--seq_len 128]

Compiles (does not run) the all-MiniLM-L6-v2 MNRL train step for the full batch plainly and with
`grad_cache_chunk`, and for a plain step of one chunk's size, and prints the temporary memory XLA
allocates for each (`compiled.memory_analysis()`); arguments and outputs are the same for both.
With gradient caching the peak grows with the chunk, not the batch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp


def temp_bytes(cfg, params, batch_size: int, seq_len: int, chunk: int) -> tuple[int, int]:
  from configs import scifact_mnrl
  from embed_jax import train
  from embed_jax.models import SentenceEncoder
  from embed_jax.objective import build_objective
  c = scifact_mnrl.get_config()
  c.train.grad_cache_chunk = chunk
  tx, schedule = train.make_optimizer(c.optim, 100)
  state = jax.eval_shape(lambda: train.init_state(params, tx, 0))
  ids = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
  vec = lambda dt: jax.ShapeDtypeStruct((batch_size,), dt)
  batch = {"groups": {"q": {"ids": ids, "mask": ids}, "p": {"ids": ids, "mask": ids}},
           "inputs": {"pairs": {"q_ids_B": vec(jnp.int32), "p_ids_B": vec(jnp.int32),
                                "valid_B": vec(jnp.bool_)}}}
  step = jax.jit(train.make_train_step(SentenceEncoder(cfg), build_objective(c), c, tx, schedule),
                 donate_argnums=0)
  mem = step.lower(state, batch).compile().memory_analysis()
  return mem.temp_size_in_bytes, mem.argument_size_in_bytes


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
  p.add_argument("--batch_size", type=int, default=512)
  p.add_argument("--chunk", type=int, default=32)
  p.add_argument("--seq_len", type=int, default=128)
  args = p.parse_args()
  from embed_jax import hf
  cfg, params = hf.load(hf.resolve(args.model), max_seq_length=args.seq_len)
  rows = [(f"plain, batch {args.batch_size}", args.batch_size, 0),
          (f"grad cache, batch {args.batch_size}, chunk {args.chunk}", args.batch_size, args.chunk),
          (f"plain, batch {args.chunk}", args.chunk, 0)]
  print(f"all-MiniLM-L6-v2 MNRL train step, queries and positives of {args.seq_len} tokens; "
        f"XLA temporary buffers (params, optimiser state and batch come on top)")
  out = []
  for name, b, chunk in rows:
    temp, arg = temp_bytes(cfg, params, b, args.seq_len, chunk)
    out.append(temp)
    print(f"{name:36} temp {temp / 2**30:7.2f} GiB   (arguments {arg / 2**30:.2f} GiB)")
  print(f"\ngrad cache / plain at batch {args.batch_size}: {out[1] / out[0]:.3f}; "
        f"grad cache at {args.batch_size} / plain at {args.chunk}: {out[1] / out[2]:.2f}")


if __name__ == "__main__":
  main()
