"""One writer per workdir: an advisory lock that the operating system drops with its holder.

`hold(workdir, what)` takes an exclusive `fcntl.flock` on `<workdir>/.lock`
for as long as the context lasts and records who holds it (command, host,
PID, start time) in that file. A second writer fails at once with a one-line
`WorkdirLockedError` naming the holder. A holder that is killed (even with
SIGKILL) leaves no stale lock: the kernel releases the lock with the process,
and the next writer simply takes it (the old record is overwritten).

Only process 0 of a multi-process run takes the lock (it is the one that
writes); `hold_for_all` tells every process whether it got it, so a refused
run stops on every process with the same error. flock is per machine: on a
network file system shared by several hosts it may not exclude writers on
other hosts.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket

import jax
import numpy as np

from score_sde import parallel

LOCK_FILE = '.lock'


class WorkdirLockedError(RuntimeError):
  """Another process is writing to the workdir."""


def _holder_text(path: str) -> str:
  try:
    with open(path) as f:
      holder = json.load(f)
    return (f"`{holder['what']}` (host {holder['host']}, PID {holder['pid']}, since "
            f"{holder['since']})")
  except (OSError, ValueError, KeyError):
    return 'another process'


@contextlib.contextmanager
def hold(workdir: str, what: str, *, active: bool = True):
  """Holds the workdir's lock for the `with` block; `what` names the writer (e.g. 'train').

  With active=False (processes other than 0) it does nothing.
  """
  if not active:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirLockedError(
          f'{workdir} is in use by {_holder_text(path)}; wait for it to finish or stop it, '
          f'then run this again (a killed holder releases the lock by itself).') from None
    record = {'what': what, 'host': socket.gethostname(), 'pid': os.getpid(),
              'since': datetime.datetime.now().isoformat(timespec='seconds')}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    yield
  finally:
    os.close(fd)                      # closing the descriptor releases the lock


@contextlib.contextmanager
def hold_for_all(workdir: str, what: str):
  """`hold` on process 0 for the `with` block; every process raises the same
  WorkdirLockedError when process 0 could not take the lock (none is left
  waiting in a collective)."""
  with contextlib.ExitStack() as stack:
    refused = None
    if jax.process_index() == 0:
      try:
        stack.enter_context(hold(workdir, what))
      except WorkdirLockedError as error:
        refused = error
    if jax.process_count() > 1:
      flag = parallel.broadcast_from_first(np.asarray(refused is not None, np.int32))
      if int(flag) and refused is None:
        refused = WorkdirLockedError(
            f'{workdir} is in use by another writer (process 0 could not take its lock); '
            f'wait for it to finish or stop it, then run this again.')
    if refused is not None:
      raise refused
    yield
