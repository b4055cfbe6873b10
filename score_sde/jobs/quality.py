"""Sample quality and the main job's final evaluation: dataset statistics, FID / KID /
IS of a sampling job (digits: the digits classifier's features), and the
grid + bits/dim + baselines summary printed after training.
"""
from __future__ import annotations

import os
import re

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
  <workdir>/eval/final_<step>.json (with 'sample_dir' and the bpd job's 'result_file',
  both addressed by their settings). A rerun with other eval / sampling settings
  (they may change on resume) first moves the earlier summary to
  final_<step>_<id>.json, <id> naming its files: nothing is overwritten."""
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
  result['sample_dir'] = out_dir
  if jax.process_index() == 0:
    path = os.path.join(workdir, 'eval', f'final_{step}.json')
    _keep_earlier_summary(path, result)
    io.atomic_json(path, result)
    base = result['baselines']
    verdict = ('below' if result['bpd'] < base['pixel_histogram'] else 'not yet below')
    print(f'\nSamples: {os.path.join(out_dir, "grid.png")}\n'
          f'{bpd_summary_line(result, experiment.is_flow)}\n'
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


def bpd_summary_line(result: dict, is_flow: bool) -> str:
  """The final evaluation's bits/dim line from a bpd job's result: the mean over the
  examples +- its standard error ('bpd_stderr': the examples' std / sqrt(n)), and for a
  score model the mean NFE per example."""
  source = result['tfds_split']
  how, cost = (('exact change of variables', '') if is_flow else
               ('probability-flow ODE', f' (mean NFE {result["nfe_mean"]:.0f})'))
  split_label = ('Test' if source == 'test' and result.get('held_out') is not False else
                 f'Training-data (tfds {source})' if result.get('held_out') is False else
                 f'Held-out (tfds {source})')
  return (f'{split_label} bits/dim ({how}, {result["num_levels"]} levels, '
          f'{result["num_examples"]} examples): {result["bpd"]:.4f} +- '
          f'{result["bpd_stderr"]:.4f} (standard error){cost}')


def _keep_earlier_summary(path: str, result: dict) -> None:
  """Moves an earlier final_<step>.json made from other files to final_<step>_<id>.json."""
  if not os.path.exists(path):
    return
  earlier = io.read_json_object(path, 'an earlier final evaluation',
                                'restore it from a backup, or move it aside')

  def names(summary):      # the files' names: the same workdir spelled another way matches
    return {k: os.path.basename(str(summary.get(k))) for k in ('result_file', 'sample_dir')}
  made_from = names(earlier)
  if made_from == names(result):
    return
  kept = f'{path[:-len(".json")]}_{common.settings_id(made_from)}.json'
  os.replace(path, kept)
  print(f'The earlier final evaluation at this step (other settings) is kept as {kept}',
        flush=True)


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


def stats_dataset(config) -> str:
  """What a statistics file says it describes: the dataset, with its LSUN category."""
  name = data_lib.dataset_name(config)
  if '{category}' in data_lib.IMAGE_DATASETS[name].tfds_name:
    return f"{name}/{config.data.get('category', 'bedroom')}"
  return name


def default_stats_path(config, split: str, max_examples: int | None = None) -> str:
  """<data_dir>/score_sde_stats/<dataset>[_<category>]_<image size>_<split>[_n<max>]
  _inception.npz; <split> is the tfds split our split name reads (sanitised)."""
  spec = data_lib.tfds_split(config, split)
  source = spec if re.fullmatch(r'[A-Za-z0-9_]+', spec) else (   # 'train[:-300]': + its hash
      re.sub(r'[^A-Za-z0-9_]+', '-', spec).strip('-') + '-'
      + common.settings_id({'tfds_split': spec})[:6])
  name = stats_dataset(config).lower().replace('/', '_')
  limit = f'_n{max_examples}' if max_examples else ''
  return os.path.join(data_lib.data_dir(config), 'score_sde_stats',
                      f'{name}_{config.data.image_size}_{source}{limit}_inception.npz')


def _check_stats_dataset(config, stats, path: str) -> None:
  """Refuses a statistics file that says it describes another dataset or LSUN category
  (files from other code bases name none and pass)."""
  expected = stats_dataset(config)
  found = stats.dataset.upper()
  if found in ('', expected.upper()):
    return
  older = (' (made before files recorded the LSUN category)'
           if '/' in expected and found == expected.split('/')[0] else '')
  raise ValueError(f'{path} holds statistics of {stats.dataset!r}{older}, but the config is '
                   f'{expected!r}; make them with launch.py stats --config <this config> '
                   f'or pass the right --stats_file.')


def stats_job(config, *, split: str = 'train', out_path: str | None = None,
              weights: str | None = None, batch_size: int = 200,
              max_examples: int | None = None, mesh=None) -> str:
  """Inception pool-feature statistics (mean, covariance, raw features) of a split."""
  from score_sde.evaluation import inception
  from score_sde.evaluation import metrics
  if data_lib.dataset_name(config) == 'DIGITS':
    raise ValueError('the digits use their own classifier features, whose statistics are '
                     'computed on the fly: run launch.py eval on a digits workdir directly.')
  out_path = out_path or default_stats_path(config, split, max_examples)
  if parallel.broadcast_from_first(os.path.exists(out_path)):    # every process decides alike
    raise FileExistsError(
        f'{out_path} exists; statistics are not overwritten (an earlier FID may rest on '
        f'them). Pass another --stats_file, or move the file away to recompute it.')
  mesh = mesh or parallel.make_mesh()
  network = inception.feature_network(inception.load_params(weights), mesh=mesh,
                                      batch_size=batch_size)
  stats = metrics.compute_statistics(
      network, metrics.dataset_batches(config, split, batch_size, max_examples),
      dataset=stats_dataset(config), split=data_lib.tfds_split(config, split))
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    metrics.save_stats(out_path, stats)
  return out_path


def unfinished_shards(sample_dir: str, manifest: dict) -> list[int]:
  """The shard indices of a sampling job's manifest that have no file yet."""
  return [s for s in range(manifest['num_shards'])
          if not os.path.exists(common.shard_path(sample_dir, s))]


def sampling_jobs(workdir: str) -> dict[str, dict]:
  """{folder: manifest} of the workdir's sampling jobs (the folders under
  <workdir>/samples that hold a manifest), in name order."""
  root = os.path.join(workdir, 'samples')
  folders = [os.path.join(root, d) for d in (sorted(os.listdir(root)) if os.path.isdir(root)
                                             else [])]
  manifests = {folder: common.read_manifest(folder) for folder in folders}
  return {folder: manifest for folder, manifest in manifests.items() if manifest is not None}


def latest_sample_dir(workdir: str) -> str:
  """The newest finished sampling job of a workdir (newest by its manifest's time).

  An unfinished job (one still running, or interrupted) is passed over; when
  no job is finished, the error names the newest one and how to finish it.
  """
  root = os.path.join(workdir, 'samples')
  manifests = sampling_jobs(workdir)
  if not manifests:
    raise FileNotFoundError(f'{workdir} has no sampling job output; run launch.py sample '
                            f'--workdir {workdir} --num_samples N first.')
  newest_first = sorted(manifests, reverse=True,
                        key=lambda d: os.path.getmtime(os.path.join(d, 'manifest.json')))
  for sample_dir in newest_first:
    if not unfinished_shards(sample_dir, manifests[sample_dir]):
      return sample_dir
  raise FileNotFoundError(
      f'no sampling job in {root} is finished (the newest is {newest_first[0]}); run its '
      f'launch.py sample command again to finish it, or pass --tag.')


def _sample_tags(workdir: str) -> str:
  """What to pass as --tag instead: the workdir's sampling jobs (folders with a manifest)."""
  tags = [os.path.basename(folder) for folder in sampling_jobs(workdir)]
  if not tags:
    return f'{workdir} has no sampling job yet: run launch.py sample --workdir {workdir} first.'
  return (f'the sampling jobs of {workdir} (--tag): {", ".join(tags)}; or leave --tag out for '
          f'the newest finished one.')


# what determines a sampling job's shards ('config_hash': the address before 'run_hash')
SAMPLE_SETTINGS = ('sampler', 'checkpoint_step', 'seed', 'run_hash', 'config_hash', 'shard_size')


def eval_job(workdir: str, config, *, tag: str | None = None, stats_path: str | None = None,
             weights: str | None = None, mesh=None) -> dict:
  """FID / KID / IS of a sampling job (digits: classifier features, test split).

  The features and logits of each sample shard are kept in
  <workdir>/eval/quality_<tag>/shard_<s>.npz, so an interrupted evaluation
  resumes. Writes <workdir>/eval/quality_<tag>_<id>.json and returns it (with
  'result_file'); <id> names the sample count, the reference statistics (a digest of
  their values) and the metric options, so a rerun after more samples or against
  another reference keeps the earlier result.
  """
  from score_sde.evaluation import metrics
  sample_dir = (os.path.join(workdir, 'samples', common.check_folder_name(tag)) if tag
                else latest_sample_dir(workdir))
  samples = common.read_manifest(sample_dir)
  if samples is None:
    raise FileNotFoundError(f'no sampling job output in {sample_dir}; {_sample_tags(workdir)}')
  missing = unfinished_shards(sample_dir, samples)
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
    default_path = not stats_path
    stats_path = stats_path or default_stats_path(config, 'train')
    if not parallel.broadcast_from_first(os.path.exists(stats_path)):
      raise FileNotFoundError(
          f'dataset statistics file {stats_path} is missing; make it with launch.py stats '
          f'--config <config> --split train (or pass --stats_file).')
    network = inception.feature_network(inception.load_params(weights),
                                        mesh=mesh or parallel.make_mesh())
    reference = metrics.load_stats(stats_path)
    metrics.check_compatible(reference, network.name)
    _check_stats_dataset(config, reference, stats_path)
    train_source = data_lib.tfds_split(config, 'train')
    if default_path and reference.split not in ('', train_source):
      raise ValueError(f'{stats_path} holds statistics of tfds split {reference.split!r}, '
                       f'not {train_source!r}; move it away and run launch.py stats again.')
    options = {}
  name = os.path.basename(sample_dir)
  reference_digest = common.digest(
      reference.mu, reference.sigma, *([] if reference.features is None else [reference.features]))
  result_id = common.settings_id({'num_samples': samples['num_samples'],
                                  'reference': reference_digest,
                                  'feature_network': network.name, 'options': options})
  job = common.Job(
      out_dir=os.path.join(workdir, 'eval', f'quality_{name}'),
      num_shards=samples['num_shards'], shard_size=samples['shard_size'],
      settings={'samples': name, 'feature_network': network.name,
                'sample_settings': {k: samples[k] for k in SAMPLE_SETTINGS
                                    if k in samples}},
      checked=('samples', 'feature_network', 'sample_settings', 'shard_size'),
      title=f'features of {samples["num_samples"]} samples in {sample_dir}',
      what='features', unit='sample', retry_hint='sample under another --tag',
      num_rows=samples['num_samples'])

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
    result.update(reference_split='test',
                  reference_tfds_split=data_lib.tfds_split(config, 'test'),
                  classifier_test_accuracy=classifier.test_accuracy)
  else:
    result['stats_file'] = stats_path
  result = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in result.items()}
  result.update(samples=sample_dir, reference_digest=reference_digest,
                result_file=os.path.join(workdir, 'eval', f'quality_{name}_{result_id}.json'))
  if jax.process_index() == 0:
    io.atomic_json(result['result_file'], result)
  return result
