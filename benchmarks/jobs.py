"""Sampling and bits/dim throughput of a trained workdir: one JSON object per line.

  python benchmarks/jobs.py --workdir runs/digits [--batch 64] [--bpd_examples 297]

PC sampler (the config's predictor/corrector, 1000 steps), probability-flow
ODE sampler (Tsit5, adaptive, rtol = atol = 1e-5), and the bits/dim job's
likelihood (rtol = atol = 1e-5, Hutchinson) on the test split. Times exclude
compilation (each function runs once before it is timed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _timed(fn, *args):
  import jax
  jax.block_until_ready(fn(*args))               # compile + warm up
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--bpd_examples', type=int, default=297)
  args = parser.parse_args()

  import jax
  import numpy as np
  import score_sde
  from score_sde import data as data_lib
  from score_sde import likelihood
  from score_sde import sampling
  from score_sde.models import utils as model_utils

  model = score_sde.load(args.workdir)
  config = model.config
  shape = model_utils.input_shape(config, args.batch)
  method, options = sampling.config_options(config)
  cases = [('pc', dict(options, num_steps=1000) if method == 'pc' else
            dict(predictor='euler_maruyama', corrector='none', num_steps=1000)),
           ('ode', dict(ode_solver='tsit5', rtol=1e-5, atol=1e-5, num_steps=0))]
  for name, opts in cases:
    fn = sampling.jit_sampler(sampling.build_sampler(
        model.sde, model.score_model_fn, shape, name, eps=model.sampling_eps, **opts))
    (x, info), seconds = _timed(fn, jax.random.PRNGKey(0), model.ema_params)
    print(json.dumps({'job': f'sample_{name}', 'options': opts, 'batch': args.batch,
                      'nfe': int(info['nfe']), 'seconds': seconds,
                      'samples_per_s': args.batch / seconds}), flush=True)

  levels = model.experiment.num_levels
  uint = data_lib.load_split_uint(config, 'test', args.bpd_examples)
  x = np.asarray(data_lib.get_data_scaler(config)(likelihood.uniform_dequantize(
      jax.random.PRNGKey(1), uint.astype(np.float32) / (levels - 1), levels)))
  fn = likelihood.get_likelihood_fn(model.sde, model.score_model_fn, rtol=1e-5, atol=1e-5)
  (logp, _, info), seconds = _timed(fn, jax.random.PRNGKey(2), model.ema_params, x)
  bpd = likelihood.bits_per_dim(logp, int(np.prod(x.shape[1:])),
                                data_lib.get_data_inverse_scaler(config), levels)
  nfe = np.asarray(info['nfe_per_example'])
  print(json.dumps({'job': 'bpd', 'examples': len(x), 'seconds': seconds,
                    'examples_per_s': len(x) / seconds, 'nfe_mean': float(nfe.mean()),
                    'nfe_max': int(nfe.max()), 'bpd': float(np.mean(bpd))}), flush=True)


if __name__ == '__main__':
  from score_sde.cpu import process
  process.prepare()   # XLA:CPU flags and the huge-page restart, as launch.py (score_sde/cpu/)
  main()
