"""Time grids of the few-step samplers, for any SDE of the `score_sde.sde` interface.

Every SDE here has Gaussian transitions x_t = m(t) x_0 + s(t) z. Two functions
of t describe them for the samplers:

  sigma(t)  = s(t) / m(t)           EDM's noise level of the scaled x / m(t)
  lambda(t) = log(m(t) / s(t))      the half log-SNR of DPM-Solver, = -log sigma(t)

Both are monotone (sigma increases with t), so a grid chosen in sigma or lambda
maps to times by inverting lambda(t) on [eps, T] by bisection: no SDE needs a
closed-form inverse.

Schedules (`time_schedule`), K = num_steps intervals, grid t_0 = T > ... > t_K = eps:

  'karras'  sigma_i = (sigma_max^(1/rho) + i / K (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
            with sigma_max = sigma(T), sigma_min = sigma(eps) (Karras et al. 2022, eq. 5)
  'logsnr'  lambda uniform from lambda(T) to lambda(eps) (Lu et al. 2022)
  'time'    t uniform from T to eps (the grid of DDIM and the Euler ODE here)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from score_sde import sde as sde_lib

SCHEDULES = ('karras', 'logsnr', 'time')
BISECTION_STEPS = 40      # halves [eps, T] below float32 resolution


def log_snr(sde, t) -> jax.Array:
  """lambda(t) = log m(t) - log s(t), with the shape of t."""
  mean_coeff, std = sde_lib.transition_coeffs(sde, t)
  return jnp.log(mean_coeff) - jnp.log(std)


def edm_sigma(sde, t) -> jax.Array:
  """sigma(t) = s(t) / m(t), with the shape of t."""
  mean_coeff, std = sde_lib.transition_coeffs(sde, t)
  return std / mean_coeff


def time_of_log_snr(sde, lam, t_min: float, t_max: float) -> jax.Array:
  """t in [t_min, t_max] with lambda(t) = lam (elementwise; clipped to the interval)."""
  lam = jnp.asarray(lam, jnp.float32)
  low = jnp.full(lam.shape, t_min, jnp.float32)
  high = jnp.full(lam.shape, t_max, jnp.float32)

  def halve(_, bounds):
    low, high = bounds
    mid = 0.5 * (low + high)
    above = log_snr(sde, mid) > lam          # lambda decreases in t: the root lies later
    return jnp.where(above, mid, low), jnp.where(above, high, mid)

  low, high = jax.lax.fori_loop(0, BISECTION_STEPS, halve, (low, high))
  return 0.5 * (low + high)


def time_grid(sde, num_steps: int, eps: float, schedule: str = 'karras',
              rho: float = 7.0) -> jax.Array:
  """[num_steps + 1] times from T down to eps (float32; the ends exact)."""
  fractions = jnp.linspace(0.0, 1.0, num_steps + 1)
  if schedule == 'time':
    times = sde.T + fractions * (eps - sde.T)
  else:
    lam_start, lam_end = log_snr(sde, sde.T), log_snr(sde, eps)
    if schedule == 'logsnr':
      lam = lam_start + fractions * (lam_end - lam_start)
    elif schedule == 'karras':
      start, end = jnp.exp(-lam_start / rho), jnp.exp(-lam_end / rho)
      lam = -rho * jnp.log(start + fractions * (end - start))
    else:
      raise ValueError(f'unknown time_schedule {schedule!r}; valid: {list(SCHEDULES)}.')
    times = time_of_log_snr(sde, lam, eps, sde.T)
  return times.at[0].set(sde.T).at[-1].set(eps)


def check_schedule(schedule: str, rho) -> tuple[str, float]:
  """(schedule, rho) validated."""
  schedule = str(schedule).lower()
  if schedule not in SCHEDULES:
    raise ValueError(f'unknown time_schedule {schedule!r}; valid: {list(SCHEDULES)}.')
  rho = float(rho)
  if not rho > 0:
    raise ValueError(f'rho (the Karras schedule exponent) must be > 0; got {rho}.')
  return schedule, rho
