"""Sampler accuracy versus cost on an exact Gaussian mixture, and speed on a small network.

Prints one JSON object per measurement. For the mixture (D = 64 by default,
three components, exact scores from score_sde.analytic) each line has

  nfe               score evaluations per batch (batched calls)
  time_s            wall time of one batch (compiled), compile_s the first call
  nll_gap_per_dim   (E_samples[-log p_0(x)] - H(p_0)) / D in nats: 0 for exact
                    samples; a variance error of d per coordinate gives ~ d / 2
  z_stat            (stat - df) / sqrt(2 df) of the per-component chi^2 test of
                    tests/test_sampling.py (weights, means, variances): ~N(0, 1)
                    for exact samples
  weight_err        max_k |w_k_hat - w_k|

and lines with "sampler": "exact" give the same metrics for true samples (the
noise floor). The network lines (an MLP with random weights) report time only.

  python benchmarks/sampling.py [--dim 64] [--batch 1000] [--sde vp] [--quick]
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
from score_sde import sampling  # noqa: E402
from score_sde import sde as sde_lib  # noqa: E402
from score_sde import score_fn

SDES = {'vp': sde_lib.VPSDE, 've': sde_lib.VESDE, 'subvp': sde_lib.SubVPSDE}


def sampler_grid(sde_name: str, quick: bool):
  """(label, method, options, list of step settings) for the error-versus-NFE table."""
  pc_steps = [50, 100, 250, 500, 1000]
  few_steps = [10, 25, 50, 100, 200]
  sde_steps = [25, 50, 100, 250, 500]
  if quick:
    pc_steps, few_steps, sde_steps = [100, 500], [25, 100], [50, 250]
  grid = [
      ('pc:reverse_diffusion+langevin', 'pc',
       dict(predictor='reverse_diffusion', corrector='langevin'), 'num_steps', pc_steps),
      ('pc:reverse_diffusion', 'pc',
       dict(predictor='reverse_diffusion', corrector='none'), 'num_steps', pc_steps),
      ('pc:euler_maruyama', 'pc', dict(predictor='euler_maruyama', corrector='none'),
       'num_steps', pc_steps),
      ('pc:ancestral_sampling', 'pc', dict(predictor='ancestral_sampling', corrector='none'),
       'num_steps', pc_steps),
      ('pc:euler_maruyama+ald', 'pc', dict(predictor='euler_maruyama', corrector='ald'),
       'num_steps', pc_steps),
      ('pc:probability_flow', 'pc',
       dict(predictor='reverse_diffusion', corrector='none', probability_flow=True),
       'num_steps', pc_steps),
      ('ode:tsit5', 'ode', dict(ode_solver='tsit5'), 'tol', [1e-2, 1e-3, 1e-4, 1e-5]),
      ('ode:dopri5', 'ode', dict(ode_solver='dopri5'), 'tol', [1e-3, 1e-5]),
      ('ode:euler', 'ode', dict(ode_solver='euler'), 'num_steps', few_steps),
      ('ode:heun', 'ode', dict(ode_solver='heun'), 'num_steps', few_steps),
      ('sde:euler', 'sde', dict(sde_solver='euler'), 'num_steps', sde_steps),
      ('sde:shark', 'sde', dict(sde_solver='shark'), 'num_steps', sde_steps),
      ('sde:sra1', 'sde', dict(sde_solver='sra1'), 'num_steps', sde_steps),
      ('ddim:eta=0', 'ddim', dict(ddim_eta=0.0), 'num_steps', few_steps),
      ('ddim:eta=1', 'ddim', dict(ddim_eta=1.0), 'num_steps', few_steps),
  ]
  if quick:
    grid = [g for g in grid if g[0] not in ('ode:dopri5', 'sde:sra1', 'pc:euler_maruyama+ald')]
  return grid


def metrics(mix, x, entropy: float) -> dict:
  """Discrepancies of samples x [n, D] from the mixture (see the module docstring)."""
  x = jnp.asarray(x, jnp.float32)
  n, dim = x.shape
  if not bool(jnp.all(jnp.isfinite(x))):
    return dict(nll_gap_per_dim=float('nan'), z_stat=float('nan'), weight_err=float('nan'))
  nll = -np.asarray(mix.log_prob(x), np.float64)
  labels = np.asarray(jnp.argmax(mix.log_posterior_t(x, 0.0, sde_lib.VPSDE()), -1))
  xs = np.asarray(x, np.float64)
  w = np.asarray(mix.weights, np.float64)
  mu = np.asarray(mix.means, np.float64)
  var = np.asarray(mix.covs, np.float64)
  stat, weight_err = 0.0, 0.0
  for k in range(len(w)):
    xk = xs[labels == k]
    nk = max(len(xk), 2)
    weight_err = max(weight_err, abs(len(xk) / n - w[k]))
    stat += (len(xk) / n - w[k]) ** 2 / (w[k] * (1 - w[k]) / n)
    if len(xk) >= 2:
      stat += np.sum((xk.mean(0) - mu[k]) ** 2 / (var[k] / nk))
      stat += np.sum((xk.var(0, ddof=1) / var[k] - 1) ** 2 / (2 / (nk - 1)))
  df = len(w) * (1 + 2 * dim)
  return dict(nll_gap_per_dim=float((nll.mean() - entropy) / dim),
              z_stat=float((stat - df) / math.sqrt(2 * df)), weight_err=float(weight_err))


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
  sde = SDES[args.sde]()
  mix = analytic.random_mixture(jax.random.PRNGKey(1), args.dim, 3, spread=2.0, scale=0.5)
  score_model_fn = lambda m, x, t: m.score(x, t, sde)   # noqa: E731
  reference = mix.sample(jax.random.PRNGKey(123), 50000)
  entropy = float(-jnp.mean(mix.log_prob(reference)))
  for seed in range(3):
    x = mix.sample(jax.random.PRNGKey(1000 + seed), args.batch)
    emit(dict(benchmark='sampling', data=f'mixture{args.dim}', sde=args.sde, sampler='exact',
              seed=seed, batch=args.batch, **metrics(mix, x, entropy)))
  key = jax.random.PRNGKey(0)
  for label, method, options, knob, values in sampler_grid(args.sde, args.quick):
    for value in values:
      opts = dict(options)
      if knob == 'tol':
        opts.update(rtol=value, atol=value)
      else:
        opts[knob] = value
      fn = sampling.jit_sampler(sampling.build_sampler(
          sde, score_model_fn, (args.batch, args.dim), method, **opts))
      (x, info), compile_s, run_s = timed(fn, key, mix)
      emit(dict(benchmark='sampling', data=f'mixture{args.dim}', sde=args.sde,
                sampler=label, **{knob: value}, batch=args.batch, nfe=int(info['nfe']),
                time_s=round(run_s, 4), compile_s=round(compile_s, 2),
                **metrics(mix, x, entropy)))


def network_benchmarks(args) -> None:
  """Time per batch with a randomly initialised MLP score network (D = args.dim)."""
  from score_sde.models import mlp as mlp_lib
  sde = SDES[args.sde]()
  model = mlp_lib.MLP(dim=args.dim, nf=256, num_layers=3, embedding_type='positional',
                      init_scale=1.0)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, args.dim)), jnp.ones((1,)))['params']
  score_model_fn = score_fn.get_score_model_fn(sde, score_fn.get_model_fn(model))
  cases = [('pc:reverse_diffusion+langevin', 'pc', dict(num_steps=500)),
           ('pc:ancestral_sampling', 'pc', dict(predictor='ancestral_sampling',
                                                corrector='none', num_steps=500)),
           ('ode:tsit5', 'ode', dict(rtol=1e-3, atol=1e-3)),
           ('ode:tsit5', 'ode', dict(rtol=1e-5, atol=1e-5)),
           ('sde:shark', 'sde', dict(sde_solver='shark', num_steps=100)),
           ('ddim:eta=0', 'ddim', dict(num_steps=50))]
  for label, method, options in cases:
    fn = sampling.jit_sampler(sampling.build_sampler(
        sde, lambda p, x, t: score_model_fn(p, x, t), (args.batch, args.dim), method,
        **options))
    (_, info), compile_s, run_s = timed(fn, jax.random.PRNGKey(0), params)
    emit(dict(benchmark='sampling', data='mlp_random', sde=args.sde, sampler=label,
              **{k: v for k, v in options.items() if k in ('num_steps', 'rtol')},
              batch=args.batch, nfe=int(info['nfe']), time_s=round(run_s, 4),
              compile_s=round(compile_s, 2),
              ms_per_eval=round(1000 * run_s / max(int(info['nfe']), 1), 3)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dim', type=int, default=64)
  parser.add_argument('--batch', type=int, default=1000)
  parser.add_argument('--sde', choices=sorted(SDES), default='vp')
  parser.add_argument('--quick', action='store_true', help='fewer step counts')
  parser.add_argument('--skip_network', action='store_true')
  args = parser.parse_args()
  emit(dict(benchmark='sampling', devices=len(jax.devices()),
            platform=jax.devices()[0].platform))
  mixture_benchmarks(args)
  if not args.skip_network:
    network_benchmarks(args)


if __name__ == '__main__':
  process.prepare(restart_for_huge_pages=False)   # XLA:CPU flags, as launch.py
  main()
