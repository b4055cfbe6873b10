"""Importing checkpoints written by the original code bases (score_sde in Flax,
score_sde_pytorch), checked against the original code's own scores.

The fixtures in shared/data/original_checkpoints/ were written by those code
bases themselves (see its README); expected.npz holds the original score at
fixed (x, t) with the EMA parameters.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from score_sde import experiment as experiment_lib
from score_sde.convert import original as original_lib
from score_sde.jobs import import_checkpoint as import_lib
from tests.reference_outputs import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, '..', 'shared', 'data', 'original_checkpoints')
SHARED_TFDS = os.path.join(ROOT, '..', 'shared', 'data', 'tfds')
FIXTURE_DIRS = sorted(glob.glob(os.path.join(FIXTURES, '*', '*', 'fixture.json')))
NAMES = [os.path.relpath(os.path.dirname(p), FIXTURES) for p in FIXTURE_DIRS]

# Relative tolerance of the imported score against the original's. One case is
# looser, for a measured reason: at t = 0.01 the DDPM score divides by
# sqrt(1 - alpha_bar_9) = 0.0435, and 1 - alpha_bar_9 = 0.0019 loses ~525x of
# float32 precision; the fixture's own environment rounded alpha_bar_9 one ulp
# away from this JAX (the original Flax module, run here on the same weights,
# gives our output bitwise), which is 1.6e-5 relative on that example.
RTOL = {'flax/vp_ddpm_cifar10': 2e-5}


def _fixture(name: str):
  directory = os.path.join(FIXTURES, name)
  with open(os.path.join(directory, 'fixture.json')) as f:
    fixture = json.load(f)
  overrides = {k: tuple(v) if isinstance(v, list) else v
               for k, v in fixture['overrides'].items()}
  config = load_config(fixture['config'], overrides)
  return directory, fixture, config


def _relative(got, expected) -> float:
  return float(np.abs(np.asarray(got, np.float64) - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize('name', NAMES)
def test_every_fixture_gives_the_original_score(name):
  directory, fixture, config = _fixture(name)
  original = import_lib.read_original(os.path.join(directory, fixture['checkpoint']))
  assert original.step == fixture['step'] == 250000
  assert original.format == original_lib.FLAX if name.startswith('flax') else original_lib.TORCH
  mapped = import_lib.map_original(original, config, fixture['config'])
  experiment = experiment_lib.build_experiment(config)
  expected = np.load(os.path.join(directory, 'expected.npz'))
  score_ema = experiment.score_model_fn(mapped.ema_params, expected['x'], expected['t'])
  assert _relative(score_ema, expected['score']) < RTOL.get(name, 1e-5)
  # The training parameters are a different function (they differ on purpose):
  # the EMA, not the parameters, is what the original scored.
  score_params = experiment.score_model_fn(mapped.params, expected['x'], expected['t'])
  assert _relative(score_params, expected['score']) > 1e-3


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """A workdir imported from the PyTorch VP DDPM fixture (and its source)."""
  directory, fixture, config = _fixture('torch/vp_ddpm_cifar10')
  data_dir = tmp_path_factory.mktemp('tfds')
  shutil.copytree(os.path.join(SHARED_TFDS, 'cifar10'), data_dir / 'cifar10')
  config.data.data_dir = str(data_dir)
  config.eval.batch_size = 4
  config.training.batch_size = 4      # the fine-tuning below keeps the imported config
  workdir = str(tmp_path_factory.mktemp('imported') / 'run')
  summary = import_lib.import_checkpoint(os.path.join(directory, fixture['checkpoint']),
                                         config, workdir, config_name=fixture['config'])
  return workdir, summary, directory, fixture, config


def test_imported_workdir_restores_parameters_ema_and_adam(imported):
  workdir, summary, directory, fixture, config = imported
  assert summary['step'] == 250000 and summary['adam_state']
  assert sorted(os.listdir(workdir)) == ['checkpoints', 'config.json', 'imported.json']
  from score_sde import parallel
  experiment, state, step = experiment_lib.restore_state(workdir, config,
                                                         parallel.make_mesh())
  assert step == 250000 and int(state.step) == 250000
  from score_sde.convert import torch_pickle
  raw = torch_pickle.load(os.path.join(directory, fixture['checkpoint']))
  # PyTorch's first conv (OIHW) is our Conv_0 kernel (HWIO); its EMA is the
  # matching shadow parameter, its Adam moment the matching exp_avg.
  np.testing.assert_array_equal(np.asarray(state.params['Conv_0']['kernel']),
                                raw['model']['module.all_modules.2.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(np.asarray(state.ema_params['Dense_0']['kernel']),
                                raw['ema']['shadow_params'][0].T)
  adam = [s for s in state.opt_state[-1] if hasattr(s, 'mu')][0]
  np.testing.assert_array_equal(np.asarray(adam.nu['Dense_1']['bias']),
                                raw['optimizer']['state'][3]['exp_avg_sq'])
  assert int(adam.count) == int(raw['optimizer']['state'][0]['step'])
  schedule = [s for s in state.opt_state[-1] if type(s).__name__ == 'ScaleByScheduleState'][0]
  assert int(schedule.count) == 250000     # learning-rate warm-up is long past


def test_score_sde_load_on_the_imported_workdir(imported):
  workdir, _, directory, _, _ = imported
  import score_sde
  model = score_sde.load(workdir)
  expected = np.load(os.path.join(directory, 'expected.npz'))
  assert _relative(model.score_fn(expected['x'], expected['t']), expected['score']) < 1e-5


def test_other_training_settings_on_an_imported_workdir_name_the_reimport(imported, tmp_path):
  """A smaller batch for fine-tuning is refused like any config change (resume would not be
  exact), and on an imported workdir the message says how: import again with it."""
  workdir, _, _, _, config = imported
  smaller = config.copy_and_resolve_references()
  smaller.training.batch_size = 2
  with pytest.raises(ValueError, match=r'different config \(training.batch_size: 4 -> 2\).*'
                                       r'import it again into a new --workdir with them'):
    experiment_lib.write_or_check_config(smaller, workdir)
  trained = tmp_path / 'trained'                   # the same refusal on a trained workdir
  shutil.copytree(workdir, trained)
  os.remove(trained / 'imported.json')
  with pytest.raises(ValueError, match=r'resuming would not be exact. Use a new --workdir.$'):
    experiment_lib.write_or_check_config(smaller, str(trained))


def _launch(*args, timeout=600):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, os.path.join(ROOT, 'launch.py'), *args],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


@pytest.mark.slow
def test_jobs_and_fine_tuning_run_on_the_imported_workdir(imported, tmp_path):
  workdir, _, _, _, _ = imported
  run = _launch('sample', f'--workdir={workdir}', '--num_samples=4',
                '--config.sampling.method=ode', '--config.sampling.rtol=1e-2',
                '--config.sampling.atol=1e-2')
  assert run.returncode == 0, run.stderr[-2000:]
  folder = glob.glob(os.path.join(workdir, 'samples', 'step_250000_ode_*'))
  assert len(folder) == 1 and os.path.exists(os.path.join(folder[0], 'grid.png'))
  run = _launch('bpd', f'--workdir={workdir}', '--max_examples=4', '--batch_size=4',
                '--config.eval.rtol=1e-2', '--config.eval.atol=1e-2')
  assert run.returncode == 0, run.stderr[-2000:]
  result_files = glob.glob(os.path.join(workdir, 'eval', 'bpd_test_250000_*.json'))
  assert len(result_files) == 1
  with open(result_files[0]) as f:
    assert np.isfinite(json.load(f)['bpd'])
  # Fine-tuning resumes from the imported step (a copy: the fixture stays as imported).
  tuned = str(tmp_path / 'tuned')
  shutil.copytree(workdir, tuned)
  run = _launch('train', f'--workdir={tuned}', '--config.training.n_iters=250005',
                '--config.training.log_freq=1',
                '--config.training.eval_freq=1000000', '--config.training.snapshot_freq=250005',
                '--config.training.snapshot_freq_for_preemption=250005',
                '--config.training.snapshot_sampling=False')
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'Resumed from the checkpoint at step 250000' in run.stdout
  assert 'holds no data-loader position' in run.stdout
  from score_sde import checkpoints
  assert checkpoints.existing_steps(tuned) == [250000, 250005]


def test_a_wrong_config_names_the_arrays_and_keys_and_writes_nothing(tmp_path):
  directory, fixture, config = _fixture('flax/ve_cifar10_ncsnpp_continuous')
  config.model.nf = 16
  workdir = tmp_path / 'run'
  with pytest.raises(original_lib.CheckpointMismatchError,
                     match=r'shapes differ: GaussianFourierProjection_0/W file \(8,\) vs config '
                           r'\(16,\), Dense_0/kernel file \(16, 32\) vs config \(32, 64\).*'
                           r'model\.nf.*Nothing was written'):
    import_lib.import_checkpoint(os.path.join(directory, fixture['checkpoint']), config,
                                 str(workdir))
  assert os.listdir(tmp_path) == []          # no workdir, no temporary folder


def test_a_config_of_another_network_is_refused(tmp_path):
  directory, fixture, _ = _fixture('torch/ve_cifar10_ncsnpp_continuous')
  config = load_config('configs/vp/cifar10_ddpmpp_continuous.py',
                       {'model.nf': 8, 'data.image_size': 16, 'model.num_res_blocks': 1,
                        'model.attn_resolutions': (8,)})
  with pytest.raises(original_lib.CheckpointMismatchError, match=r'model\.name.*model\.nf'):
    import_lib.import_checkpoint(os.path.join(directory, fixture['checkpoint']), config,
                                 str(tmp_path / 'run'))


def test_noise_levels_of_a_pytorch_file_are_checked(tmp_path):
  directory, fixture, config = _fixture('torch/ve_cifar10_ncsnpp')
  config.model.sigma_max = 25.0
  with pytest.raises(original_lib.CheckpointMismatchError,
                     match=r'other noise levels.*sigmas buffer holds 1000 levels from 50 to '
                           r'0\.01.*model\.sigma_max'):
    import_lib.import_checkpoint(os.path.join(directory, fixture['checkpoint']), config,
                                 str(tmp_path / 'run'))


def test_the_format_is_read_from_the_bytes_not_the_name(tmp_path):
  directory, fixture, _ = _fixture('flax/ve_ncsnv2_cifar10')
  disguised = tmp_path / 'model.pth'
  shutil.copy(os.path.join(directory, fixture['checkpoint']), disguised)
  assert original_lib.detect_format(str(disguised)) == original_lib.FLAX
  noise = tmp_path / 'checkpoint_3'
  noise.write_bytes(b'\x00\x01garbage' * 10)
  with pytest.raises(ValueError, match=r'neither a score_sde \(Flax msgpack\) checkpoint nor'):
    import_lib.read_original(str(noise))
  with pytest.raises(ValueError, match='does not exist'):
    import_lib.read_original(str(tmp_path / 'missing'))


def test_an_existing_workdir_is_never_overwritten(imported):
  workdir, _, directory, fixture, config = imported
  before = sorted(os.listdir(workdir))
  with pytest.raises(FileExistsError, match='already exists and is not empty'):
    import_lib.import_checkpoint(os.path.join(directory, fixture['checkpoint']), config,
                                 workdir)
  assert sorted(os.listdir(workdir)) == before


def test_cli_import_and_describe(tmp_path):
  name = 'flax/ve_ncsnv2_cifar10'
  directory, fixture, _ = _fixture(name)
  source = os.path.join(directory, fixture['checkpoint'])
  overrides = ['--config.model.nf=8', '--config.data.image_size=16']
  run = _launch('describe', f'--original={source}', '--config=configs/ve/ncsnv2/cifar10.py',
                *overrides)
  assert run.returncode == 0, run.stderr[-2000:]
  assert 'score_sde (Flax msgpack), step 250000' in run.stdout
  info = json.loads(run.stdout.strip().splitlines()[-1])
  assert info['matching_configs'] == ['configs/ve/ncsnv2/cifar10.py']
  from score_sde import describe
  assert info['parameters'] == describe.describe(_fixture(name)[2])['params']
  run = _launch('describe', f'--original={source}', '--config=configs/ve/ncsnv2/cifar10.py')
  assert run.returncode == 0 and 'matches 0 of 1 config' in run.stdout
  workdir = str(tmp_path / 'run')
  run = _launch('import_checkpoint', f'--original={source}', f'--workdir={workdir}',
                '--config=configs/ve/ncsnv2/cifar10.py', '--config.model.nf=16',
                '--config.data.image_size=16')
  assert run.returncode == 1 and run.stderr.startswith('error: ')
  assert len(run.stderr.strip().splitlines()) == 1 and 'model.nf' in run.stderr
  assert not os.path.exists(workdir)
  run = _launch('import_checkpoint', f'--workdir={workdir}',
                '--config=configs/ve/ncsnv2/cifar10.py')
  assert run.returncode == 1 and 'needs --original' in run.stderr
  run = _launch('import_checkpoint', f'--original={source}', f'--workdir={workdir}',
                '--config=configs/ve/ncsnv2/cifar10.py', *overrides)
  assert run.returncode == 0, run.stderr[-2000:]
  assert 'Imported score_sde (Flax msgpack) step 250000' in run.stdout
  with open(os.path.join(workdir, 'imported.json')) as f:
    provenance = json.load(f)
  assert provenance['config'] == 'configs/ve/ncsnv2/cifar10.py'
  assert provenance['step'] == 250000 and len(provenance['sha256']) == 64


PORT_REFINENETS = os.path.join(ROOT, 'tests', 'data', 'original_torch')


@pytest.mark.parametrize('name', ['ve_ncsnv2_cifar10', 've_ncsn_cifar10'])
def test_pytorch_refinenet_imports_with_the_ports_numerics(name, tmp_path):
  """score_sde_pytorch's 32 px NCSN / NCSNv2 (other decoder widths and numerics than
  the Flax original): the import sets the model options that make our network the
  port's function, records them in config.json, and the loaded workdir scores as
  the port's own code did."""
  directory = os.path.join(PORT_REFINENETS, name)
  with open(os.path.join(directory, 'fixture.json')) as f:
    fixture = json.load(f)
  config = load_config(fixture['config'], fixture['overrides'])
  config.lock()                                # as the launcher passes it
  source = os.path.join(directory, fixture['checkpoint'])
  assert import_lib.describe_original(source, {'cfg': config})['matching_configs'] == ['cfg']
  workdir = str(tmp_path / 'run')
  summary = import_lib.import_checkpoint(source, config, workdir,
                                         config_name=fixture['config'])
  assert 'refine_mults' not in config.model     # the caller's config is not changed
  assert any('model.refine_mults=(2, 2, 1, 1), model.norm_unbiased_variance=True, '
             'model.resize_align_corners=True' in notice for notice in summary['notices'])
  with open(os.path.join(workdir, 'config.json')) as f:
    stored = json.load(f)['model']
  assert (stored['refine_mults'], stored['norm_unbiased_variance'],
          stored['resize_align_corners']) == ([2, 2, 1, 1], True, True)
  import score_sde
  expected = np.load(os.path.join(directory, 'expected.npz'))
  score = score_sde.load(workdir).score_fn(expected['x'], expected['t'])
  assert _relative(score, expected['score']) < 1e-5


def test_a_flow_config_is_refused_before_the_file_is_read(tmp_path):
  from configs.digits import glow
  with pytest.raises(ValueError, match=r"is a normalizing flow \(glow\); the original "
                                       r"checkpoints hold score models"):
    import_lib.import_checkpoint(str(tmp_path / 'missing'), glow.get_config(),
                                 str(tmp_path / 'workdir'))


def test_a_flax_file_gives_its_adam_moments_count_and_settings(tmp_path):
  """The Flax fixtures hold zero Adam moments (their optimiser never stepped), so this
  file is built by hand in flax.optim's layout, each moment distinct: grad_ema is mu,
  grad_sq_ema nu, optimizer.state.step Adam's own count (not the training step)."""
  from flax import serialization
  from score_sde.convert import flax_msgpack
  rng = np.random.default_rng(0)
  shapes = {'Conv_0/kernel': (3, 3, 1, 2), 'Conv_0/bias': (2,),
            'ResidualBlock_0/InstanceNorm2dPlus_0/alpha': (1, 1, 1, 2)}

  def arrays(scale):
    return {p: (scale * rng.standard_normal(s)).astype(np.float32) for p, s in shapes.items()}

  params, ema, mu = arrays(1.0), arrays(1.0), arrays(1e-3)
  nu = {p: np.square(v) for p, v in arrays(1e-2).items()}
  states = original_lib.unflatten({f'{p}/{kind}': moments[p] for p in shapes
                                   for kind, moments in (('grad_ema', mu), ('grad_sq_ema', nu))})
  state = {'step': np.int64(1200), 'lr': np.float32(2e-4), 'model_state': {},
           'ema_rate': np.float32(0.999), 'params_ema': original_lib.unflatten(ema),
           'rng': np.zeros(2, np.uint32),
           'optimizer': {'target': original_lib.unflatten(params),
                         'state': {'step': np.int64(300), 'param_states': states}}}
  path = tmp_path / 'checkpoint_3'
  path.write_bytes(serialization.msgpack_serialize(state))
  assert original_lib.detect_format(str(path)) == original_lib.FLAX
  checkpoint = flax_msgpack.read(str(path))
  assert checkpoint.step == 1200 and checkpoint.adam_count == 300
  assert checkpoint.learning_rate == pytest.approx(2e-4)
  assert checkpoint.ema_rate == pytest.approx(0.999)
  for got, want in ((checkpoint.params, params), (checkpoint.ema_params, ema),
                    (checkpoint.adam_mu, mu), (checkpoint.adam_nu, nu)):
    assert sorted(got) == sorted(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  mapped = flax_msgpack.to_ours(checkpoint.adam_nu, [
      ('ResidualBlock_0/InstanceNormPlus_0/alpha', (2,)), ('Conv_0/kernel', (3, 3, 1, 2))])
  np.testing.assert_array_equal(mapped['ResidualBlock_0/InstanceNormPlus_0/alpha'],
                                nu['ResidualBlock_0/InstanceNorm2dPlus_0/alpha'].reshape(2))


def test_a_frozen_parameter_has_no_adam_moments_and_the_others_keep_their_index():
  """Adam keeps no state for GaussianFourierProjection.W (no gradient): the moments of
  parameter k stay with parameter k, not shifted onto the frozen one."""
  from score_sde.convert import torch_state
  checkpoint = torch_state.read(
      os.path.join(FIXTURES, 'torch', 've_cifar10_ncsnpp_continuous', 'checkpoint_5.pth'))
  assert 'all_modules.0.W' in checkpoint.params
  trainable = [name for name in checkpoint.params if name != 'all_modules.0.W']
  assert list(checkpoint.adam_mu) == list(checkpoint.adam_nu) == trainable
  for name in trainable:
    assert checkpoint.adam_mu[name].shape == checkpoint.adam_nu[name].shape == \
        checkpoint.params[name].shape, name
