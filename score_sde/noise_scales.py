"""NCSNv2 noise-scale selection (Song & Ermon 2020, techniques 1, 2 and 4).

  1. sigma_1 (sigma_max) = the largest pairwise Euclidean distance of the
     training data.
  2. Geometric sigmas with ratio gamma = sigma_{i-1} / sigma_i solving
        Phi(sqrt(2D)(gamma - 1) + 3 gamma) - Phi(sqrt(2D)(gamma - 1) - 3 gamma) = 0.5
     for data dimension D; as many scales as it takes to reach sigma_min.
  4. Langevin step size eps (alpha_i = eps sigma_i^2 / sigma_L^2) with T steps
     per scale, chosen so that the variance ratio after T steps,
        (1 - a)^(2T) (gamma^2 - 2 / (2 - a)) + 2 / (2 - a),  a = eps / sigma_L^2,
     is as close to 1 as possible (Proposition 3 of the paper, simplified; the
     ratio need not reach 1 exactly: e.g. 1.055 for the CIFAR-10 settings).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import scipy.optimize
import scipy.stats

EXACT_DIAMETER_MAX_POINTS = 20000


@dataclasses.dataclass(frozen=True)
class Diameter:
  """Largest pairwise distance of a point set, exact or bracketed.

  estimate: the reported value (a distance between two data points, so never
    an overestimate); lower <= true diameter <= upper.
  """
  estimate: float
  lower: float
  upper: float
  exact: bool


def _max_distance_to_set(points: np.ndarray, block: np.ndarray,
                         sq_norms: np.ndarray) -> float:
  """max over a in block, b in points of ||a - b|| (blocked Gram-matrix form)."""
  block_sq = np.sum(block ** 2, axis=1)
  d2 = block_sq[:, None] + sq_norms[None, :] - 2.0 * block @ points.T
  return float(np.sqrt(max(d2.max(), 0.0)))


def data_diameter(data, *, exact: bool | None = None, num_sweeps: int = 8,
                  seed: int = 0, block_size: int = 1024) -> Diameter:
  """The largest pairwise Euclidean distance of `data` [n, ...] (flattened).

  Exact (O(n^2 D), blocked, float64) when n <= EXACT_DIAMETER_MAX_POINTS or
  `exact=True`. Otherwise a bounded approximation: repeated double sweeps
  (from a random point, go to the farthest point, then to the farthest from
  that) give distances between actual data points, a lower bound; the upper
  bound is 2 max_i ||x_i - mean|| (triangle inequality). Both are returned.
  """
  x = np.asarray(data, np.float64).reshape(len(data), -1)
  n = x.shape[0]
  if n < 2:
    raise ValueError(f'need at least two data points to measure a diameter; got {n}.')
  if exact is None:
    exact = n <= EXACT_DIAMETER_MAX_POINTS
  if exact:
    sq_norms = np.sum(x ** 2, axis=1)
    best = max(_max_distance_to_set(x, x[i:i + block_size], sq_norms)
               for i in range(0, n, block_size))
    return Diameter(best, best, best, True)
  rng = np.random.default_rng(seed)
  lower = 0.0
  for _ in range(num_sweeps):
    a = x[rng.integers(n)]
    for _ in range(2):
      dist = np.linalg.norm(x - a, axis=1)
      far = int(np.argmax(dist))
      lower = max(lower, float(dist[far]))
      a = x[far]
  upper = 2.0 * float(np.max(np.linalg.norm(x - x.mean(axis=0), axis=1)))
  return Diameter(lower, lower, max(upper, lower), False)


def _gamma_equation(gamma: float, dim: int) -> float:
  c = math.sqrt(2.0 * dim) * (gamma - 1.0)
  return (scipy.stats.norm.cdf(c + 3.0 * gamma) - scipy.stats.norm.cdf(c - 3.0 * gamma)
          - 0.5)


def geometric_ratio(dim: int) -> float:
  """gamma > 1 solving the technique-2 equation for data dimension `dim`."""
  if int(dim) != dim or dim < 1:
    raise ValueError(f'data dimension must be a positive integer; got {dim}.')
  if 2 * dim <= 9:
    raise ValueError(f'the technique-2 equation has no solution for data dimension '
                     f'{dim} (it needs sqrt(2D) > 3, i.e. D >= 5); choose the geometric '
                     f'ratio by hand for such low-dimensional data.')
  hi = 2.0
  while _gamma_equation(hi, dim) > 0:
    hi *= 2.0
  return float(scipy.optimize.brentq(_gamma_equation, 1.0, hi, xtol=1e-15, rtol=1e-15,
                                     maxiter=500, args=(dim,)))


def num_scales(sigma_max: float, sigma_min: float, gamma: float) -> int:
  """Smallest L with sigma_max / gamma^(L - 1) <= sigma_min."""
  if not 0 < sigma_min < sigma_max:
    raise ValueError(f'need 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}.')
  return int(math.ceil(math.log(sigma_max / sigma_min) / math.log(gamma) - 1e-12)) + 1


def _variance_ratio(a: float, gamma: float, steps: int) -> float:
  return (1.0 - a) ** (2 * steps) * (gamma ** 2 - 2.0 / (2.0 - a)) + 2.0 / (2.0 - a)


def langevin_step_size(sigma_min: float, gamma: float, steps_per_scale: int) -> float:
  """eps of technique 4 (alpha_i = eps sigma_i^2 / sigma_min^2)."""
  if steps_per_scale < 1:
    raise ValueError(f'steps per scale must be >= 1; got {steps_per_scale}.')
  objective = lambda log_a: abs(_variance_ratio(math.exp(log_a), gamma, steps_per_scale) - 1)  # noqa: E731
  grid = np.linspace(math.log(1e-12), math.log(1.0), 2001)
  start = grid[int(np.argmin([objective(g) for g in grid]))]
  result = scipy.optimize.minimize_scalar(
      objective, bounds=(start - 0.01, min(start + 0.01, 0.0)), method='bounded',
      options={'xatol': 1e-12})
  return float(math.exp(result.x) * sigma_min ** 2)


@dataclasses.dataclass(frozen=True)
class NoiseScales:
  """The chosen NCSNv2 noise scales and Langevin step size."""
  sigma_max: float
  sigma_min: float
  gamma: float
  num_scales: int
  step_lr: float
  n_steps_each: int
  diameter: Diameter
  dim: int

  @property
  def ald_snr(self) -> float:
    """The `snr` that makes the ALD corrector's step 2 (snr sigma_i)^2 equal
    eps sigma_i^2 / sigma_min^2, i.e. sqrt(eps / 2) / sigma_min."""
    return math.sqrt(self.step_lr / 2) / self.sigma_min

  def config_lines(self) -> str:
    """Lines to paste into a config."""
    return '\n'.join([
        f'model.sigma_max = {self.sigma_max:.6g}',
        f'model.sigma_min = {self.sigma_min:.6g}',
        f'model.num_scales = {self.num_scales}',
        "sampling.corrector = 'ald'",
        f'sampling.n_steps_each = {self.n_steps_each}',
        f'sampling.snr = {self.ald_snr:.4g}  # ALD step eps = {self.step_lr:.4g}',
    ])


def select_noise_scales(data, *, sigma_min: float = 0.01, n_steps_each: int = 5,
                        exact: bool | None = None) -> NoiseScales:
  """NCSNv2 noise scales for `data` [n, ...] (values as the model sees them)."""
  data = np.asarray(data)
  dim = int(np.prod(data.shape[1:]))
  diameter = data_diameter(data, exact=exact)
  gamma = geometric_ratio(dim)
  sigma_max = diameter.estimate
  return NoiseScales(
      sigma_max=sigma_max, sigma_min=sigma_min, gamma=gamma,
      num_scales=num_scales(sigma_max, sigma_min, gamma),
      step_lr=langevin_step_size(sigma_min, gamma, n_steps_each),
      n_steps_each=n_steps_each, diameter=diameter, dim=dim)
