"""Normalizing flows: exact log-likelihood by the change of variables, and sampling.

A flow f (a network of `score_sde.models` with `is_flow`: NICE, RealNVP, Glow)
maps data x to a latent z = f(x) [B, D] with a tractable log |det df/dx|, so

  log p(x) = log p_Z(f(x)) + log |det df/dx|                    (nats, exact)

with a fixed prior p_Z: 'gaussian' (standard normal) or 'logistic' (standard
logistic per dimension, NICE's choice for MNIST). Sampling is x = f^-1(z) with
z = temperature * z0, z0 ~ p_Z (Glow's reduced-temperature sampling for
temperature < 1). Bits/dim follow from log p(x) of the dequantised data exactly
as for the probability-flow ODE (`score_sde.likelihood.bits_per_dim`): no ODE, no
divergence estimator.

The network enters as functions (`models.utils.flow_functions`): forward_fn(params,
x) -> (z, logdet) and inverse_fn(params, z) -> x; this module knows nothing of it.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from score_sde import parallel
from score_sde.sampling import common as sampling_common

PRIORS = ('gaussian', 'logistic')


def check_prior(prior: str) -> str:
  prior = str(prior).lower()
  if prior not in PRIORS:
    raise ValueError(f'unknown flow prior {prior!r} (config.model.prior); valid: '
                     f'{list(PRIORS)}.')
  return prior


def prior_log_prob(z: jax.Array, prior: str = 'gaussian') -> jax.Array:
  """log p_Z(z) [B] of z [B, D] (nats), summed over D."""
  prior = check_prior(prior)
  if prior == 'gaussian':
    per_dim = -0.5 * (z ** 2 + math.log(2.0 * math.pi))
  else:
    per_dim = -(jax.nn.softplus(z) + jax.nn.softplus(-z))
  return jnp.sum(per_dim, axis=-1)


def prior_sample(key, shape: tuple[int, ...], prior: str = 'gaussian') -> jax.Array:
  """z [shape] from the prior."""
  prior = check_prior(prior)
  if prior == 'gaussian':
    return jax.random.normal(key, shape, jnp.float32)
  return jax.random.logistic(key, shape, jnp.float32)


def get_log_prob_fn(forward_fn: Callable, prior: str = 'gaussian') -> Callable:
  """log_prob(params, x [B, ...], dropout_key=None) -> (log p(x) [B] nats, z [B, D]) of
  a flow whose forward_fn(params, x, dropout_key) gives (z [B, D], log |det dz/dx| [B]).
  With a dropout key (training) the density is that of the flow with its coupling
  networks' dropout masks drawn from the key."""
  prior = check_prior(prior)

  def log_prob(params, x, dropout_key=None):
    z, logdet = forward_fn(params, x, dropout_key)
    return prior_log_prob(z, prior) + logdet, z

  return log_prob


def get_sampler(inverse_fn: Callable, latent_dim: int, num_samples: int, *,
                prior: str = 'gaussian', temperature: float = 1.0, precision: str = 'highest',
                mesh=None) -> Callable:
  """Jitted sampler(key, params) -> (x [n, ...] in model space, info {'nfe': 1}).

  inverse_fn(params, z [n, latent_dim]) -> x maps latents to data. Example i's
  latent comes from fold_in(key, i), so a sample does not depend on
  the batch size or the device count; with a mesh the batch is sharded over its
  'data' axis. info['nfe'] counts network passes (one inverse). The inverse is traced
  at matmul `precision` ('highest' by default, as the likelihood: the samples come
  from the same map whose bits/dim are reported, on every backend).
  """
  prior = check_prior(prior)
  inverse_at_precision = _at_precision(inverse_fn, precision)
  temperature = float(temperature)
  if not (math.isfinite(temperature) and temperature > 0):
    raise ValueError(f'temperature must be > 0 (config.sampling.temperature); got '
                     f'{temperature}.')
  dim = int(latent_dim)
  if mesh is not None:
    parallel.check_batch_divisible(num_samples, mesh, 'number of samples')

  def sampler(key, params):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_samples))
    z = temperature * jax.vmap(lambda k: prior_sample(k, (dim,), prior))(keys)
    if mesh is not None:
      z = jax.lax.with_sharding_constraint(z, parallel.batch_sharding(mesh))
    return inverse_at_precision(params, z), {'nfe': jnp.asarray(1, jnp.int32)}

  if mesh is None:
    return jax.jit(sampler)
  return jax.jit(sampler, in_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
                 out_shardings=(parallel.batch_sharding(mesh), parallel.replicated(mesh)))


def get_likelihood_fn(log_prob_fn: Callable, *, precision: str = 'highest',
                      mesh=None) -> Callable:
  """Jitted likelihood_fn(key, params, x) -> (log p [B] nats, z [B, D], info), the
  signature of `score_sde.likelihood.get_likelihood_fn` (the key is unused: the
  density is exact). info: nfe 1 (one forward pass) and nfe_per_example [B].
  Traced at matmul `precision` ('highest': full float32 on every backend).
  """
  log_prob_at_precision = _at_precision(log_prob_fn, precision)

  def likelihood_fn(key, params, x):
    del key
    if mesh is not None:
      parallel.check_batch_divisible(x.shape[0], mesh)
    logp, z = log_prob_at_precision(params, x)
    ones = jnp.ones(x.shape[:1], jnp.int32)
    return logp, z, {'nfe': jnp.asarray(1, jnp.int32), 'nfe_per_example': ones}

  if mesh is None:
    return jax.jit(likelihood_fn)
  rep, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(likelihood_fn, in_shardings=(rep, rep, batch),
                 out_shardings=(batch, batch, rep))


def _at_precision(fn: Callable, precision: str) -> Callable:
  """fn traced at matmul `precision`."""
  precision = sampling_common.check_precision(precision)

  def traced(*args):
    with sampling_common.matmul_precision(precision):
      return fn(*args)

  return traced


def get_inverse_fn(inverse_fn: Callable, *, precision: str = 'highest') -> Callable:
  """Jitted decode(params, z [B, D]) -> x, traced at matmul `precision`."""
  return jax.jit(_at_precision(inverse_fn, precision))
