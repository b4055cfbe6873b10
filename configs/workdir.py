"""The config stored by a training run: `--config=configs/workdir.py:<workdir>`.

launch.py uses this when a command gets --workdir but no --config, so that
`--config.sampling.method=ode` style overrides work on a trained run. Plain
json + ml_collections: reading a stored config starts no JAX backend.
"""
import json
import os

import ml_collections


def _tuples(tree):
  if isinstance(tree, dict):
    return {k: _tuples(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return tuple(_tuples(v) for v in tree)
  return tree


def load_stored_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a training run stored in <workdir>/config.json."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{workdir} has no config.json: it is not a score_sde '
                            f'workdir (train into it with launch.py train first).')
  with open(path) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))


def get_config(workdir: str):
  return load_stored_config(workdir)
