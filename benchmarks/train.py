"""Train-step benchmark: prints one JSON object per (config, device count).

  python benchmarks/train.py --config configs/digits/ddpmpp_continuous.py \
      --config configs/ve/cifar10_ncsnpp_continuous.py --batch 8 --devices 1 --devices 2

Measures, in one run: the machine's float32 matmul rate (2048^2 jitted matmul),
then per config the XLA-counted flops of one train step (DSM loss, Adam,
clipping, EMA: exactly `train.make_train_step` in the form the launcher runs,
`train.param_layout`, reported as `param_layout`: flat parameter vectors on
the CPU backend; `--param_layout tree` measures the parameter-tree form), its
compile time, the median step time after warm-up, steps/s, examples/s,
achieved GFLOP/s and its fraction of the measured peak, and the peak RSS.
`--jitted_steps n` measures n steps unrolled into one program instead
(`train.make_multi_step`: what the launcher compiles for
config.training.n_jitted_steps = n with training.unroll_jitted_steps); times
and flops are then per step, compile time for the whole program. Each device
count runs in a fresh process (XLA_FLAGS must be set before JAX starts); the
global batch is split over the simulated devices. The workers apply
score_sde's XLA:CPU flags before JAX starts, as launch.py does
(score_sde/cpu/xla_flags.py; reported as `xla_flags`), and compile the flat
step with the per-program options the launcher gives it
(`step_compiler_options`; the tree form is plain jax.jit: {});
SCORE_SDE_XLA_DEFAULTS=0 measures without either. Like launch.py, the workers
start with glibc's huge-page tunable where it helps (score_sde/cpu/hugepages.py;
reported as `glibc_tunables`, with the page faults per step);
SCORE_SDE_HUGEPAGES=0 measures without it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def matmul_gflops(n: int = 2048, repeats: int = 20) -> float:
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  times.sort()
  return 2 * n ** 3 / times[len(times) // 2] / 1e9


def _apply_overrides(config, overrides):
  import ast
  for item in overrides:
    key, value = item.split('=', 1)
    node = config
    *path, last = key.split('.')
    for part in path:
      node = node[part]
    try:
      node[last] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[last] = value


def build_train_step(config_path: str, batch: int, overrides, jitted_steps: int = 1,
                     param_layout: str | None = None):
  """(compiled train step, its state, its input, mesh, compile seconds, compiler options,
  the step's form 'flat' or 'tree').

  Compiled as the launcher compiles it: the flat form by `xla_cpu.compile_step`
  (as `xla_flags.jit_step` in the loop), the tree form by plain jax.jit; the
  compile seconds are lowering plus compiling, and the options those it
  compiled with.

  The step is exactly `train.make_train_step` with the config's loss and
  optimiser on the state of `train.param_layout(config)` (param_layout, when
  given, overrides config.training.param_layout): `flat_state.FlatTrainState`
  or `experiment.TrainState`, replicated, with the batch split over the mesh.
  With jitted_steps n > 1 it is the launcher's `train.make_multi_step` of n
  steps, and the input is n batches [n, B, ...].
  """
  import jax
  import numpy as np
  sys.path.insert(0, ROOT)
  import configs
  from score_sde import experiment as experiment_lib
  from score_sde import parallel, train
  from score_sde.cpu import flat_state
  from score_sde.cpu import xla_flags as xla_cpu
  from score_sde.models import utils as model_utils

  config = configs.load(config_path)
  _apply_overrides(config, overrides)
  config.training.batch_size = batch
  if param_layout is not None:
    config.training.param_layout = param_layout
  layout = train.param_layout(config)
  mesh = parallel.make_mesh()
  experiment = experiment_lib.build_experiment(config)
  optimizer, schedule = experiment_lib.get_optimizer(config)
  loss_fn, _ = train.loss_fns(config, experiment)      # the loop's loss (a flow's too)
  step_fn = train.make_train_step(loss_fn, optimizer, schedule,
                                  ema_rate=float(config.model.ema_rate))
  replicated = parallel.replicated(mesh)
  _, init = experiment_lib.abstract_train_state(experiment, optimizer, mesh)
  to_form = ((lambda tree: flat_state.flatten_state(tree, optimizer)) if layout == 'flat'
             else (lambda tree: tree))
  state = jax.jit(lambda key: to_form(init(key)),            # as the loop runs
                  out_shardings=replicated)(jax.random.PRNGKey(0))
  shape = model_utils.input_shape(config, batch)
  x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
  x_sharding = parallel.batch_sharding(mesh)
  if jitted_steps > 1:                 # as train.make_train_calls(..., unroll=True)
    step_fn = train.make_multi_step(step_fn, jitted_steps)
    x = np.stack([x] * jitted_steps)
    x_sharding = parallel.batch_sharding(mesh, batch_axis=1)
  x = jax.device_put(x, x_sharding)
  jitted = jax.jit(step_fn, in_shardings=(replicated, x_sharding),
                   out_shardings=(replicated, replicated), donate_argnums=(0,))
  t = time.perf_counter()
  if layout == 'flat':                 # as xla_cpu.jit_step in the loop (train.step_jit)
    compiled, options = xla_cpu.compile_step(jitted, state, x)
  else:                                # plain jax.jit
    compiled, options = jitted.lower(state, x).compile(), {}
  return compiled, state, x, mesh, time.perf_counter() - t, options, layout


def measure(config_path: str, batch: int, steps: int, overrides, jitted_steps: int = 1,
            param_layout: str | None = None) -> dict:
  """Per-step figures; with jitted_steps n, each call runs n steps and is divided by n."""
  import jax
  import numpy as np
  compiled, state, x, mesh, compile_s, options, layout = build_train_step(
      config_path, batch, overrides, jitted_steps, param_layout)
  from score_sde.models import utils as model_utils
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = (float(cost.get('flops', 0.0)) * mesh.devices.size   # XLA counts one device's share
           / jitted_steps)
  for _ in range(2):
    state, metrics = compiled(state, x)
  jax.block_until_ready(metrics)
  times = []
  faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, x)
    jax.block_until_ready(metrics)
    times.append((time.perf_counter() - t) / jitted_steps)
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
  median = float(np.median(times))
  return {
      'config': os.path.relpath(config_path, ROOT), 'overrides': list(overrides),
      'params': model_utils.param_count(state.params), 'batch': batch, 'param_layout': layout,
      'devices': mesh.devices.size, 'jitted_steps': jitted_steps, 'gflop_per_step': flops / 1e9,
      'compile_s': round(compile_s, 3), 'step_s_median': median,
      'steps_per_s': 1.0 / median, 'examples_per_s': batch / median,
      'achieved_gflops': flops / median / 1e9,
      'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      'page_faults_per_step': faults / (steps * jitted_steps),
      'loss': float(np.ravel(metrics['loss'])[-1]), 'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'step_compiler_options': options,
      'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', action='append', required=True)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--steps', type=int, default=10, help='timed calls after 2 warm-up calls')
  parser.add_argument('--jitted_steps', type=int, default=1,
                      help='steps unrolled into one program (training.unroll_jitted_steps)')
  parser.add_argument('--devices', type=int, action='append')
  parser.add_argument('--override', action='append', default=[],
                      help='key=value applied to every config, e.g. model.nf=32')
  parser.add_argument('--param_layout', choices=('auto', 'tree', 'flat'), default=None,
                      help="the train step's form (training.param_layout); default: the "
                           "config's ('auto': flat on the CPU backend, as the launcher runs)")
  parser.add_argument('--_worker', nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args._worker:                     # one measurement in this (fresh) process
    sys.path.insert(0, ROOT)
    from score_sde.cpu import xla_flags
    xla_flags.apply_default_flags()    # before JAX starts, as launch.py does
    peak = float(args._worker[1])
    for path in args.config:
      result = measure(path, args.batch, args.steps, args.override, args.jitted_steps,
                       args.param_layout)
      result['machine_peak_gflops'] = peak
      result['fraction_of_peak'] = result['achieved_gflops'] / peak
      print(json.dumps(result), flush=True)
    return

  peak = matmul_gflops()
  print(json.dumps({'measurement': 'f32_matmul_2048', 'gflops': peak}), flush=True)
  sys.path.insert(0, ROOT)
  from score_sde.cpu import hugepages     # JAX has started: this import changes no XLA flags
  for devices in args.devices or [1]:
    user_flags = os.environ.get('XLA_FLAGS', '')
    env = hugepages.environ_with_huge_pages(dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=(
        f'{user_flags} --xla_force_host_platform_device_count={devices}').strip()))
    cmd = [sys.executable, os.path.abspath(__file__), '--batch', str(args.batch),
           '--steps', str(args.steps), '--jitted_steps', str(args.jitted_steps),
           '--_worker', str(devices), str(peak)]
    for path in args.config:
      cmd += ['--config', path]
    for item in args.override:
      cmd += ['--override', item]
    if args.param_layout:
      cmd += ['--param_layout', args.param_layout]
    subprocess.run(cmd, env=env, check=True)


if __name__ == '__main__':
  main()
