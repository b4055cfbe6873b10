"""The skeleton every job runs on: a state restored (or handed over), work cut into
shards by position, padded batches as global arrays, results gathered, files
written atomically.

A job splits its work into shards of a fixed size. Shard s uses the key
fold_in(job key, s) and covers fixed examples, so its result does not depend
on when it runs: an interrupted job, run again with the same command, computes
only the missing shards and ends with exactly the files of an uninterrupted
run. A shard's file is written under a temporary name and renamed, so a file
with a shard's name is always complete. Every shard runs on the whole mesh
(all devices of all processes); process 0 writes the files.
"""
from __future__ import annotations

import math
import os
import time

import jax
import numpy as np

from score_sde import experiment as experiment_lib
from score_sde import io
from score_sde import parallel


def experiment_and_state(workdir: str, config, mesh, checkpoint: int | None = None,
                         state=None, step: int | None = None):
  """(experiment, train state, step): the given state, else the workdir's checkpoint."""
  if state is None:
    return experiment_lib.restore_state(workdir, config, mesh, checkpoint)
  return experiment_lib.build_experiment(config), state, step


def shard_path(directory: str, index: int) -> str:
  return os.path.join(directory, f'shard_{index:05d}.npz')


def batches(n: int, batch_size: int):
  """(start, stop) of consecutive batches covering range(n)."""
  for start in range(0, n, batch_size):
    yield start, min(start + batch_size, n)


def pad_rows(array: np.ndarray, size: int) -> np.ndarray:
  """`array` [n, ...] padded to [size, ...] by repeating its last row."""
  if len(array) == size:
    return array
  pad = np.repeat(array[-1:], size - len(array), axis=0)
  return np.concatenate([array, pad])


def job_batch_size(config, n: int, mesh) -> int:
  """min(config.eval.batch_size, n) rounded up to the mesh's device count."""
  return parallel.round_up_to_devices(min(int(config.eval.batch_size), n), mesh)


class Progress:
  """A one-line progress report: done / total, items/s, ETA (process 0)."""

  def __init__(self, total: int, what: str, already_done: int = 0):
    self.total, self.what, self.start, self.done0 = total, what, time.time(), already_done

  def update(self, done: int, extra: str = '') -> None:
    if jax.process_index() != 0:
      return
    elapsed = max(time.time() - self.start, 1e-9)
    rate = (done - self.done0) / elapsed
    eta = (self.total - done) / rate if rate > 0 else float('nan')
    eta_text = io.format_seconds(eta) if math.isfinite(eta) else '?'
    print(f'{self.what}: {done}/{self.total} | {rate:.2f}/s | eta {eta_text}'
          + (f' | {extra}' if extra else ''), flush=True)
