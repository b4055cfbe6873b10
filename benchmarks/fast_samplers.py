"""Few-step samplers (heun, edm, dpmpp_2m, dpmpp_3m, dpmpp_2m_sde, unipc) against the
baselines, quality versus score evaluations, on an exact Gaussian mixture.

The data: a 16-dimensional mixture of three Gaussians with full covariances
(`score_sde.analytic.random_mixture(..., full=True)`), whose score is exact at
every t under every SDE (VE, VP, sub-VP, cosine VP). Each line is one JSON object:

  sde, method, options, num_steps, nfe   the run (nfe as the sampler reports it)
  cov_err       |C_hat - C|_F / |C|_F, C the mixture's covariance (exact)
  logp_gap      mean log p_0(samples) - E_p[log p_0] in nats (exact samples: ~0)
  ode_distance  deterministic methods: median |x - x_ref| over examples, x_ref the
                adaptive probability-flow ODE at rtol = atol = 1e-6 from the same
                prior draw (the solution the method discretises)

Lines with method "exact" give the same statistics for true samples (the noise
floor, several seeds); lines with "local_orders" give the slope of log ode_distance
against log nfe between consecutive NFE values (the convergence order; it flattens
where ode_distance meets the reference's own error, ~3e-4).

  python benchmarks/fast_samplers.py [--sdes ve,vp,subvp,cosine] [--batch 10000]
      [--nfes 5,10,20,35,50,100] [--methods heun,...] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from score_sde import analytic  # noqa: E402
from score_sde import sampling  # noqa: E402
from score_sde import sde as sde_lib  # noqa: E402
from score_sde.sampling import schedules  # noqa: E402

SDES = {'ve': sde_lib.VESDE(), 'vp': sde_lib.VPSDE(), 'subvp': sde_lib.SubVPSDE(),
        'cosine': sde_lib.VPSDE(schedule='cosine')}
EPS = {'ve': 1e-5, 'vp': 1e-3, 'subvp': 1e-3, 'cosine': 1e-3}    # sde_from_config's
NFES = (5, 10, 20, 35, 50, 100)
DIM = 16

# label -> (method, options, evaluations per step, deterministic)
SAMPLERS = {
    'heun': ('heun', {}, 2, True),
    'edm': ('edm', {}, 2, False),
    'dpmpp_2m': ('dpmpp_2m', {}, 1, True),
    'dpmpp_3m': ('dpmpp_3m', {}, 1, True),
    'dpmpp_2m_sde': ('dpmpp_2m_sde', {}, 1, False),
    'unipc': ('unipc', {}, 1, True),
    'euler_ode': ('ode', {'ode_solver': 'euler'}, 1, True),
    'ddim': ('ddim', {}, 1, True),
    # PC at matched NFE (reverse diffusion + one Langevin step). On the linear VP its
    # discrete chain needs N >= beta_max = 20 steps: fewer give an "error" line.
    'pc': ('pc', {}, 2, False),
}


def steps_for(nfe: int, label: str, sde) -> int:
  """num_steps whose score evaluations come closest to `nfe` from below: `per_step` per
  step, one for noise removal (PC's last predictor step denoises without one), one less
  for heun / edm where sigma(T) > grid_sigma_max (their first step is an Euler step)."""
  method, _, per_step, _ = SAMPLERS[label]
  extra = 0 if method == 'pc' else 1
  if method in ('heun', 'edm') and schedules.top_is_clipped(sde, schedules.Grid()):
    extra -= 1
  return max(1, (nfe - extra) // per_step)


def is_missing_discrete_chain(error: ValueError) -> bool:
  """PC's discrete VP chain at N < beta_max: the one error a run may report and skip."""
  return isinstance(error, sde_lib.MissingDiscreteChainError)


def mixture():
  return analytic.random_mixture(jax.random.PRNGKey(7), DIM, 3, full=True, spread=2.0,
                                 scale=0.5)


def mixture_covariance(mix) -> np.ndarray:
  w = np.asarray(mix.weights, np.float64)
  mu = np.asarray(mix.means, np.float64)
  covs = np.asarray(mix.covs, np.float64)
  mean = w @ mu
  centred = mu - mean
  return np.einsum('k,kij->ij', w, covs) + np.einsum('k,ki,kj->ij', w, centred, centred)


def expected_log_prob(mix) -> float:
  """E_p[log p_0] in nats, from 200000 exact samples (the logp_gap reference)."""
  return float(jnp.mean(mix.log_prob(mix.sample(jax.random.PRNGKey(99), 200_000))))


def statistics(mix, x, covariance, expected_logp) -> dict:
  x = np.asarray(x, np.float64)
  if not np.all(np.isfinite(x)):
    return dict(cov_err=float('nan'), logp_gap=float('nan'))
  cov_err = np.linalg.norm(np.cov(x, rowvar=False) - covariance) / np.linalg.norm(covariance)
  logp = float(np.mean(np.asarray(mix.log_prob(jnp.asarray(x, jnp.float32)), np.float64)))
  return dict(cov_err=float(cov_err), logp_gap=logp - expected_logp)


def emit(record: dict) -> None:
  print(json.dumps(record), flush=True)


def run_sde(name: str, batch: int, nfes, labels) -> None:
  sde, eps = SDES[name], EPS[name]
  mix = mixture()
  score_fn = mix.score_fn(sde)
  covariance = mixture_covariance(mix)
  expected_logp = expected_log_prob(mix)
  for seed in range(3):
    emit(dict(sde=name, method='exact', seed=seed, batch=batch,
              **statistics(mix, mix.sample(jax.random.PRNGKey(1000 + seed), batch),
                           covariance, expected_logp)))
  key = jax.random.PRNGKey(0)
  x_ref, info = sampling.sample(key, score_fn, sde, (batch, DIM), 'ode', rtol=1e-6,
                                atol=1e-6, eps=eps)
  emit(dict(sde=name, method='ode_adaptive', rtol=1e-6, nfe=int(info['nfe']),
            **statistics(mix, x_ref, covariance, expected_logp)))
  for tol in (1e-2, 1e-3, 1e-4):
    x, info = sampling.sample(key, score_fn, sde, (batch, DIM), 'ode', rtol=tol, atol=tol,
                              eps=eps)
    emit(dict(sde=name, method='ode_adaptive', rtol=tol, nfe=int(info['nfe']),
              ode_distance=float(np.median(np.linalg.norm(np.asarray(x - x_ref), axis=1))),
              **statistics(mix, x, covariance, expected_logp)))
  for label in labels:
    method, options, per_step, deterministic = SAMPLERS[label]
    distances = []
    for nfe in nfes:
      num_steps = steps_for(nfe, label, sde)
      try:
        x, info = sampling.sample(key, score_fn, sde, (batch, DIM), method,
                                  num_steps=num_steps, eps=eps, **options)
      except ValueError as error:
        if not is_missing_discrete_chain(error):
          raise
        emit(dict(sde=name, method=label, options=options, num_steps=num_steps,
                  error=str(error).split('\n')[0]))
        continue
      record = dict(sde=name, method=label, options=options, num_steps=num_steps,
                    nfe=int(info['nfe']), **statistics(mix, x, covariance, expected_logp))
      if deterministic:
        record['ode_distance'] = float(np.median(np.linalg.norm(np.asarray(x - x_ref), axis=1)))
        distances.append((record['nfe'], record['ode_distance']))
      emit(record)
    if len(distances) >= 2:
      nfe_values, errors = np.log(np.array(distances)).T
      emit(dict(sde=name, method=label,
                local_orders=[round(float(o), 2) for o in -np.diff(errors) / np.diff(nfe_values)],
                between_nfe=[int(n) for n, _ in distances]))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sdes', default='ve,vp,subvp,cosine')
  parser.add_argument('--methods', default=','.join(SAMPLERS))
  parser.add_argument('--batch', type=int, default=10000)
  parser.add_argument('--nfes', default='', help=f'default {",".join(map(str, NFES))}')
  parser.add_argument('--quick', action='store_true',
                      help='2000 samples, and NFE 10 and 20 unless --nfes is given')
  args = parser.parse_args()
  nfes = (tuple(int(n) for n in args.nfes.split(',')) if args.nfes else
          (10, 20) if args.quick else NFES)
  batch = 2000 if args.quick else args.batch
  for name in args.sdes.split(','):
    run_sde(name, batch, nfes, args.methods.split(','))


if __name__ == '__main__':
  main()
