"""Few-step samplers on trained digits models: digits-FID / KID / confident fraction
versus score evaluations, next to PC, DDIM, the Euler probability-flow ODE and the
adaptive ODE, with the real-data floor.

For a trained digits workdir (the README's main job, runs/digits, or the VE NCSN++
digits config), each line is one JSON object: method, options, num_steps, nfe,
digits_fid, digits_kid (in the classifier's squared feature units), confident_fraction, seconds (sampling, compiled),
seed. Every sampler draws `--num_samples` samples (default 297, as many as the test
digits the metrics compare with) from the EMA weights with the same seeds, so the
methods see the same prior draws. `--seeds` repeats a line with other seeds; after the
seeds of each setting a "summary" line gives the mean digits-FID over the seeds and
its standard deviation (fid_std, the noise of one number), and, where the adaptive ODE
baseline ran with the same seeds, the paired difference from it (mean over seeds) and
that mean's standard error (std of the differences / sqrt(#seeds)): the README's
"(vs ODE)" figures.

  python benchmarks/fast_samplers_digits.py --workdir runs/digits [--nfes 5,10,20,35,50]
      [--methods heun,edm,dpmpp_2m,dpmpp_3m,dpmpp_2m_sde,unipc,ddim,euler_ode,pc]
      [--baselines pc,ode] [--seeds 0,1,2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fast_samplers import SAMPLERS, is_missing_discrete_chain, steps_for  # noqa: E402

def levels_of(model, x) -> np.ndarray:
  levels = max(model.experiment.num_levels, 2)
  unit = np.clip(np.asarray(model.to_unit(x)), 0.0, 1.0)
  return np.round(unit * (levels - 1)).astype(np.uint8)


_COMPILED = set()


def measure(model, n: int, seed: int, record: dict, **sampler_options) -> dict:
  from score_sde.evaluation import digits_classifier
  key = jax.random.PRNGKey(seed)
  signature = json.dumps(sampler_options, sort_keys=True)
  if signature not in _COMPILED:                            # compile outside the timing
    jax.block_until_ready(model.sample(key, n, **sampler_options))
    _COMPILED.add(signature)
  start = time.perf_counter()
  x, info = jax.block_until_ready(model.sample(key, n, **sampler_options))
  seconds = time.perf_counter() - start
  quality = digits_classifier.digits_metrics(levels_of(model, x), model.config)
  return {**record, 'seed': seed, 'nfe': int(info['nfe']), 'seconds': round(seconds, 2),
          'digits_fid': quality['digits_fid'], 'digits_kid': quality['digits_kid'],
          'confident_fraction': quality['confident_fraction']}


def emit(record: dict) -> None:
  print(json.dumps(record), flush=True)


def seed_summary(lines: list[dict], ode_fid_by_seed: dict[int, float]) -> dict | None:
  """Mean digits-FID of one setting's per-seed lines, its std over seeds (ddof 1) and,
  where every seed has an adaptive-ODE line, the paired difference from it: mean and
  standard error of the mean (std of the differences, ddof 1, / sqrt(#seeds)). None
  without lines; std and standard error are None with one seed."""
  lines = [r for r in lines if 'digits_fid' in r]
  if not lines:
    return None
  fids = np.array([r['digits_fid'] for r in lines], np.float64)
  seeds = [r['seed'] for r in lines]
  many = len(fids) > 1
  summary = {'summary': True, 'method': lines[0]['method'], 'nfe': lines[0]['nfe'],
             'seeds': seeds, 'digits_fid_mean': float(fids.mean()),
             'fid_std': float(fids.std(ddof=1)) if many else None}
  if all(s in ode_fid_by_seed for s in seeds):
    diffs = fids - np.array([ode_fid_by_seed[s] for s in seeds])
    summary.update(fid_minus_ode=float(diffs.mean()),
                   fid_minus_ode_stderr=(float(diffs.std(ddof=1) / np.sqrt(len(diffs)))
                                         if many else None))
  return summary


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--num_samples', type=int, default=297)
  parser.add_argument('--nfes', default='5,10,20,35,50')
  parser.add_argument('--methods', default=','.join(SAMPLERS))
  parser.add_argument('--baselines', default='pc,ode')
  parser.add_argument('--seeds', default='0')
  args = parser.parse_args()
  import score_sde
  from score_sde import data as data_lib
  from score_sde.evaluation import digits_classifier
  model = score_sde.load(args.workdir)
  n = args.num_samples
  seeds = [int(s) for s in args.seeds.split(',')]
  base = {'workdir': args.workdir, 'sde': type(model.sde).__name__, 'num_samples': n}
  real = data_lib.load_split_uint(model.config, 'train')
  real = real[np.random.default_rng(0).permutation(len(real))[:n]]
  floor = digits_classifier.digits_metrics(real, model.config)
  emit({**base, 'method': 'real_train_digits', 'digits_fid': floor['digits_fid'],
        'digits_kid': floor['digits_kid'],
        'confident_fraction': floor['confident_fraction']})
  baselines = [b for b in args.baselines.split(',') if b]
  ode_lines, pc_lines = [], []
  for seed in seeds:
    if 'ode' in baselines:
      ode_lines.append(measure(model, n, seed, {**base, 'method': 'ode_adaptive',
                                                'rtol': 1e-3}, method='ode', rtol=1e-3,
                               atol=1e-3))
      emit(ode_lines[-1])
    if 'pc' in baselines:
      pc_lines.append(measure(model, n, seed, {**base, 'method': 'pc',
                                               'num_steps': model.sde.N}, method='pc'))
      emit(pc_lines[-1])
  ode_fid_by_seed = {r['seed']: r['digits_fid'] for r in ode_lines}
  for lines in (ode_lines, pc_lines):
    summary = seed_summary(lines, {} if lines is ode_lines else ode_fid_by_seed)
    if summary:
      emit({**base, **summary})
  for label in [m for m in args.methods.split(',') if m]:
    method, options, _, _ = SAMPLERS[label]
    for nfe in [int(v) for v in args.nfes.split(',')]:
      num_steps = steps_for(nfe, label, model.sde)
      record = {**base, 'method': label, 'options': options, 'num_steps': num_steps}
      lines = []
      for seed in seeds:
        try:
          lines.append(measure(model, n, seed, record, method=method, num_steps=num_steps,
                               **options))
          emit(lines[-1])
        except ValueError as error:
          if not is_missing_discrete_chain(error):
            raise
          emit({**record, 'error': str(error).split('\n')[0]})
          break
      summary = seed_summary(lines, ode_fid_by_seed)
      if summary:
        emit({**base, **summary})


if __name__ == '__main__':
  main()
