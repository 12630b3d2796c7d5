"""Exact top-k search on accelerators: the unit corpus sharded across this process's devices.

    index = ShardedFloat32()          # a 1-D mesh ("docs",) over jax.local_devices()
    index.index(docs_NxD)             # unit vectors, padded to a multiple of the device count
    scores_QxK, idx_QxK = index.search(queries_QxD, k)   # numpy, as evaluate.Float32 returns

Each device scores a query batch against its shard in float32, keeps its own top k with global
document indices, and the devices' candidates are all-gathered and cut to the final top k. The
result equals evaluate.Float32 (cosine; ties: lower document index first; k clipped to the
corpus size). `evaluate_embeddings(..., device_search=...)` picks it for the dense float32 rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from embed_jax.models.pooling import l2_normalize as unit

DEVICE_SEARCH = ("auto", "on", "off")
QUERY_BATCH = 1024  # queries scored at once (at most; fewer for a small query set or large shard)
SCORES_PER_DEVICE = 1 << 27  # a query batch's scores on one device: 512 MiB of float32 at most


def use_devices(device_search: str) -> bool:
  """Whether to search on the devices: "on", "off", or "auto" (more than one accelerator).

  On CPU the simulated devices share the same cores and numpy is faster, so "auto" is off there.
  """
  if device_search not in DEVICE_SEARCH:
    raise ValueError(f"device_search={device_search!r}; expected one of {DEVICE_SEARCH}")
  if device_search == "auto":
    return jax.local_device_count() > 1 and jax.default_backend() != "cpu"
  return device_search == "on"


def _pow2_at_most(n: int) -> int:
  return 1 << (max(n, 1).bit_length() - 1)


@functools.lru_cache(maxsize=None)
def _sharded_topk(mesh: jax.sharding.Mesh, k: int):
  """jit(q_BxD, docs_PxD sharded over "docs", num_docs) -> (scores_BxK, idx_BxK).

  Cached per (mesh, k), so jit compiles once per query batch and corpus shape.
  """

  def local(q_BxD, docs_SxD, num_docs):
    shard = docs_SxD.shape[0]
    idx_S = jax.lax.axis_index("docs") * shard + jnp.arange(shard)
    scores_BxS = jnp.dot(q_BxD, docs_SxD.T, precision=jax.lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32)
    scores_BxS = jnp.where(idx_S < num_docs, scores_BxS, -jnp.inf)  # the padding rows
    top_s_BxL, top_l_BxL = jax.lax.top_k(scores_BxS, min(k, shard))
    return top_s_BxL, idx_S[top_l_BxL]

  candidates = jax.shard_map(local, mesh=mesh, in_specs=(P(), P("docs", None), P()),
                             out_specs=(P(None, "docs"), P(None, "docs")))

  @jax.jit
  def topk(q_BxD, docs_PxD, num_docs):
    # [B, devices * L], device by device. lax.top_k puts the lower index first among equal
    # scores, so ties come in document order within a device, then across them (the merge
    # gathers the candidates).
    cand_s_BxC, cand_i_BxC = candidates(q_BxD, docs_PxD, num_docs)
    best_s_BxK, pos_BxK = jax.lax.top_k(cand_s_BxC, k)
    return best_s_BxK, jnp.take_along_axis(cand_i_BxC, pos_BxK, axis=1)

  return topk


class ShardedFloat32:
  """evaluate.Float32 on the devices: exact cosine search over the unit corpus, sharded."""
  name = "float32"  # the same representation; the row's "search_devices" says where it ran

  def __init__(self, devices=None, query_batch: int = QUERY_BATCH):
    devices = list(devices or jax.local_devices())
    self.mesh = jax.make_mesh((len(devices),), ("docs",), devices=devices,
                              axis_types=(jax.sharding.AxisType.Auto,))
    self.query_batch = query_batch

  def index(self, docs_NxD: np.ndarray) -> None:
    docs_NxD = np.ascontiguousarray(unit(docs_NxD), np.float32)
    self.num_docs, self.dims = docs_NxD.shape
    n = self.mesh.size
    padded = max(-(-self.num_docs // n), 1) * n  # every device holds at least one row
    docs_PxD = np.pad(docs_NxD, ((0, padded - self.num_docs), (0, 0)))
    self.docs_PxD = jax.device_put(docs_PxD, NamedSharding(self.mesh, P("docs", None)))

  @property
  def bytes_per_doc(self) -> float:
    return self.dims * 4

  def stats(self) -> dict:
    return {"search_devices": self.mesh.size}

  def search(self, queries_QxD: np.ndarray, k: int):
    q_QxD = unit(queries_QxD).astype(np.float32)
    num_q, k = len(q_QxD), min(k, self.num_docs)
    if num_q == 0 or k <= 0:
      return np.zeros((num_q, 0), np.float32), np.zeros((num_q, 0), np.int64)
    # Batches of a power of two: few shapes to compile, and the last batch padded to the size.
    shard = self.docs_PxD.shape[0] // self.mesh.size
    batch = min(_pow2_at_most(self.query_batch), _pow2_at_most(SCORES_PER_DEVICE // shard),
                1 << (num_q - 1).bit_length())
    q_PxD = np.pad(q_QxD, ((0, -num_q % batch), (0, 0)))
    topk = _sharded_topk(self.mesh, k)
    replicated = NamedSharding(self.mesh, P())
    num_docs = np.int32(self.num_docs)
    outs = [topk(jax.device_put(q_PxD[a:a + batch], replicated), self.docs_PxD, num_docs)
            for a in range(0, len(q_PxD), batch)]  # dispatched asynchronously, fetched below
    scores_QxK = np.concatenate([np.asarray(s) for s, _ in outs])[:num_q]
    idx_QxK = np.concatenate([np.asarray(i) for _, i in outs])[:num_q].astype(np.int64)
    # Already in this order; re-sorted on the host so the order is numpy's whatever the backend.
    order_QxK = np.lexsort((idx_QxK, -scores_QxK), axis=1)
    return np.take_along_axis(scores_QxK, order_QxK, 1), np.take_along_axis(idx_QxK, order_QxK, 1)
