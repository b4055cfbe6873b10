"""Training: pure train / eval steps and the training loop, readable in one sitting.

`train_step(state, batch) -> (state, metrics)` is pure and jitted once, with
the state replicated and the batch sharded over the mesh's 'data' axis (one
SPMD program from 1 CPU to a pod; the mean over a sharded batch already
averages across devices), and the state donated. Randomness: the root key in
the state is folded with the step inside the step, so a resumed run draws
exactly the same noise.

The step takes one of two forms of the state, with the same maths
(config.training.param_layout; 'auto' picks flat on the CPU backend, tree
elsewhere):
  tree  `experiment.TrainState` with parameter trees, compiled with plain
        `jax.jit`: the big_vision step, for GPU / TPU (leaves may differ in
        dtype; per-parameter sharding and tree-aware optax stay possible).
  flat  `cpu.flat_state.FlatTrainState`: params, Adam's moments and EMA as
        flat vectors, compiled with XLA:CPU's per-program options
        (`cpu.xla_flags.jit_step`); the step compiles ~30 % faster on XLA:CPU
        (cpu/flat_params.py says why).
Checkpoints, snapshot samples, the final evaluation and the returned state
hold trees either way, so a run may change form when it resumes.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from score_sde import checkpoints
from score_sde import data as data_lib
from score_sde import experiment as experiment_lib
from score_sde import io
from score_sde import jobs
from score_sde import locks
from score_sde import losses
from score_sde import parallel
from score_sde.cpu import flat_state
from score_sde.cpu import xla_flags
from score_sde.jobs import sample as sample_job_lib
from score_sde.models import utils as model_utils

LOSS_EPS = 1e-5  # smallest training time of the continuous loss (the reference's)


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN / inf loss or gradient."""


# ----------------------------------------------------------------------------
# Optimiser and EMA
# ----------------------------------------------------------------------------


def ema_decay(step, ema_rate: float, warmup: bool):
  """EMA decay at `step`: ema_rate, or min(ema_rate, (1 + step) / (10 + step)).

  The warm-up form forgets the untrained initial weights in short runs: at
  step 1700 its window is ~190 steps instead of 1000.
  """
  if not warmup:
    return jnp.asarray(ema_rate, jnp.float32)
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(ema_rate, (1.0 + step) / (10.0 + step))


# ----------------------------------------------------------------------------
# The step's form: parameter trees, or flat vectors on XLA:CPU
# ----------------------------------------------------------------------------


def param_layout(config) -> str:
  """'tree' or 'flat': config.training.param_layout, 'auto' resolved by JAX's backend.

  'auto' (the default) is 'flat' on the CPU backend (`jax.default_backend()`)
  and 'tree' on GPU / TPU.
  """
  layout = str(config.training.get('param_layout', 'auto')).lower()
  if layout not in experiment_lib.PARAM_LAYOUTS:
    raise ValueError(f'unknown config.training.param_layout {layout!r}; valid: '
                     f'{list(experiment_lib.PARAM_LAYOUTS)}.')
  if layout == 'auto':
    return 'flat' if jax.default_backend() == 'cpu' else 'tree'
  return layout


def step_jit(layout: str) -> Callable:
  """How a step of `layout` is compiled: `xla_flags.jit_step` (XLA:CPU's
  per-program options) for 'flat', plain `jax.jit` for 'tree'. Same arguments."""
  if layout not in ('tree', 'flat'):
    raise ValueError(f"layout must be 'tree' or 'flat' (see param_layout); got {layout!r}.")
  return xla_flags.jit_step if layout == 'flat' else jax.jit


def _tree_of(state) -> Callable:
  """params as the state stores them -> parameter tree: unravel for a FlatTrainState."""
  if isinstance(state, flat_state.FlatTrainState):
    return state.unravel
  return lambda params: params


# ----------------------------------------------------------------------------
# Pure steps
# ----------------------------------------------------------------------------


def make_train_step(loss_fn, optimizer, schedule, *, ema_rate: float,
                    ema_warmup: bool = False) -> Callable:
  """train_step(state, batch [B, ...]) -> (state, metrics) for one optimiser step.

  `state` is a TrainState (parameter trees) or a FlatTrainState (flat vectors
  [P], `flat_state.flatten_state`); `loss_fn(params tree, key, batch)` sees a
  tree either way. The gradient, clipping, Adam and EMA act on the params as
  the state stores them: the same maths, equal to round-off (the flat form
  sums the gradient norm in another order).
  """

  def train_step(state, batch):
    tree_of = _tree_of(state)
    key = jax.random.fold_in(state.key, state.step)
    loss, grads = jax.value_and_grad(
        lambda params: loss_fn(tree_of(params), key, batch))(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(state.step, ema_rate, ema_warmup)
    ema_params = jax.tree.map(lambda ema, p: decay * ema + (1.0 - decay) * p,
                              state.ema_params, params)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads),
               'learning_rate': schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema_params), metrics

  return train_step


def make_multi_step(train_step, n: int) -> Callable:
  """steps(state, batches [n, B, ...]) -> (state, metrics [n]): n steps in one program.

  `batches` may be a pytree (e.g. {'image': [n, B, ...], 'label': [n, B]}).

  The n steps are unrolled rather than looped: XLA:CPU runs a train step inside
  a while loop ~6x slower than the same step outside one (0.80 vs 0.14 s for
  the digits DDPM++ at batch 64 on 2 cores; a length-1 scan included).
  Unrolling multiplies the compile time instead, so the loop uses this only
  with config.training.unroll_jitted_steps (see `train_and_evaluate`).
  """

  def steps(state, batches):
    all_metrics = []
    for i in range(n):
      state, metrics = train_step(state, jax.tree.map(lambda b: b[i], batches))
      all_metrics.append(metrics)
    return state, jax.tree.map(lambda *m: jnp.stack(m), *all_metrics)

  return steps


def make_eval_step(eval_loss_fn) -> Callable:
  """eval_step(state, batch) -> loss of the EMA parameters (no dropout); either form."""

  def eval_step(state, batch):
    key = jax.random.fold_in(jax.random.fold_in(state.key, 1 << 30), state.step)
    return eval_loss_fn(_tree_of(state)(state.ema_params), key, batch)

  return eval_step


# ----------------------------------------------------------------------------
# Compiled steps
# ----------------------------------------------------------------------------


def make_train_calls(train_step, mesh, n: int, *, layout: str,
                     unroll: bool = False) -> Callable:
  """calls(state, local batches (an iterable of n)) -> (state, metrics [n] on the host).

  The n steps run between two host round trips (config.training.n_jitted_steps).
  By default they are n asynchronous calls of one compiled step, so each
  batch is loaded while the previous step runs. With `unroll` they are one
  program of n unrolled steps (`make_multi_step`): it compiles ~n times
  longer (paper NCSN++, n 5: 327 s instead of 30 s on 2 CPU cores, and 4.0
  instead of 3.6 s per step in one run) but made a small NCSN++ step faster
  (n 2: 0.162 instead of 0.185 s, one run each). Both give the same result to
  round-off. The state is replicated and donated, the batch sharded on
  'data'; `layout` ('tree' or 'flat', the state's form) picks the compiler
  (`step_jit`).
  """
  jit = step_jit(layout)
  replicated = parallel.replicated(mesh)
  if unroll:
    p_steps = jit(make_multi_step(train_step, n),
                  in_shardings=(replicated, parallel.batch_sharding(mesh, batch_axis=1)),
                  out_shardings=(replicated, replicated), donate_argnums=(0,))

    def unrolled_calls(state, local_batches):
      stacked = jax.tree.map(lambda *rows: np.stack(rows), *local_batches)
      state, metrics = p_steps(state, _global_batches(stacked, mesh, batch_axis=1))
      return state, jax.device_get(metrics)
    return unrolled_calls

  p_step = jit_train_step(train_step, mesh, layout=layout)

  def step_calls(state, local_batches):
    per_step = []
    for local in local_batches:
      state, metrics = p_step(state, _global_batches(local, mesh))
      per_step.append(metrics)
    return state, jax.tree.map(lambda *m: np.stack(m), *jax.device_get(per_step))
  return step_calls


def jit_train_step(train_step, mesh, *, layout: str) -> Callable:
  """train_step compiled for `layout` (`step_jit`): the state replicated and donated,
  the batch [B, ...] sharded on 'data' (NamedSharding), state and metrics replicated."""
  replicated = parallel.replicated(mesh)
  return step_jit(layout)(train_step, in_shardings=(replicated, parallel.batch_sharding(mesh)),
                          out_shardings=(replicated, replicated), donate_argnums=(0,))


def make_eval_call(eval_step, mesh, *, layout: str) -> Callable:
  """eval_step compiled for `layout` (`step_jit`): state replicated, batch sharded, no donation."""
  replicated = parallel.replicated(mesh)
  return step_jit(layout)(eval_step, in_shardings=(replicated, parallel.batch_sharding(mesh)),
                          out_shardings=replicated)


def _crossed(previous: int, current: int, every: int) -> bool:
  """Whether a multiple of `every` lies in (previous, current]."""
  return every > 0 and current // every > previous // every


# ----------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------

def loss_fns(config, experiment):
  """(train loss, eval loss), each (params, key, batch) -> scalar."""
  if experiment_lib.is_classifier(config):
    return tuple(losses.get_classifier_loss_fn(experiment.sde, experiment.model_fn,
                                               train=train, eps=LOSS_EPS)
                 for train in (True, False))
  if experiment.is_flow:
    dim = int(np.prod(model_utils.input_shape(config)[1:]))
    return tuple(losses.get_flow_nll_loss_fn(
        experiment.model_fn, dim=dim, inverse_scaler=data_lib.get_data_inverse_scaler(config),
        num_levels=experiment.num_levels, train=train) for train in (True, False))
  loss_kwargs = dict(eps=LOSS_EPS, num_levels=max(experiment.num_levels, 2))
  return tuple(losses.get_loss_fn(config, experiment.sde, experiment.model_fn, train=train,
                                  **loss_kwargs) for train in (True, False))


def _global_batches(local, mesh, batch_axis: int = 0):
  return jax.tree.map(lambda a: parallel.global_batch(a, mesh, batch_axis=batch_axis), local)


def train_and_evaluate(config, workdir: str, *, final_evaluation: bool = True,
                       extend: bool = False) -> experiment_lib.TrainState:
  """Trains (resuming from the newest checkpoint in `workdir`) and evaluates at the end.

  A score model by default; a noise-conditional classifier (on labelled batches,
  no snapshot samples, test accuracy by noise level at the end) when
  config.model.name is a classifier ('wideresnet'). One writer per workdir: a
  second run on the same workdir stops at once (`locks.WorkdirLockedError`).
  A finished run continues to a larger training.n_iters only with `extend`.
  """
  mesh = parallel.make_mesh()
  experiment_lib.check_config(config, mesh)
  os.makedirs(workdir, exist_ok=True)
  with locks.hold_for_all(workdir, 'train'):
    return _train_and_evaluate(config, workdir, mesh, final_evaluation=final_evaluation,
                               extend=extend)


def _preserved_steps(workdir: str, stored_config: dict | None) -> list[int]:
  """The checkpoints a resumed run must keep whatever its snapshot period: every step
  but the newest (the earlier period kept them), and the newest if it was a
  snapshot or the final step of a finished run (its n_iters)."""
  steps = checkpoints.existing_steps(workdir)
  if not steps or stored_config is None:
    return []
  training = stored_config.get('training', {})
  old_period = int(training.get('snapshot_freq') or 0)
  newest_kept = ((old_period > 0 and steps[-1] % old_period == 0)
                 or steps[-1] >= int(training.get('n_iters') or 0))
  return steps[:-1] + (steps[-1:] if newest_kept else [])


def _train_and_evaluate(config, workdir: str, mesh, *, final_evaluation: bool,
                        extend: bool) -> experiment_lib.TrainState:
  # ---- workdir and config (before any compilation) --------------------------
  # data splits first: a refused resume leaves config.json as the run stored it
  experiment_lib.write_or_check_data_splits(config, workdir)
  stored_config = experiment_lib.write_or_check_config(config, workdir, extend=extend)
  training = config.training
  n_jit = int(training.n_jitted_steps)
  global_batch = int(training.batch_size)
  process_count, process_index = jax.process_count(), jax.process_index()
  is_main = process_index == 0
  classifier = experiment_lib.is_classifier(config)
  layout = param_layout(config)           # 'flat' on the CPU backend by default

  # ---- input ---------------------------------------------------------------
  train_iter = data_lib.train_iterator(
      config, global_batch_size=global_batch, seed=config.seed, split='train',
      process_index=process_index, process_count=process_count, with_labels=classifier)
  eval_iter = data_lib.train_iterator(
      config, global_batch_size=global_batch, seed=config.seed + 1, split='test',
      process_index=process_index, process_count=process_count, augment=False,
      with_labels=classifier)

  # ---- model, loss, optimiser ------------------------------------------------
  experiment = experiment_lib.build_experiment(config)
  loss_fn, eval_loss_fn = loss_fns(config, experiment)
  optimizer, schedule = experiment_lib.get_optimizer(config)

  # ---- state: restore or initialise, replicated on the mesh -----------------
  abstract_state, init = experiment_lib.abstract_train_state(experiment, optimizer, mesh)
  replicated = parallel.replicated(mesh)
  manager = checkpoints.make_manager(workdir, keep_period=training.snapshot_freq or None,
                                    preserve_steps=_preserved_steps(workdir, stored_config))
  if manager.all_steps():
    state, step = checkpoints.restore(manager, abstract_state, train_iter,
                                      move_unreadable=is_main)
    if is_main:
      print(f'Resumed from the checkpoint at step {step} in {checkpoints.checkpoint_dir(workdir)}.',
            flush=True)
  else:
    # A flow's ActNorm layers initialise from data (the same batch on every process).
    init_batch = experiment_lib.flow_init_batch(config) if experiment.is_flow else None
    state = jax.jit(init, out_shardings=replicated)(jax.random.PRNGKey(config.seed), init_batch)
    step = 0
  if is_main:
    print(f'{config.model.name} on {config.data.dataset}: '
          f'{model_utils.param_count(state.params):,} parameters, '
          f'{mesh.devices.size} device(s) in {process_count} process(es), '
          f'global batch {global_batch}, parameter layout {layout}.', flush=True)

  # ---- the step's form ------------------------------------------------------
  # Checkpoints, snapshots and the result are trees; `to_tree` makes one from
  # the loop's state (a copy either way: the next step donates that state).
  if layout == 'flat':
    to_tree = jax.jit(functools.partial(flat_state.unflatten_state, optimizer=optimizer),
                      out_shardings=replicated)
    state = jax.jit(functools.partial(flat_state.flatten_state, optimizer=optimizer),
                    out_shardings=replicated)(state)
  else:
    to_tree = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=replicated)

  # ---- compiled steps ------------------------------------------------------
  train_step = make_train_step(loss_fn, optimizer, schedule,
                               ema_rate=float(config.model.ema_rate),
                               ema_warmup=bool(training.get('ema_warmup', False)))
  unroll = bool(training.get('unroll_jitted_steps', False))
  p_train = make_train_calls(train_step, mesh, n_jit, layout=layout, unroll=unroll)
  # The last call stops at n_iters when n_iters - step is no multiple of n_jit: calls of
  # one compiled step (the unrolled program takes exactly n_jit batches).
  p_last = p_train if not unroll else None
  p_eval = make_eval_call(make_eval_step(eval_loss_fn), mesh, layout=layout)
  snapshot_sampler = None

  # ---- loop ----------------------------------------------------------------
  writer = io.MetricWriter(workdir, start_step=step)
  n_iters = int(training.n_iters)
  t_start = time.time()
  last_log = None     # (time, step) the next rate counts from: the end of the first call
  other_s = 0.0       # since then: seconds in evaluation, checkpoints and snapshot samples
  try:
    while step < n_iters:
      count = min(n_jit, n_iters - step)
      if count < n_jit and p_last is None:
        p_last = make_train_calls(train_step, mesh, count, layout=layout)
      calls = p_train if count == n_jit else p_last
      state, metrics = calls(state, (next(train_iter) for _ in range(count)))
      previous, step = step, step + count
      bad = ~(np.isfinite(metrics['loss']) & np.isfinite(metrics['grad_norm']))   # syncs
      if bad.any():
        first = previous + 1 + int(np.argmax(bad))
        good = manager.latest_step()
        raise NonFiniteLossError(
            f'non-finite loss or gradient at step {first} (loss '
            f'{metrics["loss"][bad][0]}, grad norm {metrics["grad_norm"][bad][0]}); '
            f'training stopped. The last good checkpoint is '
            + (f'step {good} in {checkpoints.checkpoint_dir(workdir)}.' if good is not None
               else 'none (no checkpoint was written yet).')
            + ' Lower config.optim.lr or check the data.')
      if last_log is None:      # the first call compiled the step: timed apart from the rates
        last_log = (time.time(), step)
        writer.write(step, {'first_call_s': last_log[0] - t_start})
        if is_main:
          print(f'step {step}: the first call (compiling the train step) took '
                f'{last_log[0] - t_start:.1f} s; the rates below count from here.', flush=True)

      if _crossed(previous, step, training.log_freq) or step >= n_iters:
        now = time.time()
        scalars = {k: float(np.mean(v)) for k, v in metrics.items()}
        rate = ''
        if step > last_log[1]:         # the train steps' rate: the other work is left out
          steps_per_s = (step - last_log[1]) / max(now - last_log[0] - other_s, 1e-9)
          scalars.update(steps_per_s=steps_per_s, examples_per_s=steps_per_s * global_batch,
                         other_s=other_s)
          eta = (n_iters - step) / max(steps_per_s, 1e-9)
          rate = (f' | {steps_per_s:.2f} steps/s, {steps_per_s * global_batch:.0f} examples/s '
                  f'| eta {io.format_seconds(eta)} (train steps only)')
        last_log, other_s = (now, step), 0.0
        writer.write(step, scalars)
        if is_main:
          print(f'step {step}/{n_iters} | loss {scalars["loss"]:.5g} | grad norm '
                f'{scalars["grad_norm"]:.3g} | lr {scalars["learning_rate"]:.2e}{rate}',
                flush=True)

      other_start = time.time()
      if _crossed(previous, step, training.eval_freq):
        eval_batch = _global_batches(next(eval_iter), mesh)
        eval_loss = float(p_eval(state, eval_batch))
        writer.write(step, {'eval_loss': eval_loss})
        if is_main:
          print(f'step {step}: eval loss (EMA, one test batch of {global_batch}) '
                f'{eval_loss:.5g}', flush=True)

      if (_crossed(previous, step, training.snapshot_freq_for_preemption)
          or _crossed(previous, step, training.snapshot_freq) or step >= n_iters):
        tree_state = to_tree(state)     # a copy: the next step donates `state`
        checkpoints.save(manager, step, tree_state, train_iter)
        writer.flush()                  # the events a resume keeps, out of the buffer
        if (training.snapshot_sampling and not classifier
            and _crossed(previous, step, training.snapshot_freq)):
          snapshot_sampler = snapshot_sampler or sample_job_lib.snapshot_sampler(experiment, mesh)
          sample_job_lib.write_snapshot_samples(experiment, snapshot_sampler, tree_state, step,
                                                workdir, mesh)
        del tree_state
      other_s += time.time() - other_start
  finally:
    manager.wait_until_finished()
    writer.close()
  state = to_tree(state)
  if is_main:
    elapsed = time.time() - t_start
    print(f'Training done at step {step} ({io.format_seconds(elapsed)} this run).', flush=True)

  if final_evaluation and classifier:
    jobs.evaluate_classifier(experiment, state, step, workdir, mesh)
  elif final_evaluation and config.eval.get('enable_bpd', False):
    jobs.final_evaluation(experiment, state, workdir, mesh)
  elif final_evaluation and is_main:
    print('No final evaluation: config.eval.enable_bpd is False (True adds samples, test '
          'bits/dim and sample quality at the end; launch.py sample / bpd / eval run them on '
          'this workdir).', flush=True)
  return state


