"""Exact-likelihood baselines on the digits: NICE, RealNVP and Glow next to score-SDE models.

  python benchmarks/flows_digits.py --workdir_root runs/flows \
      --score_workdirs runs/digits,runs/digits_ve

Trains configs/digits/{nice,realnvp,glow}.py into <workdir_root>/<name> (a finished
run is only re-evaluated), then, for every flow and every score-model workdir given,
computes the test bits/dim with the same bpd job (the same dequantisation noise:
every config has seed 42, so the job draws the same uniform noise per test digit;
flows exactly, score models by the probability-flow ODE), and reads the sample
quality of each run's final evaluation (297 samples, digits-FID against the test
split). Training time is the loop's wall time from its metrics log. Prints one JSON
object per model, the baselines, and a Markdown table.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from score_sde.cpu import process  # noqa: E402

FLOWS = ('nice', 'realnvp', 'glow')


def train_seconds(workdir: str) -> float:
  """Wall time of the training loop from its metrics log: each run's first call
  (compilation included) plus, per log interval after it, steps / (steps per second) and
  the seconds spent in evaluation, checkpoints and snapshot samples."""
  from score_sde import io
  total, previous = 0.0, 0
  for row in io.read_metrics(workdir):
    if 'first_call_s' in row:
      total += row['first_call_s']
    elif 'steps_per_s' in row:
      total += (row['step'] - previous) / max(row['steps_per_s'], 1e-9) + row.get('other_s', 0)
    else:
      continue
    previous = row['step']
  return total


def final_quality(workdir: str, tfds_split: str) -> dict | None:
  """digits-FID / confident fraction of the run's final evaluation, if it has one and it
  judged the samples against the same tfds split as this measurement's bits/dim."""
  finals = {int(m.group(1)): p for p in glob.glob(os.path.join(workdir, 'eval', 'final_*.json'))
            if (m := re.fullmatch(r'final_(\d+)\.json', os.path.basename(p)))}
  paths = [finals[step] for step in sorted(finals)]
  if not paths:
    return None
  with open(paths[-1]) as f:
    final = json.load(f)
  if final.get('tfds_split', 'test') != tfds_split:
    return None
  model = final.get('sample_quality', {}).get('model')
  return None if model is None else {k: model[k] for k in ('digits_fid', 'confident_fraction')}


def per_example_bpd(result: dict) -> np.ndarray:
  """[n] bits/dim per test example (repeats averaged) from a bpd job's shard files."""
  from score_sde.jobs import common
  num_shards = result['num_repeats'] * common.count_shards(result['num_examples'],
                                                           result['shard_size'])
  shards = [common.shard_path(result['shard_dir'], s) for s in range(num_shards)]
  bpd = np.concatenate([np.load(path)['bpd'] for path in shards])
  return bpd.reshape(result['num_repeats'], result['num_examples']).mean(axis=0)


def measure(workdir: str, num_repeats: int) -> dict:
  import jax
  from score_sde import experiment as experiment_lib
  from score_sde import jobs
  from score_sde import parallel
  from score_sde.models import utils as model_utils
  config = experiment_lib.load_config(workdir)
  t0 = time.time()
  result = jobs.bpd_job(workdir, config, split='test', num_repeats=num_repeats)
  bpd_seconds = time.time() - t0
  _, state, step = experiment_lib.restore_state(workdir, config, parallel.make_mesh())
  kind = 'flow' if experiment_lib.is_flow(config) else (
      f'score SDE ({config.training.sde}, probability-flow ODE)')
  return {
      'workdir': workdir, 'model': config.model.name, 'kind': kind, 'step': int(step),
      'params': model_utils.param_count(jax.device_get(state.params)),
      'train_seconds': round(train_seconds(workdir), 1),
      'test_bpd': result['bpd'], 'test_bpd_stderr': result['bpd_stderr'],
      'num_examples': result['num_examples'], 'num_repeats': result['num_repeats'],
      'nfe_mean': result['nfe_mean'], 'bpd_job_seconds': round(bpd_seconds, 1),
      'solver': result['solver'], 'sample_quality': final_quality(workdir, result['tfds_split']),
      'per_example_bpd': per_example_bpd(result),
      'seed': int(config.seed), 'shard_size': int(result['shard_size']),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir_root', default='runs/flows')
  parser.add_argument('--score_workdirs', default='',
                      help='comma-separated trained score-model workdirs on the digits')
  parser.add_argument('--flows', default=','.join(FLOWS))
  parser.add_argument('--num_repeats', type=int, default=1,
                      help='dequantisation repeats of the test bits/dim (as the main job)')
  args = parser.parse_args()

  import configs
  from score_sde import experiment as experiment_lib
  from score_sde import jobs
  from score_sde import train
  rows = []
  for name in [n for n in args.flows.split(',') if n]:
    workdir = os.path.join(args.workdir_root, name)
    config = configs.load(os.path.join(configs.CONFIG_DIR, 'digits', f'{name}.py'))
    configs.validate(config)
    train.train_and_evaluate(config, workdir)
    rows.append(measure(workdir, args.num_repeats))
    _print_row(rows[-1])
  for workdir in [w for w in args.score_workdirs.split(',') if w]:
    rows.append(measure(workdir, args.num_repeats))
    _print_row(rows[-1])
  config = experiment_lib.load_config(rows[0]['workdir'])
  baselines = jobs.baselines(config, 'test')
  # Paired only if every job drew the same dequantisation noise: the same seed and shards.
  layouts = {(r['seed'], r['shard_size']) for r in rows}
  if len(layouts) > 1:
    raise ValueError(f'the workdirs differ in seed or bpd shard size {sorted(layouts)}: their '
                     f'dequantisation noise differs and differences would not be paired.')
  print(json.dumps({'baselines': baselines}), flush=True)

  # Paired differences from the best flow: every model saw the same dequantisation noise
  # (the same seed) on the same test examples, so the per-example differences are paired.
  flows = [r for r in rows if r['kind'] == 'flow']
  best = min(flows or rows, key=lambda r: r['test_bpd'])
  print(f'\n| model | kind | parameters | training (2 CPU cores) | test bits/dim | '
        f'vs {best["model"]} (paired) | digits-FID |')
  print('|---|---|---|---|---|---|---|')
  for row in sorted(rows, key=lambda r: r['test_bpd']):
    quality = row['sample_quality'] or {}
    fid = f'{quality["digits_fid"]:.1f}' if 'digits_fid' in quality else '-'
    diff = row['per_example_bpd'] - best['per_example_bpd']
    paired = (f'{diff.mean():+.3f} ± {diff.std(ddof=1) / np.sqrt(len(diff)):.3f}'
              if row is not best else '0')
    print(f'| {row["model"]} | {row["kind"]} | {row["params"]:,} | '
          f'{row["train_seconds"] / 60:.1f} min | {row["test_bpd"]:.3f} ± '
          f'{row["test_bpd_stderr"]:.3f} | {paired} | {fid} |')
  for name in ('pixel_histogram', 'uniform'):
    print(f'| {name.replace("_", " ")} | baseline | - | - | {baselines[name]:.3f} | '
          f'{baselines[name] - best["test_bpd"]:+.3f} | - |')


def _print_row(row: dict) -> None:
  print(json.dumps({k: v for k, v in row.items() if k != 'per_example_bpd'}), flush=True)


if __name__ == '__main__':
  process.prepare()
  main()
