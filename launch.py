"""score_sde command line: python launch.py <command> --config <file> [--workdir <dir>] ...

Commands
  train         train a score model (resumes from the newest checkpoint in --workdir)
  describe      parameter count and forward-pass shapes of a config (no training)
  noise_scales  NCSNv2 noise scales (sigma_max, gamma, number of scales, step size)
                for a config's training data

Configs are ml_collections files; override any key on the command line, e.g.
  --config.training.batch_size=64 --config.model.nf=32
An override of a key that does not exist fails with the key's name.
"""
from __future__ import annotations

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/...).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Experiment directory (checkpoints, samples, logs).')
flags.DEFINE_bool('exact', False, 'noise_scales: exact sigma_max even for large datasets.')
flags.DEFINE_integer('n_steps_each', 5, 'noise_scales: Langevin steps per noise scale.')
flags.DEFINE_integer('max_examples', 0, 'noise_scales: use at most this many examples (0: all).')

FLAGS = flags.FLAGS


def _require_config():
  if FLAGS.config is None:
    raise app.UsageError('this command needs --config=<config file>, e.g. '
                         '--config=configs/digits/ddpmpp_continuous.py')
  return FLAGS.config


def cmd_describe(argv):
  del argv
  from score_sde import describe
  print(describe.describe_json(_require_config()))


def cmd_noise_scales(argv):
  del argv
  from score_sde import data
  from score_sde import noise_scales
  config = _require_config()
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


def cmd_train(argv):
  del argv
  from score_sde import train
  if FLAGS.workdir is None:
    raise app.UsageError('train needs --workdir=<directory>.')
  train.train_and_evaluate(_require_config(), FLAGS.workdir)


COMMANDS = {
    'train': cmd_train,
    'describe': cmd_describe,
    'noise_scales': cmd_noise_scales,
}


def main(argv):
  if len(argv) < 2 or argv[1] not in COMMANDS:
    given = argv[1] if len(argv) > 1 else '(none)'
    raise app.UsageError(f'unknown command {given}; valid commands: {sorted(COMMANDS)}.\n'
                         + __doc__)
  from score_sde import checkpoints, data, train
  user_errors = (ValueError, FileNotFoundError, data.DatasetNotFoundError,
                 checkpoints.NoCheckpointError, train.NonFiniteLossError)
  try:
    COMMANDS[argv[1]](argv[2:])
  except user_errors as error:   # a clear message, not a stack trace
    sys.stderr.write(f'error: {error}\n')
    sys.exit(1)


def _unknown_override(argv) -> str | None:
  """The first --config.<key>=... override naming a key the config does not have."""
  import configs
  path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if path is None and '--config' in argv:
    path = argv[argv.index('--config') + 1]
  if path is None:
    return None
  config = configs.load(path.split(':')[0])
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


def parse_flags(argv):
  """absl flag parsing that names an unknown --config.<key> override."""
  try:
    return FLAGS(argv)
  except Exception as error:  # absl / ml_collections raise several types
    message = None
    try:
      message = _unknown_override(argv)
    except Exception:  # noqa: BLE001 -- fall back to the original error
      pass
    sys.stderr.write(f'error: {message or error}\n')
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
