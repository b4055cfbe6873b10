"""Model-side helpers: input shapes, parameter initialisation and counts.

Turning a network's output into a score is `score_sde/score_fn.py`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def input_shape(config, batch_size: int = 1) -> tuple[int, ...]:
  """[B, H, W, C] of the config's data (or [B, D] for vector data)."""
  data = config.data
  if data.get('dim', 0):
    return (batch_size, data.dim)
  return (batch_size, data.image_size, data.image_size, data.num_channels)


def init_params(key, model, config, batch_size: int = 1):
  """Initial parameters of `model` for the config's input shape."""
  shape = input_shape(config, batch_size)
  x = jnp.zeros(shape, jnp.float32)
  labels = jnp.ones(shape[:1], jnp.float32)
  variables = model.init({'params': key, 'dropout': key}, x, labels, train=False)
  return variables['params']


def param_count(params) -> int:
  """Total number of scalars in a parameter pytree."""
  return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
