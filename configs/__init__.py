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
                if os.path.basename(p) not in ('__init__.py', 'defaults.py'))
