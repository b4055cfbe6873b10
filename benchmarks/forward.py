"""Forward / forward+backward cost of the network of a config; prints one JSON object.

  python benchmarks/forward.py --config configs/ve/cifar10_ncsnpp_continuous.py --batch 8
  python benchmarks/forward.py --config configs/ve/cifar10_ncsnpp_continuous.py \
      --override model.nf=32 'model.ch_mult=(1, 2, 2)' model.num_res_blocks=1 \
      'model.attn_resolutions=(8,)'

Reported: parameter count; compile time of the jitted forward and of the jitted
forward+backward (gradient of a mean-square loss in training mode, dropout on);
their wall time per example (median over --repeats calls after compilation);
peak resident memory of the process (ru_maxrss, includes compilation).
Override values are Python literals (ast.literal_eval) or bare strings.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import pathlib
import platform
import resource
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from score_sde.cpu import process  # noqa: E402
from score_sde.models import get_model  # noqa: E402
from score_sde.models.utils import input_shape, param_count  # noqa: E402


def load_config(path: str):
  """`get_config()` of a config file given by path (repo-relative or absolute)."""
  file = pathlib.Path(path)
  if not file.is_absolute() and not file.exists():
    file = REPO / path
  if not file.exists():
    raise SystemExit(f'config file not found: {path}')
  spec = importlib.util.spec_from_file_location(f'_bench_config_{file.stem}', file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def apply_overrides(config, overrides):
  for item in overrides:
    if '=' not in item:
      raise SystemExit(f'--override expects key=value (e.g. model.nf=32); got {item!r}')
    key, raw = item.split('=', 1)
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    if isinstance(value, list):
      value = tuple(value)
    node[leaf] = value
  return config


def example_labels(config, batch: int):
  """Labels in the model's convention (sigma, noise index or timestep); values only matter little."""
  m = config.model
  if m.name == 'ncsnpp' and str(m.get('embedding_type', '')).lower() == 'fourier':
    return jnp.exp(jnp.linspace(np.log(m.sigma_min), np.log(m.sigma_max), batch))
  if m.get('scale_by_sigma', False) or m.name.startswith('ncsn'):
    return (jnp.arange(batch) * m.num_scales // batch).astype(jnp.int32)
  return jnp.linspace(0.0, 999.0, batch)


def median_time(fn, *args, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True, help='path of a config file with get_config()')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=5, help='timed calls after compilation')
  parser.add_argument('--override', nargs='+', action='extend', default=[],
                      metavar='KEY=VALUE', help='config overrides, e.g. model.nf=32')
  args = parser.parse_args(argv)

  config = apply_overrides(load_config(args.config), args.override)
  model = get_model(config)
  x = jax.random.uniform(jax.random.PRNGKey(0), input_shape(config, args.batch))
  labels = example_labels(config, args.batch)

  # Parameters ('rbg' key: cheap to compile; the values do not matter for timing).
  params = jax.jit(lambda k: model.init({'params': k}, x, labels, train=False)['params'])(
      jax.random.key(0, impl='rbg'))
  params = jax.block_until_ready(params)

  def forward(p, x, labels):
    return model.apply({'params': p}, x, labels, train=False)

  def loss(p, x, labels, key):
    out = model.apply({'params': p}, x, labels, train=True, rngs={'dropout': key})
    return jnp.mean(out.astype(jnp.float32) ** 2)

  key = jax.random.PRNGKey(1)
  start = time.perf_counter()
  forward_c = jax.jit(forward).lower(params, x, labels).compile()
  compile_forward = time.perf_counter() - start
  start = time.perf_counter()
  grad_c = jax.jit(jax.value_and_grad(loss)).lower(params, x, labels, key).compile()
  compile_grad = time.perf_counter() - start

  jax.block_until_ready(forward_c(params, x, labels))       # warm-up
  jax.block_until_ready(grad_c(params, x, labels, key))
  t_forward = median_time(forward_c, params, x, labels, repeats=args.repeats)
  t_grad = median_time(grad_c, params, x, labels, key, repeats=args.repeats)

  peak_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  result = {
      'config': args.config,
      'overrides': args.override,
      'model': config.model.name,
      'dtype': str(config.model.get('dtype', 'float32')),
      'input_shape': list(x.shape),
      'batch': args.batch,
      'param_count': param_count(params),
      'compile_forward_s': round(compile_forward, 3),
      'compile_forward_backward_s': round(compile_grad, 3),
      'forward_s_per_example': t_forward / args.batch,
      'forward_backward_s_per_example': t_grad / args.batch,
      'forward_s_per_batch': t_forward,
      'forward_backward_s_per_batch': t_grad,
      'repeats': args.repeats,
      'peak_rss_mb': round(peak_rss_kb / 1024, 1),
      'backend': jax.default_backend(),
      'devices': len(jax.devices()),
      'cpu_count': os.cpu_count(),
      'load_average_1min': round(os.getloadavg()[0], 2),
      'jax': jax.__version__,
      'python': platform.python_version(),
  }
  print(json.dumps(result))


if __name__ == '__main__':
  process.prepare(restart_for_huge_pages=False)   # XLA:CPU flags, as launch.py
  main()
