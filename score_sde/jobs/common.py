"""The skeleton every job runs on: a state restored (or handed over), work cut into
shards by position, padded batches as global arrays, results gathered, files
written atomically, a manifest checked on resume, one progress bar.

A job is a `Job` (where it writes, how many shards of what size, the settings
that determine its result) and a function computing one shard:

  compute(s) -> (arrays, info)   arrays: numpy, gathered (every process gets them);
                                 info: small JSON values (e.g. {'nfe': 20})

Shard s covers fixed rows and uses the key fold_in(job key, s) (`shard_key`),
so its result does not depend on when it ran: an interrupted job, run again
with the same command, computes only the missing shards and ends with exactly
the files of an uninterrupted run. `run` writes shard s's info into
<out_dir>/manifest.json, then its arrays to <out_dir>/shard_<s>.npz (through a
temporary file and a rename: a file under a shard's name is complete, and a
shard is done exactly when its file exists). A job whose shard is one long
compiled program (a sampler, an ODE solve) hands `run` a `ShardProgress`, so
the bar moves inside a shard too. Every shard runs on the whole
mesh (all devices of all processes); process 0 decides which shards are
missing and writes the files; the workdir is shared by all processes, as for
checkpoints.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import threading
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from score_sde import experiment as experiment_lib
from score_sde import io
from score_sde import locks
from score_sde import parallel


def experiment_and_state(workdir: str, config, mesh, checkpoint: int | None = None,
                         state=None, step: int | None = None):
  """(experiment, train state, step): the given state, else the workdir's checkpoint."""
  if state is None:
    return experiment_lib.restore_state(workdir, config, mesh, checkpoint)
  return experiment_lib.build_experiment(config), state, step


def require_score_model(config, what: str) -> None:
  """A one-line error when `what` (a controllable job) is given a normalizing flow."""
  if experiment_lib.is_flow(config):
    raise ValueError(f'{what} needs a score model; {config.model.name!r} is a normalizing '
                     f'flow: it has no reverse-time process to steer (its jobs are sample, '
                     f'bpd and eval).')


def ema_params(state, mesh):
  """The state's EMA parameters as replicated global arrays on `mesh` (a no-op for a
  restored state; host or single-device parameters handed over are placed)."""
  return parallel.replicate(state.ema_params, mesh)


# ----------------------------------------------------------------------------
# Shards by position
# ----------------------------------------------------------------------------

def shard_path(directory: str, index: int) -> str:
  return os.path.join(directory, f'shard_{index:05d}.npz')


def count_shards(num_rows: int, shard_size: int) -> int:
  return math.ceil(int(num_rows) / int(shard_size))


def shard_rows(shard: int, shard_size: int, num_rows: int) -> slice:
  """The rows [s B, min((s + 1) B, n)) of shard s."""
  return slice(shard * shard_size, min((shard + 1) * shard_size, num_rows))


def shard_key(key: jax.Array, shard: int) -> jax.Array:
  """Shard s's key: fold_in(key, s), whatever else ran before it."""
  return jax.random.fold_in(key, shard)


def pad_rows(array: np.ndarray, size: int, fill=None) -> np.ndarray:
  """`array` [n, ...] padded to [size, ...]: by repeating its last row, or with `fill`."""
  array = np.asarray(array)
  if len(array) == size:
    return array
  if fill is None:
    pad = np.repeat(array[-1:], size - len(array), axis=0)
  else:
    pad = np.full((size - len(array),) + array.shape[1:], fill, array.dtype)
  return np.concatenate([array, pad])


def job_batch_size(config, n: int, mesh) -> int:
  """min(config.eval.batch_size, n) rounded up to the mesh's device count."""
  return parallel.round_up_to_devices(min(int(config.eval.batch_size), n), mesh)


def settings_id(settings: dict) -> str:
  """8 hex digits naming settings (JSON values): default output folders carry it, so a
  job run with other settings writes to another folder instead of reusing shards."""
  text = json.dumps(json.loads(json.dumps(settings)), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:8]


def params_digest(params) -> str:
  """`digest` of a parameter tree's leaves in tree order (replicated global arrays:
  each process reads its own copy; host arrays as they are)."""
  return digest(*[np.asarray(leaf.addressable_data(0)) if isinstance(leaf, jax.Array)
                  else np.asarray(leaf) for leaf in jax.tree.leaves(params)])


def digest(*arrays) -> str:
  """A short hash of arrays' dtypes, shapes and values (inputs named in a manifest)."""
  h = hashlib.sha256()
  for array in arrays:
    array = np.ascontiguousarray(np.asarray(array))
    h.update(f'{array.dtype.str}{array.shape}'.encode())
    h.update(array.tobytes())
  return h.hexdigest()[:16]


# ----------------------------------------------------------------------------
# The job: manifest, missing shards, the shard loop
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Job:
  """A job's shards and the settings that determine them.

  out_dir: holds shard_<s>.npz and manifest.json.
  settings: JSON values written to the manifest (with shard_size, num_shards
    and per-shard info under 'shards'); the keys in `checked` must be equal
    when a job resumes in a folder that already has a manifest.
  title: the first line printed, e.g. 'sampling 64 samples (pc) ... into <dir>'.
  what / unit: the progress bar's label and the unit of its count (rows).
  retry_hint: the other way out named when a resume is refused.
  num_rows: the real rows of one pass over the data, whose last shard is padded to
    shard_size; shards past the first pass repeat it (the bpd job's repeats). The
    progress bar counts and rates real rows only. None: every shard counts shard_size.
  """
  out_dir: str
  num_shards: int
  shard_size: int
  settings: dict
  checked: tuple[str, ...]
  title: str
  what: str
  unit: str = 'example'
  retry_hint: str = 'pass another --out_dir'
  num_rows: int | None = None

  @property
  def manifest_path(self) -> str:
    return os.path.join(self.out_dir, 'manifest.json')

  def rows_in(self, shard: int) -> int:
    """The real (unpadded) rows of `shard`."""
    if self.num_rows is None:
      return self.shard_size
    per_pass = count_shards(self.num_rows, self.shard_size)
    rows = shard_rows(shard % per_pass, self.shard_size, self.num_rows)
    return rows.stop - rows.start


def read_manifest(out_dir: str) -> dict | None:
  """A job folder's manifest.json (None where there is none yet); a damaged one stops
  with a ValueError naming it."""
  path = os.path.join(out_dir, 'manifest.json')
  if not os.path.exists(path):
    return None
  return io.read_json_object(path, f'the manifest of the job in {out_dir}',
                             f'restore it from a backup, or move {out_dir} aside and run '
                             f'the job again')


def describe_change(before, after) -> str:
  """'before vs after' of one setting; for two dicts (a sampler's options) only the entries
  that differ, each 'key: before vs after' ('absent' where one side lacks the key), or only
  'method: ...' where the method differs."""
  if not (isinstance(before, dict) and isinstance(after, dict)):
    return f'{before!r} vs {after!r}'

  def value(options, key):
    return repr(options[key]) if key in options else 'absent'
  keys = sorted(k for k in set(before) | set(after) if before.get(k, ...) != after.get(k, ...))
  if 'method' in keys:         # another sampler: its options differ as a matter of course
    keys = ['method']
  return ', '.join(f'{k}: {value(before, k)} vs {value(after, k)}' for k in keys)


def open_manifest(job: Job) -> dict:
  """The job's manifest, keeping the shard info of an earlier run with the same settings.

  Settings are compared as JSON values (tuples as lists). Raises ValueError
  naming the first checked setting that differs.
  """
  manifest = json.loads(json.dumps({**job.settings, 'shard_size': int(job.shard_size),
                                    'num_shards': int(job.num_shards), 'shards': {}}))
  previous = read_manifest(job.out_dir)
  if previous is None:
    return manifest
  for key in job.checked:
    if previous.get(key) == manifest[key]:
      continue
    if key not in previous:
      raise ValueError(f'{job.out_dir} holds shards whose manifest does not record {key} '
                       f'(an older version wrote it), so they cannot be checked against '
                       f'{manifest[key]!r}; {job.retry_hint} or delete the folder.')
    raise ValueError(f'{job.out_dir} holds shards made with a different {key} '
                     f'({describe_change(previous[key], manifest[key])}); {job.retry_hint} or '
                     f'delete the folder.')
  manifest['shards'] = previous.get('shards', {})
  return manifest


def missing_shards(job: Job) -> list[int]:
  """Shards without a file, as process 0 sees them (the same list on every process)."""
  missing = np.zeros(job.num_shards, np.int32)
  if jax.process_index() == 0:
    missing[:] = [not os.path.exists(shard_path(job.out_dir, s))
                  for s in range(job.num_shards)]
  return [int(s) for s in np.flatnonzero(parallel.broadcast_from_first(missing))]


def shows_progress() -> bool:
  """Whether a job shows its progress bar: on process 0 when its stdout is a terminal.
  Every process gets process 0's answer (the programs built from it must be the same
  program on every process)."""
  isatty = getattr(sys.stdout, 'isatty', None)
  mine = jax.process_index() == 0 and bool(isatty and isatty())
  return bool(parallel.broadcast_from_first(np.asarray(mine, np.int32)))


def progress_bar(total: int, initial: int, what: str, unit: str) -> tqdm.tqdm:
  """A tqdm bar on stdout (rate, ETA); silent unless stdout is a terminal, and on
  processes other than 0."""
  isatty = getattr(sys.stdout, 'isatty', None)
  quiet = jax.process_index() != 0 or not (isatty and isatty())
  return tqdm.tqdm(total=total, initial=initial, desc=what, unit=unit, file=sys.stdout,
                   disable=quiet, dynamic_ncols=True)


def persistent_cache_in_use() -> bool:
  """Whether JAX keeps compiled programs in a persistent cache (launch.py's default)."""
  return bool(jax.config.jax_compilation_cache_dir)


@jax.custom_batching.custom_vmap
def _slowest(fraction: jax.Array) -> jax.Array:
  """`fraction`, reduced by min over any vmap-ed axes (the slowest example's)."""
  return fraction


@_slowest.def_vmap
def _slowest_vmap(axis_size, in_batched, fraction):
  del axis_size
  return _slowest(jnp.min(fraction, axis=0) if in_batched[0] else fraction), False


class ShardProgress:
  """Progress inside a shard whose work is one compiled program, on the job's bar.

  The job builds its program from `track(score_model_fn)`: each score evaluation
  then reports, by a host callback, the fraction of the way from t_start to t_end
  (e.g. T -> eps for a sampler, eps -> T for the likelihood ODE) that the slowest
  example of the batch has covered, and `run` moves the bar by that share of the
  shard's rows.

  JAX keeps no program with a host callback in its persistent compilation cache.
  So the callback is compiled in only where a bar shows (`shows_progress`) and it
  costs no cache hit: always for a program that is never kept anyway
  (`kept_in_cache=False`: diffrax solves, whose error checks are host callbacks
  already), and for one that would be kept (the samplers) only when no persistent
  cache is in use. Otherwise `track` returns the score function itself, and the
  program and its numbers are exactly those of a job without progress.
  """

  def __init__(self, t_start: float, t_end: float, *, kept_in_cache: bool = True,
               enabled: bool | None = None):
    self.t_start, self.t_end = float(t_start), float(t_end)
    if enabled is None:
      enabled = shows_progress() and not (kept_in_cache and persistent_cache_in_use())
    self.enabled = bool(enabled)
    self._lock = threading.Lock()
    self._bar, self._rows, self._shown = None, 0, 0

  def track(self, score_model_fn: Callable) -> Callable:
    """score_model_fn(params, x, t [B]) reporting its progress (itself when disabled)."""
    if not self.enabled:
      return score_model_fn
    start, span = self.t_start, self.t_end - self.t_start

    def tracked(params, x, t):
      fraction = (jnp.asarray(t, jnp.float32) - start) / span
      jax.debug.callback(self._report, _slowest(jnp.min(fraction)))
      return score_model_fn(params, x, t)

    return tracked

  def _report(self, fraction) -> None:        # on a runtime thread, during a shard
    with self._lock:
      if self._bar is None:
        return
      rows = int(self._rows * min(max(float(fraction), 0.0), 1.0))
      if rows > self._shown:                 # never backwards (rejected ODE steps)
        self._bar.update(rows - self._shown)
        self._shown = rows

  def begin(self, bar: tqdm.tqdm, rows: int) -> None:
    """Reports go to `bar` for a shard of `rows` rows."""
    with self._lock:
      self._bar, self._rows, self._shown = bar, int(rows), 0

  def end(self) -> int:
    """Stops reporting; returns the rows already shown for this shard."""
    with self._lock:
      self._bar, shown = None, self._shown
    return shown


def save_shard(out_dir: str, shard: int, arrays: dict) -> str:
  """Writes shard_<shard>.npz atomically."""
  return io.savez_atomic(shard_path(out_dir, shard), **arrays)


def remove_stale_temporaries(out_dir: str) -> list[str]:
  """Deletes the temporary files of atomic writes (io's .<name>.<pid>.tmp) that a killed
  writer left in a job folder, and returns their names. Call it holding the folder's
  lock: no other process is writing there then."""
  stale = sorted(name for name in os.listdir(out_dir)
                 if name.startswith('.') and name.endswith('.tmp'))
  for name in stale:
    os.remove(os.path.join(out_dir, name))
  return stale


def check_folder_name(name: str, flag: str = '--tag') -> str:
  """A job's folder name under the workdir: a plain name, so results stay inside it."""
  if (not name or name in ('.', '..') or name.startswith('.')
      or any(sep in name for sep in ('/', '\\', os.sep))):
    raise ValueError(f'{flag} {name!r} must be a plain folder name (letters, digits, _ - .; '
                     f'no path separators, not starting with "."): results stay inside the '
                     f'workdir.')
  return name


def run(job: Job, compute: Callable[[int], tuple[dict, dict]],
        progress: ShardProgress | None = None) -> dict:
  """Computes the job's missing shards with compute(s) -> (arrays, info); returns the
  manifest. Call it on every process (compute may run sharded programs). One
  writer per output folder: a second job on the same folder stops at once
  (`locks.WorkdirLockedError`). `progress`: the ShardProgress that compute's
  program reports to, if any (the bar then moves inside each shard)."""
  os.makedirs(job.out_dir, exist_ok=True)
  with locks.hold_for_all(job.out_dir, f'{job.what} job'):
    return _run_locked(job, compute, progress)


def _run_locked(job: Job, compute: Callable[[int], tuple[dict, dict]],
                progress: ShardProgress | None) -> dict:
  manifest = open_manifest(job)
  todo = missing_shards(job)
  main = jax.process_index() == 0
  if main:
    remove_stale_temporaries(job.out_dir)
    print(f'{job.title}: {job.num_shards} shard(s) of {job.shard_size}, '
          f'{job.num_shards - len(todo)} already done.', flush=True)
  if todo:
    total = sum(job.rows_in(s) for s in range(job.num_shards))
    with progress_bar(total, total - sum(job.rows_in(s) for s in todo), job.what,
                      job.unit) as bar:
      for shard in todo:
        rows = job.rows_in(shard)
        if progress is not None:
          progress.begin(bar, rows)
        try:
          arrays, info = compute(shard)
        finally:
          shown = progress.end() if progress is not None else 0
        manifest['shards'][str(shard)] = info
        if main:          # the info first: a file means a finished shard
          io.atomic_json(job.manifest_path, manifest)
          save_shard(job.out_dir, shard, arrays)
        if 'nfe' in info:
          bar.set_postfix(NFE=info['nfe'], refresh=False)
        bar.update(rows - shown)
  if main:
    io.atomic_json(job.manifest_path, manifest)
  parallel.barrier(f'score_sde job {job.out_dir}')   # every file written before reading
  return manifest


def load_shards(job: Job) -> list[dict]:
  """The arrays of every shard, in order."""
  return [io.load_npz(shard_path(job.out_dir, s)) for s in range(job.num_shards)]
