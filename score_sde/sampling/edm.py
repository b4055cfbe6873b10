"""EDM's samplers (Karras et al. 2022, Algorithms 1 and 2) for any SDE:
`method='heun'` (deterministic) and `method='edm'` (stochastic churn).

EDM writes the probability-flow ODE in the scaled variable y = x / m(t) and the
noise level sigma = s(t) / m(t) (`schedules.edm_sigma`):

  dy / dsigma = (y - D(y, sigma)) / sigma,

with the data prediction D = E[x_0 | x_t] = (x + s(t)^2 score(x, t)) / m(t)
(Tweedie). This holds for every SDE with Gaussian transitions x_t = m x_0 + s z,
so VE (m = 1), VP, sub-VP and the cosine VP all run the same code; the network
is evaluated at the time t(sigma) (bisection of the log-SNR).

A step sigma_i -> sigma_{i+1} (the grid of `schedules.time_grid`, default uniform log-SNR):
  churn (edm only): gamma = min(S_churn / K, sqrt(2) - 1) if S_tmin <= sigma_i <= S_tmax,
                    sigma_hat = min(sigma_i (1 + gamma), sigma(T)),
                    y_hat = y + sqrt(sigma_hat^2 - sigma_i^2) S_noise z
  Euler:            d = (y_hat - D(y_hat, sigma_hat)) / sigma_hat,  y' = y_hat + (sigma_{i+1} - sigma_hat) d
  Heun correction:  y_{i+1} = y_hat + (sigma_{i+1} - sigma_hat) (d + d') / 2,  d' at (y', sigma_{i+1})

EDM's last step (to sigma = 0) is an Euler step, y = D(y, sigma_min): that is
`noise_removal` here (one Tweedie step at eps). So num_steps = K Heun steps from
T to eps cost 2 K + 1 score evaluations (EDM's "18 steps, 35 NFE" is K = 17).
sigma_hat is capped at sigma(T) because the networks are trained on [eps, T].

EDM starts at sigma_max = 80 from N(0, 80^2). Here the prior is at T, and where
sigma(T) lies above grid_sigma_max (VP 152, cosine VP 6024) the first step runs from
sigma(T) down to the grid's first level inside [grid_sigma_min, grid_sigma_max]; it
is an Euler step (exact while D stays constant up there), one evaluation, 2 K in all:
Heun's trapezoid would weigh the slope at its end over the whole, much longer, step
(measured on the cosine VP mixture at 18-19 evaluations: -3.1 nats against -11.1
with an unclipped grid and -26 with a Heun first step).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from score_sde import sde as sde_lib
from score_sde.sampling import common
from score_sde.sampling import schedules
from score_sde.sampling.common import Info, ScoreFn


def churn_times(sde, times, s_churn: float, s_tmin: float, s_tmax: float) -> jax.Array:
  """[K] times t_hat_i >= t_i at the raised noise levels sigma_hat_i of EDM's churn."""
  num_steps = times.shape[0] - 1
  sigma = schedules.edm_sigma(sde, times[:-1])
  gamma = jnp.where((sigma >= s_tmin) & (sigma <= s_tmax),
                    min(s_churn / num_steps, math.sqrt(2.0) - 1.0), 0.0)
  sigma_hat = jnp.minimum(sigma * (1.0 + gamma), schedules.edm_sigma(sde, sde.T))
  raised = schedules.time_of_log_snr(sde, -jnp.log(sigma_hat), times[-1], sde.T)
  return jnp.where(gamma > 0, jnp.maximum(raised, times[:-1]), times[:-1])


def _heun_sampler(key, score_fn: ScoreFn, sde, shape, *, churn: bool, num_steps: int,
                  grid: schedules.Grid, s_churn: float, s_tmin: float,
                  s_tmax: float, s_noise: float, noise_removal: bool, eps: float,
                  constrain) -> tuple[jax.Array, Info]:
  num_steps = num_steps or sde.N
  batch, example_shape = shape[0], tuple(shape[1:])
  keys = common.example_keys(key, batch)
  x = constrain(common.prior_sample(sde, common.fold_keys(keys, 0), shape))
  common.check_score_shape(score_fn, x)
  times = schedules.time_grid(sde, num_steps, eps, grid)
  raised = (churn_times(sde, times, s_churn, s_tmin, s_tmax) if churn else times[:-1])

  def slope(y, t):
    """(y - D) / sigma at time t (for y = x / m(t))."""
    mean_coeff, std = sde_lib.transition_coeffs(sde, t)
    denoised = common.tweedie_denoise(sde, score_fn, mean_coeff * y, t)
    return (y - denoised) / (std / mean_coeff)

  def step(x, inputs, heun=True):
    index, t, t_hat, t_next = inputs
    mean_coeff = sde_lib.transition_coeffs(sde, t)[0]
    y = x / mean_coeff
    sigma, sigma_hat, sigma_next = (schedules.edm_sigma(sde, u) for u in (t, t_hat, t_next))
    if churn:
      noise = common.example_normal(common.fold_keys(keys, index + 1), example_shape, x.dtype)
      y = y + jnp.sqrt(jnp.maximum(sigma_hat ** 2 - sigma ** 2, 0.0)) * s_noise * noise
    d = slope(y, t_hat)
    y_next = y + (sigma_next - sigma_hat) * d
    if heun:
      y_next = y + (sigma_next - sigma_hat) * 0.5 * (d + slope(y_next, t_next))
    return sde_lib.transition_coeffs(sde, t_next)[0] * y_next, None

  inputs = (jnp.arange(num_steps), times[:-1], raised, times[1:])
  nfe = 2 * num_steps
  if schedules.top_is_clipped(sde, grid) and num_steps > 1:
    # sigma(T) > grid_sigma_max: an Euler first step (module docstring).
    x, _ = step(x, jax.tree.map(lambda a: a[0], inputs), heun=False)
    inputs = jax.tree.map(lambda a: a[1:], inputs)
    nfe -= 1
  x, _ = jax.lax.scan(step, x, inputs)
  if noise_removal:
    x = common.tweedie_denoise(sde, score_fn, x, eps)
    nfe += 1
  return x, {'nfe': jnp.asarray(nfe, jnp.int32)}


def heun_sampler(key, score_fn: ScoreFn, sde, shape, *, num_steps=0,
                 grid=schedules.Grid(), noise_removal=True, eps=1e-3,
                 constrain=common.identity) -> tuple[jax.Array, Info]:
  """EDM's deterministic Heun sampler: K = num_steps steps, 2 K (+1) evaluations (one
  fewer where sigma(T) > grid_sigma_max and K > 1: an Euler first step)."""
  return _heun_sampler(key, score_fn, sde, shape, churn=False, num_steps=num_steps,
                       grid=grid, s_churn=0.0, s_tmin=0.0,
                       s_tmax=0.0, s_noise=1.0, noise_removal=noise_removal, eps=eps,
                       constrain=constrain)


def edm_sampler(key, score_fn: ScoreFn, sde, shape, *, num_steps=0, grid=schedules.Grid(),
                s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003,
                noise_removal=True, eps=1e-3,
                constrain=common.identity) -> tuple[jax.Array, Info]:
  """EDM's stochastic sampler (churn, then a Heun step): 2 K (+1) evaluations (one
  fewer where sigma(T) > grid_sigma_max and K > 1: an Euler first step)."""
  return _heun_sampler(key, score_fn, sde, shape, churn=True, num_steps=num_steps,
                       grid=grid, s_churn=s_churn, s_tmin=s_tmin,
                       s_tmax=s_tmax, s_noise=s_noise, noise_removal=noise_removal, eps=eps,
                       constrain=constrain)


def check_heun_options(sde, opts: dict) -> dict:
  """Options of 'heun', validated."""
  return schedules.check_grid(sde, opts)


def check_edm_options(sde, opts: dict) -> dict:
  """Options of 'edm', validated."""
  opts = check_heun_options(sde, opts)
  for name in ('s_churn', 's_tmin', 's_tmax', 's_noise'):
    value = float(opts[name])
    if not (math.isfinite(value) or (name == 's_tmax' and value == math.inf)) or value < 0:
      raise ValueError(f'{name} must be a number >= 0; got {opts[name]!r}.')
    opts[name] = value
  if opts['s_tmin'] > opts['s_tmax']:
    raise ValueError(f"s_tmin must not exceed s_tmax; got {opts['s_tmin']} > {opts['s_tmax']}.")
  return opts
