"""Controllable-generation jobs over a trained workdir: inpainting, colourisation and
class-conditional sampling (the maths is `score_sde/controllable.py`).

Each writes, in its output folder,

  inpainting.npz     inputs [N, H, W, C], masks [N, H, W, C] uint8, results
                     [N, S, H, W, C] (S samples per input), floats in [0, 1]
  colorization.npz   grey [N, H, W, 3], results [N, S, H, W, 3] (+ originals)
  conditional.npz    samples [N, H, W, C] in [0, 1], labels [N]
  <name>.png         one row per input: masked input, mask, results / grey,
                     results / one row per class
  <name>.json        checkpoint step, seed, sampler settings, NFE

  <name>_shards/      shard_<s>.npz (results of inputs [s B, (s + 1) B)) and
                     manifest.json, so an interrupted job resumes (`common.run`)

The inputs (repeated samples_per_image times) are cut into shards of B =
config.eval.batch_size (at most the number of inputs) rounded up to the device
count, shard s sampled with key fold_in(PRNGKey(seed), s): a job's samples
depend on (seed, B), and an interrupted job run again gives exactly the files
of an uninterrupted one. A resume with other inputs or settings in the same
folder is refused.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from score_sde import controllable
from score_sde import data as data_lib
from score_sde import experiment as experiment_lib
from score_sde import io
from score_sde import losses
from score_sde import models
from score_sde import parallel
from score_sde import sampling
from score_sde import score_fn as score_fn_lib
from score_sde import sde as sde_lib
from score_sde.jobs import common


def load_mask(spec: str, image_size: int, num_channels: int, *,
              fraction: float | None = None, seed: int = 0) -> np.ndarray:
  """A mask [H, W, C] or [N, H, W, C] (1 = known) from a pattern name or a file.

  Files: .npy, .npz (key 'mask' or 'masks'), or an image (white = known, black
  = missing; other grey levels are an error).
  """
  if controllable.is_mask_pattern(spec):
    return controllable.make_mask(spec, image_size, num_channels, fraction=fraction, seed=seed)
  if not os.path.exists(spec):
    raise ValueError(f'{spec!r} is neither a mask pattern {sorted(controllable.MASK_PATTERNS)} '
                     f'nor an existing mask file.')
  lower = spec.lower()
  if lower.endswith('.npz'):
    with np.load(spec, allow_pickle=False) as f:
      names = [n for n in ('mask', 'masks') if n in f.files]
      if not names:
        raise ValueError(f'{spec} has no "mask" or "masks" array (it has {f.files}).')
      mask = f[names[0]]
  elif lower.endswith('.npy'):
    mask = np.load(spec, allow_pickle=False)
  else:
    mask = io.read_image_file(spec, 1)[..., 0] * 255.0
    if not np.all(np.isin(np.unique(mask), (0.0, 255.0))):
      raise ValueError(f'{spec}: a mask image must be black (missing) and white (known) '
                       f'only; it has other grey levels.')
    mask = mask / 255.0
  shape = (image_size, image_size, num_channels)
  mask = np.asarray(mask)
  per_example = mask.ndim == 2 or (mask.ndim == 3 and mask.shape[-1] in (1, num_channels)
                                   and mask.shape[:2] == shape[:2])
  return controllable.check_mask(mask, shape, None if per_example else mask.shape[0])


def _masked_view(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
  """Images with the missing entries shown mid-grey."""
  return images * masks + 0.5 * (1.0 - masks)


def save_inpainting(out_dir: str, inputs, masks, results, *, info: dict | None = None) -> dict:
  """Writes inpainting.npz and inpainting.png (rows: masked input, mask, results...).

  inputs, masks: [N, H, W, C]; results: [N, S, H, W, C] (S samples per input)
  or [N, H, W, C]; images in [0, 1]. Returns the paths.
  """
  inputs, masks = np.asarray(inputs, np.float32), np.asarray(masks, np.float32)
  results = np.asarray(results, np.float32)
  if results.ndim == inputs.ndim:
    results = results[:, None]
  npz = os.path.join(out_dir, 'inpainting.npz')
  io.savez_atomic(npz, inputs=inputs, masks=masks.astype(np.uint8), results=results)
  columns = [_masked_view(inputs, masks), masks] + [results[:, s] for s in range(results.shape[1])]
  png = io.panel_grid(os.path.join(out_dir, 'inpainting.png'),
                   [np.clip(c, 0.0, 1.0) for c in columns])
  _write_info(out_dir, 'inpainting', info)
  return {'npz': npz, 'png': png}


def save_colorization(out_dir: str, grey, results, *, originals=None,
                      info: dict | None = None) -> dict:
  """Writes colorization.npz and .png (rows: [original,] grey, results...), in [0, 1]."""
  grey = np.asarray(grey, np.float32)
  results = np.asarray(results, np.float32)
  if results.ndim == grey.ndim:
    results = results[:, None]
  arrays = {'grey': grey, 'results': results}
  columns = [grey] + [results[:, s] for s in range(results.shape[1])]
  if originals is not None:
    arrays['originals'] = np.asarray(originals, np.float32)
    columns = [arrays['originals']] + columns
  npz = os.path.join(out_dir, 'colorization.npz')
  io.savez_atomic(npz, **arrays)
  png = io.panel_grid(os.path.join(out_dir, 'colorization.png'),
                   [np.clip(c, 0.0, 1.0) for c in columns])
  _write_info(out_dir, 'colorization', info)
  return {'npz': npz, 'png': png}


def save_conditional_samples(out_dir: str, samples, labels, *, info: dict | None = None) -> dict:
  """Writes conditional.npz (samples, labels) and conditional.png (one row per class)."""
  samples = np.asarray(samples, np.float32)
  labels = np.asarray(labels)
  npz = os.path.join(out_dir, 'conditional.npz')
  io.savez_atomic(npz, samples=samples, labels=labels)
  paths = {'npz': npz}
  if samples.ndim == 4:
    classes = np.unique(labels)
    per_class = min(int(np.sum(labels == c)) for c in classes)
    columns = [np.stack([samples[labels == c][j] for c in classes]) for j in range(per_class)]
    paths['png'] = io.panel_grid(os.path.join(out_dir, 'conditional.png'),
                              [np.clip(c, 0.0, 1.0) for c in columns])
  _write_info(out_dir, 'conditional', info)
  return paths


def _write_info(out_dir: str, name: str, info: dict | None) -> None:
  if info is None or jax.process_index() != 0:
    return
  info = json.loads(json.dumps(info, default=str))       # plain JSON values
  io.atomic_json(os.path.join(out_dir, f'{name}.json'), info)


def pc_options_from_config(config) -> dict:
  """The PC options of config.sampling (inpainting / colourisation always use PC)."""
  sampling_config = config.sampling
  return {name: sampling_config.get(name, default)
          for name, default in sampling.METHODS['pc'].defaults.items() if name != 'eps'}


def _shards_job(out_dir: str, name: str, num_rows: int, shard_size: int, settings: dict,
                what: str) -> common.Job:
  """The shards of a controllable job in <out_dir>/<name>_shards/ (all settings checked)."""
  return common.Job(
      out_dir=os.path.join(out_dir, f'{name}_shards'),
      num_shards=common.count_shards(num_rows, shard_size), shard_size=shard_size,
      settings=settings, checked=tuple(sorted(settings)) + ('shard_size',),
      title=f'{what}: {num_rows} result(s) into {out_dir}', what=what, unit='image',
      num_rows=num_rows)


def _replacement_settings(experiment, config, step: int, seed: int, inputs_digest: str,
                          samples_per_image: int) -> tuple[dict, dict]:
  """(PC options, the settings that determine an inpainting / colourisation job)."""
  options = pc_options_from_config(config)
  return options, {
      'checkpoint_step': int(step), 'seed': seed, 'sampler': options,
      'eps': experiment.sampling_eps, 'run_hash': experiment_lib.run_hash(config),
      'inputs': inputs_digest, 'samples_per_image': samples_per_image}


def _default_out_dir(workdir: str, name: str, settings: dict, shard_size: int) -> str:
  """<workdir>/samples/<name>_<id>: the id names every setting (inputs included), so a
  job with other settings or inputs never meets this one's shards."""
  return os.path.join(workdir, 'samples',
                      f'{name}_{common.settings_id({**settings, "shard_size": shard_size})}')


def _results(job: common.Job, name: str = 'results') -> np.ndarray:
  """The shards' `name` arrays, concatenated."""
  return np.concatenate([arrays[name] for arrays in common.load_shards(job)])


def _last_nfe(manifest: dict) -> int:
  return int(manifest['shards'][str(manifest['num_shards'] - 1)]['nfe'])


def inpaint_job(workdir: str, config, images: np.ndarray, mask, *,
                mask_fraction: float | None = None, mask_seed: int = 0,
                out_dir: str | None = None, samples_per_image: int = 1, seed: int | None = None,
                checkpoint: int | None = None, mesh=None, state=None,
                step: int | None = None) -> dict:
  """Inpaints `images` ([N, H, W, C] in [0, 1]) with the workdir's EMA score model.

  mask: a pattern name or mask file (see `load_mask`; `mask_fraction`,
  `mask_seed` for patterns), or an array [H, W(, C)] for all images or
  [N, H, W(, C)] per image (1 = known). Writes <out_dir>/inpainting.{npz,png,
  json} (default out_dir <workdir>/samples/inpainting_step<step>_seed<seed>_<id>,
  the id naming its settings and inputs).
  The N * samples_per_image inputs are cut into resumable shards (see the
  module docstring). The sampler settings come from config.sampling (PC
  options). Returns the file paths (an empty dict on processes other than 0).
  """
  mesh = mesh or parallel.make_mesh()
  common.require_score_model(config, 'inpainting')
  experiment, state, step = common.experiment_and_state(workdir, config, mesh, checkpoint,
                                                        state, step)
  images = np.asarray(images, np.float32)
  example_shape = (config.data.image_size, config.data.image_size, config.data.num_channels)
  controllable.check_images(images, (len(images),) + example_shape, 'input images')
  if isinstance(mask, str):
    mask = load_mask(mask, example_shape[0], example_shape[2], fraction=mask_fraction,
                     seed=mask_seed)
  masks = controllable.check_mask(mask, example_shape, len(images))
  seed = config.seed if seed is None else int(seed)
  samples_per_image = int(samples_per_image)
  if samples_per_image < 1:
    raise ValueError(f'samples_per_image must be >= 1; got {samples_per_image}.')
  scaler = data_lib.get_data_scaler(config)
  inverse = data_lib.get_data_inverse_scaler(config)
  repeated = np.repeat(images, samples_per_image, axis=0)
  repeated_masks = np.repeat(masks, samples_per_image, axis=0)
  n = len(repeated)
  batch = common.job_batch_size(config, n, mesh)
  options, settings = _replacement_settings(experiment, config, step, seed,
                                            common.digest(images, masks), samples_per_image)
  out_dir = out_dir or _default_out_dir(workdir, f'inpainting_step{step}_seed{seed}', settings,
                                        batch)
  job = _shards_job(out_dir, 'inpainting', n, batch, settings, 'inpainting')
  progress = common.ShardProgress(experiment.sde.T, experiment.sampling_eps)
  fn = controllable.jit_inpainter(controllable.build_inpainter(
      experiment.sde, progress.track(experiment.score_model_fn), (batch,) + example_shape, mesh,
      eps=experiment.sampling_eps, **options), mesh)
  params = common.ema_params(state, mesh)
  key = jax.random.PRNGKey(seed)

  def compute(shard):
    rows = common.shard_rows(shard, batch, n)
    x, info = fn(common.shard_key(key, shard), params,
                 parallel.host_to_global(scaler(common.pad_rows(repeated[rows], batch)), mesh),
                 parallel.host_to_global(common.pad_rows(repeated_masks[rows], batch), mesh))
    results = np.asarray(inverse(parallel.gather(x)))[:rows.stop - rows.start]
    return {'results': results}, {'nfe': int(info['nfe'])}

  manifest = common.run(job, compute, progress)
  results = _results(job).reshape((len(images), samples_per_image) + example_shape)
  meta = {'checkpoint_step': int(step), 'seed': seed, 'nfe': _last_nfe(manifest),
          'sampler': dict(options), 'eps': experiment.sampling_eps}
  if jax.process_index() != 0:
    return {}
  return save_inpainting(out_dir, images, masks, results, info=meta)


def colorize_job(workdir: str, config, images: np.ndarray, *, out_dir: str | None = None,
                 samples_per_image: int = 1, seed: int | None = None,
                 checkpoint: int | None = None, mesh=None, state=None,
                 step: int | None = None) -> dict:
  """Colours grey-scale `images` ([N, H, W, 1] or RGB, whose channel mean is used; [0, 1]).

  Writes <out_dir>/colorization.{npz,png,json} (RGB inputs are kept as the
  'originals' column), through resumable shards. Sampler settings from
  config.sampling (PC options).
  """
  images = np.asarray(images, np.float32)
  size = config.data.image_size
  example_shape = (size, size, 3)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'images to colourise must be [N, H, W, 1] (grey) or [N, H, W, 3]; got '
                     f'shape {list(images.shape)}.')
  originals = images if images.shape[-1] == 3 else None
  grey = np.asarray(controllable.to_grayscale(images))
  controllable.check_grayscale(grey, (size, size, config.data.num_channels))  # before restoring
  mesh = mesh or parallel.make_mesh()
  common.require_score_model(config, 'colourisation')
  experiment, state, step = common.experiment_and_state(workdir, config, mesh, checkpoint,
                                                        state, step)
  seed = config.seed if seed is None else int(seed)
  samples_per_image = int(samples_per_image)
  scaler = data_lib.get_data_scaler(config)
  inverse = data_lib.get_data_inverse_scaler(config)
  repeated = np.repeat(grey, samples_per_image, axis=0)
  n = len(repeated)
  batch = common.job_batch_size(config, n, mesh)
  options, settings = _replacement_settings(experiment, config, step, seed,
                                            common.digest(grey), samples_per_image)
  out_dir = out_dir or _default_out_dir(workdir, f'colorization_step{step}_seed{seed}',
                                        settings, batch)
  job = _shards_job(out_dir, 'colorization', n, batch, settings, 'colourisation')
  progress = common.ShardProgress(experiment.sde.T, experiment.sampling_eps)
  fn = controllable.jit_colorizer(controllable.build_colorizer(
      experiment.sde, progress.track(experiment.score_model_fn), (batch,) + example_shape, mesh,
      eps=experiment.sampling_eps, **options), mesh)
  params = common.ema_params(state, mesh)
  key = jax.random.PRNGKey(seed)

  def compute(shard):
    rows = common.shard_rows(shard, batch, n)
    x, info = fn(common.shard_key(key, shard), params,
                 parallel.host_to_global(scaler(common.pad_rows(repeated[rows], batch)), mesh))
    results = np.asarray(inverse(parallel.gather(x)))[:rows.stop - rows.start]
    return {'results': results}, {'nfe': int(info['nfe'])}

  manifest = common.run(job, compute, progress)
  results = _results(job).reshape((len(images), samples_per_image) + example_shape)
  meta = {'checkpoint_step': int(step), 'seed': seed, 'nfe': _last_nfe(manifest),
          'sampler': options, 'eps': experiment.sampling_eps}
  if jax.process_index() != 0:
    return {}
  return save_colorization(out_dir, np.repeat(grey, 3, axis=-1), results,
                           originals=originals, info=meta)


def conditional_sample_job(workdir: str, config, classifier_workdir: str, classifier_config,
                           labels, *, scale: float = 1.0, out_dir: str | None = None,
                           seed: int | None = None, checkpoint: int | None = None,
                           classifier_checkpoint: int | None = None, mesh=None,
                           state=None, step: int | None = None, classifier_state=None,
                           classifier_step: int | None = None) -> dict:
  """Class-conditional samples: the workdir's EMA score model guided by the
  EMA classifier of classifier_workdir (its config: model.name 'wideresnet').

  labels: [N] class indices (e.g. np.repeat(np.arange(10), 8)), cut into
  resumable shards. Sampler from config.sampling (any method). Writes
  <out_dir>/conditional.{npz,png,json}.
  """
  mesh = mesh or parallel.make_mesh()
  common.require_score_model(config, 'class-conditional sampling')
  experiment, state, step = common.experiment_and_state(workdir, config, mesh, checkpoint,
                                                        state, step)
  if classifier_state is None:
    _, classifier_state, classifier_step = common.experiment_and_state(
        classifier_workdir, classifier_config, mesh, classifier_checkpoint)
  classifier_sde, _ = sde_lib.sde_from_config(classifier_config)
  if dataclasses.replace(classifier_sde, N=experiment.sde.N) != experiment.sde:
    raise ValueError(f'the classifier was trained under {classifier_sde} but the score model '
                     f'under {experiment.sde}; train the classifier with the same SDE.')
  classifier = models.get_model(classifier_config)
  num_classes = int(classifier.num_classes)
  labels = np.asarray(labels)
  labels = losses.check_class_labels(labels, len(labels), num_classes)
  seed = config.seed if seed is None else int(seed)
  example_shape = (config.data.image_size, config.data.image_size, config.data.num_channels)
  n = len(labels)
  batch = common.job_batch_size(config, n, mesh)
  method, options = sampling.config_options(config)
  settings = {
      'checkpoint_step': int(step), 'seed': seed, 'method': method, 'sampler': options,
      'scale': float(scale), 'run_hash': experiment_lib.run_hash(config),
      'classifier_step': None if classifier_step is None else int(classifier_step),
      'classifier_run_hash': experiment_lib.run_hash(classifier_config),
      # the classifier's own weights: another workdir with the same config and step
      # (other data, another seed's run) never meets these shards
      'classifier_params': common.params_digest(classifier_state.ema_params),
      'labels': common.digest(labels)}
  out_dir = out_dir or _default_out_dir(
      workdir, f'conditional_step{step}_scale{scale:g}_seed{seed}', settings, batch)
  job = _shards_job(out_dir, 'conditional', n, batch, settings, 'class-conditional samples')
  logits_model_fn = score_fn_lib.get_logits_model_fn(experiment.sde, classifier)
  progress = common.ShardProgress(experiment.sde.T, experiment.sampling_eps)
  fn = controllable.jit_conditional_sampler(controllable.build_conditional_sampler(
      experiment.sde, progress.track(experiment.score_model_fn), logits_model_fn,
      (batch,) + example_shape, num_classes, method, mesh, scale, eps=experiment.sampling_eps,
      **options), mesh)
  inverse = data_lib.get_data_inverse_scaler(config)
  params = common.ema_params(state, mesh)
  classifier_params = common.ema_params(classifier_state, mesh)
  key = jax.random.PRNGKey(seed)

  def compute(shard):
    rows = common.shard_rows(shard, batch, n)
    x, info = fn(common.shard_key(key, shard), params, classifier_params,
                 parallel.host_to_global(common.pad_rows(labels[rows], batch), mesh))
    samples = np.asarray(inverse(parallel.gather(x)))[:rows.stop - rows.start]
    return {'samples': samples}, {'nfe': int(info['nfe'])}

  manifest = common.run(job, compute, progress)
  samples = _results(job, 'samples')
  meta = {'checkpoint_step': int(step), 'classifier_step': classifier_step, 'seed': seed,
          'scale': float(scale), 'nfe': _last_nfe(manifest), 'method': method,
          'sampler': options, 'classifier_workdir': classifier_workdir}
  if jax.process_index() != 0:
    return {}
  if data_lib.dataset_name(config) == 'DIGITS':   # an independent check of the labels
    from score_sde.evaluation import digits_classifier
    levels = data_lib.num_levels(config)
    uint = np.clip(np.round(samples * (levels - 1)), 0, levels - 1).astype(np.uint8)
    meta['digits_label_agreement'] = digits_classifier.label_agreement(uint, labels, config)
    print(f'The digits classifier (test accuracy '
          f'{meta["digits_label_agreement"]["classifier_test_accuracy"]:.3f}) reads the '
          f'requested class in {meta["digits_label_agreement"]["agreement"]:.1%} of the '
          f'{len(labels)} samples.', flush=True)
  return save_conditional_samples(out_dir, samples, labels, info=meta)
