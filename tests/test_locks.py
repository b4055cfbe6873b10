"""One writer per workdir (score_sde/locks.py): a second writer is refused in one line, a
killed holder leaves no stale lock."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from score_sde import locks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_HOLDER = """
import sys, time
from score_sde import locks
with locks.hold(sys.argv[1], 'train'):
  print('held', flush=True)
  time.sleep(600)
"""


def _start_holder(workdir):
  holder = subprocess.Popen([sys.executable, '-c', _HOLDER, workdir], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                            text=True)
  assert holder.stdout.readline().strip() == 'held'
  return holder


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path):
  holder = _start_holder(str(tmp_path))
  try:
    with pytest.raises(locks.WorkdirLockedError,
                       match=rf'in use by `train` \(host .*, PID {holder.pid}, since .*\); '
                             r'wait for it to finish or stop it'):
      with locks.hold(str(tmp_path), 'sample'):
        pass
  finally:
    holder.kill()
    holder.wait()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
  holder = _start_holder(str(tmp_path))
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  with locks.hold(str(tmp_path), 'train'):              # taken at once
    assert str(os.getpid()) in open(tmp_path / locks.LOCK_FILE).read()


def test_the_lock_is_released_after_the_block_and_inactive_processes_skip_it(tmp_path):
  with locks.hold(str(tmp_path), 'train'):
    with locks.hold(str(tmp_path), 'train', active=False):   # process != 0: no lock
      pass
  start = time.time()
  with locks.hold(str(tmp_path), 'bpd'):
    pass
  assert time.time() - start < 5


def test_the_record_names_only_the_current_holder(tmp_path):
  # A shorter record must replace a longer one whole, or the file is no longer JSON and a
  # refused writer could not say who holds the workdir.
  with locks.hold(str(tmp_path), 'import_checkpoint --original=/a/very/long/path/checkpoint_26'):
    pass
  with locks.hold(str(tmp_path), 'bpd'):
    with open(tmp_path / locks.LOCK_FILE) as f:
      record = json.load(f)
    assert record['what'] == 'bpd' and record['pid'] == os.getpid()


def test_hold_for_all_refuses_when_the_lock_is_held(tmp_path):
  with locks.hold(str(tmp_path), 'train'):   # another open file: flock excludes it too
    with pytest.raises(locks.WorkdirLockedError, match=r'in use by `train` \(host'):
      with locks.hold_for_all(str(tmp_path), 'sample job'):
        pytest.fail('the body ran without the lock')
  with locks.hold_for_all(str(tmp_path), 'sample job'):
    with pytest.raises(locks.WorkdirLockedError, match=r'in use by `sample job`'):
      with locks.hold(str(tmp_path), 'train'):
        pass
