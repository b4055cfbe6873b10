"""Device mesh and shardings: one SPMD code path from 1 CPU to a multi-host pod.

A global 1-D mesh over all devices of all processes, axis 'data'. Batches are
sharded along their first axis on 'data'; parameters and optimiser state are
replicated. Jitted functions state these shardings explicitly.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named 'data' over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  """Axis `batch_axis` (the batch; 1 for n stacked batches [n, B, ...]) split over 'data'."""
  return NamedSharding(mesh, P(*([None] * batch_axis), DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """The same full array on every device."""
  return NamedSharding(mesh, P())


def check_batch_divisible(batch_size: int, mesh: Mesh, what: str = 'batch size') -> None:
  """Raises unless `batch_size` splits evenly over the mesh's devices."""
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(
        f'the global {what} {batch_size} does not divide by the number of '
        f'devices {n}; choose a multiple of {n} (e.g. {max(n, batch_size // n * n)}).')


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           cpu_collectives: str | None = None) -> None:
  """Starts multi-process JAX if asked to; a no-op for a single process.

  On TPU pods and SLURM/GKE clusters `jax.distributed.initialize()` finds its
  settings itself (pass nothing and set JAX_COORDINATOR_ADDRESS or run on a
  pod). Elsewhere give the coordinator 'host:port', the process count and this
  process's id (flags or the environment variables JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES, JAX_PROCESS_ID). CPU processes need collectives: 'gloo'.
  """
  import os
  coordinator_address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  if num_processes is None and os.environ.get('JAX_NUM_PROCESSES'):
    num_processes = int(os.environ['JAX_NUM_PROCESSES'])
  if process_id is None and os.environ.get('JAX_PROCESS_ID'):
    process_id = int(os.environ['JAX_PROCESS_ID'])
  on_tpu_pod = os.environ.get('TPU_WORKER_HOSTNAMES') or os.environ.get('CLOUD_TPU_TASK_ID')
  if not coordinator_address and not on_tpu_pod:
    return
  if cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def global_batch(local_batch: np.ndarray, mesh: Mesh, batch_axis: int = 0) -> jax.Array:
  """The global array whose rows on this process's devices are `local_batch`.

  Each process passes its own consecutive slice of the global batch (process
  p holds rows [p b, (p + 1) b)); axis `batch_axis` is split over 'data'.
  """
  spec = [None] * local_batch.ndim
  spec[batch_axis] = DATA_AXIS
  sharding = NamedSharding(mesh, P(*spec))
  return jax.make_array_from_process_local_data(sharding, local_batch)


def host_to_global(batch: np.ndarray, mesh: Mesh, batch_axis: int = 0) -> jax.Array:
  """The global array equal to `batch`, a full batch that every process holds alike.

  Each device receives its own rows (multi-process safe: a process only
  touches its own devices). Axis `batch_axis` is split over 'data'.
  """
  batch = np.asarray(batch)
  return jax.make_array_from_callback(batch.shape, batch_sharding(mesh, batch_axis),
                                      lambda index: batch[index])


def gather(x) -> np.ndarray:
  """A (possibly multi-process) global array as one numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def round_up_to_devices(size: int, mesh: Mesh) -> int:
  """The smallest multiple of the mesh's device count that is >= size (and >= 1 device)."""
  n = mesh.devices.size
  return max(1, -(-int(size) // n)) * n


def replicate(tree, mesh: Mesh):
  """A tree of arrays, equal on every process, as global arrays replicated over `mesh`.

  Leaves already replicated on the mesh (a restored train state) are returned as
  they are; host or single-device leaves are placed device by device, so a
  process only touches its own devices (multi-process safe).
  """
  sharding = replicated(mesh)

  def place(leaf):
    if isinstance(leaf, jax.Array):
      if leaf.sharding.is_equivalent_to(sharding, leaf.ndim):
        return leaf
      if not leaf.is_fully_addressable:
        return jax.device_put(leaf, sharding)
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(place, tree)


def broadcast_from_first(value) -> np.ndarray:
  """Process 0's numpy array, on every process (the array itself with one process)."""
  value = np.asarray(value)
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.broadcast_one_to_all(value))


def barrier(name: str) -> None:
  """Returns once every process has reached the barrier `name` (no-op for one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
