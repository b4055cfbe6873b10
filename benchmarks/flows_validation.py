"""Model selection for the digits flows without the test split: train on digits
0..(1499 - holdout) and report bits/dim on the last `holdout` training digits.

  python benchmarks/flows_validation.py --holdout 300 -- train \
      --config configs/digits/glow.py --workdir runs/val/glow_k16 --config.model.dropout=0.5

Everything after `--` is an ordinary launch.py command line; only the digits splits
change, for this process: 'train' becomes tfds 'train[:-holdout]' and 'test' (eval
loss, final bits/dim, baselines, digits-FID reference) becomes 'train[-holdout:]'. The
configs/digits/{nice,realnvp,glow}.py docstrings quote the validation bits/dim this gave
(holdout 300, with --config.eval.batch_size=300 --config.eval.num_samples=300).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
  if '--' not in sys.argv:
    sys.exit('usage: flows_validation.py --holdout N -- <launch.py command line>')
  split_at = sys.argv.index('--')
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--holdout', type=int, default=300)
  args = parser.parse_args(sys.argv[1:split_at])
  if not 0 < args.holdout < 1500:
    sys.exit(f'--holdout must lie in (0, 1500), the digits training split; got {args.holdout}')
  from score_sde import data
  spec = data.IMAGE_DATASETS['DIGITS']
  data.IMAGE_DATASETS['DIGITS'] = dataclasses.replace(
      spec, splits={'train': f'train[:-{args.holdout}]', 'test': f'train[-{args.holdout}:]'})
  sys.argv = [os.path.join(ROOT, 'launch.py')] + sys.argv[split_at + 1:]
  runpy.run_path(sys.argv[0], run_name='__main__')


if __name__ == '__main__':
  main()
