"""FSDP on 8 simulated devices: parameters and optimiser state split over the mesh's fsdp axis
give the same steps as plain data parallelism (replicated parameters), for the dense,
Matryoshka and distillation objectives, with and without gradient caching."""

from __future__ import annotations

import jax
import pytest

from embed_jax import train as T
from embed_jax.optim import param_path
from tests.conftest import slow_variant
from tests.test_train import _assert_same

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


@pytest.fixture(autouse=True)
def shard_everything(monkeypatch):
  """The tiny model's leaves are all small: shard every leaf the fsdp size divides."""
  monkeypatch.setattr(T, "MIN_SHARD_SIZE", 1)


def test_fsdp_specs_follow_the_rules():
  from jax.sharding import PartitionSpec as P
  assert T.fsdp_spec("params/encoder/embeddings/word_embeddings/embedding", (30522, 384), 2,
                     min_size=0) == P("fsdp", None)
  assert T.fsdp_spec("params/encoder/layer_0/attention/self/query/kernel", (384, 384), 4,
                     min_size=0) == P("fsdp", None)
  assert T.fsdp_spec("params/encoder/layer_0/intermediate/dense/kernel", (384, 1536), 8,
                     min_size=0) == P(None, "fsdp")  # the largest axis the size divides
  assert T.fsdp_spec("params/encoder/embeddings/word_embeddings/embedding", (30522, 384), 8,
                     min_size=0) == P(None, "fsdp")  # 8 does not divide the vocabulary
  assert T.fsdp_spec("opt_state/0/mu/x/bias", (30,), 8, min_size=0) == P()  # 8 does not divide 30
  assert T.fsdp_spec("step", (), 8, min_size=0) == P()
  assert T.fsdp_spec("params/x/kernel", (64, 64), 8, min_size=1 << 14) == P()  # too small to split


@needs_8
def test_fsdp_leaves_are_split_over_the_fsdp_axis():
  from tests.test_train import _setup, make_step
  cfg, c, tx, schedule, state = _setup()
  runner = T.make_runner("jit", make_step(cfg, c, tx, schedule), jax.devices()[:8], fsdp=4)
  placed = runner.put_state(state)
  kernel = placed.params["encoder"]["layer_0"]["intermediate"]["dense"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert kernel.addressable_shards[0].data.shape == (32, kernel.shape[1] // 4)
  # The optimiser state's moments are split as their parameters (the same paths and shapes).
  leaves = jax.tree_util.tree_leaves_with_path(placed.opt_state)
  moments = [x for path, x in leaves if "intermediate" in param_path(path) and x.shape == kernel.shape]
  assert len(moments) >= 2 and all(m.sharding.spec == kernel.sharding.spec for m in moments)


@needs_8
@pytest.mark.parametrize("fsdp,chunk", [(8, 0), (4, 2)])  # fsdp 8; data 2 x fsdp 4 + grad cache
def test_dense_fsdp_equals_data_parallel(fsdp, chunk):
  from tests.test_train import _run
  dp = _run("jit", jax.devices()[:8], chunk=chunk)
  _assert_same(dp, _run("jit", jax.devices()[:8], chunk=chunk, fsdp=fsdp))


@needs_8
@pytest.mark.parametrize("chunk", [pytest.param(0, marks=slow_variant), 2])
def test_matryoshka_fsdp_equals_data_parallel(chunk):
  from tests.test_matryoshka import _mrl_run
  dp, _ = _mrl_run("jit", jax.devices()[:8], chunk=chunk)
  fs, _ = _mrl_run("jit", jax.devices()[:8], chunk=chunk, fsdp=4)
  _assert_same(dp, fs)


@needs_8
@pytest.mark.parametrize("chunk", [0, pytest.param(2, marks=slow_variant)])
def test_distillation_fsdp_equals_data_parallel(chunk):
  from tests.test_distill import _run_distill
  dp = _run_distill("jit", jax.devices()[:8], chunk=chunk)
  _assert_same(dp, _run_distill("jit", jax.devices()[:8], chunk=chunk, fsdp=8))


def test_a_mesh_that_does_not_divide_the_devices_is_refused():
  from configs import scifact_mnrl
  c = scifact_mnrl.get_config()
  c.train.fsdp = 3
  with pytest.raises(ValueError, match="train.fsdp=3 must divide the 8 devices"):
    T.check_config(c, 8)
  c.train.fsdp, c.train.runner = 2, "pmap"
  with pytest.raises(ValueError, match="needs train.runner='jit'"):
    T.check_config(c, 8)
