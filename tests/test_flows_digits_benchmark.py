"""benchmarks/flows_digits.py reads exactly the files of the result it reports."""
import importlib.util
import json
import os

import numpy as np
import pytest

from score_sde import io
from score_sde.jobs import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _benchmark():
  spec = importlib.util.spec_from_file_location(
      'flows_digits', os.path.join(ROOT, 'benchmarks', 'flows_digits.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_per_example_bpd_reads_only_the_results_repeats(tmp_path):
  shard_dir = str(tmp_path / 'bpd_test_10_abcdef01')
  n, shard_size = 3, 2                        # 2 shards per repeat; 3 repeats on disk
  per_repeat = np.array([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0], [100.0, 100.0, 100.0]])
  for repeat, values in enumerate(per_repeat):
    for b in range(2):
      io.savez_atomic(common.shard_path(shard_dir, 2 * repeat + b),
                      bpd=values[b * shard_size:(b + 1) * shard_size])
  result = {'shard_dir': shard_dir, 'num_repeats': 2, 'num_examples': n,
            'shard_size': shard_size}          # the 2-repeat result: the third is not its own
  np.testing.assert_array_equal(_benchmark().per_example_bpd(result), [2.0, 3.0, 4.0])


def test_train_seconds_adds_each_runs_first_call_to_its_log_intervals(tmp_path):
  writer = io.MetricWriter(str(tmp_path))
  writer.write(1, {'first_call_s': 10.0})     # compiled, ran step 1
  writer.write(1, {'loss': 1.0})              # no rate: no step since the first call
  writer.write(3, {'loss': 1.0, 'steps_per_s': 1.0})          # steps 2..3: 2 s
  writer.write(5, {'eval_loss': 1.0})
  writer.write(7, {'loss': 1.0, 'steps_per_s': 2.0, 'other_s': 0.5})    # replaced below
  writer.write(4, {'first_call_s': 5.0})      # a resumed run (its rows replace 5..7)
  writer.write(7, {'loss': 1.0, 'steps_per_s': 1.0, 'other_s': 0.25})   # 5..7: 3 s + 0.25 s
  writer.close()
  assert _benchmark().train_seconds(str(tmp_path)) == pytest.approx(10 + 2 + 5 + 3.25)


def test_final_quality_is_the_newest_summary_on_the_same_split(tmp_path):
  eval_dir = tmp_path / 'eval'
  eval_dir.mkdir()

  def summary(name, fid, split='test'):
    (eval_dir / name).write_text(json.dumps({'tfds_split': split, 'sample_quality': {
        'model': {'digits_fid': fid, 'confident_fraction': 0.5, 'num_samples': 297}}}))

  summary('final_500.json', 120.0)
  summary('final_1700.json', 87.0)
  summary('final_1700_0badc0de.json', 99.0)     # an earlier summary moved aside
  bench = _benchmark()
  assert bench.final_quality(str(tmp_path), 'test') == {'digits_fid': 87.0,
                                                       'confident_fraction': 0.5}
  assert bench.final_quality(str(tmp_path), 'train[-300:]') is None   # judged on another split
