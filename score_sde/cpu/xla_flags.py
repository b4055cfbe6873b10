"""XLA:CPU compiler flags that this project's models measurably run or compile faster with.

`apply_default_flags` adds them to XLA_FLAGS before JAX starts its backend:
the launcher and the benchmarks call it through `process.prepare()`, the test
conftest directly, so they all compile the same way (importing score_sde sets
nothing). They are meant for CPU runs and are left out unless JAX will run on
the CPU alone (every JAX_PLATFORMS entry is cpu, or no GPU/TPU plugin is
installed). A flag the user already set in XLA_FLAGS wins, a flag file named
by XLA_FLAGS is left alone, SCORE_SDE_XLA_DEFAULTS=0 turns them all off, and
they are only set for the jaxlib versions they were checked with (XLA aborts
on an unknown flag). The figures in the comments are step-time medians and
compile-time ranges on the 2-core CPU this project is developed on
(benchmarks/train.py, batch 8, 32x32x3, jax 0.10.2).

One more option is given per program rather than process-wide:
`compile_step` / `jit_step` compile the flat form of the train and eval steps
(train.py, the CPU backend's) with STEP_COMPILER_OPTIONS (YNNPACK elementwise
fusions), under the same conditions, and check the result (see the comment
there). The tree form of the step is compiled with plain jax.jit.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import pkgutil
import re
import sys
from typing import Any, Callable

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

# The train and eval steps' elementwise fusions run as YNNPACK library calls
# instead of one generated LLVM kernel each. The list replaces the flag's
# whole list: XLA's defaults (individual dots, reductions, individual
# convolutions) without the convolutions (Eigen, above) and with elementwise
# fusions. Lower + compile, alternating runs (README, Speed): small NCSN++
# train step 8.9-10.5 -> 6.1-7.8 s, paper config 24.3-24.8 -> 14.9-18.9 s,
# digits DDPM++ 11.3 -> 5.6-6.8 s, with step times within run-to-run spread.
# Per program, not process-wide: this XLA puts an array that a LAPACK call
# wants column-major (a batched Cholesky in the controllable-generation
# samplers) into such a fusion and then fails at run time ("Instruction with
# unsupported layout in YNN fusion"), so `compile_step` checks each compiled
# step and compiles it again without the option if needed.
LIBRARY_FUSION_OPTION = 'xla_cpu_experimental_ynn_fusion_type'
STEP_COMPILER_OPTIONS: dict[str, str] = {
    LIBRARY_FUSION_OPTION: 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE,'
                           'LIBRARY_FUSION_TYPE_ELTWISE',
}
# YNNPACK's largest tensor rank (YNN_MAX_TENSOR_RANK in jaxlib 0.10.2); XLA
# fuses larger arrays too and then fails at run time like a column-major one.
LIBRARY_FUSION_MAX_RANK = 8
# Names of the DEFAULT_FLAGS that apply_default_flags put into XLA_FLAGS (the
# environment carries it to restarted and child processes), so a value the
# user set themselves is told apart from ours.
ADDED_FLAGS_VARIABLE = 'SCORE_SDE_XLA_FLAGS_ADDED'

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
        '(%s); see score_sde/cpu/xla_flags.py.', version, ', '.join(CHECKED_JAXLIB_VERSIONS))
    return False
  updated = with_default_flags(current)
  if updated == current.strip():
    return False
  present = _flag_values(current)
  environ[ADDED_FLAGS_VARIABLE] = ','.join(name for name in DEFAULT_FLAGS if name not in present)
  environ['XLA_FLAGS'] = updated
  return True


def _flag_values(xla_flags: str) -> dict[str, str]:
  """{name: value} of the --name=value items in an XLA_FLAGS string."""
  items = (item.lstrip('-').split('=', 1) for item in xla_flags.split())
  return {item[0]: item[1] if len(item) > 1 else '' for item in items}


def step_compiler_options(environ=os.environ) -> dict[str, str]:
  """STEP_COMPILER_OPTIONS where they apply, else {}.

  They apply unless opted out (SCORE_SDE_XLA_DEFAULTS=0), when JAX runs on
  the CPU alone, for the checked jaxlib versions, and when XLA_FLAGS is not a
  flag file and does not set the library-fusion flag itself: a value that
  apply_default_flags added (named in SCORE_SDE_XLA_FLAGS_ADDED) is ours, any
  other is the user's and wins. Unlike the process-wide flags, they also
  apply when JAX started before `apply_default_flags` ran.
  """
  if switched_off(environ, OPT_OUT_VARIABLE) or not runs_on_cpu(environ):
    return {}
  if jaxlib_version() not in CHECKED_JAXLIB_VERSIONS:
    return {}
  current = environ.get('XLA_FLAGS', '').strip()
  if current and not current.startswith('-'):
    return {}
  if LIBRARY_FUSION_OPTION in _flag_values(current):
    ours = environ.get(ADDED_FLAGS_VARIABLE, '').split(',')
    if LIBRARY_FUSION_OPTION not in ours:
      return {}
  return dict(STEP_COMPILER_OPTIONS)


_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) \(.*\{$')
_LIBRARY_FUSION_CALL = re.compile(r'calls=%([\w.\-]+).*"kind":"__ynn_fusion"')
_ARRAY_LAYOUT = re.compile(r'\b(?:pred|[a-z]+\d+)\[([\d,]*)\]\{([\d,]*)\}')


def hlo_computations(hlo_text: str) -> dict[str, list[str]]:
  """{computation name: its instruction lines, stripped} of HLO text (ENTRY included)."""
  bodies: dict[str, list[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    stripped = line.strip()
    match = _COMPUTATION.match(stripped)
    if match:
      current = bodies.setdefault(match.group(1), [])
    elif stripped == '}':
      current = None
    elif current is not None:
      current.append(stripped)
  return bodies


def unsupported_library_fusion_layouts(hlo_text: str) -> list[str]:
  """The instructions of YNNPACK fusions in compiled HLO text that YNNPACK rejects.

  YNNPACK takes row-major arrays of rank <= LIBRARY_FUSION_MAX_RANK only:
  every array inside such a fusion must have the descending layout
  {n-1, ..., 0}. Returns the offending HLO lines, and the fusion's line if its
  computation is not found in the text (empty when the program can run).
  """
  bodies = hlo_computations(hlo_text)
  bad = []
  for line in hlo_text.splitlines():
    call = _LIBRARY_FUSION_CALL.search(line)
    if call is None:
      continue
    if call.group(1) not in bodies:
      bad.append(line.strip())
      continue
    for instruction in bodies[call.group(1)]:
      for dims, layout in _ARRAY_LAYOUT.findall(instruction.split(', metadata=')[0]):
        rank = len(dims.split(',')) if dims else 0
        descending = [int(d) for d in layout.split(',')] if layout else []
        if rank > LIBRARY_FUSION_MAX_RANK or (
            rank and descending != list(range(rank - 1, -1, -1))):
          bad.append(instruction)
          break
  return bad


def compile_step(jitted, *args, options: dict[str, str] | None = None):
  """(jitted.lower(*args) compiled, the compiler options it was compiled with).

  The options are `step_compiler_options()` unless given. If the program
  compiled with them holds a YNNPACK fusion that would fail at run time
  (`unsupported_library_fusion_layouts`), it is compiled again without them
  (logged) and the options returned are {}. The program is a
  jax.stages.Compiled.
  """
  lowered = jitted.lower(*args)
  options = step_compiler_options() if options is None else dict(options)
  if not options:
    return lowered.compile(), {}
  compiled = lowered.compile(options)
  bad = unsupported_library_fusion_layouts(compiled.as_text())
  if not bad:
    return compiled, options
  logging.getLogger('score_sde').warning(
      'score_sde: %s compiled a second time, without %s: YNNPACK cannot take %s',
      getattr(jitted, '__name__', 'a step'), sorted(options), bad[0][:200])
  return lowered.compile(), {}


def jit_step(fun: Callable, **jit_kwargs: Any) -> Callable:
  """jax.jit(fun, **jit_kwargs) whose programs are built by `compile_step`.

  Each distinct signature (tree structure, shapes, dtypes, weak types and
  shardings of the arguments) is lowered and compiled once, at its first
  call. For programs called many times with the same shapes (train and eval
  steps): positional array arguments only, no static arguments.
  """
  import jax
  static = sorted(k for k in ('static_argnums', 'static_argnames') if jit_kwargs.get(k))
  if static:
    raise ValueError(f'jit_step takes array arguments only; got {", ".join(static)}. '
                     'Use jax.jit for a function with static arguments.')
  jitted = jax.jit(fun, **jit_kwargs)
  compiled: dict[Any, Any] = {}

  def signature(args):
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((getattr(x, 'shape', None), getattr(x, 'dtype', type(x)),
                           getattr(x, 'weak_type', False), getattr(x, 'sharding', None))
                          for x in leaves)

  def call(*args):
    key = signature(args)
    if key not in compiled:
      compiled[key], _ = compile_step(jitted, *args)
    return compiled[key](*args)

  call.jitted = jitted
  return call
