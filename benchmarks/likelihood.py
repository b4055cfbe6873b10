"""Probability-flow likelihood: accuracy versus tolerance on an exact mixture, speed on a network.

Prints one JSON object per measurement. For the mixture (D = 64 by default,
exact scores from score_sde.analytic) each line has

  nfe                 vector-field evaluations per batch (each one score
                      evaluation with its JVPs)
  time_s              wall time of one batch (compiled); compile_s the first call
  err_bpd_mean/max    |log_likelihood - log p_eps(x)| in bits/dim, where the
                      model's prior at T is replaced by the exact log p_T(z)
                      (so the comparison is exact; see tests/test_likelihood.py)
  bias_bpd            mean over the batch of (estimate - truth) in bits/dim
                      (Hutchinson: unbiased, so ~0 within bias_se_bpd)
  prior_gap_bpd       mean (log p_T(z) - prior_logp(z)) / (D ln 2): what replacing
                      p_T by the prior costs a model with the exact score

The network lines (an MLP with random weights) report time and NFE only.

  python benchmarks/likelihood.py [--dim 64] [--batch 256]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from score_sde.cpu import process  # noqa: E402
from score_sde import analytic  # noqa: E402
from score_sde import likelihood  # noqa: E402
from score_sde import sde as sde_lib  # noqa: E402
from score_sde import score_fn

SDES = {'vp': sde_lib.VPSDE, 've': sde_lib.VESDE, 'subvp': sde_lib.SubVPSDE}
EPS = 1e-5


def timed(fn, *args):
  """(output, first-call seconds, second-call seconds)."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, first, time.perf_counter() - start


def emit(record: dict) -> None:
  print(json.dumps(record), flush=True)


def mixture_benchmarks(args) -> None:
  mix = analytic.random_mixture(jax.random.PRNGKey(1), args.dim, 3, spread=2.0, scale=0.5)
  x = mix.sample(jax.random.PRNGKey(2), args.batch)
  to_bpd = 1.0 / (args.dim * math.log(2.0))
  for sde_name in args.sdes.split(','):
    sde = SDES[sde_name]()
    score_model_fn = lambda m, y, t, sde=sde: m.score(y, t, sde)   # noqa: E731
    truth = mix.log_prob_t(x, EPS, sde)
    for divergence in ('exact', 'hutchinson_rademacher', 'hutchinson_gaussian'):
      for tol in (1e-3, 1e-5):
        fn = likelihood.get_likelihood_fn(sde, score_model_fn, rtol=tol, atol=tol,
                                          divergence=divergence, eps=EPS)
        (logp, z, info), compile_s, run_s = timed(fn, jax.random.PRNGKey(0), mix, x)
        exact_prior = logp - sde.prior_logp(z) + mix.log_prob_t(z, sde.T, sde)
        err = np.asarray(exact_prior - truth, np.float64) * to_bpd
        prior_gap = np.asarray(mix.log_prob_t(z, sde.T, sde) - sde.prior_logp(z)) * to_bpd
        emit(dict(benchmark='likelihood', data=f'mixture{args.dim}', sde=sde_name,
                  divergence=divergence, rtol=tol, atol=tol, batch=args.batch,
                  nfe=int(info['nfe']), nfe_mean=float(jnp.mean(info['nfe_per_example'])),
                  time_s=round(run_s, 4), compile_s=round(compile_s, 2),
                  err_bpd_mean=float(np.abs(err).mean()), err_bpd_max=float(np.abs(err).max()),
                  bias_bpd=float(err.mean()),
                  bias_se_bpd=float(err.std(ddof=1) / math.sqrt(len(err))),
                  prior_gap_bpd=float(prior_gap.mean())))


def network_benchmarks(args) -> None:
  """Time per batch with a randomly initialised MLP score network (D = args.dim)."""
  from score_sde.models import mlp as mlp_lib
  sde = sde_lib.VPSDE()
  model = mlp_lib.MLP(dim=args.dim, nf=256, num_layers=3, embedding_type='positional',
                      init_scale=1.0)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, args.dim)), jnp.ones((1,)))['params']
  score_model_fn = score_fn.get_score_model_fn(sde, score_fn.get_model_fn(model))
  x = jax.random.normal(jax.random.PRNGKey(3), (args.batch, args.dim))
  for divergence in ('hutchinson_rademacher', 'exact'):
    for tol in (1e-3, 1e-5):
      fn = likelihood.get_likelihood_fn(sde, lambda p, y, t: score_model_fn(p, y, t),
                                        rtol=tol, atol=tol, divergence=divergence, eps=EPS)
      (_, _, info), compile_s, run_s = timed(fn, jax.random.PRNGKey(0), params, x)
      emit(dict(benchmark='likelihood', data='mlp_random', sde='vp', divergence=divergence,
                rtol=tol, atol=tol, batch=args.batch, nfe=int(info['nfe']),
                time_s=round(run_s, 4), compile_s=round(compile_s, 2),
                ms_per_eval=round(1000 * run_s / max(int(info['nfe']), 1), 3)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dim', type=int, default=64)
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--sdes', default='vp,ve,subvp', help='comma-separated: vp,ve,subvp')
  parser.add_argument('--skip_network', action='store_true')
  args = parser.parse_args()
  emit(dict(benchmark='likelihood', devices=len(jax.devices()),
            platform=jax.devices()[0].platform))
  mixture_benchmarks(args)
  if not args.skip_network:
    network_benchmarks(args)


if __name__ == '__main__':
  process.prepare(restart_for_huge_pages=False)   # XLA:CPU flags, as launch.py
  main()
