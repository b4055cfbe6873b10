"""Sample quality and the main job's final evaluation: dataset statistics, FID / KID /
IS of a sampling job (digits: the digits classifier's features), and the
grid + bits/dim + baselines summary printed after training.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from score_sde import data as data_lib
from score_sde import io
from score_sde import parallel
from score_sde.jobs import bpd as bpd_lib
from score_sde.jobs import common
from score_sde.jobs import sample as sample_lib


def final_evaluation(experiment, state, workdir: str, mesh) -> dict:
  """After training: a sample grid and the test bits/dim next to two baselines, written to
  <workdir>/eval/final_<step>.json."""
  config = experiment.config
  step = int(jax.device_get(state.step))
  out_dir = sample_lib.sample_job(workdir, config, num_samples=int(config.eval.num_samples),
                                  mesh=mesh, state=state, step=step)
  result = bpd_lib.bpd_job(workdir, config, split='test',
                           num_repeats=int(config.eval.num_repeats), mesh=mesh, state=state,
                           step=step)
  result['baselines'] = bpd_lib.baselines(config, 'test')
  source = result['tfds_split']
  quality = None
  if data_lib.dataset_name(config) == 'DIGITS':
    quality = digits_quality_with_baselines(config, sample_lib.load_samples(out_dir))
    result['sample_quality'] = quality
  if jax.process_index() == 0:
    path = os.path.join(workdir, 'eval', f'final_{step}.json')
    io.atomic_json(path, result)
    base = result['baselines']
    verdict = ('below' if result['bpd'] < base['pixel_histogram'] else 'not yet below')
    how, cost = (('exact change of variables', '') if experiment.is_flow else
                 ('probability-flow ODE', f' (mean NFE {result["nfe_mean"]:.0f})'))
    split_label = 'Test' if source == 'test' else f'Held-out (tfds {source})'
    print(f'\nSamples: {os.path.join(out_dir, "grid.png")}\n'
          f'{split_label} bits/dim ({how}, {result["num_levels"]} levels, '
          f'{result["num_examples"]} examples): {result["bpd"]:.4f} +- '
          f'{result["bpd_stderr"]:.4f}{cost}\n'
          f'  uniform baseline:             {base["uniform"]:.4f}\n'
          f'  per-pixel histogram baseline: {base["pixel_histogram"]:.4f}\n'
          f'The model is {verdict} the per-pixel baseline.', flush=True)
    if quality:
      rows = [('model samples', quality['model']),
              ('real train digits (floor)', quality['real_train_digits']),
              ('Gaussian fit to train (poor)', quality['gaussian_baseline'])]
      print(f'Sample quality vs the {source} split ({quality["model"]["num_samples"]} each; digits '
            f'classifier, test accuracy {quality["model"]["classifier_test_accuracy"]:.3f}):')
      for name, q in rows:
        print(f'  {name:30s} digits-FID {q["digits_fid"]:7.1f} | confident '
              f'{q["confident_fraction"]:.2f} | class entropy {q["class_entropy_bits"]:.2f} bits')
    print(f'Written to {path}', flush=True)
  return result


def digits_quality_with_baselines(config, samples: np.ndarray) -> dict:
  """Digits metrics of samples, of as many real training digits (the floor) and of a
  Gaussian fitted to the training digits (a poor baseline), all vs the test split."""
  from score_sde.evaluation import digits_classifier
  n = len(samples)
  real = data_lib.load_split_uint(config, 'train')
  real = real[np.random.default_rng(0).permutation(len(real))[:n]]
  gaussian = digits_classifier.gaussian_baseline_samples(config, n)
  return {name: {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                 for k, v in digits_classifier.digits_metrics(x, config).items()}
          for name, x in [('model', samples), ('real_train_digits', real),
                          ('gaussian_baseline', gaussian)]}


def default_stats_path(config, split: str) -> str:
  """<data_dir>/score_sde_stats/<dataset>_<image size>_<split>_inception.npz"""
  return os.path.join(data_lib.data_dir(config), 'score_sde_stats',
                      f'{config.data.dataset.lower()}_{config.data.image_size}_{split}'
                      f'_inception.npz')


def stats_job(config, *, split: str = 'train', out_path: str | None = None,
              weights: str | None = None, batch_size: int = 200,
              max_examples: int | None = None, mesh=None) -> str:
  """Inception pool-feature statistics (mean, covariance, raw features) of a split."""
  from score_sde.evaluation import inception
  from score_sde.evaluation import metrics
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


SAMPLE_SETTINGS = ('sampler', 'checkpoint_step', 'seed', 'config_hash', 'shard_size')


def eval_job(workdir: str, config, *, tag: str | None = None, stats_path: str | None = None,
             weights: str | None = None, mesh=None) -> dict:
  """FID / KID / IS of a sampling job (digits: classifier features, test split).

  The features and logits of each sample shard are kept in
  <workdir>/eval/quality_<tag>/shard_<s>.npz, so an interrupted evaluation
  resumes. Writes <workdir>/eval/quality_<tag>.json and returns it.
  """
  from score_sde.evaluation import metrics
  sample_dir = (os.path.join(workdir, 'samples', common.check_folder_name(tag)) if tag
                else latest_sample_dir(workdir))
  samples = common.read_manifest(sample_dir)
  if samples is None:
    raise FileNotFoundError(f'no sampling job output in {sample_dir}.')
  missing = [s for s in range(samples['num_shards'])
             if not os.path.exists(common.shard_path(sample_dir, s))]
  if missing:
    raise FileNotFoundError(f'the sampling job in {sample_dir} is unfinished (shards {missing} '
                            f'are missing); run the same launch.py sample command again to '
                            f'finish it.')
  if samples['num_samples'] < 2:
    raise ValueError(f'sample metrics need at least 2 samples; {sample_dir} has '
                     f'{samples["num_samples"]}.')
  digits = data_lib.dataset_name(config) == 'DIGITS'
  if digits:
    from score_sde.evaluation import digits_classifier
    classifier = digits_classifier.get_digits_classifier(config)
    network = digits_classifier.feature_network(classifier)
    reference = digits_classifier.reference_stats(config, classifier, 'test')
    options = dict(kid_subset_size=50, is_splits=10, seed=0, prefix='digits_')  # as digits_metrics
  else:
    from score_sde.evaluation import inception
    stats_path = stats_path or default_stats_path(config, 'train')
    if not os.path.exists(stats_path):
      raise FileNotFoundError(
          f'dataset statistics file {stats_path} is missing; make it with launch.py stats '
          f'--config <config> --split train (or pass --stats_file).')
    network = inception.feature_network(inception.load_params(weights),
                                        mesh=mesh or parallel.make_mesh())
    reference = metrics.load_stats(stats_path)
    metrics.check_compatible(reference, network.name)
    options = {}
  name = os.path.basename(sample_dir)
  job = common.Job(
      out_dir=os.path.join(workdir, 'eval', f'quality_{name}'),
      num_shards=samples['num_shards'], shard_size=samples['shard_size'],
      settings={'samples': name, 'feature_network': network.name,
                'sample_settings': {k: samples[k] for k in SAMPLE_SETTINGS}},
      checked=('samples', 'feature_network', 'sample_settings', 'shard_size'),
      title=f'features of {samples["num_samples"]} samples in {sample_dir}',
      what='features', unit='sample', retry_hint='sample under another --tag')

  def compute(shard):
    images = io.load_npz(common.shard_path(sample_dir, shard)).get('images')
    if images is None:
      raise ValueError(f'{sample_dir} holds float samples, not images; sample quality is '
                       f'measured on images.')
    features, logits = network.apply(images)
    return {'features': np.asarray(features, np.float32),
            'logits': np.asarray(logits, np.float32)}, {}

  common.run(job, compute)
  shards = common.load_shards(job)
  count = samples['num_samples']
  features = np.concatenate([a['features'] for a in shards])[:count]
  logits = np.concatenate([a['logits'] for a in shards])[:count]
  result = metrics.evaluate_features(features, logits, reference,
                                     feature_network=network.name, **options)
  if digits:
    result.update(digits_classifier.confidence_summary(logits))
    result.update(reference_split='test', classifier_test_accuracy=classifier.test_accuracy)
  else:
    result['stats_file'] = stats_path
  result = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in result.items()}
  result['samples'] = sample_dir
  if jax.process_index() == 0:
    io.atomic_json(os.path.join(workdir, 'eval', f'quality_{name}.json'), result)
  return result
