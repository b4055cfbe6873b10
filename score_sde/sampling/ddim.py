"""DDIM (`method='ddim'`) for any SDE with Gaussian transitions x_t = m(t) x_0 + s(t) z.

With eps_hat = -s_t score and x0_hat = (x + s_t^2 score) / m_t, a step t -> t' is

  x' = m_t' x0_hat + sqrt(s_t'^2 - sigma^2) eps_hat + sigma z,
  sigma = eta sqrt(s_t'^2 / s_t^2 (s_t^2 - (m_t / m_t')^2 s_t'^2)),

the posterior q(x_t' | x_t, x0_hat) at eta = 1 and deterministic at eta = 0;
for VP (s^2 = 1 - m^2) this is Song, Meng & Ermon (2021), eq. 12.
`noise_removal` is one Tweedie step at eps (one more score evaluation).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from score_sde import sde as sde_lib
from score_sde.sampling import common
from score_sde.sampling.common import Info, ScoreFn


def ddim_sampler(key, score_fn: ScoreFn, sde, shape, *, ddim_eta=0.0, num_steps=0,
                 noise_removal=True, eps=1e-3,
                 constrain=common.identity) -> tuple[jax.Array, Info]:
  """DDIM from T to eps in num_steps steps (0: sde.N) on linspace(T, eps, num_steps + 1)."""
  num_steps = num_steps or sde.N
  batch, example_shape = shape[0], tuple(shape[1:])
  keys = common.example_keys(key, batch)
  x = constrain(common.prior_sample(sde, common.fold_keys(keys, 0), shape))
  common.check_score_shape(score_fn, x)
  times = jnp.linspace(sde.T, eps, num_steps + 1)

  def step(x, inputs):
    index, t, t_next = inputs
    mean_coeff, std = sde_lib.transition_coeffs(sde, t)
    next_mean_coeff, next_std = sde_lib.transition_coeffs(sde, t_next)
    score = score_fn(x, common.batch_times(t, x))
    eps_hat = -std * score
    x0_hat = (x + std ** 2 * score) / mean_coeff
    ratio = mean_coeff / next_mean_coeff
    post_var = next_std ** 2 / std ** 2 * (std ** 2 - ratio ** 2 * next_std ** 2)
    sigma = ddim_eta * jnp.sqrt(jnp.maximum(post_var, 0.0))
    noise = common.example_normal(common.fold_keys(keys, index + 1), example_shape, x.dtype)
    direction = jnp.sqrt(jnp.maximum(next_std ** 2 - sigma ** 2, 0.0))
    return next_mean_coeff * x0_hat + direction * eps_hat + sigma * noise, None

  x, _ = jax.lax.scan(step, x, (jnp.arange(num_steps), times[:-1], times[1:]))
  nfe = num_steps
  if noise_removal:
    x = common.tweedie_denoise(sde, score_fn, x, eps)
    nfe += 1
  return x, {'nfe': jnp.asarray(nfe, jnp.int32)}


def check_options(sde, opts: dict) -> dict:
  """The DDIM options, validated."""
  del sde
  eta = float(opts['ddim_eta'])
  if not (math.isfinite(eta) and eta >= 0):
    raise ValueError(f'ddim_eta must be >= 0; got {eta}.')
  opts['ddim_eta'] = eta
  return opts
