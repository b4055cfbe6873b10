"""XLA:CPU compiler flags that this project's models measurably run or compile faster with.

`import score_sde` adds them to XLA_FLAGS before JAX starts its backend, so
the launcher, scripts, benchmarks and tests all compile the same way. They
are meant for CPU runs and are left out unless JAX will run on the CPU alone
(every JAX_PLATFORMS entry is cpu, or no GPU/TPU plugin is installed). A
flag the user already set in XLA_FLAGS wins, a flag file named by XLA_FLAGS
is left alone, SCORE_SDE_XLA_DEFAULTS=0 turns them all off, and they are
only set for the jaxlib versions they were checked with (XLA aborts on an
unknown flag). The figures in the comments are medians on the 2-core CPU
this project is developed on (benchmarks/train.py, batch 8, 32x32x3, jax 0.10.2).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import pkgutil
import sys

DEFAULT_FLAGS: dict[str, str] = {
    # Convolutions through XLA's Eigen kernels, which use both cores, instead
    # of YNNPACK fusions, which ran each convolution up to ~128 channels on
    # one core (3x3, 64 -> 64 channels at 32x32, batch 8: 97 vs 170 GFLOP/s).
    # Small NCSN++ train step 0.23 -> 0.17 s, paper config 3.96 -> 3.62 s.
    'xla_cpu_experimental_ynn_fusion_type': '-individual_convolution',
    # LLVM -O1 for the generated elementwise kernels: small NCSN++ train-step
    # compile 13.1 -> 10.0 s with the same step time (-O0 doubles the step).
    # The kernels round differently in the last bits (e.g. 6e-6 after ~100
    # adaptive ODE steps, where -O2 builds for 1 and 4 devices agreed exactly).
    'xla_backend_optimization_level': '1',
}

OPT_OUT_VARIABLE = 'SCORE_SDE_XLA_DEFAULTS'
# XLA aborts the process on a flag it does not know, and experimental flags
# come and go between releases: the defaults are only set for jaxlib versions
# they were checked with (requirements.txt pins one of them).
CHECKED_JAXLIB_VERSIONS = ('0.10.2',)


def switched_off(environ, variable: str) -> bool:
  """Whether environment variable `variable` is 0 / false / no / off (unset: on)."""
  return environ.get(variable, '1').strip().lower() in ('0', 'false', 'no', 'off')


def jaxlib_version() -> str | None:
  """The installed jaxlib's version, without importing it (None if not installed)."""
  from importlib import metadata
  try:
    return metadata.version('jaxlib')
  except metadata.PackageNotFoundError:
    return None


def with_default_flags(xla_flags: str, defaults: dict[str, str] = DEFAULT_FLAGS) -> str:
  """`xla_flags` plus every default flag it does not set itself (its own values win)."""
  present = {item.lstrip('-').split('=', 1)[0] for item in xla_flags.split()}
  extra = [f'--{name}={value}' for name, value in defaults.items() if name not in present]
  return ' '.join([xla_flags.strip()] + extra).strip()


def accelerator_plugin_installed() -> bool:
  """True when a JAX GPU/TPU plugin is installed (JAX would then not run on the CPU only).

  JAX finds plugins as modules of the `jax_plugins` namespace package and as
  `jax_plugins` entry points; libtpu is found on its own.
  """
  from importlib import metadata
  if importlib.util.find_spec('libtpu') is not None:
    return True
  if list(metadata.entry_points(group='jax_plugins')):
    return True
  spec = importlib.util.find_spec('jax_plugins')
  if spec is None or not spec.submodule_search_locations:
    return False
  return any(True for _ in pkgutil.iter_modules(list(spec.submodule_search_locations)))


def runs_on_cpu(environ=os.environ) -> bool:
  """Whether JAX will run on the CPU alone: every JAX_PLATFORMS entry is cpu, or no plugin."""
  platforms = [p.strip() for p in environ.get('JAX_PLATFORMS', '').split(',') if p.strip()]
  if platforms:
    return all(p == 'cpu' for p in platforms)
  return not accelerator_plugin_installed()


def _backend_started() -> bool:
  if 'jax' not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):   # a JAX without this helper: assume it may have
    return True


def apply_default_flags(environ=os.environ) -> bool:
  """Adds DEFAULT_FLAGS to environ['XLA_FLAGS'] when they can still take effect.

  Returns whether XLA_FLAGS was changed. Does nothing when opted out, when
  XLA_FLAGS names a flag file, when JAX will not run on the CPU alone, when
  JAX's backend has already started (XLA reads its flags once, at start-up),
  or (with a warning) when the jaxlib version is not one the flags were
  checked with.
  """
  if switched_off(environ, OPT_OUT_VARIABLE):
    return False
  current = environ.get('XLA_FLAGS', '')
  if current.strip() and not current.strip().startswith('-'):
    return False                      # XLA reads a value not starting with '-' as a flag file
  if not runs_on_cpu(environ) or _backend_started():
    return False
  version = jaxlib_version()
  if version not in CHECKED_JAXLIB_VERSIONS:
    if environ.get('SCORE_SDE_HUGEPAGES_RESTARTED'):   # hugepages.RESTARTED: warned before
      return False
    logging.getLogger('score_sde').warning(
        'score_sde: XLA:CPU speed flags not set: jaxlib %s is not one they were checked with '
        '(%s); see score_sde/xla_cpu.py.', version, ', '.join(CHECKED_JAXLIB_VERSIONS))
    return False
  updated = with_default_flags(current)
  if updated == current.strip():
    return False
  environ['XLA_FLAGS'] = updated
  return True
