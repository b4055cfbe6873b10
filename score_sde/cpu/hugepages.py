"""Transparent huge pages for XLA:CPU's per-call buffers (Linux with glibc >= 2.35).

XLA:CPU allocates each call's temporary buffer afresh and frees it afterwards.
glibc serves blocks that large with mmap and returns them with munmap, so every
train step touches its whole temporary buffer in new 4 KiB pages: 31 k page
faults per step (126 MB) for the small NCSN++ of benchmarks/train.py, 329 k
(1.35 GB) for the paper NCSN++ config. glibc's tunable glibc.malloc.hugetlb=1
marks those mappings for transparent huge pages (2 MiB), which the kernel
honours when its THP mode is `madvise`: ~1 k faults per step. On this
project's 2-core machine (2026-11-29) that took the small NCSN++ step from
0.203-0.223 to 0.163-0.174 s and the paper config from 3.83-4.34 to
3.59-3.68 s, its compile from 39 to 35 s (two alternating pairs of runs each).

glibc reads tunables only when a process starts, so `launch.py` re-executes
itself once with the tunable added: same PID, arguments and environment
otherwise. SCORE_SDE_HUGEPAGES=0 turns that off. Scripts of your own get the
same by starting Python with GLIBC_TUNABLES=glibc.malloc.hugetlb=1.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Mapping

from score_sde.cpu import xla_flags

TUNABLE = 'glibc.malloc.hugetlb'
THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'
OPT_OUT = 'SCORE_SDE_HUGEPAGES'
RESTARTED = 'SCORE_SDE_HUGEPAGES_RESTARTED'   # set for the restarted process: at most one restart


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
  """The kernel's transparent-huge-page mode: 'always', 'madvise', 'never', or None."""
  try:
    with open(path) as f:
      match = re.search(r'\[(\w+)\]', f.read())
  except OSError:
    return None
  return match.group(1) if match else None


def _glibc_has_tunable() -> bool:
  """Whether the running C library is glibc >= 2.35 (the version that added the tunable)."""
  try:
    running = os.confstr('CS_GNU_LIBC_VERSION') or ''    # e.g. 'glibc 2.36'
  except (AttributeError, ValueError, OSError):           # not glibc, or no confstr
    return False
  name, _, version = running.partition(' ')
  numbers = tuple(int(part) for part in re.findall(r'\d+', version)[:2])
  return name == 'glibc' and numbers >= (2, 35)


def tunable_would_help() -> bool:
  """True on Linux with glibc >= 2.35 when the kernel gives huge pages only on request."""
  return sys.platform.startswith('linux') and _glibc_has_tunable() and thp_mode() == 'madvise'


def environ_with_huge_pages(environ: Mapping[str, str],
                            would_help: bool | None = None) -> dict[str, str]:
  """A copy of `environ` whose GLIBC_TUNABLES asks for huge pages, where that helps.

  Unchanged when the tunable would not help (see `tunable_would_help`), when
  SCORE_SDE_HUGEPAGES is 0 / false / no / off, or when GLIBC_TUNABLES already
  sets it (either way).
  """
  environ = dict(environ)
  if would_help is None:
    would_help = tunable_would_help()
  tunables = environ.get('GLIBC_TUNABLES', '')
  already_set = any(item.split('=', 1)[0] == TUNABLE for item in tunables.split(':'))
  if not would_help or xla_flags.switched_off(environ, OPT_OUT) or already_set:
    return environ
  environ['GLIBC_TUNABLES'] = f'{tunables}:{TUNABLE}=1' if tunables else f'{TUNABLE}=1'
  return environ


def reexec_with_huge_pages(would_help: bool | None = None) -> None:
  """Restarts this Python process with the tunable when it is missing and would help.

  Call it first thing in a command-line entry point: the process is replaced
  (os.execve: same PID, arguments and interpreter options), so nothing done
  before survives. Restarts at most once (a loader that drops GLIBC_TUNABLES
  cannot cause a loop) and carries on unchanged if the restart fails.
  """
  if os.environ.get(RESTARTED) or not sys.executable or not xla_flags.runs_on_cpu():
    return                              # XLA:CPU's buffers only: pointless on GPU / TPU
  environ = environ_with_huge_pages(os.environ, would_help)
  if environ.get('GLIBC_TUNABLES') == os.environ.get('GLIBC_TUNABLES'):
    return
  environ[RESTARTED] = '1'
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, sys.orig_argv, environ)
  except OSError:
    pass                                # run on without huge pages
