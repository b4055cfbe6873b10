"""The sampling job: draws samples from a workdir's EMA parameters into npz shards.

  <workdir>/samples/<tag>/shard_00000.npz   uint8 images (+ float samples)
  <workdir>/samples/<tag>/manifest.json      sampler, steps, NFE per shard, seed, ...
  <workdir>/samples/<tag>/grid.png           the first 64 samples

Also the training loop's snapshot samples (`snapshot_sampler`).
"""
from __future__ import annotations

import json
import math
import os

import jax
import numpy as np

from score_sde import data as data_lib
from score_sde import experiment as experiment_lib
from score_sde import io
from score_sde import parallel
from score_sde import sampling
from score_sde.jobs import common
from score_sde.models import utils as model_utils


# ----------------------------------------------------------------------------
# Loading a workdir
# ----------------------------------------------------------------------------


# ----------------------------------------------------------------------------
# Shard files
# ----------------------------------------------------------------------------


# ----------------------------------------------------------------------------
# Sampling job
# ----------------------------------------------------------------------------

def sampler_description(config) -> dict:
  """The sampler settings that determine the samples (for the manifest)."""
  method, options = sampling.config_options(config)
  return {'method': method, **{k: (list(v) if isinstance(v, tuple) else v)
                               for k, v in sorted(options.items())}}


def sample_job(workdir: str, config, *, num_samples: int, shard_size: int | None = None,
               checkpoint: int | None = None, seed: int | None = None,
               save_floats: bool = False, tag: str | None = None, mesh=None,
               state=None, step: int | None = None) -> str:
  """Draws `num_samples` samples from the EMA parameters into sharded npz files.

  Returns the output directory. Re-running completes missing shards only.
  """
  mesh = mesh or parallel.make_mesh()
  experiment, state, step = common.experiment_and_state(workdir, config, mesh, checkpoint,
                                                        state, step)
  n_dev = mesh.devices.size
  shard_size = int(shard_size or min(config.eval.batch_size, num_samples))
  shard_size = max(1, math.ceil(shard_size / n_dev)) * n_dev
  num_shards = math.ceil(num_samples / shard_size)
  seed = config.seed if seed is None else seed
  description = sampler_description(config)
  tag = tag or f'step_{step}_{description["method"]}_seed{seed}'
  out_dir = os.path.join(workdir, 'samples', tag)
  os.makedirs(out_dir, exist_ok=True)
  manifest_path = os.path.join(out_dir, 'manifest.json')
  manifest = {'sampler': description, 'checkpoint_step': int(step), 'seed': int(seed),
              'config_hash': experiment_lib.config_hash(config), 'shard_size': shard_size,
              'num_samples': int(num_samples), 'num_shards': num_shards, 'shards': {}}
  if os.path.exists(manifest_path):
    with open(manifest_path) as f:
      previous = json.load(f)
    for key in ('sampler', 'checkpoint_step', 'seed', 'config_hash', 'shard_size'):
      if previous.get(key) != manifest[key]:
        raise ValueError(f'{out_dir} holds samples made with a different {key} '
                         f'({previous.get(key)!r} vs {manifest[key]!r}); pass another '
                         f'--tag or delete the folder.')
    manifest['shards'] = previous.get('shards', {})

  todo = [s for s in range(num_shards) if not os.path.exists(common.shard_path(out_dir, s))]
  if jax.process_index() == 0:
    print(f'sampling {num_samples} samples ({description["method"]}) from step {step} into '
          f'{out_dir}: {num_shards} shard(s) of {shard_size}, {num_shards - len(todo)} '
          f'already done.', flush=True)
  if todo:
    shape = model_utils.input_shape(config, shard_size)
    sampler = sampling.get_sampling_fn(config, experiment.sde, experiment.score_model_fn,
                                       shape, experiment.sampling_eps, mesh=mesh)
    inverse = data_lib.get_data_inverse_scaler(config)
    base_key = jax.random.PRNGKey(seed)
    progress = common.Progress(num_shards * shard_size, 'samples',
                        (num_shards - len(todo)) * shard_size)
    for done, shard in enumerate(todo):
      x, info = sampler(jax.random.fold_in(base_key, shard), state.ema_params)
      x = parallel.gather(x)
      if jax.process_index() == 0:
        arrays = {}
        if x.ndim == 4:
          levels = max(experiment.num_levels, 2)
          unit = np.clip(np.asarray(inverse(x)), 0.0, 1.0)
          arrays['images'] = np.round(unit * (levels - 1)).astype(np.uint8)
          arrays['levels'] = np.asarray(levels)
        if save_floats or x.ndim != 4:
          arrays['samples'] = x.astype(np.float32)
        io.savez_atomic(common.shard_path(out_dir, shard), **arrays)
        manifest['shards'][str(shard)] = {'nfe': int(np.asarray(info['nfe']))}
        io.atomic_json(manifest_path, manifest)
      progress.update((num_shards - len(todo) + done + 1) * shard_size,
                      f'NFE {int(np.asarray(info["nfe"]))}')
  if jax.process_index() == 0:
    io.atomic_json(manifest_path, manifest)
    first = load_samples(out_dir, limit=64)
    if first.ndim == 4:
      grid = os.path.join(out_dir, 'grid.png')
      levels = max(experiment.num_levels, 2)
      io.save_image_grid(grid, first / (levels - 1), scale=max(1, 64 // first.shape[1]))
  return out_dir


def load_samples(out_dir: str, limit: int | None = None, floats: bool = False) -> np.ndarray:
  """The samples of a sampling job, in shard order (uint8 images or float samples)."""
  with open(os.path.join(out_dir, 'manifest.json')) as f:
    manifest = json.load(f)
  parts, count = [], 0
  for shard in range(manifest['num_shards']):
    arrays = io.load_npz(common.shard_path(out_dir, shard))
    part = arrays['samples'] if (floats or 'images' not in arrays) else arrays['images']
    parts.append(part)
    count += len(part)
    if limit is not None and count >= limit:
      break
  samples = np.concatenate(parts)[:manifest['num_samples']]
  return samples if limit is None else samples[:limit]


# ----------------------------------------------------------------------------
# Bits/dim job
# ----------------------------------------------------------------------------


# ----------------------------------------------------------------------------
# The main job's final evaluation
# ----------------------------------------------------------------------------


# ----------------------------------------------------------------------------
# Sample quality: dataset statistics and FID / KID / IS of a sampling job
# ----------------------------------------------------------------------------


# ----------------------------------------------------------------------------
# Snapshot samples during training
# ----------------------------------------------------------------------------

def snapshot_sampler(experiment, mesh):
  """The config's sampler for up to 64 snapshot samples during training (jitted)."""
  config = experiment.config
  n = min(int(config.training.batch_size), 64)
  n = max(n // mesh.devices.size, 1) * mesh.devices.size
  shape = model_utils.input_shape(config, n)
  return sampling.get_sampling_fn(config, experiment.sde, experiment.score_model_fn, shape,
                                  experiment.sampling_eps, mesh=mesh)


def write_snapshot_samples(experiment, sampler, state, step: int, workdir: str, mesh):
  """Samples of the EMA parameters at `step` as <workdir>/samples/step_<step>.png."""
  key = jax.random.fold_in(jax.random.PRNGKey(experiment.config.seed + 2), step)
  samples, info = sampler(key, state.ema_params)
  images = np.asarray(jax.device_get(
      data_lib.get_data_inverse_scaler(experiment.config)(samples)))
  if jax.process_index() == 0 and images.ndim == 4:
    path = os.path.join(workdir, 'samples', f'step_{step}.png')
    io.save_image_grid(path, images, scale=max(1, 64 // images.shape[1]))
    print(f'step {step}: wrote {len(images)} samples ({int(info["nfe"])} score '
          f'evaluations) to {path}', flush=True)
  return images
