"""Import a checkpoint of the original code bases into a new workdir.

`import_checkpoint(path, config, workdir)` reads a yang-song/score_sde (Flax
msgpack) or score_sde_pytorch (.pth) checkpoint (the format is read from the
file's bytes), maps its names onto the parameter tree `config` builds, checks
every array's presence and shape, and writes a normal workdir: config.json,
an orbax checkpoint at the original step (training parameters, EMA, Adam's
moments and counts), and imported.json (where it came from). Every job,
`score_sde.load` and `train` (fine-tuning from that step) then work on it
unchanged. The workdir is assembled in a temporary sibling folder and renamed
into place, so a failure writes nothing.

`describe_original(path, candidates)` says what a file holds and which of the
given configs it matches.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax

from score_sde import checkpoints
from score_sde import experiment as experiment_lib
from score_sde import io
from score_sde import models
from score_sde.convert import flax_msgpack
from score_sde.convert import original as original_lib
from score_sde.convert import torch_refinenet
from score_sde.convert import torch_state
from score_sde.models import utils as model_utils

PROVENANCE_FILE = experiment_lib.IMPORT_PROVENANCE_FILE


def read_original(path: str) -> original_lib.OriginalCheckpoint:
  """The checkpoint file at `path`, in whichever original format it is."""
  fmt = original_lib.detect_format(path)
  return flax_msgpack.read(path) if fmt == original_lib.FLAX else torch_state.read(path)


@dataclasses.dataclass(frozen=True)
class MappedCheckpoint:
  """An original checkpoint as our trees (nested dicts of numpy arrays)."""
  params: dict
  ema_params: dict
  adam_mu: dict | None
  adam_nu: dict | None


def _to_ours(original: original_lib.OriginalCheckpoint, flat: dict, config) -> dict:
  target = model_utils.param_shapes_in_order(models.get_model(config), config)
  if original.format == original_lib.FLAX:
    return flax_msgpack.to_ours(flat, target), target
  return torch_state.to_ours(flat, target, str(config.model.name)), target


def map_original(original: original_lib.OriginalCheckpoint, config,
                 config_name: str = 'the config') -> MappedCheckpoint:
  """Our parameter, EMA and Adam trees; CheckpointMismatchError names what differs."""
  trees = {}
  for field in ('params', 'ema_params', 'adam_mu', 'adam_nu'):
    flat = getattr(original, field)
    if flat is None:
      trees[field] = None
      continue
    if field.startswith('adam'):
      # Moments exist only for trained parameters (not for the frozen Fourier
      # projection); the missing ones start at zero, as they would in Adam.
      flat = {name: flat[name] if name in flat else np.zeros_like(value)
              for name, value in original.params.items()}
    mapped, target = _to_ours(original, flat, config)
    what = {'params': original.path, 'ema_params': f'{original.path} (EMA)'}.get(
        field, f'{original.path} (Adam state)')
    original_lib.check_against(mapped, target, source=what, config_name=config_name)
    trees[field] = original_lib.unflatten({p: mapped[p] for p, _ in target})
  _check_noise_levels(original, config, config_name)
  return MappedCheckpoint(**trees)


def _check_noise_levels(original: original_lib.OriginalCheckpoint, config,
                        config_name: str) -> None:
  """A PyTorch file's `sigmas` buffer against the config's geometric noise levels
  (exp(linspace(log sigma_max, log sigma_min, num_scales)), what the original
  stores whatever the SDE)."""
  stored = next((v for k, v in original.buffers.items() if k.split('.')[-1] == 'sigmas'), None)
  if stored is None:
    return
  model = config.model
  expected = np.exp(np.linspace(np.log(float(model.sigma_max)), np.log(float(model.sigma_min)),
                                int(model.num_scales)))
  if stored.shape != expected.shape or not np.allclose(stored, expected, rtol=1e-5, atol=0):
    found = (f'{stored.size} levels from {float(stored.max()):g} to {float(stored.min()):g}'
             if stored.size else 'no levels')
    raise original_lib.CheckpointMismatchError(
        f'{original.path} was trained with other noise levels than {config_name}: its sigmas '
        f'buffer holds {found}, the config {expected.size} from {float(model.sigma_max):g} to '
        f'{float(model.sigma_min):g}. Config keys that would explain it: model.sigma_max, '
        f'model.sigma_min, model.num_scales. Nothing was written.')


def with_original_numerics(original: original_lib.OriginalCheckpoint, config):
  """(config, {key: value set}): for a score_sde_pytorch NCSN / NCSNv2 file, a copy of
  `config` whose network computes that code base's function (its RefineBlock
  widths, unbiased variances, align_corners upsampling: models/ncsnv2.py). Keys the
  config already sets stay as they are. Other files: `config` unchanged, {}."""
  name = str(config.model.name).lower()
  if original.format != original_lib.TORCH or name not in torch_state.REFINENET_MODELS:
    return config, {}
  config = copy.deepcopy(config)
  added = {}
  with config.unlocked():
    for key, value in torch_refinenet.port_model_options(name).items():
      if key not in config.model:
        config.model[key] = value
        added[key] = value
  return config, added


def _as_dtypes(tree, abstract):
  return jax.tree.map(lambda value, spec: jnp.asarray(value, spec.dtype), tree, abstract)


def _filled_opt_state(opt_state, mapped: MappedCheckpoint, adam_count: int, step: int):
  """Our optax state with Adam's moments and count and the schedule's count set."""
  kinds = (optax.ScaleByAdamState, optax.ScaleByScheduleState)

  def fill(part):
    if isinstance(part, optax.ScaleByAdamState):
      mu = part.mu if mapped.adam_mu is None else _as_dtypes(mapped.adam_mu, part.mu)
      nu = part.nu if mapped.adam_nu is None else _as_dtypes(mapped.adam_nu, part.nu)
      count = adam_count if mapped.adam_mu is not None else 0
      return part._replace(count=jnp.asarray(count, part.count.dtype), mu=mu, nu=nu)
    if isinstance(part, optax.ScaleByScheduleState):
      return part._replace(count=jnp.asarray(step, part.count.dtype))
    return part

  return jax.tree.map(fill, opt_state, is_leaf=lambda x: isinstance(x, kinds))


def train_state(original: original_lib.OriginalCheckpoint, mapped: MappedCheckpoint,
                config) -> experiment_lib.TrainState:
  """The train state a run of this code at the original step would hold. The root
  key is the one a new run with config.seed starts from (the original's key
  has another meaning)."""
  experiment = experiment_lib.build_experiment(config)
  optimizer, _ = experiment_lib.get_optimizer(config)
  abstract = jax.eval_shape(lambda k: experiment_lib.init_train_state(
      k, model=experiment.model, config=config, optimizer=optimizer), jax.random.PRNGKey(0))
  params = _as_dtypes(mapped.params, abstract.params)
  ema = _as_dtypes(mapped.ema_params, abstract.ema_params)
  opt_state = _filled_opt_state(optimizer.init(params), mapped, original.adam_count,
                                original.step)
  _, key = jax.random.split(jax.random.PRNGKey(config.seed))
  return experiment_lib.TrainState(step=jnp.asarray(original.step, jnp.int32), params=params,
                                   opt_state=opt_state, ema_params=ema, key=key)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _check_new_workdir(workdir: str) -> None:
  if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
    raise FileExistsError(f'{workdir} already exists and is not empty; import into a new '
                          f'--workdir (nothing there was changed).')


def import_checkpoint(path: str, config, workdir: str, *,
                      config_name: str = 'the config') -> dict:
  """Writes a workdir holding the checkpoint at `path`; returns a summary dict."""
  if jax.process_count() > 1:
    raise ValueError('import_checkpoint runs in one process; start it without '
                     'jax.distributed (it only converts a file).')
  if experiment_lib.is_flow(config):
    raise ValueError(f'{config_name} is a normalizing flow ({config.model.name}); the original '
                     f'checkpoints hold score models: pass the config they were trained with.')
  _check_new_workdir(workdir)
  original = read_original(path)
  config, numerics = with_original_numerics(original, config)
  experiment_lib.check_config(config)
  mapped = map_original(original, config, config_name)
  state = train_state(original, mapped, config)
  notices = []
  if original.ema_rate is not None and not np.isclose(original.ema_rate,
                                                      float(config.model.ema_rate)):
    notices.append(f'the file\'s EMA rate is {original.ema_rate:g} but config.model.ema_rate '
                   f'is {float(config.model.ema_rate):g}; fine-tuning uses the config\'s '
                   f'(pass --config.model.ema_rate={original.ema_rate:g} to keep the file\'s).')
  if numerics:
    settings = ', '.join(f'model.{key}={value}' for key, value in numerics.items())
    notices.append(f'score_sde_pytorch\'s NCSN / NCSNv2 numerics, kept in config.json: '
                   f'{settings} (the Flax original\'s differ; see models/ncsnv2.py).')
  provenance = {
      'source': os.path.abspath(path), 'format': original.format,
      'sha256': _sha256(path), 'step': original.step, 'config': config_name,
      'parameters': original.parameter_count, 'ema_rate_in_file': original.ema_rate,
      'adam_state': original.adam_mu is not None, 'adam_count': original.adam_count,
      'imported_at': datetime.datetime.now().isoformat(timespec='seconds'),
  }
  parent = os.path.dirname(os.path.abspath(workdir))
  os.makedirs(parent, exist_ok=True)
  temporary = os.path.join(parent, f'.{os.path.basename(os.path.abspath(workdir))}'
                                   f'.importing-{os.getpid()}')
  shutil.rmtree(temporary, ignore_errors=True)
  try:
    manager = checkpoints.make_manager(temporary)
    checkpoints.save(manager, original.step, state)
    manager.wait_until_finished()
    manager.close()
    io.atomic_json(os.path.join(temporary, 'config.json'),
                   experiment_lib.config_to_dict(config))
    io.atomic_json(os.path.join(temporary, PROVENANCE_FILE), provenance)
    _check_new_workdir(workdir)
    if os.path.isdir(workdir):
      os.rmdir(workdir)                # empty (checked): the rename needs it gone
    os.rename(temporary, workdir)
  finally:
    shutil.rmtree(temporary, ignore_errors=True)
  return {**provenance, 'workdir': workdir, 'notices': notices}


# ----------------------------------------------------------------------------
# What a file holds
# ----------------------------------------------------------------------------

def _family_matches(original: original_lib.OriginalCheckpoint, config) -> bool:
  """A cheap pre-check (no tracing): could the config's network be this file's?"""
  if experiment_lib.is_flow(config):         # the original checkpoints hold score models
    return False
  name = str(config.model.name).lower()
  refinenet = name in torch_state.REFINENET_MODELS
  names = ' '.join(original.params)
  file_refinenet = 'RefineBlock' in names or 'refine' in names
  if refinenet != file_refinenet:
    return False
  if original.format == original_lib.FLAX and not refinenet:
    ddpm = 'ResnetBlockDDPM_' in names
    return (name == 'ddpm') == ddpm
  return True


def describe_original(path: str, candidates: dict | None = None) -> dict:
  """Format, step, array and parameter counts of a file, and which of `candidates`
  ({name: config}) it matches exactly (names and shapes of every array)."""
  original = read_original(path)
  matches = []
  for name, config in (candidates or {}).items():
    if not _family_matches(original, config):
      continue
    config, _ = with_original_numerics(original, config)
    try:
      map_original(dataclasses.replace(original, adam_mu=None, adam_nu=None), config, name)
    except original_lib.CheckpointMismatchError:
      continue
    matches.append(name)
  shapes = {name: list(np.shape(value)) for name, value in original.params.items()}
  return {
      'file': path, 'format': original.format, 'step': original.step,
      'arrays': len(original.params), 'parameters': original.parameter_count,
      'network': original_lib.family_of(original.params),
      'ema_rate': original.ema_rate, 'learning_rate': original.learning_rate,
      'adam_state': original.adam_mu is not None, 'adam_count': original.adam_count,
      'buffers': sorted(original.buffers),
      'matching_configs': matches, 'configs_tried': len(candidates or {}),
      'array_shapes': shapes,
  }
