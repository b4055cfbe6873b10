"""JAX's persistent compilation cache for the launcher: a run reloads the XLA
programs an earlier run with the same shapes, config and JAX version compiled.

Tracing and lowering remain; the XLA compile is what is saved (README, 'Speed on
this machine', has the figures measured with benchmarks/train.py).
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

DEFAULT_DIR = os.path.join('~', '.cache', 'score_sde', 'xla')
# Programs compiling faster than this are not worth a file.
MIN_COMPILE_SECONDS = 1.0


def cache_dir(flag_value: Optional[str], environ: Mapping[str, str] = os.environ) -> Optional[str]:
  """The folder to use: the flag, else $JAX_COMPILATION_CACHE_DIR, else DEFAULT_DIR; 'none' -> None."""
  value = flag_value if flag_value is not None else environ.get('JAX_COMPILATION_CACHE_DIR')
  if value is None:
    value = DEFAULT_DIR
  if value.strip().lower() in ('', 'none', 'off'):
    return None
  return os.path.abspath(os.path.expanduser(value))


def enable(flag_value: Optional[str]) -> Optional[str]:
  """Points JAX's persistent cache at cache_dir(flag_value); returns the folder (None: off)."""
  import jax
  folder = cache_dir(flag_value)
  if folder is None:
    return None
  os.makedirs(folder, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', folder)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_SECONDS)
  return folder
