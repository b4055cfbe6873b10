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


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data', other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


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
