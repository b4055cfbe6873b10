"""From network outputs to scores, with the reference parameterisations.

  VE (continuous): the network is conditioned on sigma(t) and outputs the score
                   (NCSN++ divides by sigma itself when `scale_by_sigma`).
  VE (discrete):   conditioned on the noise index i = round((T - t)(N - 1)),
                   0 = sigma_max (the NCSN ordering).
  VP, sub-VP:      the network predicts the noise eps from the label 999 t
                   (discrete VP: the DDPM timestep t (N - 1)); the score is
                   -eps / std(t) (discrete VP: the std of the DDPM chain).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import sde as sde_lib

# model_fn(params, x, labels, train, key) -> network output
ModelFn = Callable[..., jax.Array]


def get_model_fn(model) -> ModelFn:
  """model_fn(params, x, labels, train=False, key=None) -> raw network output."""

  def model_fn(params, x, labels, train: bool = False, key=None):
    rngs = {'dropout': key} if (train and key is not None) else {}
    return model.apply({'params': params}, x, labels, train=train, rngs=rngs)

  return model_fn


def _labels_shape(t, x):
  t = jnp.asarray(t, jnp.float32)
  return jnp.broadcast_to(t, x.shape[:1]) if t.ndim == 0 else t


def get_score_model_fn(sde, model_fn: ModelFn, continuous: bool = True,
                       learned_variance: bool = False) -> ModelFn:
  """score_model_fn(params, x, t, train=False, key=None) -> score [same shape as x].

  `t` is a continuous time in [0, T], scalar or one per example. With
  `learned_variance` the network returns [eps, v] on the last axis and the
  score uses eps.
  """
  if isinstance(sde, sde_lib.VESDE):
    def score_model_fn(params, x, t, train=False, key=None):
      t = _labels_shape(t, x)
      if continuous:
        labels = sde_lib.transition_coeffs(sde, t)[1]          # sigma(t)
      else:
        labels = jnp.round((sde.T - t) * (sde.N - 1)).astype(jnp.int32)
      return model_fn(params, x, labels, train, key)

    return score_model_fn

  if isinstance(sde, (sde_lib.VPSDE, sde_lib.SubVPSDE)):
    use_discrete_chain = (not continuous) and isinstance(sde, sde_lib.VPSDE)

    def score_model_fn(params, x, t, train=False, key=None):
      t = _labels_shape(t, x)
      if use_discrete_chain:
        labels = t * (sde.N - 1)
        std = jnp.sqrt(1.0 - sde.alphas_cumprod)[labels.astype(jnp.int32)]
      else:
        labels = t * 999
        std = sde_lib.transition_coeffs(sde, t)[1]
      eps = model_fn(params, x, labels, train, key)
      if learned_variance:
        eps = eps[..., :x.shape[-1]]
      return -eps / sde_lib.expand_to(std, eps)

    return score_model_fn

  raise ValueError(f'no score parameterisation for SDE type {type(sde).__name__}; '
                   f'known: VESDE, VPSDE, SubVPSDE.')


def get_score_fn(sde, model, params, train: bool = False, continuous: bool = True,
                 key=None, learned_variance: bool = False):
  """score_fn(x, t) of a network with fixed parameters (samplers, likelihood)."""
  score_model_fn = get_score_model_fn(sde, get_model_fn(model), continuous, learned_variance)
  return lambda x, t: score_model_fn(params, x, t, train, key)


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
