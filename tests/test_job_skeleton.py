"""The job skeleton (score_sde/jobs/common.py) on a toy job: shards by position, padding,
the manifest, refusal of a changed setting, the progress bar."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from score_sde import io
from score_sde import parallel
from score_sde.jobs import common
from tests import tensorboard_events

NUM_ROWS, SHARD_SIZE = 10, 4          # 3 shards, the last one padded from 2 rows


@pytest.fixture(scope='module')
def mesh():
  return parallel.make_mesh(jax.devices()[:2])


@pytest.fixture(scope='module')
def noisy_double(mesh):
  sharding = parallel.batch_sharding(mesh)
  return jax.jit(lambda key, x: 2.0 * x + jax.random.normal(key, x.shape),
                 in_shardings=(parallel.replicated(mesh), sharding), out_shardings=sharding)


def toy_job(out_dir, scale=1.0):
  return common.Job(out_dir=str(out_dir), num_shards=common.count_shards(NUM_ROWS, SHARD_SIZE),
                    shard_size=SHARD_SIZE, settings={'scale': scale, 'num_rows': NUM_ROWS},
                    checked=('scale', 'shard_size'), title=f'toy job into {out_dir}',
                    what='toy', unit='row')


def toy_compute(noisy_double, mesh, calls, scale=1.0):
  """Shard s: 2 x + N(0, 1) noise of key fold_in(key 0, s) on rows [4 s, 4 s + 4) of x."""
  data = scale * np.arange(NUM_ROWS * 3, dtype=np.float32).reshape(NUM_ROWS, 3)

  def compute(shard):
    calls.append(shard)
    rows = common.shard_rows(shard, SHARD_SIZE, NUM_ROWS)
    x = parallel.host_to_global(common.pad_rows(data[rows], SHARD_SIZE), mesh)
    y = parallel.gather(noisy_double(common.shard_key(jax.random.PRNGKey(0), shard), x))
    return {'y': y[:rows.stop - rows.start]}, {'nfe': 7 + shard}

  return compute


def test_shard_rows_keys_and_padding():
  assert common.count_shards(NUM_ROWS, SHARD_SIZE) == 3
  assert [common.shard_rows(s, 4, 10) for s in range(3)] == [slice(0, 4), slice(4, 8),
                                                             slice(8, 10)]
  rows = np.array([[1, 2], [3, 4]])
  np.testing.assert_array_equal(common.pad_rows(rows, 4), [[1, 2], [3, 4], [3, 4], [3, 4]])
  np.testing.assert_array_equal(common.pad_rows(rows, 3, fill=0), [[1, 2], [3, 4], [0, 0]])
  assert common.pad_rows(rows, 2) is rows
  key = jax.random.PRNGKey(3)
  np.testing.assert_array_equal(common.shard_key(key, 5), jax.random.fold_in(key, 5))
  assert common.digest(rows) == common.digest(rows.copy()) != common.digest(rows + 1)
  assert common.digest(rows) != common.digest(rows.astype(np.int8))   # dtype counts too


def test_subset_recomputed_equals_full_run_and_manifest(tmp_path, mesh, noisy_double):
  calls = []
  manifest = common.run(toy_job(tmp_path), toy_compute(noisy_double, mesh, calls))
  assert calls == [0, 1, 2]
  full = [io.load_npz(common.shard_path(tmp_path, s))['y'] for s in range(3)]
  assert [len(y) for y in full] == [4, 4, 2]          # padding rows are not kept
  # Each shard's rows and key are fixed: 2 x + noise, the noise of shard s's key.
  data = np.arange(30, dtype=np.float32).reshape(10, 3)
  noise = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), 2), (4, 3))
  np.testing.assert_allclose(full[2], 2 * data[8:] + np.asarray(noise)[:2], rtol=1e-6)
  with open(tmp_path / 'manifest.json') as f:
    assert json.load(f) == manifest == {
        'scale': 1.0, 'num_rows': 10, 'shard_size': 4, 'num_shards': 3,
        'shards': {'0': {'nfe': 7}, '1': {'nfe': 8}, '2': {'nfe': 9}}}

  for s in (0, 2):                                     # a subset is lost ...
    os.remove(common.shard_path(tmp_path, s))
  calls.clear()
  again = common.run(toy_job(tmp_path), toy_compute(noisy_double, mesh, calls))
  assert calls == [0, 2] and again == manifest         # ... and only it is recomputed
  for s in range(3):
    np.testing.assert_array_equal(io.load_npz(common.shard_path(tmp_path, s))['y'], full[s])
  assert [len(a['y']) for a in common.load_shards(toy_job(tmp_path))] == [4, 4, 2]


class Crash(Exception):
  pass


def test_interrupted_job_records_info_before_the_shard_file(tmp_path, mesh, noisy_double,
                                                            monkeypatch):
  reference = common.run(toy_job(tmp_path / 'ref'), toy_compute(noisy_double, mesh, []))
  saved = []

  def crash_on_second(out_dir, shard, arrays):
    if saved:
      raise Crash()
    saved.append(shard)
    return io.savez_atomic(common.shard_path(out_dir, shard), **arrays)

  with monkeypatch.context() as m:
    m.setattr(common, 'save_shard', crash_on_second)
    with pytest.raises(Crash):
      common.run(toy_job(tmp_path / 'cut'), toy_compute(noisy_double, mesh, []))
  written = sorted(f for f in os.listdir(tmp_path / 'cut') if f != '.lock')
  assert written == ['manifest.json', 'shard_00000.npz']
  with open(tmp_path / 'cut' / 'manifest.json') as f:
    assert json.load(f)['shards'] == {'0': {'nfe': 7}, '1': {'nfe': 8}}  # shard 1: no file
  calls = []
  assert common.run(toy_job(tmp_path / 'cut'), toy_compute(noisy_double, mesh, calls)) == reference
  assert calls == [1, 2]
  for s in range(3):
    np.testing.assert_array_equal(io.load_npz(common.shard_path(tmp_path / 'ref', s))['y'],
                                  io.load_npz(common.shard_path(tmp_path / 'cut', s))['y'])


def test_resume_with_a_changed_setting_is_refused(tmp_path, mesh, noisy_double):
  common.run(toy_job(tmp_path), toy_compute(noisy_double, mesh, []))
  calls = []
  with pytest.raises(ValueError, match=r'holds shards made with a different scale \(1\.0 vs '
                                       r'2\.0\); pass another --out_dir or delete the folder'):
    common.run(toy_job(tmp_path, scale=2.0), toy_compute(noisy_double, mesh, calls, 2.0))
  assert not calls
  bigger = common.Job(out_dir=str(tmp_path), num_shards=2, shard_size=8,
                      settings={'scale': 1.0}, checked=('scale', 'shard_size'),
                      title='toy', what='toy')
  with pytest.raises(ValueError, match=r'different shard_size \(4 vs 8\)'):
    common.run(bigger, lambda s: ({}, {}))
  tuples = common.Job(out_dir=str(tmp_path / 't'), num_shards=1, shard_size=1,
                      settings={'grid': (1, 2)}, checked=('grid',), title='toy', what='toy')
  common.run(tuples, lambda s: ({'x': np.zeros(1)}, {}))
  common.run(tuples, lambda s: ({'x': np.zeros(1)}, {}))   # (1, 2) matches its JSON [1, 2]
  # a setting an older manifest does not record is named as unrecorded, not as 'None vs'
  newer = common.Job(out_dir=str(tmp_path / 't'), num_shards=1, shard_size=1,
                     settings={'grid': (1, 2), 'weights': 'ab12'}, checked=('grid', 'weights'),
                     title='toy', what='toy')
  with pytest.raises(ValueError, match=r"manifest does not record weights \(an older version "
                                       r"wrote it\), so they cannot be checked against 'ab12'"):
    common.run(newer, lambda s: ({'x': np.zeros(1)}, {}))
  unset = common.Job(out_dir=str(tmp_path / 't'), num_shards=1, shard_size=1,
                     settings={'grid': (1, 2), 'weights': None}, checked=('grid', 'weights'),
                     title='toy', what='toy')
  common.run(unset, lambda s: ({'x': np.zeros(1)}, {}))    # unrecorded and unset: as before


def test_a_changed_sampler_option_is_named_not_two_whole_dicts(tmp_path):
  """The refusal names the option that differs ('temperature: 0.7 vs 0.5'), not the two
  option dicts (12 entries for PC) for the user to compare by eye."""
  def sampler_job(options):
    return common.Job(out_dir=str(tmp_path), num_shards=1, shard_size=1,
                      settings={'sampler': options}, checked=('sampler',), title='toy',
                      what='toy')
  before = {'method': 'flow', 'precision': 'highest', 'temperature': 0.7}
  common.run(sampler_job(before), lambda s: ({'x': np.zeros(1)}, {}))
  with pytest.raises(ValueError, match=r'different sampler \(temperature: 0\.7 vs 0\.5\); '):
    common.run(sampler_job({**before, 'temperature': 0.5}), lambda s: ({}, {}))
  assert common.describe_change({'a': 1, 'b': 2}, {'b': 3, 'c': 4}) == (
      'a: 1 vs absent, b: 2 vs 3, c: absent vs 4')
  assert common.describe_change({'method': 'ode', 'rtol': 1e-3},
                                {'method': 'pc', 'snr': 0.16}) == "method: 'ode' vs 'pc'"
  assert common.describe_change(1.0, 2.0) == '1.0 vs 2.0'


def test_progress_bar_is_quiet_off_a_terminal_and_shows_nfe_on_one(tmp_path, mesh,
                                                                    noisy_double, capsys,
                                                                    monkeypatch):
  common.run(toy_job(tmp_path / 'a'), toy_compute(noisy_double, mesh, []))
  out = capsys.readouterr().out
  assert out.splitlines() == [f'toy job into {tmp_path / "a"}: 3 shard(s) of 4, 0 already done.']
  monkeypatch.setattr(sys.stdout, 'isatty', lambda: True, raising=False)
  common.run(toy_job(tmp_path / 'b'), toy_compute(noisy_double, mesh, []))
  out = capsys.readouterr().out
  assert 'already done' in out
  bar = out.split('\r')[-1]
  assert 'toy: 100%' in bar and '12/12' in bar and 'NFE=9' in bar and 'row/s' in bar, out


def test_a_second_job_on_the_same_folder_is_refused_and_names_are_plain(tmp_path):
  from score_sde import locks
  job = common.Job(out_dir=str(tmp_path / 'job'), num_shards=1, shard_size=2, settings={},
                   checked=(), title='toy', what='toy')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  holder = subprocess.Popen(                         # another process writes the same folder
      [sys.executable, '-c', 'import sys, time; from score_sde import locks\n'
       'with locks.hold(sys.argv[1], "samples job"):\n  print("held", flush=True); '
       'time.sleep(600)', job.out_dir], cwd=root, env=dict(os.environ, PYTHONPATH=root),
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(locks.WorkdirLockedError, match='in use by `samples job`'):
      common.run(job, lambda s: ({'x': np.zeros(2)}, {}))
    assert not os.path.exists(common.shard_path(job.out_dir, 0))
  finally:
    holder.kill()
    holder.wait()
  common.run(job, lambda s: ({'x': np.zeros(2)}, {}))    # free again after the kill
  assert os.path.exists(common.shard_path(job.out_dir, 0))
  for bad in ('../escape', '/abs', '..', '.hidden', 'a/b'):
    with pytest.raises(ValueError, match='must be a plain folder name'):
      common.check_folder_name(bad)
  assert common.check_folder_name('step_10_pc') == 'step_10_pc'


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _failing_replace(src, dst):
  raise OSError(f'killed before renaming {src} to {dst}')


@pytest.mark.parametrize('write,read', [
    (lambda path, v: io.savez_atomic(path, x=np.full(3, v)),
     lambda path: float(io.load_npz(path)['x'][0])),
    (lambda path, v: io.atomic_json(path, {'x': v}),
     lambda path: _read_json(path)['x']),
], ids=['savez_atomic', 'atomic_json'])
def test_atomic_writes_leave_the_old_file_whole_until_the_rename(tmp_path, monkeypatch,
                                                                  write, read):
  path = str(tmp_path / 'written')
  write(path, 1.0)
  renames = []
  replace = os.replace

  def watched_replace(src, dst):
    # The complete new file sits next to the old one (same folder: an atomic rename).
    assert os.path.dirname(src) == os.path.dirname(dst) and src != dst
    assert read(src) == 3.0 and read(dst) == 1.0
    renames.append(dst)
    replace(src, dst)

  monkeypatch.setattr(os, 'replace', watched_replace)
  write(path, 3.0)
  assert renames == [path] and read(path) == 3.0
  monkeypatch.setattr(os, 'replace', _failing_replace)     # a kill just before the rename
  with pytest.raises(OSError, match='killed before renaming'):
    write(path, 5.0)
  assert read(path) == 3.0


def test_a_json_value_that_fails_half_way_leaves_the_old_file_and_no_temporary(tmp_path):
  path = str(tmp_path / 'manifest.json')
  io.atomic_json(path, {'done': [0, 1]})
  with pytest.raises(TypeError):
    io.atomic_json(path, {'a_first': 1, 'done': [0, 1, 2], 'z': object()})
  with open(path) as f:
    assert json.load(f) == {'done': [0, 1]}
  assert os.listdir(tmp_path) == ['manifest.json']


def test_atomic_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
  """The new file's data is synced before it takes the old name, and the folder after
  (a power loss then leaves the old or the new file, never an empty one)."""
  events = []
  fsync, replace = os.fsync, os.replace

  def watched_fsync(fd):
    events.append(('fsync', os.path.isdir(f'/proc/self/fd/{fd}')))
    fsync(fd)

  def watched_replace(src, dst):
    events.append(('rename', False))
    replace(src, dst)

  monkeypatch.setattr(os, 'fsync', watched_fsync)
  monkeypatch.setattr(os, 'replace', watched_replace)
  for write in (lambda: io.savez_atomic(str(tmp_path / 'a.npz'), x=np.ones(2)),
                lambda: io.atomic_json(str(tmp_path / 'a.json'), {'x': 1}),
                lambda: io.save_image_grid(str(tmp_path / 'a.png'), np.ones((1, 2, 2, 1)))):
    events.clear()
    write()
    assert events == [('fsync', False), ('rename', False), ('fsync', True)]
  assert sorted(os.listdir(tmp_path)) == ['a.json', 'a.npz', 'a.png']


def test_metrics_log_survives_a_torn_line_and_a_resume_reads_as_one_run(tmp_path):
  """A line cut short by a power loss does not swallow the next run's first row, and the
  steps a resumed run logs again replace the earlier rows of the same step and names, in
  the JSON log and in TensorBoard (whose files, here both of the same second, are kept)."""
  writer = io.MetricWriter(str(tmp_path), start_step=0)
  for step in (1, 2, 3):
    writer.write(step, {'loss': 1.0 / step})
  writer.write(3, {'eval_loss': 9.0})
  writer.close()
  path = tmp_path / 'logs' / 'metrics.jsonl'
  with open(path, 'a') as f:
    f.write('{"step": 4, "loss": 0.2')              # the interrupted run's last, torn write
  resumed = io.MetricWriter(str(tmp_path), start_step=2)   # from a checkpoint at step 2
  for step in (3, 4):
    resumed.write(step, {'loss': 10.0 + step})      # told apart here (resume is exact)
  resumed.close()
  assert path.read_text().splitlines()[-3] == '{"step": 4, "loss": 0.2'   # kept, closed
  assert io.read_metrics(str(tmp_path)) == [
      {'step': 1, 'loss': 1.0}, {'step': 2, 'loss': 0.5}, {'step': 3, 'loss': 13.0},
      {'step': 3, 'eval_loss': 9.0}, {'step': 4, 'loss': 14.0}]
  shown = tensorboard_events.visible_scalars(str(tmp_path / 'logs'))
  assert shown == {'loss': [(1, 1.0), (2, 0.5), (3, 13.0), (4, 14.0)], 'eval_loss': []}
  with pytest.raises(FileNotFoundError, match='train with --workdir'):
    io.read_metrics(str(tmp_path / 'elsewhere'))


def test_sizes_round_up_to_the_devices_and_replicate_places_every_leaf(mesh):
  assert [parallel.round_up_to_devices(n, mesh) for n in (0, 1, 2, 3, 5)] == [2, 2, 2, 4, 6]
  # a controllable job's shard: no larger than its inputs need, nor than eval.batch_size
  config = ml_collections.ConfigDict({'eval': {'batch_size': 8}})
  assert [common.job_batch_size(config, n, mesh) for n in (1, 3, 8, 100)] == [2, 4, 8, 8]
  config.eval.batch_size = 7
  assert common.job_batch_size(config, 100, mesh) == 8
  sharded = parallel.host_to_global(np.arange(8.0).reshape(4, 2), mesh)
  assert not sharded.sharding.is_equivalent_to(parallel.replicated(mesh), 2)
  placed = parallel.replicate({'sharded': sharded, 'host': np.ones(3)}, mesh)
  for leaf, want in ((placed['sharded'], np.arange(8.0).reshape(4, 2)),
                     (placed['host'], np.ones(3))):
    assert leaf.sharding.is_equivalent_to(parallel.replicated(mesh), leaf.ndim)
    np.testing.assert_array_equal(leaf, want)
  assert parallel.replicate(placed, mesh)['sharded'] is placed['sharded']   # kept as it is


def test_progress_bar_counts_real_rows_not_the_padding(tmp_path, mesh, noisy_double, capsys,
                                                       monkeypatch):
  """10 rows in shards of 4 (the last padded to 4): the bar ends at 10/10, not 12/12, and
  with two passes (repeats, as the bpd job) at 20/20; rows_in gives 4, 4, 2 per pass."""
  job = dataclasses.replace(toy_job(tmp_path / 'a'), num_rows=NUM_ROWS)
  assert [job.rows_in(s) for s in range(3)] == [4, 4, 2]
  twice = dataclasses.replace(job, out_dir=str(tmp_path / 'b'), num_shards=6)
  assert [twice.rows_in(s) for s in range(6)] == [4, 4, 2, 4, 4, 2]
  monkeypatch.setattr(sys.stdout, 'isatty', lambda: True, raising=False)
  common.run(job, toy_compute(noisy_double, mesh, []))
  bar = capsys.readouterr().out.split('\r')[-1]
  assert 'toy: 100%' in bar and '10/10' in bar, bar
  compute = toy_compute(noisy_double, mesh, [])
  common.run(twice, lambda shard: compute(shard % 3))
  bar = capsys.readouterr().out.split('\r')[-1]
  assert '20/20' in bar, bar
