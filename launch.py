"""score_sde command line: python launch.py <command> --config <file> [--workdir <dir>] ...

Commands
  train         train a score model or a normalizing flow (config.model.name nice,
                realnvp or glow); on an existing --workdir it resumes from the
                newest checkpoint (--config may then be left out)
  sample        draw --num_samples samples from a trained workdir's EMA parameters
                into resumable npz shards + manifest + PNG grid (<workdir>/samples/)
  bpd           bits/dim of a split through the probability-flow ODE (a flow's:
                exact, by the change of variables), resumable
                (<workdir>/eval/bpd_<split>_<step>_<id>_r<repeats>.json)
  stats         Inception feature statistics of a dataset split for FID / KID
                (--split, default train: the split eval compares samples with)
  eval          FID / KID / IS of a sampling job against those statistics (digits:
                a digits classifier's features) -> <workdir>/eval/quality_<tag>_<id>.json
  train_classifier
                train a noise-conditional classifier p(y | x_t) (config.model.name
                'wideresnet', e.g. configs/digits/wrn_classifier.py) with the same
                loop, checkpoints and sharding; test accuracy by noise level at the end
  inpaint       fill in the missing part of --images (PNG / folder / npz, or 'test' /
                'train' for the dataset's first --num_images) under --mask (a pattern:
                center_box, left_half, ..., random_pixels, or a mask file)
  colorize      colour grey-scale --images (the model must be RGB)
  cond_sample   class-conditional samples: the workdir's score model guided by the
                classifier of --classifier_workdir (--labels 3,3,7 or --num_per_class)
  import_checkpoint
                import a checkpoint of the original code bases (score_sde's Flax
                checkpoint_<k> or score_sde_pytorch's checkpoint_<k>.pth) into a new
                --workdir: --original <file> --config <the config it was trained with>
  describe      parameter count and forward-pass shapes of a config (no training);
                with --original <file>: what an original checkpoint holds and which
                config under configs/ (or the given --config) it matches
  noise_scales  NCSNv2 noise scales (sigma_max, gamma, number of scales, step size)
                for a config's training data

Every job (sample, bpd, eval, inpaint, colorize, cond_sample) is sharded and
resumable: after an interruption, run the same command again. Its default output
folder carries an id of the settings that determine its numbers, so other
settings never reuse its shards. One train at a time writes to a workdir.

Configs are ml_collections files; override any key on the command line, e.g.
  --config.training.batch_size=64 --config.model.nf=32
An override of a key that does not exist fails with the key's name. Commands on
a trained --workdir read its stored config when --config is not given, e.g.
  launch.py sample --workdir runs/digits --num_samples 256 --config.sampling.method=ode
"""
from __future__ import annotations

import errno
import os
import sys

from score_sde.cpu import process

if __name__ == '__main__':
  # Before JAX starts: the XLA:CPU flags, then one restart with glibc's huge-page
  # tunable (score_sde/cpu/); both do nothing unless JAX runs on the CPU.
  process.prepare()

from absl import app  # noqa: E402  (after the restart above)
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/...).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Experiment directory (checkpoints, samples, logs).')
flags.DEFINE_string('original', None, 'import_checkpoint / describe: a checkpoint file of '
                    'yang-song/score_sde (checkpoint_<k>) or score_sde_pytorch (.pth).')
flags.DEFINE_bool('extend', False, 'train / train_classifier: continue a finished run to a '
                  'larger config.training.n_iters (otherwise refused).')
flags.DEFINE_bool('exact', False, 'noise_scales: exact sigma_max even for large datasets.')
flags.DEFINE_integer('n_steps_each', 5, 'noise_scales: Langevin steps per noise scale.')
flags.DEFINE_integer('max_examples', 0, 'noise_scales / bpd / stats: use at most this many '
                     'examples (0: all).')
flags.DEFINE_integer('num_samples', 64, 'sample: number of samples.')
flags.DEFINE_integer('shard_size', 0, 'sample: samples per shard file (0: config.eval.batch_size).')
flags.DEFINE_integer('checkpoint', None, 'sample / bpd / inpaint / colorize / cond_sample: '
                     'checkpoint step (default: newest).')
flags.DEFINE_integer('seed', None, 'sample / inpaint / colorize / cond_sample: PRNG seed '
                     '(default: config.seed).')
flags.DEFINE_string('tag', None, 'sample: output folder name under <workdir>/samples; eval: the '
                    'folder to evaluate (default: the newest finished one).')
flags.DEFINE_bool('save_floats', False, 'sample: also store the float samples.')
flags.DEFINE_enum('split', None, ['train', 'test'], 'bpd: which split (default test); '
                  'stats: which split (default train, the one eval compares samples with).')
flags.DEFINE_integer('num_repeats', 1, 'bpd: dequantisation repeats (fresh noise each).')
flags.DEFINE_integer('batch_size', 0, 'bpd: examples per shard (0: config.eval.batch_size).')
flags.DEFINE_string('stats_file', None, 'stats / eval: dataset statistics file (default: '
                    '<data_dir>/score_sde_stats/<dataset>[_<lsun category>]_<size>_<tfds '
                    'split>[_n<max_examples>]_inception.npz; stats never overwrites one).')
flags.DEFINE_string('inception_weights', None, 'stats / eval: Inception weights npz (default: '
                    '$SCORE_SDE_INCEPTION_WEIGHTS or ~/.cache/score_sde/inception_fid.npz).')
flags.DEFINE_string('images', None, 'inpaint / colorize: an image file, a folder of images, '
                    'an npz/npy of images, or "test" / "train" (the dataset\'s first '
                    '--num_images).')
flags.DEFINE_integer('num_images', 8, 'inpaint / colorize: use at most this many images.')
flags.DEFINE_string('mask', 'center_box', 'inpaint: a mask pattern (center_box, left_half, '
                    'right_half, top_half, bottom_half, random_pixels) or a mask file '
                    '(.npy / .npz / black-and-white image; 1 or white = known).')
flags.DEFINE_float('mask_fraction', None, 'inpaint: box side (center_box) or missing '
                   'probability (random_pixels).')
flags.DEFINE_integer('samples_per_image', 1, 'inpaint / colorize: samples per input.')
flags.DEFINE_string('out_dir', None, 'inpaint / colorize / cond_sample: output folder '
                    '(default: under <workdir>/samples).')
flags.DEFINE_string('classifier_workdir', None, 'cond_sample: workdir of a classifier '
                    'trained with train_classifier.')
flags.DEFINE_string('labels', None, 'cond_sample: comma-separated class indices, one per '
                    'sample (default: every class --num_per_class times).')
flags.DEFINE_integer('num_per_class', 4, 'cond_sample: samples per class without --labels.')
flags.DEFINE_float('scale', 1.0, 'cond_sample: classifier scale (1: the exact conditional).')
flags.DEFINE_string('coordinator_address', None, 'Multi-process: coordinator host:port '
                    '(or $JAX_COORDINATOR_ADDRESS; automatic on TPU pods).')
flags.DEFINE_integer('num_processes', None, 'Multi-process: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-process: this process\'s index.')
flags.DEFINE_string('compilation_cache', None, 'Folder where compiled XLA programs are kept '
                    'for later runs (default: $JAX_COMPILATION_CACHE_DIR, else '
                    '~/.cache/score_sde/xla); "none" turns the cache off.')
flags.DEFINE_string('cpu_collectives', None, 'Multi-process on CPU: "gloo".')

FLAGS = flags.FLAGS


def _require_config():
  if FLAGS.config is None:
    raise ValueError('this command needs --config=<config file>, e.g. '
                     '--config=configs/digits/ddpmpp_continuous.py')
  return FLAGS.config


def _config_name() -> str:
  """The --config file as given (with its ':arg'), for records."""
  try:
    return config_flags.get_config_filename(FLAGS['config'])
  except Exception:  # noqa: BLE001 -- only a label
    return 'the config'


def _paper_configs() -> dict:
  """{path relative to the repository: config} of every config under configs/."""
  import configs
  here = os.path.dirname(os.path.abspath(__file__))
  return {os.path.relpath(path, here): configs.load(path) for path in configs.all_config_paths()}


def cmd_describe(argv):
  del argv
  if FLAGS.original is None:
    from score_sde import describe
    print(describe.describe_json(_require_config()))
    return
  import json
  from score_sde.jobs import import_checkpoint
  candidates = ({_config_name(): FLAGS.config} if FLAGS.config is not None
                else _paper_configs())
  info = import_checkpoint.describe_original(FLAGS.original, candidates)
  shapes = info.pop('array_shapes')
  shown = dict(list(shapes.items())[:12])
  print(f"{info['file']}: {info['format']}, step {info['step']}, {info['network']}")
  print(f"  {info['arrays']} arrays, {info['parameters']:,} parameters; EMA rate "
        f"{info['ema_rate']}; Adam state {'yes' if info['adam_state'] else 'no'} (count "
        f"{info['adam_count']}); buffers {info['buffers'] or 'none'}")
  for name, shape in shown.items():
    print(f'    {name} {tuple(shape)}')
  if len(shapes) > len(shown):
    print(f'    ... and {len(shapes) - len(shown)} more')
  matches = info['matching_configs']
  print(f"  matches {len(matches)} of {info['configs_tried']} config(s) tried: "
        + (', '.join(matches) if matches else
           'none (a shrunk or changed config: pass it with --config and its '
           '--config.key=value overrides to check it)'))
  print(json.dumps({**info, 'array_shapes_shown': shown}))


def cmd_import_checkpoint(argv):
  del argv
  from score_sde.jobs import import_checkpoint
  if FLAGS.original is None:
    raise ValueError('import_checkpoint needs --original=<checkpoint file> (score_sde: '
                     'checkpoint_<k>; score_sde_pytorch: checkpoint_<k>.pth).')
  workdir = _require_workdir()
  config = _validated_config()
  summary = import_checkpoint.import_checkpoint(FLAGS.original, config, workdir,
                                                config_name=_config_name())
  print(f"Imported {summary['format']} step {summary['step']} "
        f"({summary['parameters']:,} parameters) from {summary['source']} into {workdir}.")
  for notice in summary['notices']:
    print(f'note: {notice}')
  print(f'Next: python launch.py sample --workdir {workdir}   (or bpd / eval / train)')


def cmd_noise_scales(argv):
  del argv
  from score_sde import data
  from score_sde import experiment
  from score_sde import noise_scales
  config = _require_config()
  if experiment.is_flow(config):
    raise ValueError(f'noise_scales picks the noise levels of a score model (NCSNv2); '
                     f'{config.model.name!r} is a normalizing flow, which has none.')
  examples = data.load_split(config, 'train', FLAGS.max_examples or None)
  scales = noise_scales.select_noise_scales(
      examples, sigma_min=config.model.sigma_min, n_steps_each=FLAGS.n_steps_each,
      exact=True if FLAGS.exact else None)
  d = scales.diameter
  print(f'data: {config.data.dataset}, {len(examples)} training examples, dimension {scales.dim}')
  print(f'sigma_max (largest pairwise distance): {scales.sigma_max:.6g}'
        + ('' if d.exact else f'  (approximate: true value in [{d.lower:.6g}, {d.upper:.6g}];'
           ' --exact computes it)'))
  print(f'gamma (geometric ratio sigma_i-1 / sigma_i): {scales.gamma:.8f}')
  print(f'number of scales from sigma_max to sigma_min={scales.sigma_min}: {scales.num_scales}')
  print(f'Langevin step size eps for {scales.n_steps_each} steps per scale: {scales.step_lr:.6g}')
  print('\nConfig lines:\n' + scales.config_lines())


def _require_workdir():
  if not FLAGS.workdir:                 # not given, or given empty
    raise ValueError('this command needs --workdir=<experiment directory>, e.g. '
                     '--workdir=runs/digits.')
  return FLAGS.workdir


def _validated_config():
  """The --config, its keys checked against configs/defaults.py."""
  import configs
  config = _require_config()
  configs.validate(config)
  return config


def cmd_train(argv):
  del argv
  from score_sde import experiment
  from score_sde import train
  workdir = _require_workdir()
  config = _validated_config()
  if experiment.is_classifier(config):
    raise ValueError(f'config.model.name {config.model.name!r} is a classifier: train it '
                     f'with launch.py train_classifier.')
  train.train_and_evaluate(config, workdir, extend=FLAGS.extend)


def cmd_train_classifier(argv):
  del argv
  from score_sde import experiment
  from score_sde import train
  workdir = _require_workdir()
  config = _validated_config()
  if not experiment.is_classifier(config):
    raise ValueError(f'train_classifier needs a classifier config (config.model.name in '
                     f'{list(experiment.CLASSIFIER_MODELS)}, e.g. configs/digits/'
                     f'wrn_classifier.py); got model {config.model.name!r}.')
  train.train_and_evaluate(config, workdir, extend=FLAGS.extend)


def _input_images(config):
  """--images as float32 [N, H, W, C] in [0, 1]."""
  from score_sde import data
  from score_sde import io
  if FLAGS.images is None:
    raise ValueError('this command needs --images=<file, folder, npz, or test / train>.')
  if FLAGS.images in ('train', 'test'):
    levels = data.num_levels(config)
    images = data.load_split_uint(config, FLAGS.images, FLAGS.num_images or None)
    return images.astype('float32') / (levels - 1)
  return io.load_images(FLAGS.images, config.data.image_size,
                                  config.data.num_channels, max_images=FLAGS.num_images or None)


def cmd_inpaint(argv):
  del argv
  from score_sde import jobs
  workdir = _require_workdir()
  config = _require_config()
  paths = jobs.inpaint_job(
      workdir, config, _input_images(config), FLAGS.mask, mask_fraction=FLAGS.mask_fraction,
      out_dir=FLAGS.out_dir, samples_per_image=FLAGS.samples_per_image, seed=FLAGS.seed,
      checkpoint=FLAGS.checkpoint)
  if paths:
    print(f'inpainting: {paths["png"]} (inputs, masks, results in {paths["npz"]})')


def cmd_colorize(argv):
  del argv
  from score_sde import jobs
  workdir = _require_workdir()
  config = _require_config()
  paths = jobs.colorize_job(
      workdir, config, _input_images(config), out_dir=FLAGS.out_dir, samples_per_image=FLAGS.samples_per_image,
      seed=FLAGS.seed, checkpoint=FLAGS.checkpoint)
  if paths:
    print(f'colourisation: {paths["png"]} (grey inputs and results in {paths["npz"]})')


def cmd_cond_sample(argv):
  del argv
  import numpy as np
  from configs import workdir as workdir_config
  from score_sde import experiment
  from score_sde import jobs
  from score_sde import models
  workdir = _require_workdir()
  config = _require_config()
  if FLAGS.classifier_workdir is None:
    raise ValueError('cond_sample needs --classifier_workdir=<a train_classifier workdir>.')
  classifier_config = workdir_config.load_stored_config(FLAGS.classifier_workdir)
  if not experiment.is_classifier(classifier_config):
    raise ValueError(f'--classifier_workdir {FLAGS.classifier_workdir} holds a '
                     f'{classifier_config.model.name!r} model, not a noise-conditional '
                     f'classifier; pass the workdir of launch.py train_classifier (the score '
                     f'model goes in --workdir).')
  num_classes = int(models.get_model(classifier_config).num_classes)
  if FLAGS.labels:
    try:
      labels = np.asarray([int(v) for v in FLAGS.labels.split(',') if v.strip()])
    except ValueError:
      raise ValueError(f'--labels must be comma-separated integers; got {FLAGS.labels!r}.'
                       ) from None
  else:
    labels = np.repeat(np.arange(num_classes), FLAGS.num_per_class)
  paths = jobs.conditional_sample_job(
      workdir, config, FLAGS.classifier_workdir, classifier_config, labels, scale=FLAGS.scale,
      out_dir=FLAGS.out_dir, seed=FLAGS.seed, checkpoint=FLAGS.checkpoint)
  if paths:
    print(f'class-conditional samples: {paths.get("png", "")} (samples, labels in '
          f'{paths["npz"]})')


def cmd_sample(argv):
  del argv
  from score_sde import jobs
  workdir = _require_workdir()
  out_dir = jobs.sample_job(workdir, _require_config(), num_samples=FLAGS.num_samples,
                            shard_size=FLAGS.shard_size or None, checkpoint=FLAGS.checkpoint,
                            seed=FLAGS.seed, save_floats=FLAGS.save_floats, tag=FLAGS.tag)
  from score_sde.jobs import common
  print(f'samples: {out_dir} ({_sampling_cost(common.read_manifest(out_dir))}manifest.json, '
        f'shard_*.npz, grid.png)')


def _sampling_cost(manifest: dict | None) -> str:
  """'<n> samples, <NFE> score evaluations each; ' from a sampling job's manifest (the mean
  over shards: an adaptive ODE's NFE varies), '' without one (another host wrote it)."""
  nfes = [shard['nfe'] for shard in ((manifest or {}).get('shards') or {}).values()
          if 'nfe' in shard]
  if not nfes:
    return ''
  if manifest.get('sampler', {}).get('method') == 'flow':
    return f'{manifest["num_samples"]} samples, one inverse pass each; '
  mean = sum(nfes) / len(nfes)
  return f'{manifest["num_samples"]} samples, {mean:.0f} score evaluations each; '


def cmd_bpd(argv):
  del argv
  import json
  from score_sde import jobs
  workdir = _require_workdir()
  result = jobs.bpd_job(workdir, _require_config(), split=FLAGS.split or 'test',
                        num_repeats=FLAGS.num_repeats, batch_size=FLAGS.batch_size or None,
                        checkpoint=FLAGS.checkpoint, max_examples=FLAGS.max_examples or None)
  print(json.dumps(result, indent=2))
  print(_bpd_summary(result))


def _bpd_summary(result: dict) -> str:
  """One line under the JSON: the final evaluation's bits/dim line (mean +- standard error,
  on what, how), the repeats, the step and the result file."""
  from score_sde.jobs import quality
  is_flow = result['solver'].get('method') == 'change_of_variables'
  return (f'{quality.bpd_summary_line(result, is_flow)}; {result["num_repeats"]} repeat(s), '
          f'step {result["checkpoint_step"]} -> {result["result_file"]}')


def cmd_stats(argv):
  del argv
  from score_sde import jobs
  path = jobs.stats_job(_require_config(), split=FLAGS.split or 'train',
                        out_path=FLAGS.stats_file,
                        weights=FLAGS.inception_weights,
                        max_examples=FLAGS.max_examples or None)
  print(f'statistics: {path}')


def cmd_eval(argv):
  del argv
  import json
  from score_sde import jobs
  workdir = _require_workdir()
  result = jobs.eval_job(workdir, _require_config(), tag=FLAGS.tag,
                         stats_path=FLAGS.stats_file, weights=FLAGS.inception_weights)
  print(json.dumps(result, indent=2))
  print(_quality_summary(result))


# Fewer samples than this give an FID biased upwards by more than papers' differences.
FID_SAMPLES_FOR_COMPARISON = 10_000


def _quality_summary(result: dict) -> str:
  """One line of FID / KID / IS with units, a line saying what each +- is (KID: a
  standard error; IS: a standard deviation over splits), and a note when the sample
  count is small."""
  prefix = 'digits_' if 'digits_fid' in result else ''
  n = int(result['num_samples'])
  parts = [f'{prefix}FID {result[prefix + "fid"]:.2f}']
  if result.get(prefix + 'kid') is not None and prefix:
    # the digits classifier's features have their own scale: no paper unit to match
    parts.append(f'{prefix}KID {result[prefix + "kid"]:.2f} +- '
                 f'{result[prefix + "kid_stderr"]:.2f} (classifier features)')
  elif result.get('kid') is not None:
    parts.append(f'KID {1e3 * result["kid"]:.2f} +- '
                 f'{1e3 * result["kid_stderr"]:.2f} (x 1e-3, the unit papers report)')
  parts.append(f'{prefix}IS {result[prefix + "is"]:.2f} +- {result[prefix + "is_std"]:.2f}')
  line = ' | '.join(parts) + f' on {n} samples'
  splits = result.get(prefix + 'is_splits', '?')
  kid_error = ("KID's +- is its standard error over disjoint blocks; "
               if result.get(prefix + 'kid') is not None else '')
  line += (f'\n({kid_error}IS\'s +- is the standard deviation of the score over its '
           f'{splits} split(s), not an error of the mean)')
  if prefix:        # the digits metrics are this project's own: no paper protocol
    line += (f'\nnote: {prefix}FID is biased upwards on few samples (it falls as the sample '
             f'count grows): compare only {prefix}FIDs computed on as many samples ({n} '
             f'here); KID is unbiased but noisier.')
  elif n < FID_SAMPLES_FOR_COMPARISON:
    line += (f'\nnote: FID on {n} samples is biased upwards (it falls as the sample count '
             f'grows; papers use 10,000-50,000): compare only FIDs computed on as many '
             f'samples; KID is unbiased but noisier. IS is biased downwards on few samples '
             f'per split ({splits} split(s) here; Salimans et al.: 50,000 samples in 10, '
             f'Song et al.\'s code: all samples in one), down to exactly 1 with one sample '
             f'per split.')
  return line


COMMANDS = {
    'train': cmd_train,
    'train_classifier': cmd_train_classifier,
    'inpaint': cmd_inpaint,
    'colorize': cmd_colorize,
    'cond_sample': cmd_cond_sample,
    'sample': cmd_sample,
    'bpd': cmd_bpd,
    'eval': cmd_eval,
    'stats': cmd_stats,
    'describe': cmd_describe,
    'import_checkpoint': cmd_import_checkpoint,
    'noise_scales': cmd_noise_scales,
}


# Commands that read a trained workdir (its stored config without --config); a flow's
# workdir serves sample, bpd and eval, and the controllable jobs refuse it in one line.
WORKDIR_COMMANDS = ('sample', 'bpd', 'eval', 'inpaint', 'colorize', 'cond_sample')
# errno values of a file system that cannot take what a command writes.
STORAGE_ERRORS = {errno.ENOSPC: 'no space left on device', errno.EDQUOT: 'disk quota exceeded',
                  errno.EROFS: 'read-only file system', errno.EACCES: 'permission denied'}


def _check_trained_workdir(command: str) -> None:
  """One-line errors for a missing workdir, a folder that is no workdir, a malformed
  config.json, or a classifier workdir given to a score-model command."""
  if command not in WORKDIR_COMMANDS:
    return
  from score_sde import experiment
  from score_sde import io
  workdir = _require_workdir()
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'no workdir at {workdir}; train one first with launch.py train '
                            f'--config <config file> --workdir {workdir}.')
  config = FLAGS.config if FLAGS.config is not None else io.read_config_json(workdir)
  if experiment.is_classifier(config):
    raise ValueError(f'{workdir} holds a noise-conditional classifier (launch.py '
                     f'train_classifier), not a score model; {command} needs a score-model '
                     f'workdir' + (' (the classifier goes in --classifier_workdir).'
                                   if command == 'cond_sample' else '.'))


# The sampling.* keys a normalizing flow's one inverse pass reads.
FLOW_SAMPLING_KEYS = ('sampling.temperature',)


def _check_flow_overrides(command: str, args) -> None:
  """One line for a --config.sampling.<key> override that a flow's sampler would ignore."""
  if command not in ('train', 'sample') or FLAGS.config is None:
    return
  from score_sde import experiment
  if not experiment.is_flow(FLAGS.config):
    return
  for arg in args:
    key = arg[len('--config.'):].split('=', 1)[0] if arg.startswith('--config.') else ''
    if key.startswith('sampling.') and key not in FLOW_SAMPLING_KEYS:
      raise ValueError(f'{arg}: {FLAGS.config.model.name!r} is a normalizing flow, which samples '
                       f'by one inverse pass; of the sampling.* keys only '
                       f'{", ".join(FLOW_SAMPLING_KEYS)} applies to it.')


def _check_pc_only_overrides(command: str, args) -> None:
  """One line for a --config.sampling.method override that inpaint / colorize would ignore:
  their replacement step runs in the PC loop only."""
  if command not in ('inpaint', 'colorize') or FLAGS.config is None:
    return
  method = FLAGS.config.sampling.get('method', 'pc')
  given = any(a.startswith('--config.sampling.method') for a in args)
  if given and method != 'pc':
    raise ValueError(f'--config.sampling.method={method}: {command} runs the PC sampler only '
                     f'(its replacement step re-noises the known pixels after every predictor '
                     f'and corrector update); leave the method out and set the PC keys '
                     f'instead (sampling.predictor, corrector, num_steps, snr).')


# Integer flags and the least value each may take (0 where the flag's help says what 0
# means); checked before any folder is made or any work starts.
FLAG_MINIMUMS = {'num_samples': 1, 'num_repeats': 1, 'samples_per_image': 1,
                 'num_per_class': 1, 'n_steps_each': 1, 'max_examples': 0,
                 'num_images': 0, 'shard_size': 0, 'batch_size': 0}


def _check_counts() -> None:
  """One line for a count flag below its least value (before any work)."""
  for name, least in FLAG_MINIMUMS.items():
    value = FLAGS[name].value
    if value < least:
      meaning = '' if least else ' (0: the default)'
      raise ValueError(f'--{name} must be >= {least}{meaning}; got {value}.')


def _check_names() -> None:
  """--tag names a folder inside the workdir: a plain name, no path (before any work)."""
  from score_sde.jobs import common
  if FLAGS.tag is not None:
    common.check_folder_name(FLAGS.tag)


def _storage_error_message(error: OSError) -> str:
  """'<what> under <path>' and, for a training workdir, the newest intact checkpoint."""
  path = error.filename or FLAGS.workdir or '.'
  message = f'{STORAGE_ERRORS[error.errno]} under {path}'
  from score_sde import checkpoints
  steps = checkpoints.existing_steps(FLAGS.workdir) if FLAGS.workdir else []
  if steps:
    message += f'; the last checkpoint, step {steps[-1]}, is intact'
  return message + ('; free some space and run the same command again.'
                    if error.errno in (errno.ENOSPC, errno.EDQUOT) else
                    '; choose a --workdir you can write to.')


def main(argv):
  if len(argv) < 2 or argv[1] not in COMMANDS:
    given = argv[1] if len(argv) > 1 else '(none)'
    sys.stderr.write(f'error: unknown command {given}; valid commands: {sorted(COMMANDS)} '
                     f'(python launch.py --help describes each).\n')
    sys.exit(2)
  if not FLAGS['verbosity'].present:    # library INFO logs (tfds, orbax) only on request
    logging.set_verbosity(logging.WARNING)
  from score_sde import checkpoints, compile_cache, data, locks, parallel, train
  user_errors = (ValueError, FileNotFoundError, data.DatasetNotFoundError,
                 checkpoints.NoCheckpointError, train.NonFiniteLossError,
                 locks.WorkdirLockedError, FileExistsError)
  try:
    _check_counts()
    _check_names()
    if FLAGS.workdir and os.path.exists(FLAGS.workdir) and not os.path.isdir(FLAGS.workdir):
      raise ValueError(f'--workdir {FLAGS.workdir} is a file; a workdir is a folder (give a '
                       f'new path, or an existing workdir).')
    _check_trained_workdir(argv[1])
    _check_flow_overrides(argv[1], sys.argv)
    _check_pc_only_overrides(argv[1], sys.argv)
    compile_cache.enable(FLAGS.compilation_cache)
    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id, FLAGS.cpu_collectives)
    COMMANDS[argv[1]](argv[2:])
  except user_errors as error:   # a clear message, not a stack trace
    sys.stderr.write(f'error: {error}\n')
    sys.exit(1)
  except OSError as error:
    if error.errno not in STORAGE_ERRORS:
      raise
    sys.stderr.write(f'error: {_storage_error_message(error)}\n')
    sys.exit(1)
  except KeyboardInterrupt:       # Ctrl-C: every file is written atomically
    sys.stderr.write('interrupted: what was written is intact (checkpoints, finished shards); '
                     'run the same command again to resume.\n')
    sys.exit(130)


def _config_arg(argv) -> str | None:
  """The --config value (a file, optionally ':<arg>'), or None."""
  path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if path is None and '--config' in argv and argv.index('--config') + 1 < len(argv):
    path = argv[argv.index('--config') + 1]
  return path


def _missing_config_file(argv) -> str | None:
  """A one-line message when --config names no file (ml_collections would fail late,
  with a stack trace)."""
  path = _config_arg(argv)
  if path is None:
    return None
  file_name = path.partition(':')[0]
  if os.path.isfile(file_name):
    return None
  what = 'a folder, not a config file' if os.path.isdir(file_name) else 'no such file'
  return (f'--config {file_name}: {what}; a config is a Python file with get_config(), '
          f'e.g. --config configs/digits/ddpmpp_continuous.py.')


def _unknown_override(argv) -> str | None:
  """The first --config.<key>=... override naming a key the config does not have."""
  import configs
  path = _config_arg(argv)
  if path is None:
    return None
  file_name, _, arg = path.partition(':')
  config = configs.load(file_name, arg or None)
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    key = arg[len('--config.'):].split('=', 1)[0]
    node = config
    for part in key.split('.'):
      if not hasattr(node, 'keys') or part not in node:
        valid = sorted(node.keys()) if hasattr(node, 'keys') else []
        return (f'unknown config key {key!r} in {arg}; valid keys at that level: {valid}')
      node = node[part]
  return None


def _with_workdir_config(argv):
  """Adds --config=configs/workdir.py:<workdir> when a command on a workdir has no --config."""
  if any(a == '--config' or a.startswith('--config=') for a in argv):
    return argv
  workdir = next((a.split('=', 1)[1] for a in argv if a.startswith('--workdir=')), None)
  if workdir is None and '--workdir' in argv and argv.index('--workdir') + 1 < len(argv):
    workdir = argv[argv.index('--workdir') + 1]
  if workdir is None or not os.path.exists(os.path.join(workdir, 'config.json')):
    return argv
  from score_sde import io
  io.read_config_json(workdir)     # a malformed file stops here, with a one-line message
  here = os.path.dirname(os.path.abspath(__file__))
  config_arg = f'--config={os.path.join(here, "configs", "workdir.py")}:{workdir}'
  return argv[:1] + [config_arg] + argv[1:]   # before any --config.<key> override


def parse_flags(argv):
  """absl flag parsing that names an unknown --config.<key> override."""
  try:
    argv = _with_workdir_config(argv)
  except ValueError as error:
    sys.stderr.write(f'error: {error}\n')
    sys.exit(2)
  missing = _missing_config_file(argv)
  if missing:
    sys.stderr.write(f'error: {missing}\n')
    sys.exit(2)
  try:
    return FLAGS(argv)
  except Exception as error:  # absl / ml_collections raise several types
    message = None
    try:
      message = _unknown_override(argv)
    except Exception:  # noqa: BLE001 -- fall back to the original error
      pass
    if message is None and 'Traceback' in str(error):   # a config file's own error: its last line
      message = str(error).strip().splitlines()[-1]
    sys.stderr.write(f'error: {message or error}\n')
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
