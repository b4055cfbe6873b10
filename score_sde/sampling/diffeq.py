"""The probability-flow ODE and the reverse SDE on diffrax: samplers, and the
ODE solve that likelihood.py shares.

The forward SDE dx = f(x, t) dt + g(t) dw has the reverse-time SDE and the
probability-flow ODE (Song et al. 2021, eqs. 6 and 13)

  dx = [f(x, t) - g(t)^2 s(x, t)] dt + g(t) dw_bar,   t: T -> 0,
  dx = [f(x, t) - g(t)^2 s(x, t) / 2] dt.

Probability-flow ODE (`method='ode'`): `diffrax.diffeqsolve` from T to eps,
adaptive (Tsit5, Dopri5, Heun with a PID controller on rtol / atol) or with
fixed steps (Euler, Heun, ...).

Reverse SDE (`method='sde'`): diffrax with `MultiTerm(ODETerm, ControlTerm)`
driven by a `VirtualBrownianTree`, solved forward in s = T - t:

  dy = -[f - g^2 s](y, T - s) ds + g(T - s) dW_s,   s: 0 -> T - eps,

(drift negated, diffusion unchanged). diffrax 0.7.2's additive-noise
Runge-Kutta solvers (ShARK, SRA1) are wrong for t0 > t1 (diffrax #598), and
correct in this forward form. Each example has its own Brownian tree (tol =
ds / 2); with cheap (analytic) scores the tree dominates the cost.

Both solve each example separately (`vmap`), adaptive step sizes included, and
end with `noise_removal`: one Tweedie step at eps (one more score evaluation).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import lineax
import numpy as np

from score_sde import sde as sde_lib
from score_sde.sampling import common
from score_sde.sampling.common import Info, ScoreFn


class OdeSolver(NamedTuple):
  make: Callable[[], diffrax.AbstractSolver]
  adaptive: bool             # has an error estimate (PID control possible)
  evals_per_step: int        # vector-field evaluations per step (accepted or not)
  init_evals: int            # evaluations before the first step (FSAL)


class SdeSolver(NamedTuple):
  make: Callable[[], diffrax.AbstractSolver]
  levy_area: type
  drift_evals_per_step: int


# Evaluation counts were checked by counting calls (tests/test_sampling.py).
ODE_SOLVERS = {
    'tsit5': OdeSolver(diffrax.Tsit5, True, 6, 1),
    'dopri5': OdeSolver(diffrax.Dopri5, True, 6, 1),
    'heun': OdeSolver(diffrax.Heun, True, 2, 0),
    'euler': OdeSolver(diffrax.Euler, False, 1, 0),
}

SDE_SOLVERS = {
    'euler': SdeSolver(diffrax.Euler, diffrax.BrownianIncrement, 1),
    'shark': SdeSolver(diffrax.ShARK, diffrax.SpaceTimeLevyArea, 2),
    'sra1': SdeSolver(diffrax.SRA1, diffrax.SpaceTimeLevyArea, 2),
}


# ----------------------------------------------------------------------------
# The ODE solve (shared with likelihood.py)
# ----------------------------------------------------------------------------

def solve_ode(vector_field, y0, t0: float, t1: float, *, solver: str = 'tsit5',
              rtol: float = 1e-5, atol: float = 1e-5, num_steps: int = 0,
              max_steps: int = 4096, args=None):
  """Solves one ODE dy/dt = vector_field(t, y, args) from t0 to t1 with diffrax.

  Adaptive (PID controller on rtol / atol) when `num_steps` is 0, else
  `num_steps` equal steps. `y0` is any pytree of arrays (one example: vmap this
  for a batch). Returns (y(t1), nfe), nfe the number of vector-field calls.
  """
  spec = common.lookup(ODE_SOLVERS, solver, 'ODE solver')
  if num_steps:
    controller = diffrax.ConstantStepSize()
    dt0 = (t1 - t0) / num_steps
    max_steps = num_steps + 1
  else:
    controller = diffrax.PIDController(rtol=rtol, atol=atol)
    dt0 = None
  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(vector_field), spec.make(), t0=t0, t1=t1, dt0=dt0, y0=y0,
      args=args, saveat=diffrax.SaveAt(t1=True), stepsize_controller=controller,
      max_steps=max_steps)
  y1 = jax.tree_util.tree_map(lambda leaf: leaf[-1], sol.ys)
  nfe = spec.init_evals + spec.evals_per_step * sol.stats['num_steps']
  return y1, nfe


def check_ode_options(solver: str, num_steps: int, rtol: float, atol: float,
                      max_steps: int) -> None:
  """Raises on an unknown solver, negative steps or non-positive tolerances."""
  spec = common.lookup(ODE_SOLVERS, solver, 'ODE solver')
  common.check_count('num_steps', num_steps, allow_zero=True)
  common.check_count('max_steps', max_steps)
  if not num_steps:
    if not spec.adaptive:
      raise ValueError(
          f'ODE solver {solver!r} has no error estimate, so it cannot choose its '
          f'own steps; pass num_steps > 0 or an adaptive solver '
          f'{sorted(k for k, v in ODE_SOLVERS.items() if v.adaptive)}.')
    for name, value in (('rtol', rtol), ('atol', atol)):
      if not (math.isfinite(value) and value > 0):
        raise ValueError(f'{name} must be a positive number; got {value}.')


def probability_flow_solve(score_fn: ScoreFn, sde, x: jax.Array, t0: float,
                           t1: float, **solver_options):
  """Transports x [B, ...] along the probability-flow ODE from t0 to t1.

  Each example is solved separately (`vmap`), adaptive steps included.
  Returns (x(t1) [B, ...], nfe [B]).
  """
  example_shape = x.shape[1:]
  score_flat = common.per_example_score(score_fn, example_shape)
  rsde = sde_lib.reverse(sde, score_flat, probability_flow=True)

  def vector_field(t, y, args):
    del args
    drift, _ = rsde.sde(y, jnp.asarray(t, jnp.float32))
    return drift

  def solve_one(y0):
    return solve_ode(vector_field, y0, t0, t1, **solver_options)

  y1, nfe = jax.vmap(solve_one)(x.reshape(x.shape[0], -1))
  return y1.reshape(x.shape), nfe


# ----------------------------------------------------------------------------
# The samplers
# ----------------------------------------------------------------------------

def ode_sampler(key, score_fn: ScoreFn, sde, shape, *, ode_solver='tsit5', rtol=1e-5,
                atol=1e-5, num_steps=0, noise_removal=True, eps=1e-3, max_steps=4096,
                constrain=common.identity) -> tuple[jax.Array, Info]:
  """Probability-flow ODE from the prior at T to eps (diffrax), then Tweedie."""
  keys = common.example_keys(key, shape[0])
  x = constrain(common.prior_sample(sde, common.fold_keys(keys, 0), shape))
  common.check_score_shape(score_fn, x)
  x, nfe = probability_flow_solve(score_fn, sde, x, sde.T, eps, solver=ode_solver,
                                  rtol=rtol, atol=atol, num_steps=num_steps,
                                  max_steps=max_steps)
  if noise_removal:
    x = common.tweedie_denoise(sde, score_fn, x, eps)
    nfe = nfe + 1
  return x, {'nfe': jnp.max(nfe), 'nfe_per_example': nfe}


def sde_sampler(key, score_fn: ScoreFn, sde, shape, *, sde_solver='euler', num_steps=0,
                noise_removal=True, eps=1e-3,
                constrain=common.identity) -> tuple[jax.Array, Info]:
  """Reverse SDE with diffrax, forward in s = T - t, fixed steps, one Brownian tree per example."""
  spec = SDE_SOLVERS[sde_solver]
  num_steps = num_steps or sde.N
  batch, example_shape = shape[0], tuple(shape[1:])
  dim = int(np.prod(example_shape))
  keys = common.example_keys(key, batch)
  x = constrain(common.prior_sample(sde, common.fold_keys(keys, 0), shape))
  common.check_score_shape(score_fn, x)
  score_flat = common.per_example_score(score_fn, example_shape)
  rsde = sde_lib.reverse(sde, score_flat)
  horizon = sde.T - eps
  ds = horizon / num_steps

  def drift(s, y, args):
    del args
    reverse_drift, _ = rsde.sde(y, jnp.asarray(sde.T - s, jnp.float32))
    return -reverse_drift

  def diffusion(s, y, args):
    del args
    _, g = sde.sde(y, jnp.asarray(sde.T - s, jnp.float32))
    return lineax.DiagonalLinearOperator(jnp.broadcast_to(g, y.shape))

  def solve_one(y0, path_key):
    brownian = diffrax.VirtualBrownianTree(0.0, horizon, tol=ds / 2, shape=(dim,),
                                           key=path_key, levy_area=spec.levy_area)
    terms = diffrax.MultiTerm(diffrax.ODETerm(drift),
                              diffrax.ControlTerm(diffusion, brownian))
    sol = diffrax.diffeqsolve(terms, spec.make(), t0=0.0, t1=horizon, dt0=ds, y0=y0,
                              saveat=diffrax.SaveAt(t1=True), max_steps=num_steps + 1)
    return sol.ys[-1], spec.drift_evals_per_step * sol.stats['num_steps']

  y, nfe = jax.vmap(solve_one)(x.reshape(batch, dim), common.fold_keys(keys, 1))
  x = y.reshape(shape)
  if noise_removal:
    x = common.tweedie_denoise(sde, score_fn, x, eps)
    nfe = nfe + 1
  return x, {'nfe': jnp.max(nfe), 'nfe_per_example': nfe}


def check_ode_sampler_options(sde, opts: dict) -> dict:
  """The `ode_sampler` options, validated; num_steps 0 with a fixed-step solver -> sde.N."""
  opts['ode_solver'] = str(opts['ode_solver']).lower()
  if not (opts['num_steps']
          or common.lookup(ODE_SOLVERS, opts['ode_solver'], 'ODE solver').adaptive):
    opts['num_steps'] = sde.N     # a fixed-step solver: 0 means the SDE's N
  check_ode_options(opts['ode_solver'], opts['num_steps'], opts['rtol'], opts['atol'],
                    opts['max_steps'])
  opts['rtol'], opts['atol'] = float(opts['rtol']), float(opts['atol'])
  return opts


def check_sde_sampler_options(sde, opts: dict) -> dict:
  """The `sde_sampler` options, validated."""
  del sde
  opts['sde_solver'] = str(opts['sde_solver']).lower()
  common.lookup(SDE_SOLVERS, opts['sde_solver'], 'SDE solver')
  return opts
