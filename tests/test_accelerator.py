"""The accelerator path, checked on the CPU: bfloat16 mixed precision end to end,
the matmul precision of the likelihood and sampling programs (read from their
HLO), and the train step's accelerator form with the backend check forced.
"""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde import checkpoints
from score_sde import experiment as experiment_lib
from score_sde import io
from score_sde import likelihood
from score_sde import parallel
from score_sde import sampling
from score_sde import train
from score_sde.cpu import xla_flags
from score_sde.models import utils as model_utils
from tests.test_families import _small
from tests.test_train import _assert_trees_equal, small_toy_config

# ----------------------------------------------------------------------------
# Matmul precision in the compiled programs
# ----------------------------------------------------------------------------

DOT_OR_CONV = re.compile(r'stablehlo\.(dot_general|convolution)\b')
# dot_general: `precision = [HIGHEST, HIGHEST]`; convolution: `precision_config =
# [#stablehlo<precision HIGHEST>, #stablehlo<precision HIGHEST>]`; absent: DEFAULT.
PRECISION = re.compile(r'precision(?:_config)? = \[(?:#stablehlo<precision )?(\w+)>?, '
                       r'(?:#stablehlo<precision )?(\w+)>?\]')


def precisions_of(hlo_text: str) -> list[tuple[str, str]]:
  """(op, precision of its operands) of every dot_general / convolution in StableHLO text."""
  found = []
  for line in hlo_text.splitlines():
    op = DOT_OR_CONV.search(line)
    if op:
      precision = PRECISION.search(line)
      found.append((op.group(1), precision.groups() if precision else ('DEFAULT', 'DEFAULT')))
  return found


@pytest.fixture(scope='module')
def ncsnpp_experiment(tmp_path_factory):
  """A small digits NCSN++ (convolutions, attention, dense layers, Fourier features)."""
  config = _small('ve_ncsnpp_continuous', str(tmp_path_factory.mktemp('tfds')))
  experiment = experiment_lib.build_experiment(config)
  params = model_utils.init_params(jax.random.PRNGKey(0), experiment.model, config)
  return config, experiment, params


@pytest.mark.parametrize('precision', ['highest', 'default'])
def test_every_dot_and_convolution_of_the_likelihood_program_gets_its_precision(
    ncsnpp_experiment, precision):
  config, experiment, params = ncsnpp_experiment
  fn = likelihood.get_likelihood_fn(experiment.sde, experiment.score_model_fn, rtol=1e-3,
                                    atol=1e-3, precision=precision)
  x = jnp.zeros(model_utils.input_shape(config, 2))
  ops = precisions_of(fn.lower(jax.random.PRNGKey(0), params, x).as_text())
  kinds = {op for op, _ in ops}
  assert kinds == {'dot_general', 'convolution'} and len(ops) > 20, ops
  found = {p for _, p in ops}
  if precision == 'highest':
    assert found == {('HIGHEST', 'HIGHEST')}, ops
  else:       # the option is what made them HIGHEST (a few layers ask for it themselves)
    assert ('DEFAULT', 'DEFAULT') in found, ops


@pytest.mark.parametrize('method', ['pc', 'dpmpp_2m'])
def test_the_sampling_option_reaches_every_dot_and_convolution(ncsnpp_experiment, method):
  """'highest' / 'default' set every op's precision; 'inherit' (the default) keeps what
  JAX is set to, here 'highest' by jax.default_matmul_precision around the tracing."""
  _, experiment, params = ncsnpp_experiment
  config = ncsnpp_experiment[0].copy_and_resolve_references()
  config.sampling.method = method
  seen = {}
  for precision in ('highest', 'default', 'inherit'):
    config.sampling.matmul_precision = precision
    _, options = sampling.config_options(config)       # the config key reaches the sampler
    assert options['matmul_precision'] == precision
    sampler = sampling.build_sampler(experiment.sde, experiment.score_model_fn,
                                     model_utils.input_shape(config, 2), method,
                                     **{**options, 'num_steps': 3})
    with jax.default_matmul_precision('highest'):
      ops = precisions_of(jax.jit(sampler).lower(jax.random.PRNGKey(0), params).as_text())
    assert len(ops) > 20
    seen[precision] = {p for _, p in ops}
  assert seen['highest'] == seen['inherit'] == {('HIGHEST', 'HIGHEST')}
  assert ('DEFAULT', 'DEFAULT') in seen['default']


def test_the_bpd_job_takes_its_precision_from_the_config(ncsnpp_experiment):
  from score_sde.jobs import bpd
  config = ncsnpp_experiment[0].copy_and_resolve_references()
  assert bpd.settings_from_config(config).precision == 'highest'      # configs/defaults.py
  config.eval.matmul_precision = 'HIGH'
  assert bpd.settings_from_config(config).precision == 'high'
  config.eval.matmul_precision = 'inherit'                            # not for likelihoods
  with pytest.raises(ValueError, match="unknown matmul precision 'inherit'"):
    bpd.settings_from_config(config)


def test_a_bad_precision_is_refused_with_the_choices(ncsnpp_experiment):
  config, experiment, _ = ncsnpp_experiment
  with pytest.raises(ValueError, match=r"unknown matmul precision 'float64'; valid: "
                                       r"\['default', 'high', 'highest'\]"):
    likelihood.get_likelihood_fn(experiment.sde, experiment.score_model_fn, precision='float64')
  with pytest.raises(ValueError, match='unknown matmul precision'):
    sampling.build_sampler(experiment.sde, experiment.score_model_fn, (2, 8, 8, 1), 'ode',
                           matmul_precision='tf32')


# ----------------------------------------------------------------------------
# bfloat16 training
# ----------------------------------------------------------------------------

BF16_STEPS = 60


def stored_arrays(workdir: str, step: int) -> dict:
  """{array name: (shape, dtype name)} of a checkpoint as written on disk."""
  import orbax.checkpoint as ocp
  path = os.path.join(checkpoints.checkpoint_dir(workdir), str(step), 'state')
  metadata = ocp.StandardCheckpointer().metadata(path)
  leaves = jax.tree.leaves(getattr(metadata, 'item_metadata', metadata))
  return {leaf.name: (tuple(leaf.shape), np.dtype(leaf.dtype).name) for leaf in leaves}


def _trained(name, dtype, data_dir, workdir):
  config = _small(name, data_dir)
  config.model.dtype = dtype
  config.training.n_iters = BF16_STEPS
  config.training.snapshot_freq = BF16_STEPS           # one checkpoint, at the end
  state = train.train_and_evaluate(config, workdir, final_evaluation=False)
  loss = np.array([r['loss'] for r in io.read_metrics(workdir) if 'loss' in r])
  return config, state, loss


@pytest.mark.slow
@pytest.mark.parametrize('name', ['ddpmpp_continuous', 've_ncsnpp_continuous'])
def test_bfloat16_trains_like_float32_into_interchangeable_float32_checkpoints(
    name, tmp_path):
  """60 steps from the same seed and batches: the bfloat16 run's loss falls as the
  float32 run's does (mean of the last 20 steps within 10% of float32's, and below
  0.9 x its first 20; measured, float32 / bfloat16: DDPM++
  0.9681 / 0.9681 -> 0.5628 / 0.5627, NCSN++ 0.9775 / 0.9775 -> 0.7890 / 0.7890), its checkpoint holds the same float32
  tree, and either checkpoint samples under either compute dtype."""
  data_dir = str(tmp_path / 'tfds')
  runs = {dtype: _trained(name, dtype, data_dir, str(tmp_path / dtype))
          for dtype in ('float32', 'bfloat16')}
  loss32, loss16 = runs['float32'][2], runs['bfloat16'][2]
  assert len(loss16) == BF16_STEPS and np.isfinite(loss16).all()
  late32, late16 = loss32[-20:].mean(), loss16[-20:].mean()
  print(f'{name}: first 20 {loss32[:20].mean():.4f} / {loss16[:20].mean():.4f}, '
        f'last 20 {late32:.4f} / {late16:.4f} (float32 / bfloat16)')
  assert late16 < 0.9 * loss16[:20].mean(), loss16
  assert abs(late16 - late32) < 0.1 * late32, (late16, late32)

  stored = {dtype: stored_arrays(str(tmp_path / dtype), BF16_STEPS) for dtype in runs}
  assert stored['float32'] == stored['bfloat16']           # the same names and shapes
  floating = {dt for name, (_, dt) in stored['bfloat16'].items()
              if name.startswith(('params', 'ema_params', 'opt_state')) and dt != 'int32'}
  assert floating == {'float32'}, floating

  shape = model_utils.input_shape(runs['float32'][0], 8)
  samples = {}
  for compute, (config, _, _) in runs.items():
    experiment = experiment_lib.build_experiment(config)
    sampler = jax.jit(sampling.build_sampler(experiment.sde, experiment.score_model_fn,
                                             shape, 'dpmpp_2m', num_steps=10))
    for params_from, (_, state, _) in runs.items():
      x, _ = sampler(jax.random.PRNGKey(3), state.ema_params)
      samples[params_from, compute] = np.asarray(x, np.float32)
      assert np.isfinite(samples[params_from, compute]).all()
  for params_from in runs:     # the compute dtype moves the samples by bfloat16 round-off
    a, b = samples[params_from, 'float32'], samples[params_from, 'bfloat16']
    assert np.linalg.norm(a - b) < 0.1 * np.linalg.norm(a), params_from

  if name == 'ddpmpp_continuous':  # resume: 30 steps, then on to 60, equals 60 in one run
    config16 = runs['bfloat16'][0]
    resumed = str(tmp_path / 'resumed')
    first = config16.copy_and_resolve_references()
    first.training.n_iters = BF16_STEPS // 2
    train.train_and_evaluate(first, resumed, final_evaluation=False)
    state = train.train_and_evaluate(config16, resumed, final_evaluation=False, extend=True)
    _assert_trees_equal(state, runs['bfloat16'][1], exact=True)


# ----------------------------------------------------------------------------
# The train step's accelerator form, with the backend check forced
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_on_an_accelerator_backend_the_step_is_plain_jit_on_trees_with_donation(
    monkeypatch, dtype):
  """With jax.default_backend() reporting 'gpu' (or 'tpu'): parameter trees, plain
  jax.jit (no XLA:CPU per-program options), NamedSharding in and out over the 4
  devices, the state donated; float32 parameters under either compute dtype."""
  config = small_toy_config(2)
  config.model.dtype = dtype
  compiled_for_cpu = []
  monkeypatch.setattr(xla_flags, 'compile_step',
                      lambda *a, **k: compiled_for_cpu.append(1) or (_ for _ in ()).throw(
                          AssertionError('XLA:CPU options on an accelerator backend')))
  for backend in ('gpu', 'tpu'):
    monkeypatch.setattr(jax, 'default_backend', lambda: backend)
    layout = train.param_layout(config)
    assert layout == 'tree' and train.step_jit(layout) is jax.jit
  mesh = parallel.make_mesh()
  experiment = experiment_lib.build_experiment(config)
  optimizer, schedule = experiment_lib.get_optimizer(config)
  state = experiment_lib.init_train_state(jax.random.PRNGKey(0), model=experiment.model,
                                          config=config, optimizer=optimizer)
  state = jax.device_put(state, parallel.replicated(mesh))
  loss_fn, _ = train.loss_fns(config, experiment)
  step = train.make_train_step(loss_fn, optimizer, schedule, ema_rate=0.99)
  calls = train.make_train_calls(step, mesh, 1, layout='tree')
  batch = np.random.default_rng(0).normal(size=(config.training.batch_size,)
                                          + tuple(model_utils.input_shape(config, 1)[1:]))
  first_leaf = jax.tree.leaves(state.params)[0]
  new_state, metrics = calls(state, [batch.astype(np.float32)])
  assert isinstance(new_state, experiment_lib.TrainState)
  assert first_leaf.is_deleted()                                  # donated
  assert all(isinstance(leaf.sharding, jax.sharding.NamedSharding)
             for leaf in jax.tree.leaves(new_state))
  assert np.isfinite(metrics['loss']).all() and not compiled_for_cpu
  assert {leaf.dtype for leaf in jax.tree.leaves(new_state.params)} == {np.dtype(np.float32)}
  assert len(jax.tree.leaves(new_state.params)[0].sharding.device_set) == jax.device_count()


# ----------------------------------------------------------------------------
# benchmarks/device_check.py, as the tests can run it: --tiny, on the CPU, and
# without the packages an accelerator host lacks
# ----------------------------------------------------------------------------

ABSENT_ON_THE_DEVICE_HOST = ('grain', 'tensorflow_datasets', 'tensorflow', 'array_record',
                             'tensorboardX', 'sklearn', 'PIL')
RUN_WITHOUT = """
import importlib.abc, runpy, sys
ABSENT = set(sys.argv[1].split(','))
class Absent(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split('.')[0] in ABSENT:
      raise ModuleNotFoundError(f'No module named {name!r} (absent on the device host)')
sys.meta_path.insert(0, Absent())
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def device_check_module():
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      'benchmarks', 'device_check.py')
  spec = importlib.util.spec_from_file_location('device_check', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def forward_flops_per_example(device_check, batch: int = 8) -> float:
  """XLA's FLOPs of one unsharded forward pass of the --tiny network, per example."""
  config = device_check.load_config(device_check.DEFAULT_CONFIG, tiny=True)
  experiment = experiment_lib.build_experiment(config)
  params = model_utils.init_params(jax.random.PRNGKey(0), experiment.model, config)
  x = jnp.zeros(model_utils.input_shape(config, batch))
  compiled = jax.jit(experiment.score_model_fn).lower(params, x, jnp.ones(batch)).compile()
  return device_check.xla_flops(compiled) / batch


def test_the_peak_table_matches_whole_names():
  device_check = device_check_module()
  assert device_check.table_peak('NVIDIA H100 80GB HBM3', 'bfloat16') == 989e12
  assert device_check.table_peak('NVIDIA H100 PCIe', 'bfloat16') == 756e12
  assert device_check.table_peak('NVIDIA L4', 'float32') == 60e12
  assert device_check.table_peak('NVIDIA L40', 'float32') is None     # not the L4's
  assert device_check.table_peak('TPU v5 lite', 'bfloat16') == 197e12
  assert device_check.table_peak('cpu', 'bfloat16') is None


@pytest.mark.slow
def test_device_check_runs_tiny_on_the_cpu_without_the_data_packages():
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run(
      [sys.executable, '-c', RUN_WITHOUT, ','.join(ABSENT_ON_THE_DEVICE_HOST),
       os.path.join(root, 'benchmarks', 'device_check.py'), '--tiny', '--dtypes', 'bfloat16'],
      cwd=root, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{')]
  by_kind = {}
  for record in records:
    by_kind.setdefault(record['measurement'], []).append(record)
  assert set(by_kind) == {'devices', 'peak', 'train', 'sample', 'bpd'}, records
  assert by_kind['devices'][0]['backend'] == 'cpu'
  assert by_kind['peak'][0]['measured_flops_per_s'] > 0
  (step,) = by_kind['train']
  assert step['dtype'] == 'bfloat16' and step['loss_finite'] and step['step_s'] > 0
  assert step['batch'] == 2 * jax.device_count() == 8               # 2 per device, 4 devices
  assert step['examples_per_s'] == pytest.approx(step['batch'] / step['step_s'])
  # XLA counts one device's share of a sharded step; per example, a train step (forward,
  # backward, Adam, EMA) costs ~3 forward passes, counted here on one device.
  ratio = step['xla_flops_per_example'] / forward_flops_per_example(device_check_module())
  assert 2.0 < ratio < 5.0, ratio
  assert {(r['method'], r['nfe']) for r in by_kind['sample']} == {('pc', 6), ('dpmpp_2m', 11)}
  assert all(r['finite'] for r in by_kind['sample'] + by_kind['bpd'])
  assert by_kind['bpd'][0]['precision'] == 'highest' and by_kind['bpd'][0]['nfe_max'] > 0
