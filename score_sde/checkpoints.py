"""Orbax checkpoints of (train state, data-iterator position), written atomically.

One `CheckpointManager` under <workdir>/checkpoints. A step directory appears
only once fully written (orbax writes to a temporary directory and renames
it), so a run killed mid-save leaves at worst a temporary directory that is
ignored. Steps that are multiples of `keep_period` (the snapshot frequency)
are kept; of the others only the newest survives (preemption checkpoints).
"""
from __future__ import annotations

import logging
import os

import grain
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def make_manager(workdir: str, *, keep_period: int | None = None,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """The experiment's checkpoint manager (async saves)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=1, keep_period=keep_period, create=not read_only, read_only=read_only,
      cleanup_tmp_directories=not read_only, enable_async_checkpointing=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=('state', 'data'))


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator=None) -> None:
  """Starts an asynchronous save of `state` (and the data iterator) at `step`."""
  items = {'state': ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items), force=True)


class NoCheckpointError(FileNotFoundError):
  """No usable checkpoint in a workdir."""


def restore(manager: ocp.CheckpointManager, abstract_state, data_iterator=None,
            step: int | None = None):
  """(state, step) from `step` or the newest checkpoint that restores.

  A newest checkpoint that fails to restore (corrupt, truncated) is reported
  and the previous one is tried. `abstract_state` gives shapes, dtypes and
  shardings (e.g. `jax.eval_shape` of the init function with shardings set).
  The data iterator, if given, is moved to the saved position in place.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None:
    if step not in steps:
      raise NoCheckpointError(f'no checkpoint at step {step} in {manager.directory}; '
                              f'available steps: {sorted(steps)}.')
    steps = [step]
  if not steps:
    raise NoCheckpointError(f'no checkpoint in {manager.directory}.')
  errors = []
  for candidate in steps:
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = manager.restore(candidate, args=ocp.args.Composite(**items))
    except Exception as error:  # orbax / tensorstore raise many types for bad files
      message = (f'checkpoint at step {candidate} in {manager.directory} could not be '
                 f'restored ({type(error).__name__}: {str(error).splitlines()[0][:300]})')
      logging.warning('%s; trying the previous one.', message)
      print(f'warning: {message}; trying the previous one.', flush=True)
      errors.append(message)
      continue
    return restored['state'], candidate
  raise NoCheckpointError('no checkpoint could be restored:\n' + '\n'.join(errors))
