"""Frozen network outputs and gradients, to show that speed work changed no numbers.

  python tests/reference_outputs.py tests/data/reference_outputs.npz

computes, for each case in CASES (a tiny version of a paper config), the
network output for a fixed input, the gradient of <output, r> (r fixed) with
respect to the input, the parameter count, and for every parameter leaf its
gradient's norm and its projections on NUM_PROJECTIONS fixed random unit-scale
directions (so the file stays small: a difference d between two gradients
moves each projection by about |d|, so equal projections within round-off
mean equal gradients within round-off).
tests/test_reference_outputs.py recomputes them with the current code and
compares. The stored file was written by this script at commit 749604a, the
last commit before the performance work of issue 8 (FIR resampling, attention
layout, XLA:CPU flags); the script only uses interfaces that commit has.
"""
from __future__ import annotations

import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_NCSNPP = {'model.nf': 8, 'model.ch_mult': (1, 2), 'model.num_res_blocks': 1,
               'model.attn_resolutions': (8,), 'data.image_size': 16}
# name -> (config file, overrides, train mode (dropout on, fixed key)).
CASES = {
    'ncsnpp_fir_biggan': ('configs/ve/cifar10_ncsnpp_continuous.py',
                          dict(TINY_NCSNPP, **{'model.dropout': 0.0}), False),
    # init_scale 1: the output layers (attention's last NIN among them) start
    # non-zero, so outputs and input gradients depend on every layer.
    'ncsnpp_init_scale_1': ('configs/ve/cifar10_ncsnpp_continuous.py',
                            dict(TINY_NCSNPP, **{'model.dropout': 0.0, 'model.init_scale': 1.0}),
                            False),
    'ncsnpp_dropout_train': ('configs/ve/cifar10_ncsnpp_continuous.py',
                             dict(TINY_NCSNPP, **{'model.dropout': 0.1}), True),
    'ddpmpp': ('configs/vp/cifar10_ddpmpp_continuous.py',
               dict(TINY_NCSNPP, **{'model.dropout': 0.0}), False),
    'ddpm': ('configs/vp/ddpm/cifar10.py',
             {'model.nf': 32, 'model.ch_mult': (1, 2), 'model.num_res_blocks': 1,
              'model.attn_resolutions': (8,), 'data.image_size': 16, 'model.dropout': 0.0},
             False),
}
BATCH = 2
NUM_PROJECTIONS = 4


def projections(leaf_index: int, grad: np.ndarray) -> np.ndarray:
  """[NUM_PROJECTIONS] = R g with R ~ N(0, 1/n) from a seed fixed by the leaf's index."""
  flat = np.ravel(np.asarray(grad, np.float64))
  directions = np.random.default_rng(1000 + leaf_index).normal(
      size=(NUM_PROJECTIONS, flat.size)) / np.sqrt(flat.size)
  return directions @ flat


def load_config(path: str, overrides: dict):
  """The config file at `path` (relative to the repository) with 'section.field' overrides."""
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  import configs
  config = configs.load(os.path.join(ROOT, path))
  for key, value in overrides.items():
    section, field = key.split('.')
    config[section][field] = value
  return config


def compute(name: str, compile_fn=None) -> dict[str, np.ndarray]:
  """Output [B, H, W, C], input gradient, parameter count, per-leaf names, gradient
  norms [L] and projections [L, NUM_PROJECTIONS] (leaves in tree order).

  compile_fn(jitted, *args) -> compiled program, if given, builds the program
  (default: the jitted function itself, compiled by JAX on its first call)."""
  import jax
  import jax.numpy as jnp
  config = load_config(*CASES[name][:2])
  from score_sde import models
  from score_sde import score_fn
  from score_sde.models import utils as model_utils

  path, _, train = CASES[name]
  model = models.get_model(config)
  params = model_utils.init_params(jax.random.PRNGKey(0), model, config)
  model_fn = score_fn.get_model_fn(model)
  shape = model_utils.input_shape(config, BATCH)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32)
  labels = jnp.asarray(rng.uniform(0.1, 0.9, shape[:1]) * (50.0 if 've' in path else 999.0),
                       jnp.float32)
  r = jnp.asarray(rng.normal(size=shape), jnp.float32)
  key = jax.random.PRNGKey(1)

  def objective(params, x):
    out = model_fn(params, x, labels, train=train, key=key)
    return jnp.sum(out * r), out

  program = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))
  if compile_fn is not None:
    program = compile_fn(program, params, x)
  (_, out), (grad_params, grad_x) = program(params, x)
  leaves = jax.tree_util.tree_leaves_with_path(grad_params)
  return {
      'output': np.asarray(out), 'grad_x': np.asarray(grad_x),
      'param_count': np.asarray(model_utils.param_count(params)),
      'leaf_names': np.asarray([jax.tree_util.keystr(p) for p, _ in leaves]),
      'grad_norms': np.asarray([np.linalg.norm(np.asarray(g, np.float64)) for _, g in leaves]),
      'grad_projections': np.stack([projections(i, np.asarray(g))
                                    for i, (_, g) in enumerate(leaves)]),
  }


def main(out_path: str) -> None:
  arrays = {}
  for name in CASES:
    for key, value in compute(name).items():
      arrays[f'{name}:{key}'] = value
  np.savez_compressed(out_path, **arrays)
  print(f'wrote {len(arrays)} arrays to {out_path}')


if __name__ == '__main__':
  main(sys.argv[1])
