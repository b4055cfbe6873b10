"""Training: the train state, pure train / eval steps, and the training loop.

`train_step(state, batch) -> (state, metrics)` is pure and jitted once, with
the state replicated and the batch sharded over the mesh's 'data' axis (one
SPMD program from 1 CPU to a pod; the mean over a sharded batch already
averages across devices). Randomness: the root key in the state is folded with
the step inside the step, so a resumed run draws exactly the same noise.

Two forms of the state: `TrainState` holds parameter trees (checkpoints, jobs,
the public API); the loop runs on `FlatTrainState`, whose parameters, Adam
moments and EMA are flat vectors (score_sde/flat_params.py says why: the step
compiles ~30 % faster). `flatten_state` / `unflatten_state` convert exactly.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from score_sde import checkpoints
from score_sde import data as data_lib
from score_sde import flat_params
from score_sde import losses
from score_sde import models
from score_sde import parallel
from score_sde import sde as sde_lib
from score_sde import xla_cpu
from score_sde.models import utils as model_utils

LOSS_EPS = 1e-5  # smallest training time of the continuous loss (the reference's)
CLASSIFIER_MODELS = ('wideresnet',)
# Times at which a trained classifier's test accuracy is reported (t = 0.01:
# nearly clean images; t = 1: the prior, where chance level is expected).
CLASSIFIER_EVAL_TIMES = (0.01, 0.1, 0.25, 0.5, 0.75, 1.0)


@flax.struct.dataclass
class TrainState:
  """Arrays only: step [], params, opt_state, ema_params, key (root PRNG key)."""
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  key: jax.Array


@flax.struct.dataclass
class FlatTrainState:
  """The train loop's state: TrainState with params, EMA and the optimiser's
  parameter-shaped fields (Adam's moments) as flat vectors [P] in `layout`.

  `offsets` are the layout's leaf offsets as int32 scalars: program inputs,
  so that XLA compiles the kernels that read a parameter once per shape
  (flat_params.FlatLayout.unravel).
  """
  step: jax.Array
  params: jax.Array
  opt_state: Any
  ema_params: jax.Array
  key: jax.Array
  offsets: tuple
  layout: flat_params.FlatLayout = flax.struct.field(pytree_node=False)

  def unravel(self, flat: jax.Array):
    """A flat vector of this state (params, EMA, a moment) as a parameter tree."""
    return self.layout.unravel(flat, self.offsets)


def _flat_fields(optimizer, layout: flat_params.FlatLayout):
  """The optimiser state's structure with True at parameter-shaped fields (e.g. Adam's moments).

  A field is parameter-shaped when its shape follows the number of
  parameters: [P] for P parameters and [P + 1] for P + 1.
  """
  def init_shapes(size):
    return jax.eval_shape(optimizer.init, jax.ShapeDtypeStruct((size,), layout.dtype))
  return jax.tree.map(lambda a, b: a.shape == (layout.size,) and b.shape == (layout.size + 1,),
                      init_shapes(layout.size), init_shapes(layout.size + 1))


def flatten_state(state: TrainState, optimizer) -> FlatTrainState:
  """TrainState -> FlatTrainState (an exact copy; jit it with the state's shardings)."""
  layout = flat_params.FlatLayout.of(state.params)
  opt_state = jax.tree.map(lambda flat, sub: layout.ravel(sub) if flat else sub,
                           _flat_fields(optimizer, layout), state.opt_state)
  return FlatTrainState(step=state.step, params=layout.ravel(state.params),
                        opt_state=opt_state, ema_params=layout.ravel(state.ema_params),
                        key=state.key, offsets=layout.offsets(), layout=layout)


def unflatten_state(state: FlatTrainState, optimizer) -> TrainState:
  """FlatTrainState -> TrainState (an exact copy; what checkpoints and jobs hold)."""
  opt_state = jax.tree.map(lambda flat, x: state.unravel(x) if flat else x,
                           _flat_fields(optimizer, state.layout), state.opt_state)
  return TrainState(step=state.step, params=state.unravel(state.params), opt_state=opt_state,
                    ema_params=state.unravel(state.ema_params), key=state.key)


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN / inf loss or gradient."""


# ----------------------------------------------------------------------------
# Optimiser and EMA
# ----------------------------------------------------------------------------

def learning_rate_schedule(config) -> optax.Schedule:
  """lr * min((count + 1) / warmup, 1): linear warm-up as in the reference."""
  lr, warmup = float(config.optim.lr), int(config.optim.warmup)
  if warmup > 0:
    return lambda count: lr * jnp.minimum((count + 1.0) / warmup, 1.0)
  return lambda count: lr * jnp.ones_like(count, jnp.float32)


def get_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam (AdamW when weight_decay > 0) after global-norm clipping (grad_clip >= 0)."""
  optim = config.optim
  if str(optim.optimizer).lower() != 'adam':
    raise ValueError(f'unknown optimizer {optim.optimizer!r} (config.optim.optimizer); '
                     f"valid: ['Adam'].")
  schedule = learning_rate_schedule(config)
  parts = []
  if optim.grad_clip >= 0:
    parts.append(optax.clip_by_global_norm(float(optim.grad_clip)))
  if optim.weight_decay:
    parts.append(optax.adamw(schedule, b1=optim.beta1, b2=0.999, eps=optim.eps,
                             weight_decay=optim.weight_decay))
  else:
    parts.append(optax.adam(schedule, b1=optim.beta1, b2=0.999, eps=optim.eps))
  return optax.chain(*parts), schedule


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
# Pure steps
# ----------------------------------------------------------------------------

def init_train_state(key, *, model, config, optimizer) -> TrainState:
  k_init, k_train = jax.random.split(key)
  params = model_utils.init_params(k_init, model, config)
  ema_params = jax.tree.map(jnp.copy, params)   # own buffers: the step donates both
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), ema_params=ema_params, key=k_train)


def make_train_step(loss_fn, optimizer, schedule, *, ema_rate: float,
                    ema_warmup: bool = False) -> Callable:
  """train_step(FlatTrainState, batch [B, ...]) -> (state, metrics) for one optimiser step.

  `loss_fn(params tree, key, batch)`; the gradient, clipping, Adam and EMA
  act on the flat vectors (`flatten_state` makes the state).
  """

  def train_step(state: FlatTrainState, batch):
    key = jax.random.fold_in(state.key, state.step)
    loss, grads = jax.value_and_grad(
        lambda flat: loss_fn(state.unravel(flat), key, batch))(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(state.step, ema_rate, ema_warmup)
    ema_params = decay * state.ema_params + (1.0 - decay) * params
    metrics = {'loss': loss, 'grad_norm': optax.global_norm(grads),
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


def make_train_calls(train_step, mesh, n: int, *, unroll: bool = False) -> Callable:
  """calls(state, local batches (an iterable of n)) -> (state, metrics [n] on the host).

  The n steps run between two host round trips (config.training.n_jitted_steps).
  By default they are n asynchronous calls of one compiled step, so each
  batch is loaded while the previous step runs. With `unroll` they are one
  program of n unrolled steps (`make_multi_step`): it compiles ~n times
  longer (paper NCSN++, n 5: 327 s instead of 30 s on 2 CPU cores, and 4.0
  instead of 3.6 s per step in one run) but made a small NCSN++ step faster
  (n 2: 0.162 instead of 0.185 s, one run each). Both give the same result to
  round-off. The step is compiled at its first call by `xla_cpu.jit_step`
  (with the XLA:CPU options that compile it faster).
  """
  replicated = parallel.replicated(mesh)
  if unroll:
    p_steps = xla_cpu.jit_step(
        make_multi_step(train_step, n),
        in_shardings=(replicated, parallel.batch_sharding(mesh, batch_axis=1)),
        out_shardings=(replicated, replicated), donate_argnums=(0,))

    def unrolled_calls(state, local_batches):
      stacked = jax.tree.map(lambda *rows: np.stack(rows), *local_batches)
      state, metrics = p_steps(state, _global_batches(stacked, mesh, batch_axis=1))
      return state, jax.device_get(metrics)
    return unrolled_calls

  p_step = xla_cpu.jit_step(train_step,
                            in_shardings=(replicated, parallel.batch_sharding(mesh)),
                            out_shardings=(replicated, replicated), donate_argnums=(0,))

  def step_calls(state, local_batches):
    per_step = []
    for local in local_batches:
      state, metrics = p_step(state, _global_batches(local, mesh))
      per_step.append(metrics)
    return state, jax.tree.map(lambda *m: np.stack(m), *jax.device_get(per_step))
  return step_calls


def make_eval_step(eval_loss_fn) -> Callable:
  """eval_step(FlatTrainState, batch) -> loss of the EMA parameters (no dropout)."""

  def eval_step(state: FlatTrainState, batch):
    key = jax.random.fold_in(jax.random.fold_in(state.key, 1 << 30), state.step)
    return eval_loss_fn(state.unravel(state.ema_params), key, batch)

  return eval_step


# ----------------------------------------------------------------------------
# Configs and workdirs
# ----------------------------------------------------------------------------

# Keys a resumed run may change (schedules of the loop, not the maths; with
# unroll_jitted_steps changed, the steps agree to round-off, not bitwise).
RESUMABLE_CHANGES = ('training.n_iters', 'training.log_freq', 'training.eval_freq',
                     'training.unroll_jitted_steps',
                     'training.snapshot_freq', 'training.snapshot_freq_for_preemption',
                     'training.snapshot_sampling', 'eval.', 'sampling.', 'data.data_dir')


def _flatten(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def config_to_dict(config) -> dict:
  """JSON-ready dict of a ConfigDict (tuples become lists)."""
  return json.loads(config.to_json())


def write_or_check_config(config, workdir: str) -> None:
  """Writes <workdir>/config.json, or checks a resumed run's config against it."""
  path = os.path.join(workdir, 'config.json')
  current = config_to_dict(config)
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    old, new = _flatten(stored), _flatten(current)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)
                     and not any(k == p or (p.endswith('.') and k.startswith(p))
                                 for p in RESUMABLE_CHANGES))
    if changed:
      details = ', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in changed[:8])
      raise ValueError(f'{workdir} holds a run with a different config ({details}); '
                       f'resuming would not be exact. Use a new --workdir.')
  if jax.process_index() == 0:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(current, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def check_config(config, mesh=None) -> None:
  """Everything that can be checked before compiling anything."""
  import configs
  configs.validate(config)
  data_lib.check_config_matches_dataset(config)
  models.get_model(config)        # validates the network's hyper-parameters
  sde_lib.sde_from_config(config)
  losses.loss_name_from_config(config)
  get_optimizer(config)
  if mesh is not None:
    parallel.check_batch_divisible(config.training.batch_size, mesh, 'batch size')
  n_jit = config.training.n_jitted_steps
  if n_jit < 1:
    raise ValueError(f'config.training.n_jitted_steps must be >= 1; got {n_jit}.')


# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------

class MetricWriter:
  """Scalars to <workdir>/logs/metrics.jsonl and TensorBoard event files (process 0)."""

  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    self._dir = os.path.join(workdir, 'logs')
    self._tb = None
    if self._active:
      os.makedirs(self._dir, exist_ok=True)
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(self._dir)

  def write(self, step: int, scalars: dict) -> None:
    if not self._active:
      return
    with open(os.path.join(self._dir, 'metrics.jsonl'), 'a') as f:
      f.write(json.dumps({'step': int(step), **{k: float(v) for k, v in scalars.items()}})
              + '\n')
    for name, value in scalars.items():
      self._tb.add_scalar(name, float(value), int(step))

  def close(self):
    if self._tb is not None:
      self._tb.close()


def _crossed(previous: int, current: int, every: int) -> bool:
  """Whether a multiple of `every` lies in (previous, current]."""
  return every > 0 and current // every > previous // every


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m' if seconds >= 3600 else \
      f'{seconds // 60}m{seconds % 60:02d}s'


# ----------------------------------------------------------------------------
# The experiment: everything built from a config
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Experiment:
  """The pieces a config defines, shared by training and the evaluation jobs."""
  config: Any
  sde: Any
  sampling_eps: float
  model: Any
  model_fn: Callable
  score_model_fn: Callable      # (params, x, t) -> score, eval mode
  num_levels: int

  @property
  def continuous(self) -> bool:
    return bool(self.config.training.continuous)


def is_classifier(config) -> bool:
  """Whether the config trains a noise-conditional classifier (`train_classifier`)."""
  return str(config.model.name).lower() in CLASSIFIER_MODELS


def build_experiment(config) -> Experiment:
  """The SDE, network and score function of a config (for a classifier config:
  model_fn = logits (params, x, t, train, key) -> [B, K] and no score function)."""
  sde, sampling_eps = sde_lib.sde_from_config(config)
  model = models.get_model(config)
  if is_classifier(config):
    from score_sde import controllable
    return Experiment(config=config, sde=sde, sampling_eps=sampling_eps, model=model,
                      model_fn=controllable.get_logits_model_fn(sde, model),
                      score_model_fn=None, num_levels=data_lib.num_levels(config))
  model_fn = model_utils.get_model_fn(model)
  score4 = model_utils.get_score_model_fn(
      sde, model_fn, continuous=config.training.continuous,
      learned_variance=bool(config.model.get('learned_variance', False)))
  return Experiment(config=config, sde=sde, sampling_eps=sampling_eps, model=model,
                    model_fn=model_fn,
                    score_model_fn=lambda params, x, t: score4(params, x, t, False, None),
                    num_levels=data_lib.num_levels(config))


def abstract_train_state(experiment: Experiment, optimizer, mesh):
  """Shapes, dtypes and (replicated) shardings of the train state."""
  init = functools.partial(init_train_state, model=experiment.model,
                           config=experiment.config, optimizer=optimizer)
  shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
  replicated = parallel.replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                      shapes), init


# ----------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------

def _loss_fns(config, experiment: Experiment):
  """(train loss, eval loss), each (params, key, batch) -> scalar."""
  if is_classifier(config):
    from score_sde import controllable
    return tuple(controllable.get_classifier_loss_fn(experiment.sde, experiment.model_fn,
                                                     train=train, eps=LOSS_EPS)
                 for train in (True, False))
  loss_kwargs = dict(eps=LOSS_EPS, num_levels=max(experiment.num_levels, 2))
  return tuple(losses.get_loss_fn(config, experiment.sde, experiment.model_fn, train=train,
                                  **loss_kwargs) for train in (True, False))


def _global_batches(local, mesh, batch_axis: int = 0):
  return jax.tree.map(lambda a: parallel.global_batch(a, mesh, batch_axis=batch_axis), local)


def train_and_evaluate(config, workdir: str, *, final_evaluation: bool = True) -> TrainState:
  """Trains (resuming from the newest checkpoint in `workdir`) and evaluates at the end.

  A score model by default; a noise-conditional classifier (on labelled batches,
  no snapshot samples, test accuracy by noise level at the end) when
  config.model.name is a classifier ('wideresnet').
  """
  # ---- mesh and checks (before any compilation) -------------------------
  mesh = parallel.make_mesh()
  check_config(config, mesh)
  os.makedirs(workdir, exist_ok=True)
  write_or_check_config(config, workdir)
  training = config.training
  n_jit = int(training.n_jitted_steps)
  global_batch = int(training.batch_size)
  process_count, process_index = jax.process_count(), jax.process_index()
  is_main = process_index == 0
  classifier = is_classifier(config)

  # ---- input ---------------------------------------------------------------
  train_iter = data_lib.train_iterator(
      config, global_batch_size=global_batch, seed=config.seed, split='train',
      process_index=process_index, process_count=process_count, with_labels=classifier)
  eval_iter = data_lib.train_iterator(
      config, global_batch_size=global_batch, seed=config.seed + 1, split='test',
      process_index=process_index, process_count=process_count, augment=False,
      with_labels=classifier)

  # ---- model, loss, optimiser ------------------------------------------------
  experiment = build_experiment(config)
  loss_fn, eval_loss_fn = _loss_fns(config, experiment)
  optimizer, schedule = get_optimizer(config)

  # ---- state: restore or initialise, replicated on the mesh -----------------
  abstract_state, init = abstract_train_state(experiment, optimizer, mesh)
  replicated = parallel.replicated(mesh)
  manager = checkpoints.make_manager(workdir, keep_period=training.snapshot_freq or None)
  if manager.all_steps():
    state, step = checkpoints.restore(manager, abstract_state, train_iter)
    if is_main:
      print(f'Resumed from the checkpoint at step {step} in {checkpoints.checkpoint_dir(workdir)}.',
            flush=True)
  else:
    state = jax.jit(init, out_shardings=replicated)(jax.random.PRNGKey(config.seed))
    step = 0
  if is_main:
    print(f'{config.model.name} on {config.data.dataset}: '
          f'{model_utils.param_count(state.params):,} parameters, '
          f'{mesh.devices.size} device(s) in {process_count} process(es), '
          f'global batch {global_batch}.', flush=True)

  # The loop runs on the flat form; checkpoints, snapshots and the result are trees.
  to_tree = jax.jit(functools.partial(unflatten_state, optimizer=optimizer),
                    out_shardings=replicated)
  state = jax.jit(functools.partial(flatten_state, optimizer=optimizer),
                  out_shardings=replicated)(state)

  # ---- compiled steps ------------------------------------------------------
  train_step = make_train_step(loss_fn, optimizer, schedule,
                               ema_rate=float(config.model.ema_rate),
                               ema_warmup=bool(training.get('ema_warmup', False)))
  p_train = make_train_calls(train_step, mesh, n_jit,
                             unroll=bool(training.get('unroll_jitted_steps', False)))
  p_eval = xla_cpu.jit_step(make_eval_step(eval_loss_fn),
                            in_shardings=(replicated, parallel.batch_sharding(mesh)),
                            out_shardings=replicated)
  snapshot_sampler = None

  # ---- loop ----------------------------------------------------------------
  writer = MetricWriter(workdir)
  n_iters = int(training.n_iters)
  t_start, step_start, last_log = time.time(), step, (time.time(), step)
  try:
    while step < n_iters:
      state, metrics = p_train(state, (next(train_iter) for _ in range(n_jit)))
      previous, step = step, step + n_jit
      bad = ~(np.isfinite(metrics['loss']) & np.isfinite(metrics['grad_norm']))
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

      if _crossed(previous, step, training.log_freq) or step >= n_iters:
        now = time.time()
        steps_per_s = (step - last_log[1]) / max(now - last_log[0], 1e-9)
        last_log = (now, step)
        scalars = {k: float(np.mean(v)) for k, v in metrics.items()}
        scalars.update(steps_per_s=steps_per_s, examples_per_s=steps_per_s * global_batch)
        writer.write(step, scalars)
        if is_main:
          eta = (n_iters - step) / max(steps_per_s, 1e-9)
          print(f'step {step}/{n_iters} | loss {scalars["loss"]:.5g} | grad norm '
                f'{scalars["grad_norm"]:.3g} | lr {scalars["learning_rate"]:.2e} | '
                f'{steps_per_s:.2f} steps/s, {steps_per_s * global_batch:.0f} examples/s | '
                f'eta {_format_seconds(eta)}', flush=True)

      if _crossed(previous, step, training.eval_freq):
        eval_batch = _global_batches(next(eval_iter), mesh)
        eval_loss = float(p_eval(state, eval_batch))
        writer.write(step, {'eval_loss': eval_loss})
        if is_main:
          print(f'step {step}: eval loss (EMA, test split) {eval_loss:.5g}', flush=True)

      if (_crossed(previous, step, training.snapshot_freq_for_preemption)
          or _crossed(previous, step, training.snapshot_freq) or step >= n_iters):
        tree_state = to_tree(state)     # a copy: the next step donates the flat state
        checkpoints.save(manager, step, tree_state, train_iter)
        if (training.snapshot_sampling and not classifier
            and _crossed(previous, step, training.snapshot_freq)):
          snapshot_sampler = snapshot_sampler or _snapshot_sampler(experiment, mesh)
          _write_samples(experiment, snapshot_sampler, tree_state, step, workdir, mesh)
        del tree_state
  finally:
    manager.wait_until_finished()
    writer.close()
  state = to_tree(state)
  if is_main:
    elapsed = time.time() - t_start
    print(f'Training done at step {step} ({_format_seconds(elapsed)} this run).', flush=True)

  if final_evaluation and classifier:
    evaluate_classifier(experiment, state, step, workdir, mesh)
  elif final_evaluation and config.eval.get('enable_bpd', False):
    from score_sde import jobs
    jobs.final_evaluation(experiment, state, workdir, mesh)
  return state


def evaluate_classifier(experiment: Experiment, state, step: int, workdir: str, mesh,
                        times=CLASSIFIER_EVAL_TIMES) -> dict:
  """Test-split accuracy of the EMA classifier on x_t ~ p_0t(. | x_0) at fixed times.

  One noise draw per example and time (key fold_in(seed + 3, time index)).
  Writes <workdir>/eval/classifier_accuracy_<step>.json {t: accuracy} and
  returns it (with the number of examples).
  """
  config = experiment.config
  n_dev = mesh.devices.size
  batch = max(int(config.eval.batch_size) // n_dev, 1) * n_dev
  labels = data_lib.load_split_labels(config, 'test')
  data_sharding = parallel.batch_sharding(mesh)
  replicated = parallel.replicated(mesh)
  from score_sde import controllable

  def count_correct(params, key, images, batch_labels, valid, t):
    logits_fn = lambda x, t: experiment.model_fn(params, x, t)   # noqa: E731
    correct = controllable.classifier_correct(logits_fn, experiment.sde, key, images,
                                              batch_labels, t)
    return jnp.sum(correct & valid)

  p_count = jax.jit(count_correct, in_shardings=(replicated, replicated, data_sharding,
                                                 data_sharding, data_sharding, None),
                    out_shardings=replicated)
  local = batch // jax.process_count()
  rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
  correct = np.zeros(len(times), np.int64)
  for index, (images, valid) in enumerate(
      data_lib.eval_batches(config, 'test', batch_size=batch)):
    start = index * batch
    batch_labels = np.zeros(batch, np.int32)
    batch_labels[:int(valid.sum())] = labels[start:start + int(valid.sum())]
    arrays = _global_batches((images[rows], batch_labels[rows], valid[rows]), mesh)
    for j, t in enumerate(times):
      key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed + 3), j), index)
      correct[j] += int(p_count(state.ema_params, key, *arrays, float(t)))
  accuracy = {f'{t:g}': float(c) / len(labels) for t, c in zip(times, correct)}
  result = {'step': int(step), 'num_examples': len(labels), 'accuracy_by_time': accuracy}
  if jax.process_index() == 0:
    from score_sde import jobs
    path = os.path.join(workdir, 'eval', f'classifier_accuracy_{step}.json')
    jobs._atomic_json(path, result)
    table = ', '.join(f't={t}: {a:.3f}' for t, a in accuracy.items())
    print(f'Classifier test accuracy (EMA, {len(labels)} examples, x_t ~ p_0t): {table}\n'
          f'Written to {path}', flush=True)
  return result


def _snapshot_sampler(experiment: Experiment, mesh):
  from score_sde import sampling
  config = experiment.config
  n = min(int(config.training.batch_size), 64)
  n = max(n // mesh.devices.size, 1) * mesh.devices.size
  shape = model_utils.input_shape(config, n)
  return sampling.get_sampling_fn(config, experiment.sde, experiment.score_model_fn, shape,
                                  experiment.sampling_eps, mesh=mesh)


def _write_samples(experiment: Experiment, sampler, state, step: int, workdir: str, mesh):
  from score_sde import evaluation
  key = jax.random.fold_in(jax.random.PRNGKey(experiment.config.seed + 2), step)
  samples, info = sampler(key, state.ema_params)
  images = np.asarray(jax.device_get(
      data_lib.get_data_inverse_scaler(experiment.config)(samples)))
  if jax.process_index() == 0 and images.ndim == 4:
    path = os.path.join(workdir, 'samples', f'step_{step}.png')
    evaluation.save_image_grid(path, images, scale=max(1, 64 // images.shape[1]))
    print(f'step {step}: wrote {len(images)} samples ({int(info["nfe"])} score '
          f'evaluations) to {path}', flush=True)
  return images
