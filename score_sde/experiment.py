"""An experiment built from its config: the SDE, network, score function, optimiser and
train state, and a workdir's stored config and checkpoints restored into them.

Training (`train.py`), the jobs (`jobs/`) and the Python API (`api.py`) all
start here; this module imports neither of them. Config files themselves
(`configs/`) are read by the launcher, which validates them and passes the
ConfigDict down.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from score_sde import checkpoints
from score_sde import data as data_lib
from score_sde import flows
from score_sde import io
from score_sde import losses
from score_sde import models
from score_sde import parallel
from score_sde import score_fn as score_fn_lib
from score_sde import sde as sde_lib
from score_sde.models import utils as model_utils

CLASSIFIER_MODELS = ('wideresnet',)
PARAM_LAYOUTS = ('auto', 'tree', 'flat')   # config.training.param_layout (train.py)


# ----------------------------------------------------------------------------
# The experiment, the optimiser and the train state
# ----------------------------------------------------------------------------

@flax.struct.dataclass
class TrainState:
  """Arrays only: step [], params, opt_state, ema_params, key (root PRNG key)."""
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  key: jax.Array


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


def init_train_state(key, init_batch=None, *, model, config, optimizer) -> TrainState:
  """The state at step 0; a flow's data-dependent initialisation runs on `init_batch`
  (`flow_init_batch`)."""
  k_init, k_train = jax.random.split(key)
  params = model_utils.init_params(k_init, model, config, batch=init_batch)
  ema_params = jax.tree.map(jnp.copy, params)   # own buffers: the step donates both
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), ema_params=ema_params, key=k_train)


# Keys a resumed run may change (schedules of the loop, not the maths; with
# unroll_jitted_steps or param_layout changed, the steps agree to round-off,
# not bitwise). Checkpoints hold parameter trees whichever form the train step
# took (train.param_layout), so a run may resume in the other form.
RESUMABLE_CHANGES = ('training.n_iters', 'training.log_freq', 'training.eval_freq',
                     'training.unroll_jitted_steps', 'training.param_layout',
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


def _is_resumable_change(key: str) -> bool:
  """Whether a flattened config key is one a resumed run may change."""
  return any(key == p or (p.endswith('.') and key.startswith(p)) for p in RESUMABLE_CHANGES)


def _run_differences(stored: dict, current: dict) -> list[str]:
  """'key: old -> new' for the keys (outside RESUMABLE_CHANGES) where two config dicts
  differ, sorted."""
  old, new = _flatten(stored), _flatten(current)
  return [f'{k}: {old.get(k)!r} -> {new.get(k)!r}'
          for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k) and not _is_resumable_change(k)]


def config_to_dict(config) -> dict:
  """JSON-ready dict of a ConfigDict (tuples become lists)."""
  return json.loads(config.to_json())


# Where launch.py import_checkpoint records a workdir's source (jobs/import_checkpoint.py).
IMPORT_PROVENANCE_FILE = 'imported.json'


def write_or_check_config(config, workdir: str, *, extend: bool = False) -> dict | None:
  """Checks a resumed run's config against <workdir>/config.json, then writes the current one.

  Returns the stored config (a dict) of a run that has checkpoints, else None.
  A stored config pins the run only once the run has a checkpoint: a first run
  that failed before its first checkpoint (a bad batch size, a NaN at step 3)
  does not pin its config, and the corrected run replaces it. Of the changes a
  resumed run may make (RESUMABLE_CHANGES), extending a finished run (its
  newest checkpoint at its training.n_iters) to more steps needs `extend`.
  """
  path = os.path.join(workdir, 'config.json')
  current = config_to_dict(config)
  steps = checkpoints.existing_steps(workdir)
  stored = None
  if os.path.exists(path) and steps:
    stored = config_to_dict(io.read_config_json(workdir))
    changed = _run_differences(stored, current)
    if changed:
      imported = (f' To train an imported checkpoint with other settings, import it again '
                  f'into a new --workdir with them (launch.py import_checkpoint --original '
                  f'<file> --config <its config> --config.<key>=<value> ...).'
                  if os.path.exists(os.path.join(workdir, IMPORT_PROVENANCE_FILE)) else '')
      raise ValueError(f'{workdir} holds a run with a different config '
                       f'({", ".join(changed[:8])}); resuming would not be exact. Use a new '
                       f'--workdir.{imported}')
    old, new = _flatten(stored), _flatten(current)
    old_iters, new_iters = old.get('training.n_iters'), new.get('training.n_iters')
    if old_iters is not None and steps[-1] >= old_iters and new_iters > old_iters and not extend:
      raise ValueError(f'the run in {workdir} finished at step {steps[-1]} (training.n_iters '
                       f'{old_iters}); continuing it to {new_iters} steps needs --extend '
                       f'(launch.py train ... --extend), or use a new --workdir.')
  if jax.process_index() == 0:
    io.atomic_json(path, current)
  return stored


DATA_SPLITS_FILE = 'data_splits.json'


def data_splits(config) -> dict:
  """{'train': tfds split, 'test': tfds split}: the data our split names read (the
  shipped mapping, or benchmarks/flows_validation.py's held-out one)."""
  return {'train': data_lib.tfds_split(config, 'train'),
          'test': data_lib.tfds_split(config, 'test')}


def write_or_check_data_splits(config, workdir: str) -> None:
  """Pins the tfds splits a run trains and evaluates on in <workdir>/data_splits.json,
  as `write_or_check_config` pins its config: once the run has a checkpoint, a resume
  whose split names read other data is refused (it would not be exact)."""
  path = os.path.join(workdir, DATA_SPLITS_FILE)
  current = data_splits(config)
  if os.path.exists(path) and checkpoints.existing_steps(workdir):
    stored = training_data_splits(workdir)
    if stored != current:
      raise ValueError(
          f'{workdir} holds a run on tfds splits {stored} ({DATA_SPLITS_FILE}); this run '
          f'reads {current}, so resuming would train on other data. Run it as it was '
          f'started (with or without benchmarks/flows_validation.py and its --holdout), '
          f'or use a new --workdir.')
  if jax.process_index() == 0:
    io.atomic_json(path, current)


def training_data_splits(workdir: str) -> dict | None:
  """The tfds splits the run in `workdir` trained on (data_splits.json; None for a
  workdir written before the file existed, or an imported checkpoint)."""
  path = os.path.join(workdir, DATA_SPLITS_FILE)
  if not os.path.exists(path):
    return None
  return io.read_json_object(path, f'the tfds splits the run in {workdir} trained on',
                             'restore it from a backup, or start a new --workdir')


def check_config(config, mesh=None) -> None:
  """Everything about the experiment that can be checked before compiling anything
  (the launcher checks the config's keys first, with `configs.validate`)."""
  for key in ('n_jitted_steps', 'n_iters', 'batch_size'):
    value = config.training[key]
    if int(value) != value or value < 1:
      raise ValueError(f'config.training.{key} must be an integer >= 1; got {value!r}.')
  data_lib.check_config_matches_dataset(config)
  models.get_model(config)        # validates the network's hyper-parameters
  if is_flow(config):
    _check_flow_config(config)
  else:
    sde_lib.sde_from_config(config)
  losses.loss_name_from_config(config, flow=is_flow(config))
  get_optimizer(config)
  if mesh is not None:
    parallel.check_batch_divisible(config.training.batch_size, mesh, 'batch size')
  layout = str(config.training.get('param_layout', 'auto')).lower()
  if layout not in PARAM_LAYOUTS:
    raise ValueError(f'unknown config.training.param_layout {layout!r}; valid: '
                     f'{list(PARAM_LAYOUTS)}.')


@dataclasses.dataclass(frozen=True)
class Experiment:
  """The pieces a config defines, shared by training and the evaluation jobs."""
  config: Any
  sde: Any
  sampling_eps: float | None    # None for a flow (no SDE)
  model: Any
  model_fn: Callable
  score_model_fn: Callable | None   # (params, x, t) -> score, eval mode; None: classifier, flow
  num_levels: int

  @property
  def continuous(self) -> bool:
    return bool(self.config.training.continuous)

  @property
  def is_flow(self) -> bool:
    """A normalizing flow: no SDE; model_fn(params, x) -> (log p(x) [B], z [B, D])."""
    return models.is_flow(self.config.model.name)


def is_flow(config) -> bool:
  """Whether the config trains a normalizing flow (nice, realnvp, glow)."""
  return models.is_flow(config.model.name)


def _check_flow_config(config) -> None:
  name = config.model.name
  if 'prior' not in config.model:     # every flow config states its prior
    raise ValueError(
        f'model.name={name} is a normalizing flow, but this config has no model.prior: it '
        f'looks like a score-model config with its model name changed, whose dropout '
        f'({config.model.get("dropout", 0.0)}), learning rate and EMA rate a flow would take '
        f'as they are; start from a flow config: configs/digits/{name}.py or one in '
        f'configs/flows/.')
  if not config.data.uniform_dequantization:
    raise ValueError(f'a flow ({config.model.name}) trains by maximum likelihood on '
                     f'dequantised data: set config.data.uniform_dequantization=True (on '
                     f'discrete values its density is unbounded).')
  flows.check_prior(config.model.get('prior', 'gaussian'))


def flow_init_batch(config, max_examples: int = 256) -> np.ndarray:
  """The batch a flow's data-dependent initialisation sees: the first
  min(batch size, 256) training examples (Glow's code initialises on 256), uniformly dequantised with a fixed
  seed, in model space [n, H, W, C]. The same on every process."""
  n = min(int(config.training.batch_size), max_examples)
  uint = data_lib.load_split_uint(config, 'train', n)
  unit = data_lib.to_unit_interval(uint, data_lib.num_levels(config),
                                   np.random.default_rng(config.seed))
  return np.asarray(data_lib.get_data_scaler(config)(unit), np.float32)


def is_classifier(config) -> bool:
  """Whether the config trains a noise-conditional classifier (`train_classifier`)."""
  return str(config.model.name).lower() in CLASSIFIER_MODELS


def build_experiment(config) -> Experiment:
  """The SDE, network and score function of a config (for a classifier config:
  model_fn = logits (params, x, t, train, key) -> [B, K] and no score function; for
  a flow: model_fn = exact log-density (params, x) -> (log p [B], z), no SDE)."""
  model = models.get_model(config)
  if is_flow(config):
    log_prob = flows.get_log_prob_fn(model_utils.flow_functions(model).forward,
                                     config.model.get('prior', 'gaussian'))
    return Experiment(config=config, sde=None, sampling_eps=None, model=model,
                      model_fn=log_prob, score_model_fn=None,
                      num_levels=data_lib.num_levels(config))
  sde, sampling_eps = sde_lib.sde_from_config(config)
  if is_classifier(config):
    return Experiment(config=config, sde=sde, sampling_eps=sampling_eps, model=model,
                      model_fn=score_fn_lib.get_logits_model_fn(sde, model),
                      score_model_fn=None, num_levels=data_lib.num_levels(config))
  model_fn = score_fn_lib.get_model_fn(model)
  score4 = score_fn_lib.get_score_model_fn(
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
# A workdir: its stored config and checkpoints
# ----------------------------------------------------------------------------

def load_config(workdir: str):
  """The resolved config a training run stored in <workdir>/config.json."""
  return io.read_config_json(workdir)


def run_hash(config) -> str:
  """Short hash of the config keys that determine a trained run (all but
  RESUMABLE_CHANGES: loop schedules, eval.*, sampling.*, the data location). A job's
  results depend on the config through the trained model and through its own settings
  (sampler, solver, batch), which the job records beside this; so a train rerun that
  changes only eval or sampling keys leaves every job's address as it was."""
  flat = {k: v for k, v in _flatten(config_to_dict(config)).items()
          if not _is_resumable_change(k)}
  return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def check_trained_with(config, workdir: str) -> None:
  """Refuses a config whose run-determining keys differ from <workdir>/config.json
  (the config its model was trained with): a job would compute numbers for a model
  that does not exist (another SDE, other data scaling) from these weights. eval.* and
  sampling.* keys may differ. No check for a workdir without config.json."""
  if not os.path.exists(os.path.join(workdir, 'config.json')):
    return
  changed = _run_differences(config_to_dict(io.read_config_json(workdir)),
                             config_to_dict(config))
  if changed:
    raise ValueError(f'the config given differs from the one the model in {workdir} was '
                     f'trained with ({", ".join(changed[:8])}); leave --config out to use '
                     f'{workdir}/config.json (override eval.* or sampling.* keys with '
                     f'--config.<key>=...).')


def restore_state(workdir: str, config, mesh, checkpoint: int | None = None):
  """(experiment, train state, step) of a workdir's newest (or given) checkpoint;
  `config` must be the one it was trained with, up to eval.* and sampling.* keys
  (`check_trained_with`)."""
  check_trained_with(config, workdir)
  experiment = build_experiment(config)
  optimizer, _ = get_optimizer(config)
  abstract, _ = abstract_train_state(experiment, optimizer, mesh)
  manager = checkpoints.make_manager(workdir, read_only=True)
  if not manager.all_steps():
    raise checkpoints.NoCheckpointError(
        f'{workdir} has no checkpoints ({checkpoints.checkpoint_dir(workdir)} is empty or '
        f'missing); train first with launch.py train --workdir {workdir}.')
  state, step = checkpoints.restore(manager, abstract, step=checkpoint)
  return experiment, state, step
