"""Cost of one score evaluation inside each sampler and the likelihood, relative
to one plain forward pass of the same network: one JSON object per config.

  python benchmarks/nfe_cost.py --config configs/digits/ddpmpp_continuous.py --batch 64
  python benchmarks/nfe_cost.py --config configs/ve/cifar10_ncsnpp_continuous.py --batch 8 \
      --override model.nf=32 --override model.ch_mult='(1,2,2)' ...

Randomly initialised parameters (the cost does not depend on the values). For
each path the compiled function runs once, then `--repeats` timed runs; the
median time is divided by the NFE the path reports:

  forward      score_fn(x, t) alone, jitted                       (the unit)
  pc           PC sampler, the config's predictor / corrector, --steps steps
  ode          probability-flow ODE, fixed-step Euler, --steps steps
  likelihood   augmented ODE with a Hutchinson (Rademacher) divergence,
               fixed-step Euler, --steps steps (one JVP-vector product each)

The ratios (seconds per NFE / seconds per forward pass) show the per-step
overhead of a sampler (ideal 1.0) and the price of the divergence (a forward-mode
Jacobian-vector product from `jax.linearize`: about 2-3 forward passes).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _median_seconds(fn, repeats: int) -> tuple[float, object]:
  import jax
  out = jax.block_until_ready(fn())                 # compile + warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times), out


def measure(config_path: str, overrides: list[str], batch: int, steps: int,
            repeats: int) -> dict:
  import jax
  import jax.numpy as jnp

  import configs
  from benchmarks import train as train_benchmark
  from score_sde import likelihood
  from score_sde import sampling
  from score_sde import experiment as experiment_lib
  from score_sde.models import utils as model_utils

  config = configs.load(config_path)
  train_benchmark._apply_overrides(config, overrides)   # key=value, values as Python literals
  experiment = experiment_lib.build_experiment(config)
  params = model_utils.init_params(jax.random.PRNGKey(0), experiment.model, config)
  shape = model_utils.input_shape(config, batch)
  score_fn = lambda x, t: experiment.score_model_fn(params, x, t)   # noqa: E731
  sde, eps = experiment.sde, experiment.sampling_eps
  x = jax.random.normal(jax.random.PRNGKey(1), shape)
  t = jnp.full((batch,), 0.5)

  forward = jax.jit(score_fn)
  forward_s, _ = _median_seconds(lambda: forward(x, t), repeats)
  method, pc_options = sampling.config_options(config)
  pc_options = dict(pc_options) if method == 'pc' else {}
  pc_options.update(num_steps=steps)
  rows = {'forward': (forward_s, 1)}
  pc_s, (_, pc_info) = _median_seconds(
      lambda: sampling.sample(jax.random.PRNGKey(2), score_fn, sde, shape, 'pc', eps=eps,
                              **pc_options), repeats)
  rows['pc'] = (pc_s, int(pc_info['nfe']))
  ode_s, (_, ode_info) = _median_seconds(
      lambda: sampling.sample(jax.random.PRNGKey(2), score_fn, sde, shape, 'ode', eps=eps,
                              ode_solver='euler', num_steps=steps, noise_removal=False),
      repeats)
  rows['ode'] = (ode_s, int(ode_info['nfe']))
  like_s, (_, _, like_info) = _median_seconds(
      lambda: likelihood.log_likelihood(jax.random.PRNGKey(3), score_fn, sde, x,
                                        solver='euler', num_steps=steps), repeats)
  rows['likelihood'] = (like_s, int(like_info['nfe']))
  result = {'config': config_path, 'overrides': overrides, 'batch': batch, 'steps': steps,
            'param_count': model_utils.param_count(params),
            'pc_options': {k: v for k, v in pc_options.items()}}
  for name, (seconds, nfe) in rows.items():
    per_nfe = seconds / max(nfe, 1)
    result[name] = {'seconds': round(seconds, 4), 'nfe': nfe,
                    'seconds_per_nfe': round(per_nfe, 5),
                    'ratio_to_forward': round(per_nfe / forward_s, 3)}
  result['devices'] = jax.device_count()
  result['cpu_count'] = os.cpu_count()
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True)
  parser.add_argument('--override', action='append', default=[],
                      help='key=value of the config, e.g. model.nf=32')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--steps', type=int, default=50)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  print(json.dumps(measure(args.config, args.override, args.batch, args.steps, args.repeats)),
        flush=True)


if __name__ == '__main__':
  from score_sde.cpu import process
  process.prepare()   # XLA:CPU flags and the huge-page restart, as launch.py (score_sde/cpu/)
  main()
