"""Experiment configs (ml_collections), one file per experiment with `get_config()`.

See `configs/defaults.py` for the shared keys. `load(path)` imports a config
file by path; `all_config_paths()` lists every experiment config.
"""
import glob
import importlib.util
import os

import ml_collections

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def load(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The config returned by `get_config()` (or `get_config(arg)`) of a file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path!r} does not exist; configs live under '
                            f'{CONFIG_DIR} (e.g. configs/digits/ddpmpp_continuous.py).')
  spec = importlib.util.spec_from_file_location(
      'score_sde_config_' + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def all_config_paths() -> list[str]:
  """Every experiment config file under configs/ (not defaults, not packages)."""
  paths = glob.glob(os.path.join(CONFIG_DIR, '**', '*.py'), recursive=True)
  return sorted(p for p in paths
                if os.path.basename(p) not in ('__init__.py', 'defaults.py', 'workdir.py'))


# Hyper-parameters a network may read from config.model (beyond configs/defaults.py).
MODEL_KEYS = frozenset({
    'attention_type', 'attn_resolutions', 'ch_mult', 'conditional', 'conv_size',
    'embedding_type', 'fir', 'fir_kernel', 'fourier_scale', 'init_scale', 'interpolation',
    'learned_variance', 'nf', 'nonlinearity', 'normalization', 'num_layers',
    'num_res_blocks', 'progressive', 'progressive_combine', 'progressive_input',
    'resamp_with_conv', 'resblock_type', 'scale_by_sigma', 'skip_rescale', 'ema_rate',
    # the noise-conditional Wide-ResNet classifier (models/wideresnet.py)
    'num_classes', 'blocks_per_group', 'depth', 'channel_multiplier', 'base_channels',
    'embedding_size', 'standardize',
    # score_sde_pytorch's RefineNet numerics (models/ncsnv2.py; set by import_checkpoint)
    'refine_mults', 'norm_unbiased_variance', 'resize_align_corners',
    # normalizing flows (models/nice.py, realnvp.py, glow.py; score_sde/flows.py)
    'prior', 'num_couplings', 'hidden_layers', 'hidden_features', 'num_levels', 'num_steps',
    'coupling', 'learn_top',
})
OTHER_KEYS = frozenset({'optim.amsgrad', 'data.category', 'data.dim',
                        'sampling.temperature'})   # flows: latent std when sampling


def _flat_keys(config, prefix=''):
  keys = set()
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys |= _flat_keys(value, f'{prefix}{name}.')
    else:
      keys.add(f'{prefix}{name}')
  return keys


def known_keys() -> frozenset:
  from configs import defaults
  keys = _flat_keys(defaults.base()) | _flat_keys(defaults.toy()) | _flat_keys(defaults.digits())
  return frozenset(keys | {f'model.{k}' for k in MODEL_KEYS} | OTHER_KEYS)


def validate(config) -> None:
  """Raises on a key no part of score_sde reads (a misspelt key would be ignored)."""
  unknown = sorted(_flat_keys(config) - known_keys())
  if unknown:
    raise ValueError(f'unknown config key(s) {unknown}: no part of score_sde reads them. '
                     f'Check the spelling against configs/defaults.py and the model\'s '
                     f'hyper-parameters.')
