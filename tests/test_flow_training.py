"""Normalizing flows through the real loop and jobs: the loss falls on the digits, resume is
bitwise exact, 1 and 4 devices agree, the model still inverts after training, the bpd and
sample jobs and `score_sde.load` work on a flow workdir, and misuse is a one-line error."""
import json
import os

import jax
import numpy as np
import portpicker
import pytest

import score_sde
from configs import defaults
from score_sde import data as data_lib
from score_sde import experiment as experiment_lib
from score_sde import io
from score_sde import jobs
from score_sde import losses
from score_sde import models
from score_sde import parallel
from score_sde import train
from score_sde.jobs import common
from score_sde.models import utils as model_utils
from tests.readme_examples import python_blocks, run_example
from tests.train_worker import small_flow_config, start_worker

N_ITERS = 200


def _logged_losses(workdir) -> dict:
  return {row['step']: row['loss'] for row in io.read_metrics(workdir) if 'loss' in row}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """{name: (workdir, config, final state)}: each flow trained N_ITERS steps."""
  runs = {}
  for name in ('nice', 'realnvp', 'glow'):
    workdir = str(tmp_path_factory.mktemp(name))
    config = small_flow_config(name, N_ITERS)
    state = train.train_and_evaluate(config, workdir, final_evaluation=False)
    runs[name] = (workdir, config, state)
  return runs


def test_the_loops_flow_losses_train_with_dropout_and_evaluate_exactly(trained):
  """train.loss_fns: the training loss draws dropout masks from its key (the RealNVP
  config has dropout 0.2); the eval loss ignores the key and is the batch's exact mean
  bits/dim, as the trained model's log_likelihood gives it."""
  from score_sde import likelihood
  workdir, config, state = trained['realnvp']
  assert config.model.dropout > 0
  train_loss, eval_loss = train.loss_fns(config, experiment_lib.build_experiment(config))
  batch = data_lib.load_split(config, 'test', 32)
  params = state.ema_params
  keys = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  train_values = [float(train_loss(params, k, batch)) for k in keys]
  eval_values = [float(eval_loss(params, k, batch)) for k in keys]
  assert train_values[0] != train_values[1] and eval_values[0] == eval_values[1]
  logp, _, _ = score_sde.load(workdir).log_likelihood(keys[0], batch)
  exact = likelihood.bits_per_dim(logp, int(np.prod(batch.shape[1:])),
                                  data_lib.get_data_inverse_scaler(config),
                                  data_lib.num_levels(config))
  np.testing.assert_allclose(eval_values[0], float(np.mean(exact)), rtol=1e-5)


def test_the_readme_flow_example_runs_on_a_flow_workdir(trained):
  """README 'Normalizing flows' example, as written, with 4 samples and images instead of 64."""
  (block,) = python_blocks('Normalizing flows (NICE, RealNVP, Glow)')
  workdir, config, _ = trained['realnvp']
  names = run_example('import jax, score_sde\n' + block,
                      {"'runs/realnvp'": repr(workdir), ', 64': ', 4'})
  assert names['x'].shape == (4, 8, 8, 1) and names['z'].shape == (4, 64)   # flat latents
  bpd = names['bpd']
  assert bpd.shape == (4,) and np.all((bpd > 0) & (bpd < np.log2(data_lib.num_levels(config))))


@pytest.mark.parametrize('name', ['nice', 'realnvp', 'glow'])
def test_flows_train_through_the_loop_and_the_loss_falls(trained, name):
  workdir, config, state = trained[name]
  logged = _logged_losses(workdir)
  assert sorted(logged)[-1] == N_ITERS
  first, last = logged[10], np.mean([logged[s] for s in (180, 190, 200)])
  uniform = np.log2(data_lib.num_levels(config))          # bits/dim of a uniform model
  assert last < first - 0.3 and last < uniform, logged
  # the checkpoint holds float32 trees; the trained flow still inverts to round-off
  model = score_sde.load(workdir)
  assert model.step == N_ITERS
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(model.ema_params))
  x = data_lib.load_split(config, 'test', 16)
  z = model.encode(x)
  np.testing.assert_allclose(model.decode(z), x, atol=1e-4)


def test_resume_of_a_flow_is_bitwise_exact(trained, tmp_path):
  reference_dir, config, reference = trained['glow']
  half = small_flow_config('glow', N_ITERS // 2)
  train.train_and_evaluate(half, str(tmp_path), final_evaluation=False)
  resumed = train.train_and_evaluate(config, str(tmp_path), final_evaluation=False,
                                     extend=True)
  for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_flow_train_step_on_one_and_four_devices_agrees(trained, four_devices):
  _, config, _ = trained['realnvp']
  experiment = experiment_lib.build_experiment(config)
  optimizer, schedule = experiment_lib.get_optimizer(config)
  loss_fn, _ = train.loss_fns(config, experiment)
  step = train.make_train_step(loss_fn, optimizer, schedule, ema_rate=0.99)
  batches = [data_lib.load_split(config, 'train', 64)[i * 32:(i + 1) * 32] for i in range(2)]
  init_batch = experiment_lib.flow_init_batch(config)
  results = []
  for devices in (1, 4):
    mesh = parallel.make_mesh(four_devices[:devices])
    _, init = experiment_lib.abstract_train_state(experiment, optimizer, mesh)
    state = jax.jit(init, out_shardings=parallel.replicated(mesh))(
        jax.random.PRNGKey(0), init_batch)
    p_step = train.jit_train_step(step, mesh, layout='tree')
    losses_seen = []
    for batch in batches:
      state, metrics = p_step(state, parallel.global_batch(batch, mesh))
      losses_seen.append(float(metrics['loss']))
    results.append((state, losses_seen))
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(results[0][0].params), jax.tree.leaves(results[1][0].params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_flow_loss_is_the_mean_bits_per_dim_of_the_batch(trained):
  _, config, state = trained['nice']
  experiment = experiment_lib.build_experiment(config)
  loss_fn, _ = train.loss_fns(config, experiment)
  batch = data_lib.load_split(config, 'test', 8)
  logp, _ = experiment.model_fn(state.ema_params, batch)
  dim = 64
  # [-1, 1] data of 17 levels: bits/dim = -logp / (D ln 2) + log2(17) + log2(1 / 2)
  expected = np.mean(-np.asarray(logp) / (dim * np.log(2.0)) + np.log2(17.0) - 1.0)
  assert float(loss_fn(state.ema_params, None, batch)) == pytest.approx(expected, rel=1e-6)


def test_bpd_job_of_a_flow_is_exact_and_matches_the_python_api(trained):
  workdir, config, _ = trained['glow']
  result = jobs.bpd_job(workdir, config, split='test', batch_size=32, max_examples=32)
  assert result['solver'] == {'method': 'change_of_variables', 'precision': 'highest'}
  assert result['nfe_mean'] == 1 and result['num_levels'] == 17 and result['dim'] == 64
  assert result['checkpoint_step'] == N_ITERS and os.path.exists(result['result_file'])
  # the job's shard 0 key dequantises the same 32 test digits the same way
  model = score_sde.load(workdir)
  key = common.shard_key(jax.random.PRNGKey(config.seed + 7), 0)
  expected = model.bits_per_dim(key, data_lib.load_split_uint(config, 'test', 32))
  assert result['bpd'] == pytest.approx(float(np.mean(expected)), rel=1e-6)
  assert result['bpd'] < np.log2(17.0)
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['rtol'\] for a flow's "
                                       r'log_likelihood: its density is exact'):
    model.bits_per_dim(key, data_lib.load_split_uint(config, 'test', 2), rtol=1e-3)


def test_sample_job_of_a_flow_writes_images_at_the_config_temperature(trained):
  workdir, config, _ = trained['realnvp']
  config = config.copy_and_resolve_references()
  config.sampling.temperature = 0.7
  out_dir = jobs.sample_job(workdir, config, num_samples=8, shard_size=8)
  with open(os.path.join(out_dir, 'manifest.json')) as f:
    manifest = json.load(f)
  assert manifest['sampler'] == {'method': 'flow', 'prior': 'gaussian',
                                 'temperature': 0.7, 'precision': 'highest'}
  images = jobs.load_samples(out_dir)
  assert images.shape == (8, 8, 8, 1) and images.dtype == np.uint8 and images.max() <= 16
  assert os.path.exists(os.path.join(out_dir, 'grid.png'))
  # the job's samples are the API's at the same temperature and key
  model = score_sde.load(workdir)
  x, info = model.sample(common.shard_key(jax.random.PRNGKey(config.seed), 0), 8,
                         temperature=0.7)
  assert int(info['nfe']) == 1
  expected = np.round(np.clip(np.asarray(model.to_unit(x)), 0, 1) * 16).astype(np.uint8)
  np.testing.assert_array_equal(images, expected)


def test_sample_job_shards_draw_from_the_given_seed_with_their_own_keys(trained):
  """Shard s of `sample_job(seed=...)` holds the API's samples from fold_in(PRNGKey(seed), s):
  the --seed flag reaches the samples, no two shards repeat each other, and a job under the
  same --tag with another seed is refused rather than extended."""
  workdir, config, _ = trained['realnvp']
  out_dir = jobs.sample_job(workdir, config, num_samples=8, shard_size=4, seed=5,
                            save_floats=True, tag='seed5')
  model = score_sde.load(workdir)
  shards = [io.load_npz(common.shard_path(out_dir, s))['samples'] for s in range(2)]
  for s, samples in enumerate(shards):
    x, _ = model.sample(common.shard_key(jax.random.PRNGKey(5), s), 4)
    np.testing.assert_allclose(samples, np.asarray(x), rtol=1e-5, atol=1e-6)
  assert np.abs(shards[0] - shards[1]).max() > 0.1
  with pytest.raises(ValueError, match=r'different seed \(5 vs 6\)'):   # never mixed in
    jobs.sample_job(workdir, config, num_samples=12, shard_size=4, seed=6, save_floats=True,
                    tag='seed5')


def test_bpd_job_repeats_every_example_with_each_shards_own_noise(trained):
  """Shard s = r * num_batches + b of the bpd job is batch b under repeat r's dequantisation
  (the key of shard s): the reported mean and standard error are those of the per-example
  averages over the repeats, rebuilt here from the API's bits/dim of each batch."""
  workdir, config, _ = trained['glow']
  result = jobs.bpd_job(workdir, config, split='test', num_repeats=2, batch_size=8,
                        max_examples=16)
  model = score_sde.load(workdir)
  uint = data_lib.load_split_uint(config, 'test', 16)
  base = jax.random.PRNGKey(config.seed + 7)
  repeats = np.stack([np.concatenate([
      model.bits_per_dim(common.shard_key(base, 2 * r + b), uint[8 * b:8 * (b + 1)])
      for b in range(2)]) for r in range(2)]).astype(np.float64)     # [repeat, example]
  per_example = repeats.mean(axis=0)
  assert np.abs(repeats[0] - repeats[1]).max() > 0      # fresh noise in each repeat
  assert result['bpd'] == pytest.approx(per_example.mean(), rel=1e-6)
  assert result['bpd_stderr'] == pytest.approx(per_example.std(ddof=1) / 4, rel=1e-4)


def test_controllable_jobs_refuse_a_flow_in_one_line(trained):
  workdir, config, _ = trained['nice']
  images = np.zeros((2, 8, 8, 1), np.float32)
  with pytest.raises(ValueError, match="inpainting needs a score model; 'nice' is a "
                                       "normalizing flow"):
    jobs.inpaint_job(workdir, config, images, 'center_box')


@pytest.mark.parametrize('change, match', [
    (('data', 'uniform_dequantization', False), 'set config.data.uniform_dequantization=True'),
    (('model', 'dtype', 'bfloat16'), 'glow runs in float32 only'),
    (('model', 'prior', 'laplace'), "unknown flow prior 'laplace'"),
    (('training', 'loss', 'dsm'), "loss 'dsm' does not fit model 'glow'"),
    (('model', 'num_levels', 4), r'glow: 4 squeeze\(s\) need an image size divisible by 16; '
                                 r'got 8'),
    (('model', 'num_steps', 0), r'glow needs config.model.num_steps >= 1; got 0'),
    (('model', 'coupling', 'affin'), "unknown glow coupling 'affin'"),
    (('model', 'dropout', 1.0), r'glow needs 0 <= config.model.dropout < 1; got 1.0'),
])
def test_bad_flow_configs_are_clear_errors_before_compiling(change, match):
  config = small_flow_config('glow', N_ITERS)
  section, key, value = change
  config[section][key] = value
  with pytest.raises(ValueError, match=match):
    experiment_lib.check_config(config)


def test_a_score_config_renamed_to_a_flow_is_refused_before_it_trains():
  """Without the refusal the flow would silently take the score model's dropout,
  learning rate and EMA rate."""
  import configs
  config = configs.load(os.path.join(configs.CONFIG_DIR, 'digits', 'ddpmpp_continuous.py'))
  config.model.name = 'glow'
  with pytest.raises(ValueError, match=r'model.name=glow is a normalizing flow, but this '
                                       r'config has no model.prior.*configs/digits/glow.py'):
    experiment_lib.check_config(config)


def test_flow_configs_validate_and_cifar10_configs_build():
  import configs
  for path in configs.all_config_paths():
    if '/flows/' in path or os.path.basename(path) in ('nice.py', 'realnvp.py', 'glow.py'):
      config = configs.load(path)
      configs.validate(config)
      if '/digits/' in path:
        experiment_lib.check_config(config)
      shapes = jax.eval_shape(
          lambda k, c=config: model_utils.init_params(k, models.get_model(c), c),
          jax.random.PRNGKey(0))
      assert model_utils.param_count(shapes) > 1e4
  flow_config = defaults.digits_flow(defaults.digits(), 'glow')
  assert experiment_lib.is_flow(flow_config)
  assert losses.loss_name_from_config(flow_config, flow=True) == 'nll'


@pytest.mark.slow
def test_two_processes_train_a_flow_as_one_process(tmp_path):
  """2 processes x 2 devices (gloo collectives) == 1 process x 4 devices, for Glow."""
  def worker(workdir, devices, extra=()):
    return start_worker(workdir, 6, devices, extra, env={'SCORE_SDE_TEST_FLOW': 'glow'})

  single = worker(tmp_path / 'single', 4)
  assert single.wait(timeout=300) == 0, single.stdout.read()
  address = f'127.0.0.1:{portpicker.pick_unused_port()}'
  procs = [worker(tmp_path / 'multi', 2, (address, '2', str(i))) for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outputs
  assert '4 device(s) in 2 process(es)' in outputs[0]
  states = [score_sde.load(str(tmp_path / name)) for name in ('single', 'multi')]
  assert states[0].step == states[1].step == 6
  for a, b in zip(jax.tree.leaves(states[0].ema_params), jax.tree.leaves(states[1].ema_params),
                  strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)
