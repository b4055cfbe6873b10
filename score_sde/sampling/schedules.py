"""Time grids of the few-step samplers, for any SDE of the `score_sde.sde` interface.

Every SDE here has Gaussian transitions x_t = m(t) x_0 + s(t) z. Two functions
of t describe them for the samplers:

  sigma(t)  = s(t) / m(t)           EDM's noise level of the scaled x / m(t)
  lambda(t) = log(m(t) / s(t))      the half log-SNR of DPM-Solver, = -log sigma(t)

Both are monotone (sigma increases with t), so a grid chosen in sigma or lambda
maps to times by inverting lambda(t) on [eps, T] by bisection: no SDE needs a
closed-form inverse.

Schedules (`time_schedule`), K = num_steps intervals, grid t_0 = T > ... > t_K = eps:

  'karras'  sigma_i = (sigma_hi^(1/rho) + i / K (sigma_lo^(1/rho) - sigma_hi^(1/rho)))^rho
            (Karras et al. 2022, eq. 5)
  'logsnr'  lambda uniform from -log sigma_hi to -log sigma_lo (Lu et al. 2022)
  'time'    t uniform from t(sigma_hi) to t(sigma_lo)

with sigma_hi = min(sigma(T), grid_sigma_max) and sigma_lo = max(sigma(eps),
grid_sigma_min); then the first point is moved to T and the last to eps. So the
grid always spans [eps, T], and its interior noise levels stay within EDM's range
[0.002, 80] by default: the cosine VP (sigma(T) = 6024) and sub-VP (sigma(eps) =
1e-4) would otherwise spend steps where the data prediction does not change.
Where the SDE's own range lies inside [grid_sigma_min, grid_sigma_max] (the digits
and CIFAR-10 VE configs, VP at its bottom end) the grid is the plain one.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from score_sde import sde as sde_lib

SCHEDULES = ('karras', 'logsnr', 'time')
BISECTION_STEPS = 40      # halves [eps, T] below float32 resolution
GRID_SIGMA_MIN = 0.002    # EDM's noise-level range (Karras et al. 2022, Table 1)
GRID_SIGMA_MAX = 80.0


class Grid(NamedTuple):
  """How the few-step samplers place their time steps (options of the same names)."""
  time_schedule: str = 'logsnr'
  rho: float = 7.0
  grid_sigma_min: float = GRID_SIGMA_MIN
  grid_sigma_max: float = GRID_SIGMA_MAX


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


def time_grid(sde, num_steps: int, eps: float, grid: Grid = Grid()) -> jax.Array:
  """[num_steps + 1] times from T down to eps (float32; the ends exact)."""
  fractions = jnp.linspace(0.0, 1.0, num_steps + 1)
  lam_top, lam_bottom = log_snr(sde, sde.T), log_snr(sde, eps)
  lam_start = jnp.clip(-math.log(grid.grid_sigma_max), lam_top, lam_bottom)
  lam_end = jnp.clip(-math.log(grid.grid_sigma_min) if grid.grid_sigma_min > 0 else math.inf,
                     lam_top, lam_bottom)
  if grid.time_schedule == 'time':
    start = jnp.where(lam_start > lam_top, time_of_log_snr(sde, lam_start, eps, sde.T), sde.T)
    end = jnp.where(lam_end < lam_bottom, time_of_log_snr(sde, lam_end, eps, sde.T), eps)
    times = start + fractions * (end - start)
  else:
    if grid.time_schedule == 'logsnr':
      lam = lam_start + fractions * (lam_end - lam_start)
    elif grid.time_schedule == 'karras':
      rho = grid.rho
      start, end = jnp.exp(-lam_start / rho), jnp.exp(-lam_end / rho)
      lam = -rho * jnp.log(start + fractions * (end - start))
    else:
      raise ValueError(f'unknown time_schedule {grid.time_schedule!r}; '
                       f'valid: {list(SCHEDULES)}.')
    times = time_of_log_snr(sde, lam, eps, sde.T)
  return times.at[0].set(sde.T).at[-1].set(eps)


def top_is_clipped(sde, grid: Grid) -> bool:
  """Whether sigma(T) lies above grid_sigma_max (the grid's first step is then longer)."""
  with jax.ensure_compile_time_eval():
    return bool(edm_sigma(sde, sde.T) > grid.grid_sigma_max)


def check_grid(sde, opts: dict) -> dict:
  """opts with time_schedule, rho, grid_sigma_min / max validated (eps already checked)
  and gathered into one `Grid`, opts['grid'], the samplers' argument."""
  schedule = str(opts['time_schedule']).lower()
  if schedule not in SCHEDULES:
    raise ValueError(f'unknown time_schedule {schedule!r}; valid: {list(SCHEDULES)}.')
  rho = float(opts['rho'])
  if not rho > 0:
    raise ValueError(f'rho (the Karras schedule exponent) must be > 0; got {rho}.')
  low, high = float(opts['grid_sigma_min']), float(opts['grid_sigma_max'])
  if not 0 <= low < high:
    raise ValueError(f'grid_sigma_min / grid_sigma_max must satisfy 0 <= min < max; got '
                     f'{opts["grid_sigma_min"]!r} / {opts["grid_sigma_max"]!r}.')
  sigma_top = float(edm_sigma(sde, sde.T))
  sigma_bottom = float(edm_sigma(sde, opts['eps']))
  if low >= sigma_top or high <= sigma_bottom:
    raise ValueError(f'the grid noise levels [grid_sigma_min, grid_sigma_max] = [{low:g}, '
                     f'{high:g}] miss this SDE\'s range [sigma(eps), sigma(T)] = '
                     f'[{sigma_bottom:.3g}, {sigma_top:.3g}]; choose an overlapping range '
                     f'(defaults {GRID_SIGMA_MIN:g}, {GRID_SIGMA_MAX:g}).')
  opts = {name: value for name, value in opts.items() if name not in Grid._fields}
  return {**opts, 'grid': Grid(schedule, rho, low, high)}

