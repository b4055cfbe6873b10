"""Resumable, sharded sampling and bits/dim jobs over a trained workdir.

A job splits its work into shards of a fixed size. Shard s uses the key
fold_in(job key, s) and covers fixed examples, so its result does not depend
on when it runs: an interrupted job, run again with the same command, computes
only the missing shards and ends with exactly the files of an uninterrupted
run. A shard's file is written under a temporary name and renamed, so a file
with a shard's name is always complete. Every shard runs on the whole mesh
(all devices of all processes); process 0 writes the files.

  <workdir>/samples/<tag>/shard_00000.npz   uint8 images (+ float samples)
  <workdir>/samples/<tag>/manifest.json      sampler, steps, NFE per shard, seed, ...
  <workdir>/eval/bpd_<split>_<step>/...       per-shard log-likelihoods
  <workdir>/eval/bpd_<split>_<step>.json      mean, standard error, NFE, settings
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import checkpoints
from score_sde import data as data_lib
from score_sde import evaluation
from score_sde import likelihood
from score_sde import parallel
from score_sde import sampling
from score_sde import train
from score_sde.models import utils as model_utils

LIKELIHOOD_EPS = 1e-5   # the reference's lower end of the likelihood ODE


# ----------------------------------------------------------------------------
# Loading a workdir
# ----------------------------------------------------------------------------

def load_config(workdir: str):
  """The resolved config a training run stored in <workdir>/config.json."""
  from configs import workdir as workdir_config
  return workdir_config.load_stored_config(workdir)


def config_hash(config) -> str:
  return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:16]


def restore_state(workdir: str, config, mesh, checkpoint: int | None = None):
  """(train state, step) of a workdir's newest (or given) checkpoint."""
  experiment = train.build_experiment(config)
  optimizer, _ = train.get_optimizer(config)
  abstract, _ = train.abstract_train_state(experiment, optimizer, mesh)
  manager = checkpoints.make_manager(workdir, read_only=True)
  if not manager.all_steps():
    raise checkpoints.NoCheckpointError(
        f'{workdir} has no checkpoints ({checkpoints.checkpoint_dir(workdir)} is empty or '
        f'missing); train first with launch.py train --workdir {workdir}.')
  state, step = checkpoints.restore(manager, abstract, step=checkpoint)
  return experiment, state, step


# ----------------------------------------------------------------------------
# Shard files
# ----------------------------------------------------------------------------

def _atomic_savez(path: str, **arrays) -> None:
  tmp = path + '.tmp.npz'
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def _atomic_json(path: str, value) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def load_npz(path: str) -> dict:
  """Plain arrays of an npz file; never unpickles objects."""
  with np.load(path, allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def _shard_path(directory: str, index: int) -> str:
  return os.path.join(directory, f'shard_{index:05d}.npz')


def _gather(x) -> np.ndarray:
  """A (possibly multi-process) global array as one numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class Progress:
  """A one-line progress report: done / total, items/s, ETA (process 0)."""

  def __init__(self, total: int, what: str, already_done: int = 0):
    self.total, self.what, self.start, self.done0 = total, what, time.time(), already_done

  def update(self, done: int, extra: str = '') -> None:
    if jax.process_index() != 0:
      return
    elapsed = max(time.time() - self.start, 1e-9)
    rate = (done - self.done0) / elapsed
    eta = (self.total - done) / rate if rate > 0 else float('nan')
    eta_text = train._format_seconds(eta) if math.isfinite(eta) else '?'  # noqa: SLF001
    print(f'{self.what}: {done}/{self.total} | {rate:.2f}/s | eta {eta_text}'
          + (f' | {extra}' if extra else ''), flush=True)


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
  if state is None:
    experiment, state, step = restore_state(workdir, config, mesh, checkpoint)
  else:
    experiment = train.build_experiment(config)
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
              'config_hash': config_hash(config), 'shard_size': shard_size,
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

  todo = [s for s in range(num_shards) if not os.path.exists(_shard_path(out_dir, s))]
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
    progress = Progress(num_shards * shard_size, 'samples',
                        (num_shards - len(todo)) * shard_size)
    for done, shard in enumerate(todo):
      x, info = sampler(jax.random.fold_in(base_key, shard), state.ema_params)
      x = _gather(x)
      if jax.process_index() == 0:
        arrays = {}
        if x.ndim == 4:
          levels = max(experiment.num_levels, 2)
          unit = np.clip(np.asarray(inverse(x)), 0.0, 1.0)
          arrays['images'] = np.round(unit * (levels - 1)).astype(np.uint8)
          arrays['levels'] = np.asarray(levels)
        if save_floats or x.ndim != 4:
          arrays['samples'] = x.astype(np.float32)
        _atomic_savez(_shard_path(out_dir, shard), **arrays)
        manifest['shards'][str(shard)] = {'nfe': int(np.asarray(info['nfe']))}
        _atomic_json(manifest_path, manifest)
      progress.update((num_shards - len(todo) + done + 1) * shard_size,
                      f'NFE {int(np.asarray(info["nfe"]))}')
  if jax.process_index() == 0:
    _atomic_json(manifest_path, manifest)
    first = load_samples(out_dir, limit=64)
    if first.ndim == 4:
      grid = os.path.join(out_dir, 'grid.png')
      levels = max(experiment.num_levels, 2)
      evaluation.save_image_grid(grid, first / (levels - 1), scale=max(1, 64 // first.shape[1]))
  return out_dir


def load_samples(out_dir: str, limit: int | None = None, floats: bool = False) -> np.ndarray:
  """The samples of a sampling job, in shard order (uint8 images or float samples)."""
  with open(os.path.join(out_dir, 'manifest.json')) as f:
    manifest = json.load(f)
  parts, count = [], 0
  for shard in range(manifest['num_shards']):
    arrays = load_npz(_shard_path(out_dir, shard))
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

@dataclasses.dataclass(frozen=True)
class LikelihoodSettings:
  rtol: float = 1e-5
  atol: float = 1e-5
  solver: str = 'tsit5'
  divergence: str = 'hutchinson_rademacher'
  num_probes: int = 1
  eps: float = LIKELIHOOD_EPS


def bpd_job(workdir: str, config, *, split: str = 'test', num_repeats: int = 1,
            batch_size: int | None = None, checkpoint: int | None = None,
            settings: LikelihoodSettings | None = None, max_examples: int | None = None,
            mesh=None, state=None, step: int | None = None) -> dict:
  """Bits/dim of a split through the probability-flow ODE, resumable and sharded.

  Each repeat draws fresh dequantisation noise and Hutchinson probes. Writes
  <workdir>/eval/bpd_<split>_<step>.json and returns its contents.
  """
  mesh = mesh or parallel.make_mesh()
  if state is None:
    experiment, state, step = restore_state(workdir, config, mesh, checkpoint)
  else:
    experiment = train.build_experiment(config)
  settings = settings or LikelihoodSettings(rtol=config.eval.get('rtol', 1e-5),
                                            atol=config.eval.get('atol', 1e-5))
  levels = experiment.num_levels
  if levels < 2:
    raise ValueError(f'bits/dim need quantised data; {config.data.dataset} is continuous.')
  uint = data_lib.load_split_uint(config, split, max_examples)       # [n, H, W, C]
  n, dim = len(uint), int(np.prod(uint.shape[1:]))
  n_dev = mesh.devices.size
  batch_size = int(batch_size or config.eval.batch_size)
  batch_size = max(1, math.ceil(min(batch_size, n) / n_dev)) * n_dev
  num_batches = math.ceil(n / batch_size)
  out_dir = os.path.join(workdir, 'eval', f'bpd_{split}_{step}')
  os.makedirs(out_dir, exist_ok=True)
  likelihood_fn = likelihood.get_likelihood_fn(
      experiment.sde, experiment.score_model_fn, mesh=mesh, **dataclasses.asdict(settings))
  scaler = data_lib.get_data_scaler(config)
  inverse = data_lib.get_data_inverse_scaler(config)
  base_key = jax.random.PRNGKey(config.seed + 7)
  total = num_repeats * num_batches
  already = sum(os.path.exists(_shard_path(out_dir, i)) for i in range(total))
  progress = Progress(total * batch_size, f'bits/dim ({split})', already * batch_size)
  shard = 0
  for repeat in range(num_repeats):
    for b in range(num_batches):
      path = _shard_path(out_dir, shard)
      if not os.path.exists(path):
        rows = uint[b * batch_size:(b + 1) * batch_size]
        valid = len(rows)
        rows = np.concatenate([rows, np.zeros((batch_size - valid,) + rows.shape[1:],
                                              rows.dtype)])
        key_deq, key_probe = jax.random.split(jax.random.fold_in(base_key, shard))
        x = rows.astype(np.float32) / (levels - 1)
        x = np.asarray(scaler(likelihood.uniform_dequantize(key_deq, x, levels)))
        x = jax.make_array_from_callback(x.shape, parallel.batch_sharding(mesh),
                                         lambda index, x=x: x[index])
        logp, _, info = likelihood_fn(key_probe, state.ema_params, x)
        bpd = np.asarray(likelihood.bits_per_dim(_gather(logp), dim, inverse, levels))
        if jax.process_index() == 0:
          _atomic_savez(path, bpd=bpd[:valid].astype(np.float64),
                        nfe=np.asarray(_gather(info['nfe_per_example']))[:valid])
        progress.update((shard + 1) * batch_size, f'NFE {int(np.asarray(info["nfe"]))}')
      shard += 1

  bpds, nfes = [], []
  for s in range(total):
    arrays = load_npz(_shard_path(out_dir, s))
    bpds.append(arrays['bpd'])
    nfes.append(arrays['nfe'])
  bpds = np.concatenate(bpds).reshape(num_repeats, n)
  per_example = bpds.mean(axis=0)            # average the repeats of each example
  nfes = np.concatenate(nfes)
  result = {
      'split': split, 'checkpoint_step': int(step), 'num_examples': int(n),
      'num_repeats': int(num_repeats), 'bpd': float(per_example.mean()),
      'bpd_stderr': float(per_example.std(ddof=1) / math.sqrt(n)) if n > 1 else float('nan'),
      'num_levels': int(levels), 'dim': dim,
      'nfe_mean': float(nfes.mean()), 'nfe_min': int(nfes.min()), 'nfe_max': int(nfes.max()),
      'solver': dataclasses.asdict(settings), 'config_hash': config_hash(config),
  }
  if jax.process_index() == 0:
    _atomic_json(os.path.join(workdir, 'eval', f'bpd_{split}_{step}.json'), result)
  return result


def baselines(config, split: str = 'test') -> dict:
  """Uniform and per-pixel-histogram bits/dim on the same split and levels."""
  levels = data_lib.num_levels(config)
  train_uint = data_lib.load_split_uint(config, 'train')
  test_uint = data_lib.load_split_uint(config, split)
  return {'uniform': evaluation.uniform_bpd(levels),
          'pixel_histogram': evaluation.pixel_histogram_bpd(train_uint, test_uint, levels)}


# ----------------------------------------------------------------------------
# The main job's final evaluation
# ----------------------------------------------------------------------------

def final_evaluation(experiment, state, workdir: str, mesh) -> dict:
  """After training: a sample grid and the test bits/dim next to two baselines."""
  config = experiment.config
  step = int(jax.device_get(state.step))
  out_dir = sample_job(workdir, config, num_samples=int(config.eval.num_samples),
                       mesh=mesh, state=state, step=step)
  result = bpd_job(workdir, config, split='test', num_repeats=int(config.eval.num_repeats),
                   mesh=mesh, state=state, step=step)
  result['baselines'] = baselines(config, 'test')
  quality = None
  if data_lib.dataset_name(config) == 'DIGITS':
    quality = digits_quality_with_baselines(config, load_samples(out_dir))
    result['sample_quality'] = quality
  if jax.process_index() == 0:
    _atomic_json(os.path.join(workdir, 'eval', f'bpd_test_{step}.json'), result)
    base = result['baselines']
    verdict = ('below' if result['bpd'] < base['pixel_histogram'] else 'not yet below')
    print(f'\nSamples: {os.path.join(out_dir, "grid.png")}\n'
          f'Test bits/dim (probability-flow ODE, {result["num_levels"]} levels, '
          f'{result["num_examples"]} examples): {result["bpd"]:.4f} +- '
          f'{result["bpd_stderr"]:.4f} (mean NFE {result["nfe_mean"]:.0f})\n'
          f'  uniform baseline:             {base["uniform"]:.4f}\n'
          f'  per-pixel histogram baseline: {base["pixel_histogram"]:.4f}\n'
          f'The model is {verdict} the per-pixel baseline.', flush=True)
    if quality:
      rows = [('model samples', quality['model']),
              ('real train digits (floor)', quality['real_train_digits']),
              ('Gaussian fit to train (poor)', quality['gaussian_baseline'])]
      print(f'Sample quality vs the test split ({quality["model"]["num_samples"]} each; digits '
            f'classifier, test accuracy {quality["model"]["classifier_test_accuracy"]:.3f}):')
      for name, q in rows:
        print(f'  {name:30s} digits-FID {q["digits_fid"]:7.1f} | confident '
              f'{q["confident_fraction"]:.2f} | class entropy {q["class_entropy_bits"]:.2f} bits')
    print(f'Written to {os.path.join(workdir, "eval", f"bpd_test_{step}.json")}', flush=True)
  return result


def digits_quality_with_baselines(config, samples: np.ndarray) -> dict:
  """Digits metrics of samples, of as many real training digits (the floor) and of a
  Gaussian fitted to the training digits (a poor baseline), all vs the test split."""
  from score_sde import digits_classifier
  n = len(samples)
  real = data_lib.load_split_uint(config, 'train')
  real = real[np.random.default_rng(0).permutation(len(real))[:n]]
  gaussian = digits_classifier.gaussian_baseline_samples(config, n)
  return {name: {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                 for k, v in digits_classifier.digits_metrics(x, config).items()}
          for name, x in [('model', samples), ('real_train_digits', real),
                          ('gaussian_baseline', gaussian)]}


# ----------------------------------------------------------------------------
# Sample quality: dataset statistics and FID / KID / IS of a sampling job
# ----------------------------------------------------------------------------

def default_stats_path(config, split: str) -> str:
  """<data_dir>/score_sde_stats/<dataset>_<image size>_<split>_inception.npz"""
  return os.path.join(data_lib.data_dir(config), 'score_sde_stats',
                      f'{config.data.dataset.lower()}_{config.data.image_size}_{split}'
                      f'_inception.npz')


def stats_job(config, *, split: str = 'train', out_path: str | None = None,
              weights: str | None = None, batch_size: int = 200,
              max_examples: int | None = None, mesh=None) -> str:
  """Inception pool-feature statistics (mean, covariance, raw features) of a split."""
  from score_sde import inception
  from score_sde import metrics
  if data_lib.dataset_name(config) == 'DIGITS':
    raise ValueError('the digits use their own classifier features, whose statistics are '
                     'computed on the fly: run launch.py eval on a digits workdir directly.')
  mesh = mesh or parallel.make_mesh()
  network = inception.feature_network(inception.load_params(weights), mesh=mesh,
                                      batch_size=batch_size)
  stats = metrics.compute_statistics(
      network, metrics.dataset_batches(config, split, batch_size, max_examples),
      dataset=config.data.dataset, split=split)
  out_path = out_path or default_stats_path(config, split)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    metrics.save_stats(out_path, stats)
  return out_path


def latest_sample_dir(workdir: str) -> str:
  root = os.path.join(workdir, 'samples')
  candidates = [os.path.join(root, d) for d in (os.listdir(root) if os.path.isdir(root) else [])
                if os.path.exists(os.path.join(root, d, 'manifest.json'))]
  if not candidates:
    raise FileNotFoundError(f'{workdir} has no sampling job output; run launch.py sample '
                            f'--workdir {workdir} --num_samples N first.')
  return max(candidates, key=os.path.getmtime)


def eval_job(workdir: str, config, *, tag: str | None = None, stats_path: str | None = None,
             weights: str | None = None, mesh=None) -> dict:
  """FID / KID / IS of a sampling job (digits: classifier features, test split).

  Writes <workdir>/eval/quality_<tag>.json and returns it.
  """
  sample_dir = os.path.join(workdir, 'samples', tag) if tag else latest_sample_dir(workdir)
  if not os.path.exists(os.path.join(sample_dir, 'manifest.json')):
    raise FileNotFoundError(f'no sampling job output in {sample_dir}.')
  samples = load_samples(sample_dir)
  if data_lib.dataset_name(config) == 'DIGITS':
    from score_sde import digits_classifier
    result = digits_classifier.digits_metrics(samples, config)
  else:
    from score_sde import inception
    from score_sde import metrics
    stats_path = stats_path or default_stats_path(config, 'train')
    if not os.path.exists(stats_path):
      raise FileNotFoundError(
          f'dataset statistics file {stats_path} is missing; make it with launch.py stats '
          f'--config <config> --split train (or pass --stats_file).')
    network = inception.feature_network(inception.load_params(weights),
                                        mesh=mesh or parallel.make_mesh())
    result = metrics.evaluate_samples(network, samples, metrics.load_stats(stats_path))
    result['stats_file'] = stats_path
  result = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in result.items()}
  result['samples'] = sample_dir
  if jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, 'eval'), exist_ok=True)
    _atomic_json(os.path.join(workdir, 'eval',
                              f'quality_{os.path.basename(sample_dir)}.json'), result)
  return result
