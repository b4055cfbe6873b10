"""The sampling job: draws samples from a workdir's EMA parameters into npz shards.

  <workdir>/samples/<tag>/shard_00000.npz   uint8 images (+ float samples)
  <workdir>/samples/<tag>/manifest.json      sampler, steps, NFE per shard, seed, ...
  <workdir>/samples/<tag>/grid.png           the first 64 samples

A normalizing flow samples by one inverse pass at config.sampling.temperature.

Also the training loop's snapshot samples (`snapshot_sampler`).
"""
from __future__ import annotations

import glob
import os

import jax
import numpy as np

from score_sde import data as data_lib
from score_sde import experiment as experiment_lib
from score_sde import flows
from score_sde import io
from score_sde import parallel
from score_sde import sampling
from score_sde.jobs import common
from score_sde.models import utils as model_utils


def sampler_description(config) -> dict:
  """The sampler settings that determine the samples (for the manifest)."""
  if experiment_lib.is_flow(config):
    return {'method': 'flow', 'prior': flows.check_prior(config.model.get('prior', 'gaussian')),
            'temperature': float(config.sampling.get('temperature', 1.0)),
            'precision': 'highest'}
  method, options = sampling.config_options(config)
  return {'method': method, **{k: (list(v) if isinstance(v, tuple) else v)
                               for k, v in sorted(options.items())}}


def sample_job(workdir: str, config, *, num_samples: int, shard_size: int | None = None,
               checkpoint: int | None = None, seed: int | None = None,
               save_floats: bool = False, tag: str | None = None, mesh=None,
               state=None, step: int | None = None) -> str:
  """Draws `num_samples` samples from the EMA parameters into sharded npz files.

  Shard s holds samples [s B, (s + 1) B) drawn with key fold_in(PRNGKey(seed), s)
  (B = shard_size rounded up to the device count; the last shard is full, its
  extra samples are dropped by `load_samples`). Returns the output directory.
  Re-running completes missing shards only; a larger num_samples extends the job
  (without a shard_size, the earlier job's shard size is kept).
  """
  mesh = mesh or parallel.make_mesh()
  experiment, state, step = common.experiment_and_state(workdir, config, mesh, checkpoint,
                                                        state, step)
  seed = config.seed if seed is None else seed
  description = sampler_description(config)
  settings = {'sampler': description, 'checkpoint_step': int(step), 'seed': int(seed),
              'run_hash': experiment_lib.run_hash(config),
              **({'save_floats': True} if save_floats else {})}
  prefix = f'step_{step}_{description["method"]}_seed{seed}_'
  tag = common.check_folder_name(tag) if tag else None
  shard_size = parallel.round_up_to_devices(
      int(shard_size or _earlier_shard_size(workdir, tag, prefix, settings, mesh)
          or min(config.eval.batch_size, num_samples)), mesh)
  # The default tag names every setting that determines the shards, so another sampler,
  # seed, checkpoint, run or shard size never meets this job's shards.
  tag = tag or f'{prefix}{common.settings_id({**settings, "shard_size": shard_size})}'
  out_dir = os.path.join(workdir, 'samples', tag)
  _check_float_copies(out_dir, save_floats)
  job = common.Job(
      out_dir=out_dir, num_shards=common.count_shards(num_samples, shard_size),
      shard_size=shard_size, settings={**settings, 'num_samples': int(num_samples)},
      checked=('sampler', 'checkpoint_step', 'seed', 'run_hash', 'shard_size'),
      title=(f'sampling {num_samples} samples ({description["method"]}) from step {step} '
             f'into {out_dir}'),
      what='samples', unit='sample', retry_hint='pass another --tag', num_rows=num_samples)
  if experiment.is_flow:                # one inverse pass: no progress inside a shard
    progress, sampler = None, flow_sampler(experiment, shard_size, mesh)
  else:
    progress = common.ShardProgress(    # T -> eps; diffrax programs are never kept in the cache
        experiment.sde.T, experiment.sampling_eps,
        kept_in_cache=description['method'] not in ('ode', 'sde'))
    sampler = sampling.get_sampling_fn(config, experiment.sde,
                                       progress.track(experiment.score_model_fn),
                                       model_utils.input_shape(config, shard_size),
                                       experiment.sampling_eps, mesh=mesh)
  params = common.ema_params(state, mesh)
  levels = max(experiment.num_levels, 2)
  inverse = data_lib.get_data_inverse_scaler(config)
  base_key = jax.random.PRNGKey(seed)

  def compute(shard):
    x, info = sampler(common.shard_key(base_key, shard), params)
    x = parallel.gather(x)                                   # [B, ...] model space
    arrays = {}
    if x.ndim == 4:
      unit = np.clip(np.asarray(inverse(x)), 0.0, 1.0)
      arrays['images'] = np.round(unit * (levels - 1)).astype(np.uint8)
      arrays['levels'] = np.asarray(levels)
    if save_floats or x.ndim != 4:
      arrays['samples'] = x.astype(np.float32)
    return arrays, {'nfe': int(np.asarray(info['nfe']))}

  common.run(job, compute, progress)
  if jax.process_index() == 0:
    first = load_samples(out_dir, limit=64)
    if first.ndim == 4:
      io.save_image_grid(os.path.join(out_dir, 'grid.png'), first / (levels - 1),
                         scale=max(1, 64 // first.shape[1]))
  return out_dir


def _earlier_shard_size(workdir: str, tag: str | None, prefix: str, settings: dict,
                        mesh) -> int:
  """The shard size of the earlier job that this one continues (0: none): the --tag
  folder's, else that of the default-named folder with these very settings that holds
  the most samples (its shards are this job's first samples, whatever their count).
  Only a size the mesh can run (a device multiple) counts. Process 0 reads the
  manifests; every process gets its answer."""
  size = 0
  if jax.process_index() == 0:
    if tag:
      manifest = common.read_manifest(os.path.join(workdir, 'samples', tag))
      size = int(manifest['shard_size']) if manifest else 0
    else:
      most = 0
      for out_dir in glob.glob(os.path.join(workdir, 'samples', glob.escape(prefix) + '*')):
        manifest = common.read_manifest(out_dir)
        if manifest is None or manifest['num_samples'] <= most:
          continue
        same = prefix + common.settings_id({**settings, 'shard_size': manifest['shard_size']})
        if os.path.basename(out_dir) == same:
          size, most = int(manifest['shard_size']), manifest['num_samples']
  size = int(parallel.broadcast_from_first(np.int64(size)))
  return size if size and parallel.round_up_to_devices(size, mesh) == size else 0


def _check_float_copies(out_dir: str, save_floats: bool) -> None:
  """Refuses to extend image shards with(out) float copies by shards without (with) them:
  load_samples(floats=True) needs them in every shard. Process 0 looks (at any one
  existing shard) and every process raises alike."""
  kind = -1                               # -1: no shard, 0 / 1: images without / with floats
  if jax.process_index() == 0:
    existing = sorted(glob.glob(os.path.join(out_dir, 'shard_*.npz')))
    if existing:
      with np.load(existing[0], allow_pickle=False) as arrays:
        names = set(arrays.files)
      kind = int('samples' in names) if 'images' in names else -1
  kind = int(parallel.broadcast_from_first(np.int32(kind)))
  if kind >= 0 and kind != int(bool(save_floats)):
    held = 'with' if kind else 'without'
    raise ValueError(f'{out_dir} holds images {held} their float samples (save_floats '
                     f'{bool(kind)}); run again with the same --save_floats, or pass '
                     f'another --tag.')


def load_samples(out_dir: str, limit: int | None = None, floats: bool = False) -> np.ndarray:
  """The samples of a sampling job, in shard order (uint8 images or float samples)."""
  manifest = common.read_manifest(out_dir)
  if manifest is None:
    raise FileNotFoundError(f'no sampling job output in {out_dir} (no manifest.json).')
  parts, count = [], 0
  for shard in range(manifest['num_shards']):
    arrays = io.load_npz(common.shard_path(out_dir, shard))
    if floats and 'samples' not in arrays:
      raise ValueError(f'{out_dir} holds images only; sample with --save_floats for the '
                       f'float samples.')
    part = arrays['samples'] if (floats or 'images' not in arrays) else arrays['images']
    parts.append(part)
    count += len(part)
    if limit is not None and count >= limit:
      break
  samples = np.concatenate(parts)[:manifest['num_samples']]
  return samples if limit is None else samples[:limit]


# ----------------------------------------------------------------------------
# Snapshot samples during training
# ----------------------------------------------------------------------------

def flow_sampler(experiment, num_samples: int, mesh):
  """A flow's sampler(key, params) -> (x [num_samples, ...], info) at the config's
  temperature (config.sampling.temperature) and prior."""
  config = experiment.config
  flow = model_utils.flow_functions(experiment.model)
  return flows.get_sampler(flow.inverse, flow.latent_dim, num_samples,
                           prior=config.model.get('prior', 'gaussian'),
                           temperature=config.sampling.get('temperature', 1.0), mesh=mesh)


def snapshot_sampler(experiment, mesh):
  """The config's sampler for up to 64 snapshot samples during training (jitted)."""
  config = experiment.config
  n = min(int(config.training.batch_size), 64)
  n = max(n // mesh.devices.size, 1) * mesh.devices.size
  if experiment.is_flow:
    return flow_sampler(experiment, n, mesh)
  shape = model_utils.input_shape(config, n)
  return sampling.get_sampling_fn(config, experiment.sde, experiment.score_model_fn, shape,
                                  experiment.sampling_eps, mesh=mesh)


def write_snapshot_samples(experiment, sampler, state, step: int, workdir: str, mesh):
  """Samples of the EMA parameters at `step` as <workdir>/samples/step_<step>.png."""
  key = jax.random.fold_in(jax.random.PRNGKey(experiment.config.seed + 2), step)
  samples, info = sampler(key, state.ema_params)
  # every process takes part in the gather of the sharded samples (multi-host)
  images = data_lib.get_data_inverse_scaler(experiment.config)(parallel.gather(samples))
  if jax.process_index() == 0 and images.ndim == 4:
    path = os.path.join(workdir, 'samples', f'step_{step}.png')
    io.save_image_grid(path, images, scale=max(1, 64 // images.shape[1]))
    cost = ('one inverse pass' if experiment.is_flow
            else f'{int(info["nfe"])} score evaluations')
    print(f'step {step}: wrote {len(images)} samples ({cost}) to {path}', flush=True)
  return images
