"""Multi-host training: 2 processes on localhost (gloo CPU collectives), 2 simulated devices
each, equal one process with 4 devices, through a stop and a resume from the checkpoint."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np

from tests.conftest import REPO


def _port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


def _train(workdir, beir, devices: int, extra=(), processes: int = 1, overrides=None,
           timeout: int = 600, evaluate: bool = False):
  """Runs `embed-jax train` in `processes` processes; returns their (code, stderr)."""
  base = [sys.executable, "-m", "embed_jax.cli", "train", "--config",
          f"{REPO}/configs/scifact_mnrl.py:smoke", "--workdir", str(workdir),
          f"--config.data.dataset={beir}", "--config.max_steps=4",
          f"--config.evals.test.at_end={evaluate}", f"--config.evals.test.at_start={evaluate}",
          "--config.checkpoint.every_steps=2", "--config.train.log_every=1", *extra]
  if processes == 1:
    procs = [subprocess.Popen(base, env=_env(devices), stderr=subprocess.PIPE, text=True)]
  else:
    port = _port()
    procs = [subprocess.Popen(base + ["--coordinator", f"localhost:{port}", "--num_processes",
                                      str(processes), "--process_id", str(i),
                                      *((overrides or {}).get(i, []))],
                              env=_env(devices), stderr=subprocess.PIPE, text=True)
             for i in range(processes)]
  return [(p.wait(timeout), p.stderr.read()) for p in procs]


def _losses(workdir):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_two_processes_equal_one_and_resume_from_their_checkpoint(tiny_beir, tmp_path):
  from safetensors.numpy import load_file
  one = tmp_path / "one"
  assert all(code == 0 for code, _ in _train(one, tiny_beir, devices=4, evaluate=True)), \
      "single process failed"
  two = tmp_path / "two"
  first = _train(two, tiny_beir, devices=2, processes=2, extra=["--stop_after", "2"],
                 evaluate=True)
  assert all(code == 0 for code, _ in first), first[0][1][-2000:] + first[1][1][-2000:]
  assert (two / "checkpoints" / "2").exists() and not (two / "export").exists()
  second = _train(two, tiny_beir, devices=2, processes=2, evaluate=True)
  assert all(code == 0 for code, _ in second), second[0][1][-2000:] + second[1][1][-2000:]
  assert "starting from" in second[0][1] and "at step 2" in second[0][1]
  a, b = _losses(one), _losses(two)
  assert sorted(a) == sorted(b) == [0, 1, 2, 3]
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], atol=1e-5)
  wa = load_file(str(one / "export" / "model.safetensors"))
  wb = load_file(str(two / "export" / "model.safetensors"))
  assert wa.keys() == wb.keys()
  assert max(float(np.abs(wa[k] - wb[k]).max()) for k in wa) <= 1e-5
  # The evaluations (before and after): each process encoded half of the corpus, and the
  # metrics equal the single process's.
  for name in ("results_before.json", "results.json"):
    ra, rb = (json.loads((w / name).read_text()) for w in (one, two))
    n = ra["settings"]["num_docs"]
    assert ra["settings"]["documents_encoded_per_process"] == [n]
    assert rb["settings"]["documents_encoded_per_process"] == [(n + 1) // 2, n // 2]
    for x, y in zip(ra["results"], rb["results"]):
      assert x["metrics"].keys() == y["metrics"].keys()
      np.testing.assert_allclose([y["metrics"][m] for m in x["metrics"]],
                                 [x["metrics"][m] for m in x["metrics"]], atol=1e-5)


def test_an_unreachable_coordinator_and_mismatched_configs_are_clear_errors(tiny_beir, tmp_path):
  port = _port()
  cmd = [sys.executable, "-m", "embed_jax.cli", "train", "--config",
         f"{REPO}/configs/scifact_mnrl.py:smoke", "--workdir", str(tmp_path / "alone"),
         f"--config.data.dataset={tiny_beir}", "--coordinator", f"localhost:{port}",
         "--num_processes", "2", "--process_id", "1", "--init_timeout", "5"]
  out = subprocess.run(cmd, env=_env(2), capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and "could not join the coordinator" in out.stderr
  assert not (tmp_path / "alone").exists()
  results = _train(tmp_path / "mixed", tiny_beir, devices=2, processes=2,
                   overrides={1: ["--config.optim.lr=1e-3"]}, timeout=300)
  assert all(code == 2 for code, _ in results)
  assert all("were given different configs" in err for _, err in results)
  assert not (tmp_path / "mixed").exists()


def test_multi_host_flags_are_checked(capsys):
  from embed_jax.cli import main
  assert main(["train", "--config", "configs/scifact_mnrl.py", "--workdir", "/tmp/x",
               "--num_processes", "2"]) == 2
  assert "need --coordinator" in capsys.readouterr().err
  assert main(["train", "--config", "configs/scifact_mnrl.py", "--workdir", "/tmp/x",
               "--coordinator", "localhost:1", "--num_processes", "2", "--process_id", "2"]) == 2
  assert "--process_id i in 0..N-1" in capsys.readouterr().err


_SPLIT_MAP = """
import sys, jax, numpy as np, scipy.sparse as sp
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from embed_jax import distributed
items = [f"text {i} " + "x" * (i % 4) for i in range(7)]
dense = lambda xs: np.array([[len(x), int(x.split()[1])] for x in xs], np.float32)
got, per = distributed.split_map(dense, items)
assert per == [4, 3] and np.array_equal(got, dense(items)), (per, got)
csr = lambda xs: sp.csr_matrix(dense(xs))
got, _ = distributed.split_map(csr, items)
assert (got != csr(items)).nnz == 0
got, _ = distributed.split_map(lambda xs: [x.upper() for x in xs], items)
assert got == [x.upper() for x in items]
assert distributed.agreed(jax.process_index() == 0)
print("ok")
"""


def test_split_map_shares_the_work_and_returns_every_row_in_order():
  """The corpus encoding of a multi-process evaluation: dense, sparse and list outputs."""
  port = _port()
  procs = [subprocess.Popen([sys.executable, "-c", _SPLIT_MAP, f"localhost:{port}", str(i)],
                            env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
  assert all(out.strip().splitlines()[-1:] == ["ok"] for out, _ in outs), outs
