"""Checkpoints never destroy what a run made: an unreadable newest step is moved aside (and
may be written again), and steps a run was told to preserve survive a changed period."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

from score_sde import checkpoints


def _state(value):
  return {'w': jnp.full((3,), float(value)), 'step': jnp.asarray(value, jnp.int32)}


def _save(manager, *steps):
  for step in steps:
    checkpoints.save(manager, step, _state(step))
  manager.wait_until_finished()


def _truncate_every_file(directory):
  for folder, _, files in os.walk(directory):
    for name in files:
      with open(os.path.join(folder, name), 'wb') as f:
        f.write(b'garbage')


def test_an_unreadable_newest_step_is_moved_aside_and_can_be_written_again(tmp_path, capsys):
  workdir = str(tmp_path)
  manager = checkpoints.make_manager(workdir, keep_period=10)
  _save(manager, 10, 20)
  _truncate_every_file(os.path.join(checkpoints.checkpoint_dir(workdir), '20'))
  state, step = checkpoints.restore(manager, _state(0), move_unreadable=True)
  assert step == 10
  np.testing.assert_array_equal(state['w'], np.full(3, 10.0))
  out = capsys.readouterr().out
  assert 'checkpoint at step 20' in out and checkpoints.UNREADABLE_DIR in out
  moved = os.listdir(os.path.join(workdir, checkpoints.UNREADABLE_DIR))
  assert len(moved) == 1 and moved[0].startswith('20_')          # kept, not deleted
  assert sorted(manager.all_steps()) == [10]
  _save(manager, 20)                                             # the step can be saved again
  state, step = checkpoints.restore(manager, _state(0))
  assert step == 20 and float(state['w'][0]) == 20.0
  manager.close()


def test_read_only_restores_leave_an_unreadable_step_in_place(tmp_path):
  workdir = str(tmp_path)
  manager = checkpoints.make_manager(workdir, keep_period=5)
  _save(manager, 5, 6)
  manager.close()
  _truncate_every_file(os.path.join(checkpoints.checkpoint_dir(workdir), '6'))
  reader = checkpoints.make_manager(workdir, read_only=True)
  assert checkpoints.restore(reader, _state(0))[1] == 5
  assert checkpoints.existing_steps(workdir) == [5, 6]
  assert not os.path.exists(os.path.join(workdir, checkpoints.UNREADABLE_DIR))


@pytest.mark.parametrize('new_period,kept', [
    (None, [100, 200, 300, 360]),        # no period now: the preserved steps and the newest
    (1000, [100, 200, 300, 360]),
    (20, [100, 200, 300, 320, 340, 360]),
])
def test_preserved_steps_survive_a_changed_period(tmp_path, new_period, kept):
  workdir = str(tmp_path)
  manager = checkpoints.make_manager(workdir, keep_period=100)
  _save(manager, 50, 100, 150, 200, 250, 300, 320)
  assert checkpoints.existing_steps(workdir) == [100, 200, 300, 320]   # periodic + newest
  manager.close()
  preserve = [100, 200, 300]                    # what the earlier period kept
  manager = checkpoints.make_manager(workdir, keep_period=new_period, preserve_steps=preserve)
  _save(manager, 340, 360)
  assert checkpoints.existing_steps(workdir) == kept
  manager.close()


def test_when_no_step_restores_nothing_is_moved(tmp_path):
  # A failure that is not corruption (here: a state of another structure) hits every step:
  # training must stop with the steps in place, not empty checkpoints/ and start over.
  workdir = str(tmp_path)
  manager = checkpoints.make_manager(workdir, keep_period=10)
  _save(manager, 10, 20)
  other_structure = {'v': jnp.zeros((5,))}
  with pytest.raises(checkpoints.NoCheckpointError, match='no checkpoint could be restored'):
    checkpoints.restore(manager, other_structure, move_unreadable=True)
  assert checkpoints.existing_steps(workdir) == [10, 20]
  assert not os.path.exists(os.path.join(workdir, checkpoints.UNREADABLE_DIR))
  manager.close()


def test_a_step_asked_for_is_the_one_restored(tmp_path):
  workdir = str(tmp_path)
  manager = checkpoints.make_manager(workdir, keep_period=10)
  _save(manager, 10, 20)
  state, step = checkpoints.restore(manager, _state(0), step=10)
  assert step == 10 and int(state['step']) == 10
  np.testing.assert_array_equal(state['w'], np.full(3, 10.0))
  with pytest.raises(checkpoints.NoCheckpointError,
                     match=r'no checkpoint at step 15 .*available steps: \[10, 20\]'):
    checkpoints.restore(manager, _state(0), step=15)
  manager.close()


def test_a_step_made_unreadable_twice_is_moved_aside_twice_and_both_kept(tmp_path):
  workdir = str(tmp_path)
  manager = checkpoints.make_manager(workdir, keep_period=10)
  _save(manager, 10, 20)
  for _ in range(2):                          # within the same second
    _truncate_every_file(os.path.join(checkpoints.checkpoint_dir(workdir), '20'))
    assert checkpoints.restore(manager, _state(0), move_unreadable=True)[1] == 10
    _save(manager, 20)
  moved = sorted(os.listdir(os.path.join(workdir, checkpoints.UNREADABLE_DIR)))
  assert len(moved) == 2 and all(name.startswith('20_') for name in moved)
  assert checkpoints.restore(manager, _state(0))[1] == 20
  manager.close()


def test_the_data_position_is_restored_with_the_state(tmp_path):
  grain = pytest.importorskip('grain')

  def iterator():
    return iter(grain.MapDataset.range(100).shuffle(seed=3).to_iter_dataset())

  workdir = str(tmp_path)
  manager = checkpoints.make_manager(workdir, keep_period=1)
  data = iterator()
  for _ in range(7):
    next(data)
  _save(manager, 5)                           # a step without a data position: from the start
  checkpoints.save(manager, 7, _state(7), data)
  manager.wait_until_finished()
  following = [next(data) for _ in range(3)]
  fresh = iterator()
  state, step = checkpoints.restore(manager, _state(0), fresh)
  assert step == 7 and float(state['w'][0]) == 7.0
  assert [next(fresh) for _ in range(3)] == following
  assert checkpoints.has_data_position(manager, 7) and not checkpoints.has_data_position(manager, 5)
  from_start = iterator()
  checkpoints.restore(manager, _state(0), from_start, step=5)
  assert next(from_start) == next(iterator())
  manager.close()
