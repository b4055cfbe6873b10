"""The discretisation error of `heun` and `dpmpp_2m` on the fast_samplers mixture, in
closed form, and the least error any time grid can give Heun at a budget.

Within one well-separated mixture component (covariance C_k, eigenvalues v) a
deterministic sampler is affine along each eigen-direction: it scales the prior draw
by a factor r(v) where the exact flow scales it by sqrt(v / (v + sigma(T)^2)).
`analytic.gaussian_step_map` gives r(v) from the step formulas alone (the samplers
match it to 1e-4: tests/test_fast_samplers.py), so the samples' variance along that
direction is q = (r / exact)^2 times the truth and the mean log-density gap that
benchmarks/fast_samplers.py measures is, to first order,

  gap = sum_k w_k sum_v -(q(v) - 1) / 2        (nats; exact samples: 0)

(it leaves out how the steps above sigma ~ 5 assign samples to components).
Measured for comparison (fast_samplers.py, 10000 samples, 20 evaluations): heun VE
-2.42, VP -2.07, sub-VP -3.23; dpmpp_2m VP -0.26, sub-VP -0.34.

For Heun it also searches over all grids with the same number of Heun steps and the
same ends (Nelder-Mead over the interior log sigmas, several starts) for the least
|gap| and the least KL divergence, sum_k w_k sum_v (q - 1 - log q) / 2, with no Euler
first step (an Euler step over the range where components are chosen would look free
to this Gaussian-only model). Each line is one JSON object.

  python benchmarks/step_error_bound.py [--nfe 20] [--sdes ve,vp,subvp,cosine]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from scipy import optimize  # noqa: E402

import fast_samplers  # noqa: E402
from score_sde import analytic  # noqa: E402
from score_sde.sampling import schedules  # noqa: E402


def mixture_spectrum():
  """(weights [K], eigenvalues [K, D]) of the fast_samplers mixture's components."""
  mix = fast_samplers.mixture()
  weights = np.asarray(mix.weights, np.float64)
  eigenvalues = np.linalg.eigvalsh(np.asarray(mix.covs, np.float64))
  return weights / weights.sum(), eigenvalues


def variance_ratios(method, sigmas, eigenvalues, euler_first) -> np.ndarray:
  """[K, D] q = sampled / true variance along each component's eigen-directions."""
  factor = np.stack([analytic.gaussian_step_map(method, sigmas, np.ones(len(v)),
                                                np.zeros(len(v)), v, euler_first=euler_first)
                     for v in eigenvalues])
  exact = np.sqrt(eigenvalues / (eigenvalues + sigmas[0] ** 2))
  return (factor / exact) ** 2


def gap_and_kl(q, weights) -> tuple[float, float]:
  gap = float(weights @ np.sum(-0.5 * (q - 1.0), axis=1))
  kl = float(weights @ np.sum(0.5 * (q - 1.0 - np.log(q)), axis=1))
  return gap, kl


def grid_sigmas(sde, num_steps, eps, schedule) -> np.ndarray:
  grid = schedules.Grid(time_schedule=schedule)
  times = schedules.time_grid(sde, num_steps, eps, grid)
  return np.asarray(schedules.edm_sigma(sde, times), np.float64)


def sigmas_from(z, top, bottom) -> np.ndarray:
  """A decreasing grid from top to bottom; its log sigma steps are softmax(z) of the range."""
  fractions = np.concatenate([[0.0], np.cumsum(np.exp(z - z.max()))])
  fractions /= fractions[-1]
  return np.exp(np.log(top) + fractions * (np.log(bottom) - np.log(top)))


def best_heun_grid(num_steps, top, bottom, weights, eigenvalues, objective, starts=4):
  """(gap, kl, sigmas) of the grid minimising |gap| ('gap') or the KL ('kl')."""
  def loss(z):
    gap, kl = gap_and_kl(variance_ratios('heun', sigmas_from(z, top, bottom), eigenvalues,
                                         False), weights)
    return abs(gap) if objective == 'gap' else kl

  best = None
  for seed in range(starts):
    z0 = np.random.RandomState(seed).normal(0.0, 0.3, num_steps)
    result = optimize.minimize(loss, z0, method='Nelder-Mead',
                               options=dict(maxiter=20000, maxfev=20000, xatol=1e-8,
                                            fatol=1e-12))
    if best is None or result.fun < best.fun:
      best = result
  sigmas = sigmas_from(best.x, top, bottom)
  return (*gap_and_kl(variance_ratios('heun', sigmas, eigenvalues, False), weights), sigmas)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sdes', default='ve,vp,subvp,cosine')
  parser.add_argument('--nfe', type=int, default=20)
  parser.add_argument('--no_search', action='store_true', help='skip the grid search')
  args = parser.parse_args()
  weights, eigenvalues = mixture_spectrum()
  for name in args.sdes.split(','):
    sde, eps = fast_samplers.SDES[name], fast_samplers.EPS[name]
    euler_first = schedules.top_is_clipped(sde, schedules.Grid())
    for method in ('heun', 'dpmpp_2m'):
      num_steps = fast_samplers.steps_for(args.nfe, method, sde)
      for schedule in schedules.SCHEDULES:
        sigmas = grid_sigmas(sde, num_steps, eps, schedule)
        q = variance_ratios(method, sigmas, eigenvalues, euler_first and method == 'heun')
        gap, kl = gap_and_kl(q, weights)
        print(json.dumps(dict(sde=name, method=method, nfe=args.nfe, num_steps=num_steps,
                              time_schedule=schedule, predicted_gap=round(gap, 3),
                              kl=round(kl, 4), variance_ratio_range=[
                                  round(float(q.min()), 3), round(float(q.max()), 3)])),
              flush=True)
    if args.no_search:
      continue
    # The same budget spent on Heun steps only: nfe - 1 (noise removal) over 2 per step.
    num_steps = (args.nfe - 1) // 2
    top, bottom = grid_sigmas(sde, num_steps, eps, 'logsnr')[[0, -1]]
    for objective in ('gap', 'kl'):
      gap, kl, sigmas = best_heun_grid(num_steps, top, bottom, weights, eigenvalues,
                                       objective)
      print(json.dumps(dict(sde=name, method='heun', nfe=2 * num_steps + 1,
                            num_steps=num_steps, best_grid_for=objective,
                            predicted_gap=round(gap, 3), kl=round(kl, 4),
                            sigmas=[float(f'{s:.4g}') for s in sigmas])), flush=True)


if __name__ == '__main__':
  main()
