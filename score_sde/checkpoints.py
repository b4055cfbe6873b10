"""Orbax checkpoints of (train state, data-iterator position), written atomically.

One `CheckpointManager` under <workdir>/checkpoints. A step directory appears
only once fully written (orbax writes to a temporary directory and renames
it), so a run killed mid-save leaves at worst a temporary directory that is
ignored. Steps that are multiples of `keep_period` (the snapshot frequency)
are kept, and so are the steps a run was told to preserve (the ones that
existed when it started: a changed period never deletes them); of the others
only the newest survives (preemption checkpoints). When training restores,
steps newer than the newest one that restores are moved aside to
<workdir>/checkpoints_unreadable/ (never deleted or overwritten), so the run
can save those steps again; if no step restores, nothing is moved.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from score_sde import parallel

UNREADABLE_DIR = 'checkpoints_unreadable'


@contextlib.contextmanager
def _quiet_orbax():
  """Orbax's notices that mean nothing to a user ('Given directory is read only', ...)
  are absl warnings: held back to errors while a manager is made."""
  absl_logger = logging.getLogger('absl')
  level = absl_logger.level
  absl_logger.setLevel(max(level, logging.ERROR))
  try:
    yield
  finally:
    absl_logger.setLevel(level)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def existing_steps(workdir: str) -> list[int]:
  """The steps of the finished checkpoints in a workdir, ascending (no manager needed)."""
  directory = checkpoint_dir(workdir)
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(name) for name in names if name.isdigit())


def make_manager(workdir: str, *, keep_period: int | None = None, read_only: bool = False,
                 preserve_steps=()) -> ocp.CheckpointManager:
  """The experiment's checkpoint manager (async saves).

  Keeps the newest step, every multiple of `keep_period` and every step in
  `preserve_steps`.
  """
  policies = [checkpoint_managers.LatestN(1)]
  if keep_period:
    policies.append(checkpoint_managers.EveryNSteps(int(keep_period)))
  if len(preserve_steps):
    policies.append(checkpoint_managers.CustomSteps(steps=sorted(int(s) for s in preserve_steps)))
  with _quiet_orbax():
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=True)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                 item_names=('state', 'data'))


def _move_aside(manager: ocp.CheckpointManager, steps) -> list[str]:
  """Moves unreadable steps' directories to <workdir>/checkpoints_unreadable/ (renamed
  with the time, never overwritten; process 0 moves, every process then sees the
  new listing) and returns their new paths."""
  directory = str(manager.directory)
  target_dir = os.path.join(os.path.dirname(directory.rstrip('/')), UNREADABLE_DIR)
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S-%f')
  targets = [os.path.join(target_dir, f'{step}_{stamp}') for step in steps]
  if jax.process_index() == 0:
    os.makedirs(target_dir, exist_ok=True)
    for step, target in zip(steps, targets):
      os.replace(os.path.join(directory, str(step)), target)
  parallel.barrier(f'score_sde checkpoints moved aside in {directory}')
  manager.reload()
  return targets


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator=None) -> None:
  """Starts an asynchronous save of `state` (and the data iterator) at `step`."""
  items = {'state': ocp.args.StandardSave(state)}
  if data_iterator is not None:
    import grain          # only a training run (which has it) saves a data position
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items), force=True)


def has_data_position(manager: ocp.CheckpointManager, step: int) -> bool:
  """Whether the checkpoint at `step` stores the data iterator (imported ones do not)."""
  return os.path.isdir(os.path.join(str(manager.directory), str(step), 'data'))


class NoCheckpointError(FileNotFoundError):
  """No usable checkpoint in a workdir."""


def restore(manager: ocp.CheckpointManager, abstract_state, data_iterator=None,
            step: int | None = None, move_unreadable: bool = False):
  """(state, step) from `step` or the newest checkpoint that restores.

  A newest checkpoint that fails to restore (corrupt, truncated) is reported
  and the previous one is tried. With `move_unreadable` (training; call it on
  every process) the steps that failed are moved aside (`_move_aside`) once an
  older one has restored, so the resumed run can write them again; when no
  step restores nothing is moved. `abstract_state` gives shapes, dtypes and shardings (e.g.
  `jax.eval_shape` of the init function with shardings set). The data
  iterator, if given, is moved to the saved position in place.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None:
    if step not in steps:
      raise NoCheckpointError(f'no checkpoint at step {step} in {manager.directory}; '
                              f'available steps: {sorted(steps)}.')
    steps = [step]
  if not steps:
    raise NoCheckpointError(f'no checkpoint in {manager.directory}.')
  errors, failed = [], []
  for candidate in steps:
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None and has_data_position(manager, candidate):
      import grain
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    elif data_iterator is not None and jax.process_index() == 0:
      print(f'note: the checkpoint at step {candidate} holds no data-loader position (an '
            f'imported checkpoint); the data is read from its start.', flush=True)
    try:
      with _quiet_orbax():
        restored = manager.restore(candidate, args=ocp.args.Composite(**items))
    except Exception as error:  # orbax / tensorstore raise many types for bad files
      message = (f'checkpoint at step {candidate} in {manager.directory} could not be '
                 f'restored ({type(error).__name__}: {str(error).splitlines()[0][:300]})')
      logging.warning('%s; trying the previous one.', message)
      if jax.process_index() == 0:
        print(f'warning: {message}; trying the previous one.', flush=True)
      errors.append(message)
      failed.append(candidate)
      continue
    if move_unreadable and failed:
      for step_moved, target in zip(failed, _move_aside(manager, failed)):
        if jax.process_index() == 0:
          print(f'warning: the unreadable checkpoint at step {step_moved} was moved to '
                f'{target}.', flush=True)
    return restored['state'], candidate
  raise NoCheckpointError('no checkpoint could be restored:\n' + '\n'.join(errors))
