"""Memory plan: bytes per device of the train step for model shapes from MiniLM to 8B-parameter
decoders, on a mesh of N devices, with and without FSDP and gradient caching; on paper.

    python benchmarks/memory_plan.py [--devices 8] [--batch 256] [--q_len 64] [--d_len 512] \
        [--models minilm,bert-base,qwen3-0.6b,qwen3-4b,qwen3-8b] [--out experiments/results/memory_plan]

Compiles (never runs) the MNRL train step with one hard negative per pair for each model shape,
built from its config alone (no weights: abstract parameters), on N simulated CPU devices (the
mesh is data x fsdp; XLA_FLAGS is set here), bfloat16 compute with float32 parameters and AdamW
state, and reads XLA's memory analysis of the compiled program: arguments (parameters, optimiser
state, the batch shard), outputs and temporaries, per device. Parameter and optimiser-state
bytes are what they are on any backend; the temporaries are XLA:CPU's buffer assignment, a guide
to a TPU's or GPU's (which fuse and rematerialise differently). The verdict columns compare the
total with the usable memory of common accelerators.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name -> (architecture, ModelConfig fields). Qwen3 shapes as their config.json files.
SHAPES = {
    "minilm": ("bert", dict(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536,
                            vocab_size=30522)),
    "bert-base": ("bert", dict(hidden_size=768, num_layers=12, num_heads=12,
                               intermediate_size=3072, vocab_size=30522)),
    "qwen3-0.6b": ("qwen3", dict(hidden_size=1024, num_layers=28, num_heads=16,
                                 intermediate_size=3072, vocab_size=151669,
                                 decoder=dict(num_kv_heads=8, head_dim=128))),
    "qwen3-4b": ("qwen3", dict(hidden_size=2560, num_layers=36, num_heads=32,
                               intermediate_size=9728, vocab_size=151665,
                               decoder=dict(num_kv_heads=8, head_dim=128))),
    "qwen3-8b": ("qwen3", dict(hidden_size=4096, num_layers=36, num_heads=32,
                               intermediate_size=12288, vocab_size=151665,
                               decoder=dict(num_kv_heads=8, head_dim=128))),
}
ACCELERATORS = {"TPU v5e 16 GB": 16, "A100/H100 80 GB": 80}  # GiB usable, roughly


def model_config(name: str, max_len: int):
  from embed_jax.models.config import Decoder, ModelConfig
  arch, fields = SHAPES[name]
  fields = dict(fields)
  if "decoder" in fields:
    fields["decoder"] = Decoder(qk_norm=True, **fields["decoder"])
    fields.update(pooling=("lasttoken",), add_pooler=False, hidden_act="silu",
                  layer_norm_eps=1e-6, max_position_embeddings=32768, type_vocab_size=0)
  return ModelConfig(architecture=arch, max_seq_length=max_len, dtype="bfloat16",
                     hidden_dropout=0.0, attention_dropout=0.0, **fields)


def plan(name: str, devices: int, fsdp: int, chunk: int, batch: int, q_len: int, d_len: int) -> dict:
  import jax
  import jax.numpy as jnp

  from configs import scifact_hardneg
  from embed_jax import train
  from embed_jax.models import SentenceEncoder, abstract_params
  from embed_jax.objective import build_objective
  cfg = model_config(name, max(q_len, d_len))
  c = scifact_hardneg.get_config()
  c.dropout, c.train.grad_cache_chunk, c.batch_size = False, chunk, batch
  tx, schedule = train.make_optimizer(c.optim, 100)
  step = train.make_train_step(SentenceEncoder(cfg), build_objective(c), c, tx, schedule,
                               batch_shards=devices)
  runner = train.JitRunner(step, jax.devices()[:devices], fsdp=fsdp)
  params = abstract_params(cfg)
  shapes = jax.eval_shape(lambda p: train.init_state(p, tx, 0), params)
  shardings = runner.state_shardings(shapes)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                       shardings)
  rows = lambda *shape: jax.ShapeDtypeStruct((batch, *shape), jnp.int32, sharding=runner.data)  # noqa: E731
  text = lambda *shape: {"ids": rows(*shape), "mask": rows(*shape)}  # noqa: E731
  vec = lambda dt: jax.ShapeDtypeStruct((batch,), dt, sharding=runner.data)  # noqa: E731
  batch_tree = {"groups": {"q": text(q_len), "p": text(d_len), "n": text(1, d_len)},
                "inputs": {"pairs": {"q_ids_B": vec(jnp.int32), "p_ids_B": vec(jnp.int32),
                                     "neg_ids_BxN": rows(1), "valid_B": vec(jnp.bool_)}}}
  t = time.perf_counter()
  mem = runner._step.lower(state, batch_tree).compile().memory_analysis()
  n_params = sum(x.size for x in jax.tree.leaves(params))
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes)
  return {"model": name, "params_b": n_params / 1e9, "devices": devices, "fsdp": fsdp,
          "chunk": chunk, "batch": batch, "arguments_gib": mem.argument_size_in_bytes / 2**30,
          "temp_gib": mem.temp_size_in_bytes / 2**30, "total_gib": total / 2**30,
          "compile_s": round(time.perf_counter() - t, 1)}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--batch", type=int, default=256, help="global (query, positive) pairs a step")
  p.add_argument("--q_len", type=int, default=64)
  p.add_argument("--d_len", type=int, default=512)
  p.add_argument("--chunk", type=int, default=4, help="gradient-caching chunk (pairs a device)")
  p.add_argument("--models", default=",".join(SHAPES))
  p.add_argument("--out", default="experiments/results/memory_plan")
  args = p.parse_args()
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}")
  rows = []
  for name in args.models.split(","):
    for fsdp in (1, args.devices):
      for chunk in (0, args.chunk):
        r = plan(name, args.devices, fsdp, chunk, args.batch, args.q_len, args.d_len)
        rows.append(r)
        print(json.dumps(r), flush=True)
        write(rows, args)  # after every row: a long run that stops keeps what it measured


def write(rows: list[dict], args) -> None:
  head = (f"Train step (MNRL + 1 hard negative, global batch {args.batch}, queries {args.q_len} "
          f"and documents {args.d_len} tokens, bfloat16 compute, float32 params and AdamW) on "
          f"{args.devices} devices: GiB per device from XLA's memory analysis\n\n")
  cols = ["model", "params", "mode", "params+opt+batch", "temporaries", "total",
          *ACCELERATORS]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    mode = ("FSDP" if r["fsdp"] > 1 else "data parallel") + (
        f", grad cache {r['chunk']}" if r["chunk"] else "")
    fits = ["fits" if r["total_gib"] <= g * 0.9 else "no" for g in ACCELERATORS.values()]
    lines.append(f"| {r['model']} | {r['params_b']:.2f}B | {mode} | {r['arguments_gib']:.2f} | "
                 f"{r['temp_gib']:.2f} | {r['total_gib']:.2f} | " + " | ".join(fits) + " |")
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "memory_plan.md").write_text(head + "\n".join(lines) + "\n")
  (out / "memory_plan.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
  main()
