"""Jobs on a trained workdir: shards, manifests, resumption (every job kind interrupted and
re-run), 1 vs 4 devices, 1 vs 2 processes, the Python API, the launcher."""
import dataclasses
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest

import configs
import score_sde
from score_sde import checkpoints
from score_sde import data as data_lib
from score_sde.cpu import hugepages
from score_sde import jobs
from score_sde.jobs import common
from score_sde.jobs import quality
from score_sde import parallel
from score_sde import train
from score_sde import experiment as experiment_lib
from score_sde import io
from tests.readme_examples import python_blocks, run_example

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_digits_config(data_dir):
  config = configs.load(os.path.join(configs.CONFIG_DIR, 'digits', 'ddpmpp_continuous.py'))
  config.training.n_iters = 10
  config.training.batch_size = 16
  config.training.log_freq = 5
  config.training.eval_freq = 0
  config.training.snapshot_freq = 5
  config.training.snapshot_sampling = False
  config.model.nf = 8
  config.model.num_res_blocks = 1
  config.data.data_dir = data_dir
  config.eval.enable_bpd = False
  config.eval.batch_size = 8
  config.sampling.num_steps = 20
  config.eval.rtol = config.eval.atol = 1e-3
  return config


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  directory = tmp_path_factory.mktemp('digits_run')
  config = _tiny_digits_config(str(tmp_path_factory.mktemp('tfds')))
  train.train_and_evaluate(config, str(directory), final_evaluation=False)
  return str(directory)


def _shards(out_dir):
  return sorted(f for f in os.listdir(out_dir) if f.startswith('shard_'))


def test_sample_job_shards_manifest_and_resume(workdir):
  config = experiment_lib.load_config(workdir)
  out_dir = jobs.sample_job(workdir, config, num_samples=20, shard_size=8, tag='a')
  assert _shards(out_dir) == ['shard_00000.npz', 'shard_00001.npz', 'shard_00002.npz']
  with open(os.path.join(out_dir, 'manifest.json')) as f:
    manifest = json.load(f)
  assert manifest['num_shards'] == 3 and manifest['shard_size'] == 8
  assert manifest['checkpoint_step'] == 10 and manifest['sampler']['method'] == 'pc'
  assert manifest['sampler']['num_steps'] == 20
  assert sorted(manifest['shards']) == ['0', '1', '2']
  assert all(s['nfe'] == 20 for s in manifest['shards'].values())
  images = jobs.load_samples(out_dir)
  assert images.shape == (20, 8, 8, 1) and images.dtype == np.uint8 and images.max() <= 16
  assert os.path.exists(os.path.join(out_dir, 'grid.png'))
  before = io.load_npz(os.path.join(out_dir, 'shard_00001.npz'))
  os.remove(os.path.join(out_dir, 'shard_00001.npz'))    # an interrupted run
  mtime = os.path.getmtime(os.path.join(out_dir, 'shard_00000.npz'))
  jobs.sample_job(workdir, config, num_samples=20, shard_size=8, tag='a')
  assert os.path.getmtime(os.path.join(out_dir, 'shard_00000.npz')) == mtime  # not redone
  after = io.load_npz(os.path.join(out_dir, 'shard_00001.npz'))
  np.testing.assert_array_equal(before['images'], after['images'])
  with pytest.raises(ValueError, match='holds images only; sample with --save_floats'):
    jobs.load_samples(out_dir, floats=True)
  with pytest.raises(ValueError, match=r'holds images without their float samples .* same '
                                       r'--save_floats'):      # would mix shards
    jobs.sample_job(workdir, config, num_samples=28, shard_size=8, tag='a', save_floats=True)
  assert _shards(out_dir) == ['shard_00000.npz', 'shard_00001.npz', 'shard_00002.npz']
  config.sampling.num_steps = 10
  with pytest.raises(ValueError, match='different sampler'):
    jobs.sample_job(workdir, config, num_samples=20, shard_size=8, tag='a')


def test_one_and_four_devices_give_the_same_samples(workdir, four_devices):
  config = experiment_lib.load_config(workdir)
  one = jobs.sample_job(workdir, config, num_samples=8, shard_size=8, tag='one',
                        save_floats=True, mesh=parallel.make_mesh(jax.devices()[:1]))
  four = jobs.sample_job(workdir, config, num_samples=8, shard_size=8, tag='four',
                         save_floats=True, mesh=parallel.make_mesh(four_devices))
  a, b = io.load_npz(one + '/shard_00000.npz'), io.load_npz(four + '/shard_00000.npz')
  np.testing.assert_allclose(a['samples'], b['samples'], rtol=1e-4, atol=1e-5)


def test_bpd_job_resumes_to_the_same_result(workdir):
  config = experiment_lib.load_config(workdir)
  result = jobs.bpd_job(workdir, config, split='test', num_repeats=2, batch_size=8,
                        max_examples=16)
  assert result['num_examples'] == 16 and result['num_repeats'] == 2
  assert result['num_levels'] == 17 and result['dim'] == 64
  assert np.isfinite(result['bpd']) and result['bpd_stderr'] > 0 and result['nfe_mean'] > 0
  assert result['solver']['rtol'] == 1e-3
  assert result['solver']['precision'] == 'highest'     # config.eval.matmul_precision
  out_dir = result['shard_dir']
  assert re.fullmatch(r'bpd_test_10_[0-9a-f]{8}', os.path.basename(out_dir))
  assert result['result_file'] == out_dir + '_r2.json'
  assert result['trained_on'] == 'train'           # the workdir's data_splits.json
  assert _shards(out_dir) == [f'shard_{i:05d}.npz' for i in range(4)]
  os.remove(os.path.join(out_dir, 'shard_00002.npz'))
  again = jobs.bpd_job(workdir, config, split='test', num_repeats=2, batch_size=8,
                       max_examples=16)
  assert again == result
  one = jobs.bpd_job(workdir, config, split='test', num_repeats=1, batch_size=8,
                     max_examples=16)        # fewer repeats: its own file, from shards 0-1
  assert one['shard_dir'] == out_dir and one['result_file'] == out_dir + '_r1.json'
  assert one['bpd'] != result['bpd']
  with open(result['result_file']) as f:
    assert json.load(f) == result            # the 2-repeat result is kept


def test_bpd_results_are_addressed_by_every_setting_that_determines_them(workdir, monkeypatch):
  """Another tolerance, batch size, example count or data behind the split name computes
  into its own folder: nothing made with other settings is reused or reported, and
  nothing earlier is overwritten."""
  config = experiment_lib.load_config(workdir)
  first = jobs.bpd_job(workdir, config, num_repeats=1, batch_size=8, max_examples=8)
  with open(first['result_file']) as f:
    first_file = f.read()
  looser = experiment_lib.load_config(workdir)
  looser.eval.rtol = looser.eval.atol = 1e-2
  variants = [jobs.bpd_job(workdir, looser, num_repeats=1, batch_size=8, max_examples=8),
              jobs.bpd_job(workdir, config, num_repeats=1, batch_size=4, max_examples=8),
              jobs.bpd_job(workdir, config, num_repeats=1, batch_size=8, max_examples=12)]
  # The same split name reading other digits (as benchmarks/flows_validation.py does).
  spec = data_lib.IMAGE_DATASETS['DIGITS']
  monkeypatch.setitem(data_lib.IMAGE_DATASETS, 'DIGITS', dataclasses.replace(
      spec, splits={'train': 'train', 'test': 'test[100:]'}))
  variants.append(jobs.bpd_job(workdir, config, num_repeats=1, batch_size=8, max_examples=8))
  assert first['tfds_split'] == 'test' and variants[3]['tfds_split'] == 'test[100:]'
  assert variants[3]['split'] == 'test' and variants[3]['data'] != first['data']
  files = {first['result_file']} | {v['result_file'] for v in variants}
  assert len(files) == 5                                           # five places
  assert variants[0]['solver']['rtol'] == 1e-2 and variants[0]['nfe_mean'] < first['nfe_mean']
  assert variants[1]['shard_size'] == 4 and variants[2]['num_examples'] == 12
  with open(first['result_file']) as f:
    assert f.read() == first_file                                  # not overwritten


def test_a_workdir_pins_the_data_splits_it_trained_on(workdir, monkeypatch):
  """benchmarks/flows_validation.py's mapping ('train' -> the first 1200 digits, 'test'
  -> the last 300 training digits) on a workdir trained on all 1500: resuming would
  train on other data, and its 'test' bits/dim would not be held out."""
  with open(os.path.join(workdir, 'data_splits.json')) as f:
    assert json.load(f) == {'train': 'train', 'test': 'test'}
  config = experiment_lib.load_config(workdir)
  assert data_lib.shared_examples(config, 'train', 'train[-300:]') == 300
  assert data_lib.shared_examples(config, 'train[:-300]', 'train[-300:]') == 0
  assert data_lib.shared_examples(config, 'test', 'train') == 0
  assert data_lib.shared_examples(config, 'train+test', 'test[100:]') == 197
  spec = data_lib.IMAGE_DATASETS['DIGITS']
  monkeypatch.setitem(data_lib.IMAGE_DATASETS, 'DIGITS', dataclasses.replace(
      spec, splits={'train': 'train[:-300]', 'test': 'train[-300:]'}))
  with pytest.raises(ValueError, match=r"'test' reads tfds 'train\[-300:\]' .* trained on "
                                       r"tfds 'train' .* 300 examples in common, so its "
                                       r"bits/dim would not be held out"):
    jobs.bpd_job(workdir, config, split='test', batch_size=8, max_examples=8)
  with open(os.path.join(workdir, 'config.json')) as f:
    stored_config = f.read()
  resumed = experiment_lib.load_config(workdir)
  resumed.training.log_freq = 7                  # a change a resume may make
  with pytest.raises(ValueError, match=r"holds a run on tfds splits .* resuming would "
                                       r"train on other data"):
    train.train_and_evaluate(resumed, workdir, final_evaluation=False)
  with open(os.path.join(workdir, 'data_splits.json')) as f:
    assert json.load(f) == {'train': 'train', 'test': 'test'}     # still the run's
  with open(os.path.join(workdir, 'config.json')) as f:
    assert f.read() == stored_config                                # not the refused run's
  # A dataset without a held-out split (CelebA-HQ, FFHQ: 'test' is tfds 'train'): its
  # bits/dim are computed and labelled training data.
  monkeypatch.setitem(data_lib.IMAGE_DATASETS, 'DIGITS', dataclasses.replace(
      spec, splits={'train': 'train', 'test': 'train'}))
  result = jobs.bpd_job(workdir, config, split='test', batch_size=8, max_examples=8)
  assert result['held_out'] is False and result['trained_on'] == 'train'


def test_the_default_sample_tag_names_its_settings(workdir):
  config = experiment_lib.load_config(workdir)
  a = jobs.sample_job(workdir, config, num_samples=8, shard_size=8)
  b = jobs.sample_job(workdir, config, num_samples=8, shard_size=4)       # another shard size
  c = jobs.sample_job(workdir, config, num_samples=8, shard_size=8, seed=5)
  assert len({a, b, c}) == 3
  assert re.fullmatch(r'step_10_pc_seed42_[0-9a-f]{8}', os.path.basename(a))
  assert jobs.sample_job(workdir, config, num_samples=16, shard_size=8) == a   # extends a
  # Without a shard size, more samples extend the earlier job at its shard size (here 4,
  # below eval.batch_size 8), in its default folder or under its --tag.
  d = jobs.sample_job(workdir, config, num_samples=4, seed=7)
  assert jobs.sample_job(workdir, config, num_samples=6, seed=7) == d
  grown = common.read_manifest(d)
  assert (grown['shard_size'], grown['num_shards'], grown['num_samples']) == (4, 2, 6)
  six = jobs.load_samples(d)
  jobs.sample_job(workdir, config, num_samples=4, seed=7, tag='grow')
  tagged = common.read_manifest(jobs.sample_job(workdir, config, num_samples=6, seed=7,
                                                tag='grow'))
  assert (tagged['shard_size'], tagged['num_shards']) == (4, 2)
  np.testing.assert_array_equal(jobs.load_samples(os.path.join(workdir, 'samples', 'grow')),
                                six)


def test_a_job_refuses_a_config_the_model_was_not_trained_with(workdir):
  """Jobs run on the workdir's own config up to eval.* / sampling.* keys: a config of
  another SDE would report bits/dim of a model that does not exist. The job address
  hashes the run keys only, so a stored config rewritten with another eval setting (a
  train rerun) keeps every job's folder."""
  stored = experiment_lib.load_config(workdir)
  other_sde = experiment_lib.load_config(workdir)
  other_sde.training.sde = 'subvpsde'
  with pytest.raises(ValueError, match=r"differs from the one the model in .* was trained "
                                       r"with \(training\.sde: 'vpsde' -> 'subvpsde'\); "
                                       r"leave --config out"):
    jobs.bpd_job(workdir, other_sde, max_examples=4)
  with pytest.raises(ValueError, match=r'model\.nf: 8 -> 16'):
    wider = experiment_lib.load_config(workdir)
    wider.model.nf = 16
    jobs.sample_job(workdir, wider, num_samples=4)
  eval_changed = experiment_lib.load_config(workdir)
  eval_changed.eval.num_samples = 7
  eval_changed.training.n_iters = 99
  assert experiment_lib.run_hash(eval_changed) == experiment_lib.run_hash(stored)
  assert experiment_lib.run_hash(other_sde) != experiment_lib.run_hash(stored)
  a = jobs.sample_job(workdir, stored, num_samples=4, shard_size=4)
  assert jobs.sample_job(workdir, eval_changed, num_samples=4, shard_size=4) == a


def test_python_api(workdir):
  model = score_sde.load(workdir)
  assert model.step == 10
  x_pc, info_pc = model.sample(jax.random.PRNGKey(0), 8)
  x_ode, info_ode = model.sample(jax.random.PRNGKey(0), 8, method='ode', rtol=1e-3, atol=1e-3)
  assert x_pc.shape == x_ode.shape == (8, 8, 8, 1)
  assert int(info_pc['nfe']) == 20 and int(info_ode['nfe']) > 0
  logp, z, _ = model.log_likelihood(jax.random.PRNGKey(1), x_ode, rtol=1e-3, atol=1e-3)
  assert logp.shape == (8,) and z.shape == x_ode.shape
  z = model.encode(x_ode[:2], rtol=1e-5, atol=1e-5)
  back = model.decode(z, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(back, x_ode[:2], atol=2e-3 * float(np.abs(x_ode).max()))
  assert model.score_fn(x_ode, 0.5).shape == x_ode.shape


def test_clear_errors(workdir, tmp_path):
  with pytest.raises(FileNotFoundError, match='no config.json'):
    score_sde.load(str(tmp_path))
  with open(os.path.join(workdir, 'config.json')) as f:
    stored = f.read()
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'config.json').write_text(stored)
  with pytest.raises(checkpoints.NoCheckpointError, match='has no checkpoints'):
    score_sde.load(str(empty))
  with pytest.raises(checkpoints.NoCheckpointError, match=r'no checkpoint at step 7 .*'
                                                          r'available steps: \[5, 10\]'):
    score_sde.load(workdir, checkpoint=7)


def test_eval_without_a_stats_file_names_the_command(workdir, tmp_path):
  from configs import workdir as workdir_config
  config = workdir_config.load_stored_config(workdir)
  jobs.sample_job(workdir, config, num_samples=8, tag='for_eval')
  config.data.dataset = 'CIFAR10'             # image datasets compare Inception statistics
  config.data.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match=r'statistics file .* is missing; make it with '
                                              r'launch.py stats'):
    jobs.eval_job(workdir, config, tag='for_eval')
  with pytest.raises(FileNotFoundError, match='no sampling job output'):
    jobs.eval_job(workdir, config, tag='never_sampled')


def test_the_readme_script_examples_run_on_a_workdir(workdir):
  """README 'In scripts' and the few-step line, as written, with 4 samples instead of 64."""
  (scripts,) = python_blocks('In scripts')
  names = run_example(scripts, {"'runs/digits'": repr(workdir), ', 64)': ', 4)',
                                ', 64,': ', 4,'})
  assert names['x_pc'].shape == names['x_ode'].shape == (4, 8, 8, 1)
  assert names['info']['nfe'] > 0 and np.all(np.isfinite(names['logp']))
  assert names['logp'].shape == (4,) and names['z'].shape == (4, 8, 8, 1)
  assert names['images'].shape == (4, 8, 8, 1)
  (few_step,) = python_blocks('Few-step samplers')
  names = run_example(few_step, {', 64,': ', 4,'}, names)
  assert names['x'].shape == (4, 8, 8, 1) and names['info']['nfe'] == 10


def test_eval_without_a_tag_takes_the_newest_finished_sampling_job(tmp_path):
  root = tmp_path / 'samples'

  def sampling_job(name, num_shards, done, mtime):
    folder = root / name
    folder.mkdir(parents=True)
    for s in range(done):
      io.savez_atomic(common.shard_path(str(folder), s), images=np.zeros((1, 2, 2, 1), np.uint8))
    io.atomic_json(str(folder / 'manifest.json'), {'num_shards': num_shards, 'shards': {}})
    os.utime(folder / 'manifest.json', (mtime, mtime))
    return str(folder)

  with pytest.raises(FileNotFoundError, match='has no sampling job output'):
    quality.latest_sample_dir(str(tmp_path))
  unfinished = sampling_job('running', num_shards=3, done=1, mtime=3000)
  with pytest.raises(FileNotFoundError, match=f'no sampling job in .* is finished '
                                              f'\\(the newest is {unfinished}\\); run its'):
    quality.latest_sample_dir(str(tmp_path))
  older = sampling_job('older', num_shards=2, done=2, mtime=1000)
  newer = sampling_job('newer', num_shards=1, done=1, mtime=2000)
  (root / 'no_manifest').mkdir()                # a folder that is no sampling job
  assert quality.latest_sample_dir(str(tmp_path)) == newer
  os.utime(os.path.join(older, 'manifest.json'), (2500, 2500))
  assert quality.latest_sample_dir(str(tmp_path)) == older
  with open(os.path.join(newer, 'manifest.json'), 'wb') as f:
    f.write(b'{"num_shards": 2, "sha')            # changed by something other than a job
  with pytest.raises(ValueError, match=f'{newer}/manifest.json is not valid JSON .*move '
                                       f'{newer} aside and run the job again'):
    quality.latest_sample_dir(str(tmp_path))


@pytest.mark.parametrize('name, read, fix', [
    ('samples/s/manifest.json', lambda w: common.read_manifest(os.path.join(w, 'samples/s')),
     'move .*samples/s aside and run the job again'),
    ('config.json', io.read_config_json, 'start a new --workdir'),
    ('data_splits.json', experiment_lib.training_data_splits, 'start a new --workdir'),
    ('eval/final_10.json',
     lambda w: quality._keep_earlier_summary(os.path.join(w, 'eval/final_10.json'), {}),
     'restore it from a backup, or move it aside'),
], ids=['manifest', 'config', 'data_splits', 'final_summary'])
def test_a_damaged_json_file_stops_with_one_line_naming_it(tmp_path, name, read, fix):
  path = tmp_path / name
  path.parent.mkdir(parents=True, exist_ok=True)
  for damage, problem in [(b'{"num_shards": 2, "sha', 'is not valid JSON'),
                          (b'\xff\xfe{}', 'is not valid JSON'), (b'[1, 2]', 'holds a list')]:
    path.write_bytes(damage)
    with pytest.raises(ValueError, match=f'{re.escape(str(path))} {problem}.*{fix}') as error:
      read(str(tmp_path))
    assert '\n' not in str(error.value)


def test_statistics_files_name_their_data_and_are_never_overwritten(tmp_path, monkeypatch):
  from score_sde.evaluation import metrics
  church = configs.load(os.path.join(configs.CONFIG_DIR, 've', 'church_ncsnpp_continuous.py'))
  cifar = configs.load(os.path.join(configs.CONFIG_DIR, 've', 'cifar10_ncsnpp_continuous.py'))
  church.data.data_dir = cifar.data.data_dir = str(tmp_path)
  path = quality.default_stats_path(church, 'train')
  assert path == str(tmp_path / 'score_sde_stats' / 'lsun_church_outdoor_256_train_inception.npz')
  assert quality.default_stats_path(church, 'test', max_examples=1000).endswith(
      '/lsun_church_outdoor_256_validation_n1000_inception.npz')
  assert quality.default_stats_path(cifar, 'train').endswith('/cifar10_32_train_inception.npz')
  names = []
  for held_out in ('train[:-300]', 'train[-300:]'):     # complementary slices: other files
    monkeypatch.setitem(data_lib.IMAGE_DATASETS, 'CIFAR10', dataclasses.replace(
        data_lib.IMAGE_DATASETS['CIFAR10'], splits={'train': held_out, 'test': 'test'}))
    names.append(os.path.basename(quality.default_stats_path(cifar, 'train')))
  assert len(set(names)) == 2 and all(re.fullmatch(r'cifar10_32_train-300-[0-9a-f]{6}_'
                                                   r'inception\.npz', n) for n in names), names
  monkeypatch.undo()
  os.makedirs(os.path.dirname(path))
  with open(path, 'w') as f:
    f.write('earlier statistics')
  with pytest.raises(FileExistsError, match='statistics are not overwritten'):
    jobs.stats_job(church, split='train')
  with open(path) as f:
    assert f.read() == 'earlier statistics'
  bedroom = metrics.FeatureStats(mu=np.zeros(2), sigma=np.eye(2), num_examples=2,
                                 dataset='LSUN/bedroom')
  with pytest.raises(ValueError, match=r"statistics of 'LSUN/bedroom', but the config is "
                                       r"'LSUN/church_outdoor'"):
    quality._check_stats_dataset(church, bedroom, 'bedroom.npz')
  for dataset in ('CIFAR10', ''):          # ours (older files too), or a foreign file
    quality._check_stats_dataset(cifar, dataclasses.replace(bedroom, dataset=dataset), 'f.npz')
  with pytest.raises(ValueError, match="statistics of 'LSUN/bedroom'"):
    quality._check_stats_dataset(cifar, bedroom, 'bedroom.npz')
  with pytest.raises(ValueError, match=r"statistics of 'LSUN' \(made before files recorded "
                                       r"the LSUN category\)"):
    quality._check_stats_dataset(church, dataclasses.replace(bedroom, dataset='LSUN'), 'old.npz')
  quality._check_stats_dataset(church, dataclasses.replace(bedroom, dataset='lsun/Church_Outdoor'),
                               'spelled.npz')


def test_an_earlier_final_summary_made_from_other_files_is_kept(tmp_path):
  path = str(tmp_path / 'final_10.json')
  first = {'result_file': 'bpd_test_10_x_r1.json', 'sample_dir': 'samples/s', 'bpd': 2.0}
  quality._keep_earlier_summary(path, first)              # nothing there yet
  io.atomic_json(path, first)
  quality._keep_earlier_summary(path, dict(first))        # the same files: replaced in place
  quality._keep_earlier_summary(path, dict(first, sample_dir='/abs/path/samples/s'))
  assert os.listdir(tmp_path) == ['final_10.json']
  quality._keep_earlier_summary(path, dict(first, result_file='bpd_test_10_x_r5.json', bpd=1.9))
  [kept] = glob.glob(str(tmp_path / 'final_10_*.json'))
  assert re.fullmatch(r'final_10_[0-9a-f]{8}\.json', os.path.basename(kept))
  with open(kept) as f:
    assert json.load(f) == first
  assert not os.path.exists(path)


def _launch(args, devices=1):
  env = {k: v for k, v in os.environ.items()      # launch.py adds the huge-page tunable itself
         if k not in ('GLIBC_TUNABLES', hugepages.RESTARTED)}
  env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  return subprocess.Popen([sys.executable, os.path.join(ROOT, 'launch.py'), *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_during_sampling_then_rerun_gives_identical_shards(workdir, tmp_path):
  # 12 shards of 60 PC steps: the kill, sent once shard 2 exists, lands while the job
  # still has about a second of work left (6 shards of 20 steps left ~0.1 s, and on a
  # loaded machine the job sometimes finished first).
  common = ['sample', f'--workdir={workdir}', '--num_samples=24', '--shard_size=2',
            '--config.sampling.num_steps=60']
  cache = tmp_path / 'xla_cache'
  full = _launch(common + ['--tag=full', f'--compilation_cache={cache}'])
  assert full.wait(timeout=600) == 0, full.stdout.read()
  assert any(cache.iterdir()), 'launch.py --compilation_cache kept no compiled program'
  victim = _launch(common + ['--tag=killed'])
  target = os.path.join(workdir, 'samples', 'killed', 'shard_00002.npz')
  deadline = time.time() + 600
  while not os.path.exists(target) and victim.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  if hugepages.tunable_would_help() and victim.poll() is None:   # restarted with the tunable
    with open(f'/proc/{victim.pid}/environ', 'rb') as f:
      environ = f.read()
    if victim.poll() is None:               # (an exited process's environ reads empty)
      assert b'glibc.malloc.hugetlb=1' in environ
  victim.send_signal(signal.SIGKILL)
  victim.wait(timeout=60)
  done_before = _shards(os.path.join(workdir, 'samples', 'killed'))
  assert len(done_before) < 12, 'the job finished before it could be killed'
  rerun = _launch(common + ['--tag=killed'])
  output = rerun.communicate(timeout=600)[0]
  assert rerun.returncode == 0, output
  assert f'{len(done_before)} already done' in output
  for name in _shards(os.path.join(workdir, 'samples', 'full')):
    a = io.load_npz(os.path.join(workdir, 'samples', 'full', name))
    b = io.load_npz(os.path.join(workdir, 'samples', 'killed', name))
    np.testing.assert_array_equal(a['images'], b['images'])
  assert len(jobs.load_samples(os.path.join(workdir, 'samples', 'killed'))) == 24


def _tiny_classifier_config(data_dir):
  config = configs.load(os.path.join(configs.CONFIG_DIR, 'digits', 'wrn_classifier.py'))
  config.training.n_iters = 160
  config.training.n_jitted_steps = 2          # dict batches, two steps per loop iteration
  config.training.batch_size = 32
  config.training.log_freq = 40
  config.training.eval_freq = 80
  config.training.snapshot_freq = 80
  config.model.channel_multiplier = 1
  config.model.base_channels = 8
  config.model.embedding_size = 16
  config.data.data_dir = data_dir
  config.eval.batch_size = 100
  return config


@pytest.mark.slow
def test_classifier_training_and_controllable_commands(workdir, tmp_path):
  with open(os.path.join(workdir, 'config.json')) as f:
    data_dir = json.load(f)['data']['data_dir']
  classifier_dir = str(tmp_path / 'classifier')
  train.train_and_evaluate(_tiny_classifier_config(data_dir), classifier_dir)
  [path] = glob.glob(os.path.join(classifier_dir, 'eval', 'classifier_accuracy_160_*.json'))
  with open(path) as f:
    result = json.load(f)
  assert result['result_file'] == path and result['batch_size'] == 100
  accuracy = result['accuracy_by_time']
  assert result['num_examples'] == 297 and len(accuracy) == 6
  # 160 steps: far above chance (0.1) on nearly clean digits, near chance at the prior.
  assert accuracy['0.01'] > 0.5 and accuracy['1'] < 0.3, accuracy

  run = _launch(['cond_sample', f'--workdir={workdir}', f'--classifier_workdir={classifier_dir}',
                 '--labels=1,7', f'--out_dir={tmp_path / "cond"}'])
  output = run.communicate(timeout=600)[0]
  assert run.returncode == 0, output
  with np.load(tmp_path / 'cond' / 'conditional.npz') as f:
    assert f['samples'].shape == (2, 8, 8, 1)
    np.testing.assert_array_equal(f['labels'], [1, 7])
  with open(tmp_path / 'cond' / 'conditional.json') as f:
    assert 0.0 <= json.load(f)['digits_label_agreement']['agreement'] <= 1.0

  run = _launch(['inpaint', f'--workdir={workdir}', '--images=test', '--num_images=3',
                 '--mask=random_pixels', '--mask_fraction=0.3', f'--out_dir={tmp_path / "inp"}'])
  output = run.communicate(timeout=600)[0]
  assert run.returncode == 0, output
  with np.load(tmp_path / 'inp' / 'inpainting.npz') as f:
    known = f['masks'].astype(bool)
    np.testing.assert_allclose(f['results'][:, 0][known], f['inputs'][known], atol=1e-6)
    assert 0.5 < known.mean() < 0.9

  for args, message in [
      (['colorize', f'--workdir={workdir}', '--images=test'], 'needs an RGB model'),
      (['train', f'--workdir={tmp_path / "x"}',
        f'--config={os.path.join(configs.CONFIG_DIR, "digits", "wrn_classifier.py")}'],
       'train it with launch.py train_classifier'),
      (['inpaint', f'--workdir={workdir}', '--images=test', '--mask=diagonal'],
       'neither a mask pattern')]:    # label range etc.: tests/test_controllable.py
    run = _launch(args)
    output = run.communicate(timeout=300)[0]
    assert run.returncode == 1 and message in output, output


# ----------------------------------------------------------------------------
# Every job kind: interrupted and re-run, and on 2 processes, gives the same files
# ----------------------------------------------------------------------------

def _copy_trained(workdir, root):
  """root/wd: the trained workdir's config and checkpoints (none of its job outputs)."""
  os.makedirs(root)
  shutil.copytree(os.path.join(workdir, 'checkpoints'), os.path.join(root, 'wd', 'checkpoints'))
  shutil.copy(os.path.join(workdir, 'config.json'), os.path.join(root, 'wd', 'config.json'))
  return str(root)


def _assert_same_outputs(expected_root, root):
  """Every npz / json / png under the two roots is equal (npz arrays bitwise)."""
  def outputs(base):
    found = set()
    for directory, _, files in os.walk(base):
      found.update(os.path.relpath(os.path.join(directory, f), base) for f in files
                   if f.endswith(('.npz', '.json', '.png')) and 'checkpoints' not in directory)
    return found
  names = outputs(expected_root)
  assert names == outputs(root)
  assert any(re.fullmatch(r'wd/eval/bpd_test_10_[0-9a-f]{8}/shard_00002.npz', name)
             for name in names)
  assert any(re.fullmatch(r'wd/eval/quality_t_[0-9a-f]{8}.json', name) for name in names)
  assert {'wd/samples/t/shard_00002.npz',
          'wd/eval/quality_t/shard_00002.npz',
          'inpaint/inpainting_shards/shard_00001.npz', 'inpaint/inpainting.npz',
          'colorize/colorization.png', 'cond_sample/conditional_shards/manifest.json',
          'cond_sample/conditional.json'} <= names
  for name in sorted(names):
    a, b = os.path.join(expected_root, name), os.path.join(root, name)
    if name.endswith('.npz'):
      x, y = io.load_npz(a), io.load_npz(b)
      assert sorted(x) == sorted(y), name
      for key in x:
        assert x[key].dtype == y[key].dtype, (name, key)
        np.testing.assert_array_equal(x[key], y[key], err_msg=f'{name}: {key}')
    elif name.endswith('.json'):
      with open(a) as f, open(b) as g:
        assert (json.loads(f.read().replace(expected_root, '<root>'))
                == json.loads(g.read().replace(root, '<root>'))), name
    else:
      with open(a, 'rb') as f, open(b, 'rb') as g:
        assert f.read() == g.read(), name


def _worker(root, devices, *args):
  """tests/jobs_worker.py on `devices` CPU devices (the XLA flags of this process)."""
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                 os.environ.get('XLA_FLAGS', ''))
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
             XLA_FLAGS=f'{flags} --xla_force_host_platform_device_count={devices}')
  return subprocess.Popen([sys.executable, os.path.join(ROOT, 'tests', 'jobs_worker.py'),
                           root, *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope='module')
def job_runs(workdir, tmp_path_factory):
  """All six jobs three ways, at the same time: in one process with 2 devices, there
  again each interrupted after its first shard and re-run, and in 2 processes with 1
  device each (127.0.0.1, gloo). Returns ({name: root}, {name: output})."""
  from score_sde.evaluation import digits_classifier
  digits_classifier.get_digits_classifier(experiment_lib.load_config(workdir))  # made once
  base = tmp_path_factory.mktemp('job_runs')
  roots = {name: _copy_trained(workdir, base / name)
           for name in ('one_process', 'interrupted', 'two_processes')}
  address = f'127.0.0.1:{portpicker.pick_unused_port()}'
  procs = {'one_process': _worker(roots['one_process'], 2, '--interrupted_root',
                                  roots['interrupted'])}
  for i in range(2):
    procs[f'process_{i}'] = _worker(roots['two_processes'], 1, '--cluster', address, '2',
                                    str(i))
  outputs = {name: p.communicate(timeout=900)[0] for name, p in procs.items()}
  assert all(p.returncode == 0 for p in procs.values()), outputs
  return roots, outputs


@pytest.mark.slow
def test_every_job_interrupted_after_a_shard_then_rerun_gives_the_same_files(job_runs):
  roots, outputs = job_runs
  output = outputs['one_process']
  for name in ('sample', 'bpd', 'eval', 'inpaint', 'colorize', 'cond_sample'):
    assert f'worker: {name} resumed' in output
  assert output.count(', 1 already done.') == 6, output    # the re-runs skip shard 0
  assert '%|' not in output and '/s]' not in output, output   # no progress bar off a terminal
  _assert_same_outputs(roots['one_process'], roots['interrupted'])


@pytest.mark.slow
def test_every_job_on_two_processes_gives_the_one_process_files(job_runs):
  # The reference is a process with 2 devices, not a 2-device mesh in this 4-device
  # process: XLA:CPU's results there differ in the last bits (enough to change adaptive
  # ODE steps), while 1 process x 2 devices and 2 processes x 1 device agree bitwise.
  roots, outputs = job_runs
  assert 'sampling 10 samples' in outputs['process_0']           # process 0 talks,
  assert 'sampling' not in outputs['process_1']                  # process 1 does not
  assert 'worker: cond_sample done' in outputs['process_1']
  _assert_same_outputs(roots['one_process'], roots['two_processes'])


@pytest.mark.slow
def test_eval_scores_the_jobs_samples_and_not_the_last_shards_extra_ones(job_runs):
  """The worker's 10 samples lie in 3 shards of 4 (the last one full): the metrics are those
  of the 10 samples read back by load_samples, recomputed here without eval's shards."""
  from score_sde.evaluation import digits_classifier
  from score_sde.evaluation import metrics
  from score_sde.jobs import sample as sample_lib
  roots, _ = job_runs
  workdir = os.path.join(roots['one_process'], 'wd')
  config = experiment_lib.load_config(workdir)
  [path] = glob.glob(os.path.join(workdir, 'eval', 'quality_t_*.json'))
  with open(path) as f:
    result = json.load(f)
  images = sample_lib.load_samples(os.path.join(workdir, 'samples', 't'))
  assert len(images) == result['num_samples'] == 10
  classifier = digits_classifier.get_digits_classifier(config)
  network = digits_classifier.feature_network(classifier)
  features, logits = network.apply(images)
  expected = metrics.evaluate_features(
      np.asarray(features), np.asarray(logits),
      digits_classifier.reference_stats(config, classifier, 'test'),
      feature_network=network.name, kid_subset_size=50, is_splits=10, seed=0, prefix='digits_')
  for name in ('digits_fid', 'digits_kid', 'digits_is'):
    np.testing.assert_allclose(result[name], expected[name], rtol=1e-5, err_msg=name)


def test_the_final_bits_per_dim_line_says_its_error_is_a_standard_error():
  """Per-example bits/dim [1, 2, 3]: mean 2, standard error std(ddof 1) / sqrt(3) = 0.5774;
  the printed line gives both and names the error."""
  per_example = np.array([1.0, 2.0, 3.0])
  result = {'tfds_split': 'test', 'held_out': True, 'num_levels': 17, 'num_examples': 3,
            'bpd': float(per_example.mean()),
            'bpd_stderr': float(per_example.std(ddof=1) / np.sqrt(3)), 'nfe_mean': 640.2}
  line = quality.bpd_summary_line(result, is_flow=False)
  assert line == ('Test bits/dim (probability-flow ODE, 17 levels, 3 examples): 2.0000 +- '
                  '0.5774 (standard error) (mean NFE 640)'), line
  flow = quality.bpd_summary_line(dict(result, held_out=False, tfds_split='train'), is_flow=True)
  assert flow.startswith('Training-data (tfds train) bits/dim (exact change of variables')
  assert flow.endswith('+- 0.5774 (standard error)'), flow
