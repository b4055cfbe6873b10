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


def param_shapes_in_order(model, config) -> list[tuple[str, tuple[int, ...]]]:
  """[('Module_k/.../name', shape), ...] of the network's parameters in the order
  the modules are created (the forward pass's order), without computing them.

  `jax.eval_shape` returns dicts with sorted keys; the order is read while the
  initialisation is traced, when the parameter dicts are still in creation order.
  """
  order: list = []

  def paths(tree, prefix=''):
    for name, value in tree.items():
      if isinstance(value, dict) or hasattr(value, 'items'):
        yield from paths(value, f'{prefix}{name}/')
      else:
        yield f'{prefix}{name}', tuple(value.shape)

  def init(key):
    params = init_params(key, model, config)
    order.extend(paths(params))
    return params

  jax.eval_shape(init, jax.random.PRNGKey(0))
  return order
