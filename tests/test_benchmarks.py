"""benchmarks/train.py: its JSON is self-consistent, and --jitted_steps reports per step."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_train_benchmark(*args):
  """JSON objects printed by benchmarks/train.py (matmul line first, then one per config)."""
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'benchmarks', 'train.py'),
       '--config', os.path.join(ROOT, 'configs', 'toy', 'vp_mlp_continuous.py'),
       '--batch', '32', '--steps', '2', '--override', 'model.nf=16', *args],
      capture_output=True, text=True, check=True, cwd=ROOT).stdout
  return [json.loads(line) for line in out.splitlines() if line.startswith('{')]


pytestmark = pytest.mark.slow       # four processes, two compiles


@pytest.fixture(scope='module')
def one_and_two_step_results():
  return _run_train_benchmark()[1], _run_train_benchmark('--jitted_steps', '2')[1]


def test_train_benchmark_figures_follow_from_the_measured_ones(one_and_two_step_results):
  for result in one_and_two_step_results:
    assert result['gflop_per_step'] > 0 and result['compile_s'] > 0
    assert result['examples_per_s'] == pytest.approx(32 / result['step_s_median'])
    assert result['achieved_gflops'] == pytest.approx(
        result['gflop_per_step'] / result['step_s_median'])
    assert result['fraction_of_peak'] == pytest.approx(
        result['achieved_gflops'] / result['machine_peak_gflops'])
    assert result['page_faults_per_step'] >= 0 and 'glibc_tunables' in result


def test_jitted_steps_counts_flops_per_step_not_per_call(one_and_two_step_results):
  one, two = one_and_two_step_results
  assert (one['jitted_steps'], two['jitted_steps']) == (1, 2)
  # Two unrolled steps do twice the work of one; the JSON divides by the steps per call.
  assert two['gflop_per_step'] == pytest.approx(one['gflop_per_step'], rel=0.02)
  assert two['params'] == one['params']
