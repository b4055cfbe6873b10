"""Process set-up for XLA:CPU, called first thing by `launch.py` and the benchmark scripts.

Importing score_sde sets nothing; an entry point that wants this project's
XLA:CPU speed settings calls `prepare()` before JAX starts its backend. Both
steps do nothing unless JAX will run on the CPU alone (xla_flags.runs_on_cpu).
"""
from __future__ import annotations

from score_sde.cpu import hugepages
from score_sde.cpu import xla_flags


def prepare(restart_for_huge_pages: bool = True) -> None:
  """Adds the XLA:CPU flags to XLA_FLAGS, then (optionally) restarts the process once
  with glibc's huge-page tunable (hugepages.reexec_with_huge_pages), so the
  restarted process inherits the flags."""
  xla_flags.apply_default_flags()
  if restart_for_huge_pages:
    hugepages.reexec_with_huge_pages()
