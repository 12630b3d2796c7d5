"""Multi-host training on JAX's multi-controller runtime: N processes, one program.

    embed-jax train --config C --workdir W --coordinator host:port --num_processes N --process_id i

(on a TPU VM slice or under SLURM/Open MPI, jax.distributed.initialize() finds these itself:
`--coordinator auto`). Every process runs the same training loop over the global mesh (all
processes' devices): it builds every global batch from the same (seed, epoch) order and hands
the step only the rows its own devices hold (`global_batch`); the loss still sees the whole
batch. Evaluations split the corpus encoding across processes (`split_map`); process 0 writes
the logs, metrics, evaluation files and the export; all processes write
their shards of each Orbax checkpoint and restore them. Workdirs are on a filesystem every
process sees (on localhost, the same folder).
"""

from __future__ import annotations

import hashlib
import logging

import jax
import numpy as np

log = logging.getLogger(__name__)


class DistributedError(RuntimeError):
  """A multi-process run that cannot start: an unreachable coordinator, mismatched configs."""


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None,
               timeout_s: int = 120) -> None:
  """Joins the multi-process run (nothing for one process). CPU processes talk through gloo."""
  if not coordinator:
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kw = {} if coordinator == "auto" else dict(coordinator_address=coordinator,
                                            num_processes=num_processes, process_id=process_id)
  if coordinator != "auto" and process_id != 0:
    # JAX's coordination client aborts the whole process when it cannot register in time; wait
    # for the coordinator's port here first, so that an unreachable one is a clear error.
    timeout_s = _wait_for(coordinator, timeout_s, process_id, num_processes)
  try:
    jax.distributed.initialize(initialization_timeout=timeout_s, **kw)
  except Exception as e:  # noqa: BLE001 - jax raises several types here, all mean "not joined"
    where = "the cluster's coordinator" if coordinator == "auto" else f"the coordinator {coordinator}"
    raise DistributedError(
        f"process {process_id} could not join {where} within {timeout_s} s ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else e}): start all {num_processes} processes with "
        f"the same --coordinator host:port reachable from each") from None
  log.info("process %d of %d; %d local and %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())


def _wait_for(coordinator: str, timeout_s: int, process_id, num_processes) -> int:
  """Waits until the coordinator's port accepts connections; returns the seconds left."""
  import socket
  import time
  host, _, port = coordinator.rpartition(":")
  if not host or not port.isdigit():
    raise DistributedError(f"--coordinator {coordinator!r}: give host:port (e.g. 10.0.0.2:1234)")
  start = time.monotonic()
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=2):
        return max(int(timeout_s - (time.monotonic() - start)), 10)
    except OSError as e:
      if time.monotonic() - start > timeout_s:
        raise DistributedError(
            f"process {process_id} could not join the coordinator {coordinator} within "
            f"{timeout_s} s ({e.strerror or e}): start process 0 of {num_processes} there, with "
            f"the same --coordinator, reachable from every process") from None
      time.sleep(0.5)


def is_main() -> bool:
  return jax.process_index() == 0


def check_same(text: str, what: str = "config") -> None:
  """Refuses a run whose processes were given different configs (a hash of each, compared
  across processes before any compute)."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.int64)
  every = np.asarray(multihost_utils.process_allgather(digest)).reshape(-1)
  if len(set(every.tolist())) > 1:
    raise DistributedError(f"the {jax.process_count()} processes were given different {what}s "
                           f"(hashes {[hex(h & (2**64 - 1)) for h in every.tolist()]}): start "
                           f"every process with the same --config and overrides")


def barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def global_batch(batch, sharding):
  """A host batch (the same numpy arrays in every process) as global arrays split by
  `sharding`: each process puts only the rows its own devices hold."""
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_callback(
      np.shape(x), sharding, lambda index: np.asarray(x)[index]), batch)


def to_host(tree):
  """Numpy copies of (possibly process-spanning, sharded) arrays, in every process."""
  def host(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(host, tree)


def agreed(flag: bool) -> bool:
  """Process 0's `flag`, in every process: a decision that leads into collectives (whether to
  evaluate, whether a run is finished) must be the same everywhere, or the others would hang."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(bool(flag))))


def split_map(fn, items):
  """fn(items) with the work split across processes: process i runs fn on items[i::P] (strided,
  so each gets a like mix of long and short texts), and every process gets the whole result, in
  input order, and the number of items each process handled. fn returns a numpy array, a scipy
  sparse matrix or a list, one row per item (the encoders' outputs)."""
  n, count = len(items), jax.process_count()
  shares = [len(range(i, n, count)) for i in range(count)]
  if count == 1:
    return fn(items), shares
  from jax.experimental import multihost_utils
  import pickle
  mine = fn(items[jax.process_index()::count])
  blob = np.frombuffer(pickle.dumps(mine, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray(blob.size, np.int64))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:blob.size] = blob
  every = np.asarray(multihost_utils.process_allgather(padded)).reshape(count, -1)
  parts = [pickle.loads(every[i, :sizes[i]].tobytes()) for i in range(count)]
  order = np.argsort(np.concatenate([np.arange(i, n, count) for i in range(count)]), kind="stable")
  if isinstance(parts[0], list):
    stacked = [x for p in parts for x in p]
    return [stacked[j] for j in order], shares
  if isinstance(parts[0], np.ndarray):
    return np.concatenate(parts)[order], shares
  import scipy.sparse as sp
  return sp.vstack(parts, format="csr")[order], shares
