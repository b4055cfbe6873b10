"""Model-side helpers: input shapes, parameter initialisation and counts.

Turning a network's output into a score is `score_sde/score_fn.py`.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import models


def input_shape(config, batch_size: int = 1) -> tuple[int, ...]:
  """[B, H, W, C] of the config's data (or [B, D] for vector data)."""
  data = config.data
  if data.get('dim', 0):
    return (batch_size, data.dim)
  return (batch_size, data.image_size, data.image_size, data.num_channels)


def init_params(key, model, config, batch_size: int = 1, batch=None):
  """Initial parameters of `model` for the config's input shape.

  A normalizing flow (`models.is_flow`) is initialised by a forward pass over
  `batch` [B, H, W, C]: its ActNorm layers take their data-dependent initial values
  from it. Without a batch it runs over standard normal pseudo-data drawn from
  `key`: right shapes (what `jax.eval_shape` and a restore need), values that are
  no training start (train.py passes `experiment.flow_init_batch`).
  """
  shape = input_shape(config, batch_size)
  if models.is_flow(config.model.name):
    k_data, k_init = jax.random.split(key)
    x = (jax.random.normal(k_data, shape, jnp.float32) if batch is None
         else jnp.asarray(batch, jnp.float32))
    return model.init({'params': k_init}, x, method='forward')['params']
  x = jnp.zeros(shape, jnp.float32)
  labels = jnp.ones(shape[:1], jnp.float32)
  variables = model.init({'params': key, 'dropout': key}, x, labels, train=False)
  return variables['params']


class FlowFunctions(NamedTuple):
  """A normalizing flow as the functions `score_sde.flows` takes."""
  forward: Callable      # (params, x [B, H, W, C], dropout_key=None) -> (z [B, D],
                         #   log |det dz/dx| [B]); dropout only with a key (training)
  inverse: Callable      # (params, z [B, D]) -> x [B, H, W, C]
  latent_dim: int        # D


def flow_functions(model) -> FlowFunctions:
  """The forward and inverse maps and latent size of a flow network (models.FLOW_MODELS)."""
  def forward_fn(params, x, dropout_key=None):
    rngs = {} if dropout_key is None else {'dropout': dropout_key}
    return model.apply({'params': params}, x, method='forward', rngs=rngs)

  def inverse_fn(params, z):
    return model.apply({'params': params}, z, method='inverse')

  latent_dim = int(sum(np.prod(s) for s in model.latent_shapes()))
  return FlowFunctions(forward_fn, inverse_fn, latent_dim)


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
