"""Training: the tree and flat forms of the step, sharding equivalence, multi-process, exact
resume, checkpoint fallback, NaN guard."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import portpicker
import pytest

from score_sde import checkpoints
from score_sde import data as data_lib
from score_sde import io
from score_sde import losses
from score_sde import parallel
from score_sde import score_fn as score_fn_lib
from score_sde import train
from score_sde.cpu import flat_state
from score_sde.cpu import xla_flags
from score_sde.models import utils as model_utils
from score_sde import experiment as experiment_lib
from score_sde.jobs import sample as sample_job_lib
from tests import tensorboard_events
from tests.train_worker import small_toy_config, start_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_worker(workdir, n_iters, devices=1, extra=(), dtype='float32'):
  return start_worker(workdir, n_iters, devices, extra,
                      env={'SCORE_SDE_TEST_MODEL_DTYPE': dtype})   # config.model.dtype


def _load(workdir, config, step=None, with_data=False):
  """(state, step, next batch or None) of a workdir's checkpoint."""
  mesh = parallel.make_mesh()
  experiment = experiment_lib.build_experiment(config)
  optimizer, _ = experiment_lib.get_optimizer(config)
  abstract, _ = experiment_lib.abstract_train_state(experiment, optimizer, mesh)
  manager = checkpoints.make_manager(str(workdir), read_only=True)
  iterator = None
  if with_data:
    iterator = data_lib.train_iterator(config, global_batch_size=config.training.batch_size,
                                       seed=config.seed)
  state, restored_step = checkpoints.restore(manager, abstract, iterator, step=step)
  return state, restored_step, (next(iterator) if with_data else None)


def _assert_trees_equal(a, b, exact=True):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert np.shape(x) == np.shape(y) and np.asarray(x).dtype == np.asarray(y).dtype
    if exact:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    else:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# One step on 1 vs 4 devices
# ----------------------------------------------------------------------------

def _steps_on(devices, config, batches):
  mesh = parallel.make_mesh(devices)
  experiment = experiment_lib.build_experiment(config)
  optimizer, schedule = experiment_lib.get_optimizer(config)
  loss_fn = losses.get_loss_fn(config, experiment.sde, experiment.model_fn)
  step = train.make_train_step(loss_fn, optimizer, schedule, ema_rate=0.99)
  _, init = experiment_lib.abstract_train_state(experiment, optimizer, mesh)
  replicated = parallel.replicated(mesh)
  state = jax.jit(lambda key: flat_state.flatten_state(init(key), optimizer),
                  out_shardings=replicated)(jax.random.PRNGKey(0))
  p_step = jax.jit(step, in_shardings=(replicated, parallel.batch_sharding(mesh)),
                   out_shardings=(replicated, replicated))
  losses_seen = []
  for batch in batches:
    state, metrics = p_step(state, parallel.global_batch(batch, mesh))
    losses_seen.append(float(metrics['loss']))
  return state, losses_seen


def test_train_step_on_one_and_four_devices_agree(four_devices):
  config = small_toy_config(2)
  it = data_lib.train_iterator(config, global_batch_size=16, seed=0)
  batches = [next(it) for _ in range(3)]
  state1, losses1 = _steps_on(four_devices[:1], config, batches)
  state4, losses4 = _steps_on(four_devices, config, batches)
  np.testing.assert_allclose(losses1, losses4, rtol=1e-5)
  _assert_trees_equal(state1.params, state4.params, exact=False)
  _assert_trees_equal(state1.ema_params, state4.ema_params, exact=False)
  assert int(state1.step) == int(state4.step) == 3


@pytest.mark.parametrize('grad_clip, weight_decay', [(0.05, 0.0), (-1.0, 0.01)],
                         ids=['adam-clipped', 'adamw-unclipped'])
def test_both_forms_of_the_step_are_a_plain_step_on_parameter_trees(grad_clip, weight_decay):
  """The tree form is the plain step, bit for bit; the flat state is an exact round trip and
  its steps agree with the plain step to round-off."""
  config = small_toy_config(2)
  config.optim.grad_clip = grad_clip           # 0.05: small enough that clipping acts
  config.optim.weight_decay = weight_decay
  experiment = experiment_lib.build_experiment(config)
  optimizer, schedule = experiment_lib.get_optimizer(config)
  loss_fn = losses.get_loss_fn(config, experiment.sde, experiment.model_fn)
  _, init = experiment_lib.abstract_train_state(experiment, optimizer, parallel.make_mesh())
  tree_state = jax.jit(init)(jax.random.PRNGKey(0))
  moments = iter(jax.random.split(jax.random.PRNGKey(1), 1000))   # a real test: distinct
  tree_state = tree_state.replace(opt_state=jax.tree.map(          # non-zero mu and nu >= 0
      lambda x: 0.01 * jnp.abs(jax.random.normal(next(moments), x.shape))
      if x.dtype == jnp.float32 and x.ndim else x, tree_state.opt_state))
  flat = jax.jit(lambda s: flat_state.flatten_state(s, optimizer))(tree_state)
  assert flat.params.shape == (flat.layout.size,)
  assert flat.layout.size == model_utils.param_count(tree_state.params)
  unflatten = jax.jit(lambda s: flat_state.unflatten_state(s, optimizer))
  _assert_trees_equal(unflatten(flat), tree_state)

  def plain_step(state, batch):                # big_vision's step, written out
    key = jax.random.fold_in(state.key, state.step)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, key, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = jnp.float32(0.99)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema), {'loss': loss, 'grad_norm': optax.global_norm(grads)}

  step = jax.jit(train.make_train_step(loss_fn, optimizer, schedule, ema_rate=0.99))
  reference = tree_state
  it = data_lib.train_iterator(config, global_batch_size=8, seed=0)
  for _ in range(3):
    batch = next(it)
    reference, ref_metrics = jax.jit(plain_step)(reference, batch)
    tree_state, tree_metrics = step(tree_state, batch)
    flat, flat_metrics = step(flat, batch)
    assert grad_clip < 0 or float(ref_metrics['grad_norm']) > grad_clip
    for name in ('loss', 'grad_norm'):
      np.testing.assert_array_equal(tree_metrics[name], ref_metrics[name])
    np.testing.assert_allclose(flat_metrics['loss'], ref_metrics['loss'], rtol=1e-6)
    np.testing.assert_allclose(flat_metrics['grad_norm'], ref_metrics['grad_norm'], rtol=1e-5)
  assert isinstance(tree_state, experiment_lib.TrainState)
  _assert_trees_equal(tree_state, reference)
  _assert_trees_equal(unflatten(flat), reference, exact=False)


def test_train_step_reads_parameters_at_runtime_offsets():
  """XLA must not see the offsets as constants, or it compiles a kernel per parameter."""
  config = small_toy_config(2)
  experiment = experiment_lib.build_experiment(config)
  optimizer, schedule = experiment_lib.get_optimizer(config)
  loss_fn = losses.get_loss_fn(config, experiment.sde, experiment.model_fn)
  _, init = experiment_lib.abstract_train_state(experiment, optimizer, parallel.make_mesh())
  state = jax.eval_shape(lambda key: flat_state.flatten_state(init(key), optimizer),
                         jax.random.PRNGKey(0))
  batch = jax.ShapeDtypeStruct((8, 2), jnp.float32)
  step = train.make_train_step(loss_fn, optimizer, schedule, ema_rate=0.99)

  def parameter_reads(fn):
    """Compiled instructions that read a parameter out of the flat vector, by opcode."""
    hlo = jax.jit(fn).lower(state, batch).compile().as_text()
    opcodes = [line.split(' = ', 1)[1].split('(', 1)[0].split()[-1]
               for line in hlo.splitlines() if 'jvp()/dynamic_slice"' in line]
    return [op for op in opcodes if op in ('slice', 'dynamic-slice')]

  reads = parameter_reads(step)
  assert len(reads) >= len(state.layout.shapes) and set(reads) == {'dynamic-slice'}
  # The check can fail: with the offsets as constants XLA turns the reads into static slices.
  constant = parameter_reads(lambda s, b: step(s.replace(offsets=s.layout.offsets()), b))
  assert 'slice' in constant and 'dynamic-slice' not in constant


def _generated_kernel_instructions(hlo_text: str) -> int:
  """Instructions inside the kLoop fusions of compiled HLO text (XLA generates their code)."""
  bodies = xla_flags.hlo_computations(hlo_text)
  loops = set(re.findall(r'kind=kLoop, calls=%([\w.\-]+)', hlo_text))
  return sum(len(bodies[name]) for name in loops)


def test_train_step_with_the_step_options_matches_the_default_compile():
  """xla_flags.jit_step compiles the flat step with YNNPACK elementwise fusions: same numbers."""
  from tests.reference_outputs import TINY_NCSNPP, load_config
  config = load_config('configs/ve/cifar10_ncsnpp_continuous.py',
                       dict(TINY_NCSNPP, **{'model.dropout': 0.1}))
  experiment = experiment_lib.build_experiment(config)
  optimizer, schedule = experiment_lib.get_optimizer(config)
  loss_fn = losses.get_loss_fn(config, experiment.sde, experiment.model_fn)
  _, init = experiment_lib.abstract_train_state(experiment, optimizer, parallel.make_mesh())
  state = jax.jit(lambda key: flat_state.flatten_state(init(key), optimizer))(
      jax.random.PRNGKey(0))
  batches = np.random.default_rng(0).uniform(-1, 1, (3, 2, 16, 16, 3)).astype(np.float32)
  jitted = jax.jit(train.make_train_step(loss_fn, optimizer, schedule, ema_rate=0.99))

  options = xla_flags.STEP_COMPILER_OPTIONS
  with_options, used = xla_flags.compile_step(jitted, state, batches[0], options=options)
  default, none = xla_flags.compile_step(jitted, state, batches[0], options={})
  assert used == options and none == {}
  # The options act: elementwise work moves from generated kernels into library
  # fusions (small NCSN++ at 32x32: the generated kernels' instructions halve; this
  # tiny one at 16x16 keeps more of its small arrays in generated kernels: -14 %).
  text, default_text = with_options.as_text(), default.as_text()
  assert text.count('"__ynn_fusion"') > default_text.count('"__ynn_fusion"')
  assert _generated_kernel_instructions(text) < 0.9 * _generated_kernel_instructions(default_text)

  state_a = state_b = state
  for batch in batches:
    state_a, metrics_a = with_options(state_a, batch)
    state_b, metrics_b = default(state_b, batch)
    np.testing.assert_allclose(metrics_a['loss'], metrics_b['loss'], rtol=1e-6)
    np.testing.assert_allclose(metrics_a['grad_norm'], metrics_b['grad_norm'], rtol=1e-5)
  for field in ('params', 'ema_params'):
    np.testing.assert_allclose(getattr(state_a, field), getattr(state_b, field),
                               rtol=2e-5, atol=1e-6)
  _assert_trees_equal(state_a.opt_state, state_b.opt_state, exact=False)


def _recording_compile_step(monkeypatch) -> list:
  """The options of each program xla_flags.compile_step builds from now on (a list that grows)."""
  used = []
  real = xla_flags.compile_step

  def recording(jitted, *args, **kwargs):
    compiled, options = real(jitted, *args, **kwargs)
    used.append(options)
    return compiled, options

  monkeypatch.setattr(xla_flags, 'compile_step', recording)
  return used


def test_flat_form_compiles_with_the_step_options_and_tree_form_with_plain_jit(monkeypatch):
  """make_train_calls (n calls of one step, or n unrolled steps) and make_eval_call: the flat
  form builds its programs through xla_flags.compile_step, once each; the tree form never."""
  assert train.step_jit('tree') is jax.jit and train.step_jit('flat') is xla_flags.jit_step
  used = _recording_compile_step(monkeypatch)
  config = small_toy_config(2)
  mesh = parallel.make_mesh()
  replicated = parallel.replicated(mesh)
  experiment = experiment_lib.build_experiment(config)
  optimizer, schedule = experiment_lib.get_optimizer(config)
  loss_fn = losses.get_loss_fn(config, experiment.sde, experiment.model_fn)
  step = train.make_train_step(loss_fn, optimizer, schedule, ema_rate=0.99)
  eval_step = train.make_eval_step(loss_fn)
  _, init = experiment_lib.abstract_train_state(experiment, optimizer, mesh)
  it = data_lib.train_iterator(config, global_batch_size=16, seed=0)
  batches = [next(it) for _ in range(2)]
  eval_batch = parallel.global_batch(next(it), mesh)
  form = {'tree': lambda s: s, 'flat': lambda s: flat_state.flatten_state(s, optimizer)}
  to_tree = {'tree': lambda s: s,
             'flat': jax.jit(lambda s: flat_state.unflatten_state(s, optimizer))}
  results = {}
  for layout in ('flat', 'tree'):
    p_eval = train.make_eval_call(eval_step, mesh, layout=layout)
    for unroll in (False, True):
      state = jax.jit(lambda key: form[layout](init(key)),
                      out_shardings=replicated)(jax.random.PRNGKey(0))
      calls = train.make_train_calls(step, mesh, 2, layout=layout, unroll=unroll)
      losses_seen = []
      for _ in range(2):
        state, metrics = calls(state, iter(batches))
        losses_seen.extend(metrics['loss'])
      assert metrics['loss'].shape == (2,) and int(state.step) == 4
      results[layout, unroll] = (losses_seen, float(p_eval(state, eval_batch)),
                                 to_tree[layout](state))
    if layout == 'flat':      # step, eval, unrolled steps: once each, not per call
      assert used == [xla_flags.step_compiler_options()] * 3
      assert used[0] == xla_flags.STEP_COMPILER_OPTIONS     # as the suite runs (CPU, defaults on)
  assert len(used) == 3                                     # the tree form added none
  flat_losses, flat_eval, flat_state_tree = results['flat', False]
  assert isinstance(flat_state_tree, experiment_lib.TrainState)
  for key, (losses_seen, eval_loss, tree) in results.items():
    np.testing.assert_allclose(losses_seen, flat_losses, rtol=1e-6, err_msg=str(key))
    np.testing.assert_allclose(eval_loss, flat_eval, rtol=1e-6, err_msg=str(key))
    _assert_trees_equal(tree, flat_state_tree, exact=False)


def test_auto_param_layout_is_flat_on_the_cpu_backend_only(monkeypatch):
  config = small_toy_config(2)
  assert config.training.param_layout == 'auto'            # the default
  assert jax.default_backend() == 'cpu' and train.param_layout(config) == 'flat'
  for backend in ('gpu', 'tpu'):
    monkeypatch.setattr(jax, 'default_backend', lambda: backend)
    assert train.param_layout(config) == 'tree', backend
  config.training.param_layout = 'flat'                    # forced, whatever the backend
  assert train.param_layout(config) == 'flat'
  monkeypatch.undo()
  config.training.param_layout = 'tree'
  assert train.param_layout(config) == 'tree'
  config.training.param_layout = 'vector'
  with pytest.raises(ValueError, match=r"unknown config.training.param_layout 'vector'; "
                                       r"valid: \['auto', 'tree', 'flat'\]"):
    train.param_layout(config)
  with pytest.raises(ValueError, match="layout must be 'tree' or 'flat'"):
    train.step_jit('auto')


def _logged(workdir, name) -> dict:
  """{step: value} of one metric in a workdir's metrics log."""
  return {row['step']: row[name] for row in io.read_metrics(str(workdir)) if name in row}


def test_tree_and_flat_forms_train_alike_and_a_run_may_switch_form_on_resume(
    tmp_path, monkeypatch, capsys):
  """Six steps of train_and_evaluate with param_layout 'flat', 'tree', and 'flat' for three
  steps resumed as 'tree': the same losses, eval losses and state to round-off.

  Tolerances (rtol 1e-5 on the losses, 2e-5 / atol 1e-6 on the state): float32 round-off of
  sums taken in another order (the gradient norm over one vector or leaf by leaf, XLA's
  fusions), carried through six Adam steps: the forms are not bitwise equal.
  """
  def config_for(layout, n_iters=6):
    config = small_toy_config(n_iters)
    config.training.param_layout = layout
    config.training.eval_freq = 3
    return config

  used = _recording_compile_step(monkeypatch)
  flat = train.train_and_evaluate(config_for('flat'), str(tmp_path / 'flat'))
  assert len(used) == 2                                     # the train and eval steps
  tree = train.train_and_evaluate(config_for('tree'), str(tmp_path / 'tree'))
  assert len(used) == 2                                     # the tree form: plain jax.jit
  out = capsys.readouterr().out
  assert 'parameter layout flat.' in out and 'parameter layout tree.' in out
  train.train_and_evaluate(config_for('flat', n_iters=3), str(tmp_path / 'switched'))
  switched = train.train_and_evaluate(config_for('tree'), str(tmp_path / 'switched'),
                                      extend=True)
  out = capsys.readouterr().out
  assert 'Resumed from the checkpoint at step 3' in out and 'parameter layout tree.' in out

  assert isinstance(flat, experiment_lib.TrainState) and int(flat.step) == 6
  for state in (tree, switched):
    assert isinstance(state, experiment_lib.TrainState) and int(state.step) == 6
    _assert_trees_equal(state, flat, exact=False)
  # (The eval iterator is not checkpointed: after the resume at step 3 the switched run
  # evaluates another test batch at step 6, so its eval losses are not compared.)
  for name, steps, runs in (('loss', range(1, 7), ('tree', 'switched')),
                            ('grad_norm', range(1, 7), ('tree', 'switched')),
                            ('eval_loss', (3, 6), ('tree',))):
    expected = _logged(tmp_path / 'flat', name)
    assert sorted(expected) == list(steps)
    for run in runs:
      got = _logged(tmp_path / run, name)
      assert sorted(got) == list(steps), (run, name)
      np.testing.assert_allclose([got[s] for s in steps], [expected[s] for s in steps],
                                 rtol=1e-5, err_msg=f'{run} {name}')
  # The switched run's checkpoint is a tree like any other.
  saved, step, _ = _load(tmp_path / 'switched', config_for('tree'))
  assert step == 6
  _assert_trees_equal(saved, switched)


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path):
  config = small_toy_config(2)
  config.training.batch_size = 6
  with pytest.raises(ValueError, match='batch size 6 does not divide by the number of '
                                       'devices 4'):
    train.train_and_evaluate(config, str(tmp_path))


def test_unknown_config_key_fails_before_compiling(tmp_path):
  # The launcher validates a config's keys (configs/ is not the library's to import)
  # before it hands the config to train_and_evaluate.
  config_file = tmp_path / 'typo.py'
  config_file.write_text('from configs.toy import vp_mlp_continuous\n\n\ndef get_config():\n'
                         '  config = vp_mlp_continuous.get_config()\n  config.model.nff = 32\n'
                         '  return config\n')
  env = dict(os.environ, PYTHONPATH=ROOT, SCORE_SDE_HUGEPAGES='0')
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'launch.py'), 'train',
                        f'--config={config_file}', f'--workdir={tmp_path / "run"}'],
                       env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert out.returncode == 1
  assert re.search(r"unknown config key\(s\) \['model.nff'\]", out.stderr), out.stderr
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


# ----------------------------------------------------------------------------
# Multi-process: 2 processes x 2 devices == 1 process x 4 devices
# ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize('dtype', ['float32', pytest.param('bfloat16', marks=pytest.mark.slow)])
def test_two_processes_match_one_process(tmp_path, dtype):
  single = _run_worker(tmp_path / 'single', 6, devices=4, dtype=dtype)
  assert single.wait(timeout=300) == 0, single.stdout.read()
  address = f'127.0.0.1:{portpicker.pick_unused_port()}'
  procs = [_run_worker(tmp_path / 'multi', 6, devices=2, extra=(address, '2', str(i)),
                       dtype=dtype) for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outputs
  assert '4 device(s) in 2 process(es)' in outputs[0]
  config = small_toy_config(6)
  state_single, step_single, _ = _load(tmp_path / 'single', config)
  state_multi, step_multi, _ = _load(tmp_path / 'multi', config)
  assert step_single == step_multi == 6
  _assert_trees_equal(state_single.params, state_multi.params, exact=False)
  _assert_trees_equal(state_single.ema_params, state_multi.ema_params, exact=False)


# ----------------------------------------------------------------------------
# Exact resume after SIGKILL
# ----------------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise_exact(tmp_path):
  n_iters = 120
  reference = _run_worker(tmp_path / 'reference', n_iters)
  assert reference.wait(timeout=300) == 0, reference.stdout.read()

  victim = _run_worker(tmp_path / 'resumed', n_iters)
  killed_after = None
  for line in victim.stdout:                 # kill between checkpoints (every 10 steps)
    if line.startswith('step ') and '/' in line:
      step = int(line.split()[1].split('/')[0])
      if step >= 67:
        victim.send_signal(signal.SIGKILL)
        killed_after = step
        break
  victim.wait(timeout=60)
  assert killed_after is not None and victim.returncode == -signal.SIGKILL
  with open(tmp_path / 'resumed' / 'logs' / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 99, "lo')                # as if the power had gone mid-write
  resumed = _run_worker(tmp_path / 'resumed', n_iters)
  output = resumed.communicate(timeout=300)[0]
  assert resumed.returncode == 0, output
  [resumed_from] = re.findall(r'Resumed from the checkpoint at step (\d+)', output)

  config = small_toy_config(n_iters)
  ref_state, ref_step, ref_next = _load(tmp_path / 'reference', config, with_data=True)
  new_state, new_step, new_next = _load(tmp_path / 'resumed', config, with_data=True)
  assert ref_step == new_step == n_iters
  _assert_trees_equal(ref_state, new_state, exact=True)   # params, EMA, opt state, step, key
  np.testing.assert_array_equal(ref_next, new_next)
  # The log reads as one run: every step once, the logged losses those of the reference.
  assert _logged(tmp_path / 'resumed', 'loss') == _logged(tmp_path / 'reference', 'loss')
  assert _logged(tmp_path / 'resumed', 'eval_loss') == _logged(tmp_path / 'reference',
                                                                'eval_loss')
  # TensorBoard hides what the killed run logged after the checkpoint; what it shows runs
  # forward in step and its losses are the reference's (the killed run's last unflushed
  # events may be missing; everything the resumed run logged is there).
  logs = str(tmp_path / 'resumed' / 'logs')
  assert tensorboard_events.restart_steps(logs) == [1, int(resumed_from) + 1]
  reference_shown = tensorboard_events.visible_scalars(str(tmp_path / 'reference' / 'logs'))
  shown = tensorboard_events.visible_scalars(logs)
  for tag, points in shown.items():
    steps = [step for step, _ in points]
    assert steps == sorted(set(steps)), tag
    if tag in ('loss', 'grad_norm', 'learning_rate', 'eval_loss'):   # not the timings
      assert set(points) <= set(reference_shown[tag]), tag
  assert set(range(int(resumed_from) + 1, n_iters + 1)) <= {step for step, _ in shown['loss']}


# ----------------------------------------------------------------------------
# Corrupt checkpoints and NaN
# ----------------------------------------------------------------------------

def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, capsys):
  config = small_toy_config(25)
  config.training.snapshot_freq = 10           # kept: 10, 20; preemption-only 25 replaced
  config.training.snapshot_freq_for_preemption = 5
  train.train_and_evaluate(config, str(tmp_path))
  manager = checkpoints.make_manager(str(tmp_path), read_only=True)
  assert sorted(manager.all_steps()) == [10, 20, 25]
  config.training.n_iters = 20
  shutil.rmtree(os.path.join(checkpoints.checkpoint_dir(str(tmp_path)), '25'))
  good, _, _ = _load(tmp_path, config, step=10)
  newest = os.path.join(checkpoints.checkpoint_dir(str(tmp_path)), '20', 'state')
  assert _load(tmp_path, config)[1] == 20
  files = [os.path.join(d, f) for d, _, fs in os.walk(newest) for f in fs]
  for path in files:                          # truncate every file of the newest step
    with open(path, 'wb') as f:
      f.write(b'garbage')
  state, step, _ = _load(tmp_path, config)
  assert step == 10
  assert 'checkpoint at step 20' in capsys.readouterr().out
  _assert_trees_equal(state, good)


def test_training_resumes_past_an_unreadable_newest_checkpoint_and_keeps_it(tmp_path, capsys):
  config = small_toy_config(20)
  config.training.snapshot_freq = 10
  config.training.snapshot_freq_for_preemption = 5
  reference = train.train_and_evaluate(config, str(tmp_path / 'reference'))
  config.training.n_iters = 15
  train.train_and_evaluate(config, str(tmp_path / 'run'))     # checkpoints 10, 15
  config.training.n_iters = 20
  newest = os.path.join(checkpoints.checkpoint_dir(str(tmp_path / 'run')), '15')
  for folder, _, files in os.walk(newest):
    for name in files:
      with open(os.path.join(folder, name), 'wb') as f:
        f.write(b'garbage')
  state = train.train_and_evaluate(config, str(tmp_path / 'run'), extend=True)  # from 10
  assert 'moved to' in capsys.readouterr().out
  _assert_trees_equal(state, reference, exact=True)
  moved = os.listdir(tmp_path / 'run' / checkpoints.UNREADABLE_DIR)
  assert len(moved) == 1 and moved[0].startswith('15_')              # kept for inspection
  # 15, the finished run's final step, was saved again and is kept like a snapshot.
  assert checkpoints.existing_steps(str(tmp_path / 'run')) == [10, 15, 20]
  train.train_and_evaluate(config, str(tmp_path / 'run'))   # a re-run finishes at once


def test_a_finished_run_is_extended_only_when_asked_and_keeps_its_checkpoints(tmp_path):
  config = small_toy_config(30)
  config.training.snapshot_freq = 10
  config.training.snapshot_freq_for_preemption = 5
  train.train_and_evaluate(config, str(tmp_path))
  assert checkpoints.existing_steps(str(tmp_path)) == [10, 20, 30]
  config.training.n_iters = 40
  with pytest.raises(ValueError, match=r'finished at step 30 \(training.n_iters 30\); '
                                       r'continuing it to 40 steps needs --extend'):
    train.train_and_evaluate(config, str(tmp_path))
  config.training.snapshot_freq = 25               # a new retention period ...
  train.train_and_evaluate(config, str(tmp_path), extend=True)
  # ... deletes none of the steps that existed (10, 20, 30); 40 is the newest.
  assert checkpoints.existing_steps(str(tmp_path)) == [10, 20, 30, 40]


def test_a_first_run_without_a_checkpoint_does_not_pin_its_config(tmp_path):
  config = small_toy_config(2)
  config.optim.lr = float('nan')                   # fails at step 1, before any checkpoint
  with pytest.raises(train.NonFiniteLossError, match='none \\(no checkpoint was written yet\\)'):
    train.train_and_evaluate(config, str(tmp_path))
  assert os.path.exists(tmp_path / 'config.json')
  config.optim.lr = 1e-3                           # the corrected run is not "a different config"
  train.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / 'config.json') as f:
    assert json.load(f)['optim']['lr'] == 1e-3


def test_a_run_without_final_evaluation_says_so(tmp_path, capsys):
  """config.eval.enable_bpd False skips samples, bits/dim and quality at the end: one line
  says so instead of ending silently after 'Training done'."""
  config = small_toy_config(2)
  train.train_and_evaluate(config, str(tmp_path))
  out = capsys.readouterr().out
  assert 'No final evaluation: config.eval.enable_bpd is False' in out
  assert not os.path.exists(tmp_path / 'eval')


def test_a_second_trainer_on_the_same_workdir_is_refused_in_one_line(tmp_path):
  holder = _run_worker(tmp_path, 100000)
  try:
    lock = tmp_path / '.lock'
    for _ in range(600):                           # until the worker holds the lock
      if lock.exists() and str(holder.pid) in lock.read_text():
        break
      time.sleep(0.1)
    with pytest.raises(Exception) as raised:
      train.train_and_evaluate(small_toy_config(2), str(tmp_path))
    assert type(raised.value).__name__ == 'WorkdirLockedError'
    assert re.search(rf'in use by `train` \(host .*, PID {holder.pid}, since', str(raised.value))
  finally:
    holder.kill()
    holder.wait()
  train.train_and_evaluate(small_toy_config(2), str(tmp_path))      # no stale lock after a kill


def test_nan_loss_stops_with_step_and_leaves_a_loadable_checkpoint(tmp_path):
  config = small_toy_config(50)
  config.training.snapshot_freq_for_preemption = 1
  config.optim.lr = 30.0                      # diverges at step 2
  config.optim.grad_clip = -1.
  config.optim.warmup = 0
  with pytest.raises(train.NonFiniteLossError, match=r'non-finite loss or gradient at '
                                                      r'step \d+') as info:
    train.train_and_evaluate(config, str(tmp_path))
  assert 'last good checkpoint is step' in str(info.value)
  state, step, _ = _load(tmp_path, config)
  assert step >= 1 and str(step) in str(info.value)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_resume_with_a_different_config_is_refused(tmp_path):
  config = small_toy_config(2)
  train.train_and_evaluate(config, str(tmp_path))
  config.model.nf = 16
  with pytest.raises(ValueError, match=r'different config \(model.nf: 32 -> 16\)'):
    train.train_and_evaluate(config, str(tmp_path))
  config.model.nf = 32
  # The optimiser, the data's preprocessing, the batch and the seed pin a run as the model does.
  for section, key, value in (('optim', 'lr', 5e-4), ('data', 'uniform_dequantization', True),
                              ('training', 'batch_size', 32), (None, 'seed', 43)):
    node = config[section] if section else config
    before = node[key]
    node[key] = value
    name = f'{section}.{key}' if section else key
    with pytest.raises(ValueError, match=rf'different config \({name}: {before!r} -> '
                                         rf'{value!r}\)'):
      train.train_and_evaluate(config, str(tmp_path))
    node[key] = before
  config.training.n_iters = 4                 # extending a finished run is fine, when asked
  state = train.train_and_evaluate(config, str(tmp_path), extend=True)
  assert int(state.step) == 4


@pytest.mark.parametrize('weight_decay', [0.0, 0.01], ids=['adam', 'adamw'])
def test_train_step_is_clipped_adam_and_a_warmed_up_ema_written_out_in_numpy(weight_decay):
  """Five steps of config.optim's optimiser (global-norm clip 15, Adam b1 0.9, b2 0.999,
  eps 1e-8, lr 1e-2 after a 2-step warm-up, decoupled weight decay) and the warm-up EMA
  (decay min(rate, (1 + k) / (10 + k)) at step k), against a float64 numpy loop. The
  gradients' norms (about 11 x 1, 2, 0.5, 3, 0.25) are clipped on two steps and vary,
  so that Adam's second moment (b2) matters."""
  config = small_toy_config(2)
  config.optim.lr, config.optim.warmup, config.optim.grad_clip = 1e-2, 2, 15.0
  config.optim.weight_decay = weight_decay
  optimizer, schedule = experiment_lib.get_optimizer(config)
  target = {'a': np.array([3.0, -2.0, 1.0]), 'b': np.array([[0.5, 4.0]])}

  def loss_fn(params, key, scale):
    return sum(scale * jnp.sum((params[k] - target[k]) ** 2) for k in target)

  params = {k: jnp.zeros(v.shape, jnp.float32) for k, v in target.items()}
  state = experiment_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                    opt_state=optimizer.init(params),
                                    ema_params=jax.tree.map(jnp.copy, params),
                                    key=jax.random.PRNGKey(0))
  step = jax.jit(train.make_train_step(loss_fn, optimizer, schedule, ema_rate=0.999,
                                       ema_warmup=True))
  p = {k: np.zeros(v.shape) for k, v in target.items()}
  ema = {k: np.zeros(v.shape) for k, v in target.items()}
  m = {k: np.zeros(v.shape) for k, v in target.items()}
  v2 = {k: np.zeros(v.shape) for k, v in target.items()}
  clipped = []
  for k, scale in enumerate((1.0, 2.0, 0.5, 3.0, 0.25)):
    state, _ = step(state, jnp.float32(scale))
    grads = {n: 2 * scale * (p[n] - target[n]) for n in p}
    norm = np.sqrt(sum(np.sum(g ** 2) for g in grads.values()))
    clipped.append(norm > 15.0)
    lr, decay = 1e-2 * min((k + 1) / 2, 1.0), min(0.999, (1 + k) / (10 + k))
    for n in p:
      g = grads[n] * min(1.0, 15.0 / norm)
      m[n] = 0.9 * m[n] + 0.1 * g
      v2[n] = 0.999 * v2[n] + 0.001 * g ** 2
      adam = (m[n] / (1 - 0.9 ** (k + 1))) / (np.sqrt(v2[n] / (1 - 0.999 ** (k + 1))) + 1e-8)
      p[n] = p[n] - lr * (adam + weight_decay * p[n])
      ema[n] = decay * ema[n] + (1 - decay) * p[n]
  assert clipped == [False, True, False, True, False]
  for n in p:
    np.testing.assert_allclose(state.params[n], p[n], rtol=0, atol=2e-6)
    np.testing.assert_allclose(state.ema_params[n], ema[n], rtol=0, atol=2e-6)


def test_the_loops_loss_is_the_configs_dsm_loss_from_the_reference_eps():
  """train.loss_fns builds the continuous loss config.training names (reduce_mean,
  likelihood_weighting, importance_sampling) with t ~ U(1e-5, T), the reference's eps
  (yang-song/score_sde losses.get_sde_loss_fn): each key changes the loss, and the loop's
  loss is the one built directly with it, train and eval alike."""
  config = small_toy_config(2)
  config.data.dim = 3                # reduce_mean: a mean, not half the sum (as in 2-D)
  batch = next(data_lib.train_iterator(config, global_batch_size=16, seed=0))
  experiment = experiment_lib.build_experiment(config)
  params = model_utils.init_params(jax.random.PRNGKey(0), experiment.model, config)
  score_model_fn = score_fn_lib.get_score_model_fn(experiment.sde, experiment.model_fn,
                                                   continuous=True)
  key = jax.random.PRNGKey(3)
  seen = []
  for reduce_mean, weighting, importance in [(True, False, False), (False, False, False),
                                             (True, True, False), (True, True, True)]:
    config.training.reduce_mean = reduce_mean
    config.training.likelihood_weighting = weighting
    config.training.importance_sampling = importance
    loop_losses = train.loss_fns(config, experiment_lib.build_experiment(config))
    for loop_loss, is_train in zip(loop_losses, (True, False)):
      direct = losses.get_dsm_loss_fn(experiment.sde, score_model_fn, train=is_train,
                                      reduce_mean=reduce_mean, likelihood_weighting=weighting,
                                      importance_sampling=importance, eps=1e-5)
      value = float(jax.jit(loop_loss)(params, key, batch))
      np.testing.assert_allclose(value, float(jax.jit(direct)(params, key, batch)), rtol=1e-6,
                                 err_msg=str((reduce_mean, weighting, importance, is_train)))
    seen.append(value)
  assert len(set(seen)) == len(seen), seen


def test_the_loop_starts_from_the_config_seed(tmp_path):
  """The first step of train_and_evaluate is the state initialised from PRNGKey(config.seed)
  after one step on the first batch of that seed's data stream: config.seed picks the
  initial parameters as it picks the data order and the noise."""
  config = small_toy_config(1)
  config.seed = 7
  config.training.param_layout = 'tree'
  state = train.train_and_evaluate(config, str(tmp_path))
  experiment = experiment_lib.build_experiment(config)
  optimizer, schedule = experiment_lib.get_optimizer(config)
  init = experiment_lib.init_train_state(jax.random.PRNGKey(7), model=experiment.model,
                                         config=config, optimizer=optimizer)
  step = train.make_train_step(train.loss_fns(config, experiment)[0], optimizer, schedule,
                               ema_rate=float(config.model.ema_rate),
                               ema_warmup=bool(config.training.ema_warmup))
  batch = next(data_lib.train_iterator(config, global_batch_size=16, seed=7))
  expected, _ = jax.jit(step)(init, batch)
  _assert_trees_equal(jax.device_get(state), jax.device_get(expected), exact=False)


def test_ema_warmup_and_learning_rate_schedule():
  assert float(train.ema_decay(0, 0.999, True)) == pytest.approx(0.1)
  assert float(train.ema_decay(1700, 0.999, True)) == pytest.approx(1701 / 1710)
  assert float(train.ema_decay(10 ** 6, 0.999, True)) == pytest.approx(0.999)
  assert float(train.ema_decay(5, 0.999, False)) == pytest.approx(0.999)
  config = small_toy_config(2)
  config.optim.lr, config.optim.warmup = 2e-4, 100
  schedule = experiment_lib.learning_rate_schedule(config)
  np.testing.assert_allclose([schedule(0), schedule(49), schedule(99), schedule(500)],
                             [2e-6, 1e-4, 2e-4, 2e-4], rtol=1e-6)


def test_metrics_logs_written_with_rates_of_the_train_steps_alone(tmp_path, monkeypatch):
  """The first call (compilation) and the checkpoints are slowed down here: the logged
  rates leave both out, and each row logs the other work's seconds."""
  make_train_calls, save = train.make_train_calls, checkpoints.save
  first_call_s, save_s = 3.0, 1.5

  def slow_first_call(*args, **kwargs):       # stands for a long compilation
    calls = make_train_calls(*args, **kwargs)
    seen = []

    def call(state, batches):
      if not seen:
        seen.append(time.sleep(first_call_s))
      return calls(state, batches)
    return call

  def slow_save(*args, **kwargs):
    time.sleep(save_s)
    return save(*args, **kwargs)

  monkeypatch.setattr(train, 'make_train_calls', slow_first_call)
  monkeypatch.setattr(checkpoints, 'save', slow_save)
  config = small_toy_config(3)                # log_freq 1, one step per call
  config.training.snapshot_freq_for_preemption = 1
  t0 = time.time()
  train.train_and_evaluate(config, str(tmp_path))
  wall_s = time.time() - t0
  rows = io.read_metrics(str(tmp_path))
  assert [row['step'] for row in rows if 'loss' in row] == [1, 2, 3]
  [first] = [row for row in rows if 'first_call_s' in row]
  assert first['step'] == 1 and first_call_s <= first['first_call_s'] < wall_s
  timed = [row for row in rows if 'steps_per_s' in row]
  assert [row['step'] for row in timed] == [2, 3]       # step 1: no step since the first call
  for row in timed:                                     # after the checkpoint of a step
    assert row['other_s'] >= save_s and row['steps_per_s'] > 1 / save_s
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(tmp_path / 'logs'))
  assert os.path.exists(tmp_path / 'config.json')


def test_snapshot_samples_and_eval_see_the_checkpointed_ema(tmp_path, monkeypatch):
  """Snapshot sampling and the eval loss read the flat state's EMA as the checkpoint's tree."""
  config = small_toy_config(4)
  config.training.snapshot_freq = 2
  config.training.snapshot_sampling = True
  config.training.eval_freq = 2
  config.sampling.method = 'ode'
  seen = {}
  write_samples = sample_job_lib.write_snapshot_samples

  def spy(experiment, sampler, state, step, workdir, mesh):
    seen[step] = jax.device_get(state.ema_params)
    return write_samples(experiment, sampler, state, step, workdir, mesh)

  monkeypatch.setattr(sample_job_lib, 'write_snapshot_samples', spy)
  train.train_and_evaluate(config, str(tmp_path))
  assert sorted(seen) == [2, 4]
  for step in (2, 4):
    state, _, _ = _load(tmp_path, config, step=step)
    _assert_trees_equal(seen[step], state.ema_params)
  eval_losses = [row['eval_loss'] for row in io.read_metrics(str(tmp_path)) if 'eval_loss' in row]
  # The eval loss, recomputed from the checkpoint's EMA tree (the loop reads the flat one).
  experiment = experiment_lib.build_experiment(config)
  eval_loss_fn = train.loss_fns(config, experiment)[1]
  eval_iter = data_lib.train_iterator(config, global_batch_size=config.training.batch_size,
                                      seed=config.seed + 1, split='test', augment=False)
  expected = []
  for step in (2, 4):
    state, _, _ = _load(tmp_path, config, step=step)
    key = jax.random.fold_in(jax.random.fold_in(state.key, 1 << 30), step)
    expected.append(float(jax.jit(eval_loss_fn)(state.ema_params, key, next(eval_iter))))
  np.testing.assert_allclose(eval_losses, expected, rtol=1e-5)


def test_jitted_steps_as_calls_of_one_step_or_unrolled_train_alike(tmp_path, monkeypatch):
  """n_jitted_steps 2: two calls of one compiled step (default) or one unrolled program;
  n_iters 5 ends at step 5 (the last call runs one step), not 6."""
  def config_for(unroll, n_iters=5):
    config = small_toy_config(n_iters)
    config.training.n_jitted_steps = 2
    config.training.unroll_jitted_steps = unroll
    return config

  built = []
  with monkeypatch.context() as patch:
    make_multi_step = train.make_multi_step
    patch.setattr(train, 'make_multi_step',
                  lambda step, n: built.append(n) or make_multi_step(step, n))
    unrolled = train.train_and_evaluate(config_for(True), str(tmp_path / 'unrolled'))
  assert built == [2]                       # the unrolled run did build the 2-step program
  with monkeypatch.context() as patch:      # the default must not build the n-step program
    patch.setattr(train, 'make_multi_step', lambda *a: pytest.fail('unrolled by default'))
    looped = train.train_and_evaluate(config_for(False), str(tmp_path / 'looped'))
  assert int(looped.step) == int(unrolled.step) == 5
  _assert_trees_equal(looped.params, unrolled.params, exact=False)
  _assert_trees_equal(looped.ema_params, unrolled.ema_params, exact=False)
  for run in ('looped', 'unrolled'):                    # one row per call: 2, 2 and 1 steps
    assert [row['step'] for row in io.read_metrics(str(tmp_path / run)) if 'loss' in row] == [
        2, 4, 5]
  assert checkpoints.existing_steps(str(tmp_path / 'unrolled'))[-1] == 5
  # Unrolling changes no maths, so a run may resume with the other setting.
  resumed = train.train_and_evaluate(config_for(True, n_iters=8), str(tmp_path / 'looped'),
                                     extend=True)
  assert int(resumed.step) == 8
  assert [row['step'] for row in io.read_metrics(str(tmp_path / 'looped')) if 'loss' in row] == [
      2, 4, 5, 7, 8]


def test_the_printed_eta_says_it_counts_the_train_steps_only(tmp_path, capsys):
  """The ETA is (steps left) / (the train steps' own rate), which leaves out evaluation,
  checkpoints, snapshots and the final evaluation: the line says so."""
  train.train_and_evaluate(small_toy_config(3), str(tmp_path), final_evaluation=False)
  lines = [line for line in capsys.readouterr().out.splitlines() if '| eta ' in line]
  assert [line.split(' |')[0] for line in lines] == ['step 2/3', 'step 3/3'], lines
  assert all(line.endswith(' (train steps only)') for line in lines), lines
