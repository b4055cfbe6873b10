"""Samplers for score-based models: predictor-corrector, probability-flow ODE,
reverse SDE (diffrax) and DDIM.

The forward SDE dx = f(x, t) dt + g(t) dw has the reverse-time SDE and the
probability-flow ODE (Song et al. 2021, eqs. 6 and 13)

  dx = [f(x, t) - g(t)^2 s(x, t)] dt + g(t) dw_bar,   t: T -> 0,
  dx = [f(x, t) - g(t)^2 s(x, t) / 2] dt,

with the score s(x, t) = grad_x log p_t(x). Every sampler here needs only a
`score_fn(x, t)` and an SDE of the `score_sde.sde` interface; none branches on
the SDE's class. Each starts from the prior at T and stops at a small eps.

Predictor-corrector (`method='pc'`), on the reference grid t_i = linspace(T,
eps, N), one predictor step per t_i (a step of length T / N, as in the
reference) preceded by `n_steps_each` corrector steps at the same t_i:

  euler_maruyama      x <- x - [f - g^2 s] dt + g sqrt(dt) z,   dt = T / N
  reverse_diffusion   x <- x - f_i + G_i^2 s + G_i z,  (f_i, G_i) = sde.discretize
  ancestral_sampling  x <- (x + G_i^2 s) / a_i + sigma_i z, the reverse of one
                      step x_i = a_i x_{i-1} + G_i z of the discrete chain
                      (a_i = 1 + f_i(x) / x: the drift is linear in x). The
                      mean is exact (Tweedie) for any data; the variance
                      sigma_i^2 = (G_i^2 / a_i^2) (1 - G_i^2 / v_i) is exact
                      for data N(0, I), v_i = m(t)^2 + s(t)^2 (DDPM's argument
                      for sigma^2 = beta). VP: exactly the reference, beta_i.
                      VE: G_i^2 (1 + sigma_{i-1}^2) / (1 + sigma_i^2) where the
                      reference has G_i^2 sigma_{i-1}^2 / sigma_i^2 (data
                      N(mu, 0)); the two agree for sigma >> 1.
  langevin            x <- x + e s + sqrt(2 e) z, e = 2 alpha_i (snr |z| / |s|)^2
  ald                 x <- x + e s + sqrt(2 e) z, e = 2 alpha_i (snr std(t_i))^2

alpha_i = a_i^2, the squared signal factor of one step of the discrete chain:
1 - beta_i for the DDPM chain and 1 for SMLD, as in the reference (for
sub-VP, whose discretisation is Euler--Maruyama, a_i^2 = (1 - beta dt / 2)^2
where the reference uses 1 - beta_i; equal to first order in dt).

The norms in `langevin` (option `snr_norm`, mapping SNR_NORMS):
  'example' (default)  |s| per example and |z| -> E|z| = sqrt(2) Gamma((D+1)/2)
                       / Gamma(D/2), the limit of the reference's batch mean: an
                       example's step depends on nothing else in its batch. The
                       norms concentrate only in high dimension (images); in a
                       few dimensions |s| -> 0 near a mode makes e explode, so
                       use 'batch' (or 'ald') for 2-D toy data.
  'batch'              the reference: means of |z| and |s| over the whole global
                       batch (a mean over a sharded axis, no pmean); stable in any
                       dimension, couples the examples of a batch but not the
                       devices (up to rounding of the mean).
Unadjusted Langevin at a fixed snr has a stationary bias (variance inflated by
about e / (2 var)): the corrector's error does not vanish as N grows.
`noise_removal` returns the noise-free mean of the last step, as in the
reference.

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

DDIM (`method='ddim'`), for any x_t = m(t) x_0 + s(t) z: with eps_hat = -s_t
score and x0_hat = (x + s_t^2 score) / m_t, a step t -> t' is

  x' = m_t' x0_hat + sqrt(s_t'^2 - sigma^2) eps_hat + sigma z,
  sigma = eta sqrt(s_t'^2 / s_t^2 (s_t^2 - (m_t / m_t')^2 s_t'^2)),

the posterior q(x_t' | x_t, x0_hat) at eta = 1 and deterministic at eta = 0;
for VP (s^2 = 1 - m^2) this is Song, Meng & Ermon (2021), eq. 12.

`noise_removal` for the ODE, SDE and DDIM samplers is one Tweedie step at eps,
E[x_0 | x_eps] = (x + s(eps)^2 score(x, eps)) / m(eps) (one more score
evaluation).

Randomness. Every example has its own key, fold_in(key, index); all its noise
(prior draw, predictor and corrector noise, Brownian path) comes from that key,
and the ODE / SDE solvers are `vmap`-ed per example, adaptive step sizes
included. So example i depends only on (key, i): not on the batch size, the
other examples, or the number of devices.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import lineax
import numpy as np

from score_sde import parallel
from score_sde import sde as sde_lib

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]
# score_model_fn(params, x, t) -> score, with x: [B, ...] and t: [B].
ScoreModelFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
Info = dict


# ----------------------------------------------------------------------------
# Per-example randomness and small shared helpers
# ----------------------------------------------------------------------------

def example_keys(key, batch_size: int):
  """[B] keys, key i = fold_in(key, i): each example's own stream of randomness."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch_size))


def fold_keys(keys, data: int):
  """fold_in(keys[b], data) for every example b."""
  return jax.vmap(lambda k: jax.random.fold_in(k, data))(keys)


def example_normal(keys, example_shape, dtype=jnp.float32) -> jax.Array:
  """[B, *example_shape] standard normal noise, row b drawn from keys[b]."""
  return jax.vmap(lambda k: jax.random.normal(k, example_shape, dtype))(keys)


def per_example_norm(x: jax.Array) -> jax.Array:
  """Euclidean norm of each example: [B, ...] -> [B]."""
  return jnp.sqrt(jnp.sum(jnp.square(x).reshape(x.shape[0], -1), axis=-1))


def expected_normal_norm(dim: int) -> float:
  """E|z| for z ~ N(0, I_dim): sqrt(2) Gamma((dim + 1) / 2) / Gamma(dim / 2)."""
  return math.sqrt(2.0) * math.exp(math.lgamma((dim + 1) / 2) - math.lgamma(dim / 2))


def batch_times(t, x: jax.Array) -> jax.Array:
  """A scalar time broadcast to one time per example, [B]."""
  return jnp.full(x.shape[:1], t, jnp.float32)


def prior_sample(sde, keys, shape) -> jax.Array:
  """[B, ...] draws from the SDE's prior, example b from keys[b]."""
  return jax.vmap(lambda k: sde.prior_sampling(k, tuple(shape[1:])))(keys)


def with_num_steps(sde, num_steps: int):
  """The same SDE discretised with `num_steps` steps (0: unchanged)."""
  if num_steps in (0, sde.N):
    return sde
  return dataclasses.replace(sde, N=int(num_steps))


def chain_signal_factor(sde, x: jax.Array, t: jax.Array) -> jax.Array:
  """a_i of one discrete step x_i = a_i x_{i-1} + G_i z (shape broadcasting with x).

  Read off `sde.discretize` as 1 + f_i(1): every SDE here has a drift linear
  in x. 1 for SMLD, sqrt(1 - beta_i) for DDPM.
  """
  f_of_ones, _ = sde.discretize(jnp.ones_like(x), t)
  return 1.0 + f_of_ones


def tweedie_denoise(sde, score_fn: ScoreFn, x: jax.Array, t) -> jax.Array:
  """E[x_0 | x_t] = (x + s(t)^2 score(x, t)) / m(t) for x_t = m x_0 + s z."""
  mean_coeff, std = sde_lib.transition_coeffs(sde, t)
  return (x + std ** 2 * score_fn(x, batch_times(t, x))) / mean_coeff


def check_score_shape(score_fn: ScoreFn, x: jax.Array) -> None:
  """Raises (at trace time) unless score_fn(x, t) has the shape of x."""
  t = batch_times(0.5, x)
  try:
    out = jax.eval_shape(score_fn, x, t)
  except Exception as err:  # noqa: BLE001 - re-raised with the likely cause
    raise ValueError(
        f'the score function failed on data of shape {x.shape} (batch, then one '
        f'example); check that `shape` matches the data the score function was '
        f'built for. The error was: {type(err).__name__}: {err}') from err
  if out.shape != x.shape:
    raise ValueError(
        f'the score function returned shape {out.shape} for data of shape '
        f'{x.shape}; the sample shape must be the data shape [B, ...] that the '
        f'score function expects.')


def per_example_score(score_fn: ScoreFn, example_shape) -> Callable:
  """score of one flattened example: ([D], scalar t) -> [D], for vmap-ed solvers."""
  dim = int(np.prod(example_shape))

  def score_flat(y, t):
    x = y.reshape((1,) + tuple(example_shape))
    return score_fn(x, jnp.reshape(t, (1,)).astype(jnp.float32)).reshape(dim)

  return score_flat


# ----------------------------------------------------------------------------
# Predictors: (sde, score_fn, x, t [B], noise, probability_flow) -> (x, x_mean)
# ----------------------------------------------------------------------------

def euler_maruyama_predictor(sde, score_fn, x, t, noise, probability_flow):
  """x - [f - g^2 s] dt + g sqrt(dt) z with dt = T / N (reference step length)."""
  rsde = sde_lib.reverse(sde, score_fn, probability_flow)
  dt = sde.T / sde.N
  drift, diffusion = rsde.sde(x, t)
  x_mean = x - drift * dt
  return x_mean + diffusion * math.sqrt(dt) * noise, x_mean


def reverse_diffusion_predictor(sde, score_fn, x, t, noise, probability_flow):
  """x - f_i + G_i^2 s + G_i z from the SDE's own discretisation."""
  rsde = sde_lib.reverse(sde, score_fn, probability_flow)
  rev_f, rev_g = rsde.discretize(x, t)
  x_mean = x - rev_f
  return x_mean + rev_g * noise, x_mean


def ancestral_sampling_predictor(sde, score_fn, x, t, noise, probability_flow):
  """One reverse step of the discrete chain (see the module docstring)."""
  del probability_flow  # rejected when the sampler is built
  signal = chain_signal_factor(sde, x, t)
  _, step_std = sde.discretize(x, t)
  step_var = step_std ** 2
  mean_coeff, std = sde_lib.transition_coeffs(sde, t)
  unit_data_var = sde_lib.expand_to(mean_coeff ** 2 + std ** 2, x)
  x_mean = (x + step_var * score_fn(x, t)) / signal
  reverse_var = step_var * jnp.maximum(1.0 - step_var / unit_data_var, 0.0) / signal ** 2
  return x_mean + jnp.sqrt(reverse_var) * noise, x_mean


def none_predictor(sde, score_fn, x, t, noise, probability_flow):
  """Leaves x unchanged (corrector-only sampling)."""
  del sde, score_fn, t, noise, probability_flow
  return x, x


# ----------------------------------------------------------------------------
# Correctors: (sde, score_fn, x, t [B], keys [B], snr, n_steps, snr_norm)
#   -> (x, x_mean)
# ----------------------------------------------------------------------------

def _example_snr_ratio(grad, noise, snr):
  """snr E|z| / |s_b| for each example b: [B]."""
  del noise
  noise_norm = expected_normal_norm(int(np.prod(grad.shape[1:])))
  return snr * noise_norm / per_example_norm(grad)


def _batch_snr_ratio(grad, noise, snr):
  """snr mean_b |z_b| / mean_b |s_b| over the whole (global) batch: scalar."""
  return snr * jnp.mean(per_example_norm(noise)) / jnp.mean(per_example_norm(grad))


# How the Langevin corrector measures |z| / |s| in its snr rule.
SNR_NORMS = {
    'example': _example_snr_ratio,   # per example; needs high dimension (images)
    'batch': _batch_snr_ratio,       # the reference: means over the batch
}


def langevin_corrector(sde, score_fn, x, t, keys, snr, n_steps, snr_norm='example'):
  """Langevin MCMC with the snr rule e = 2 alpha (snr |z| / |s|)^2.

  snr_norm 'example': |s| per example and |z| -> E|z|, so an example's step
  does not depend on its batch; the norms concentrate only in high dimension
  (images), and in a few dimensions |s| -> 0 near a mode makes the step
  explode. 'batch': the reference's means of |z| and |s| over the whole
  (global) batch, which is stable in any dimension but couples the examples
  (not the devices: the mean over a sharded batch is the same mean).
  """
  alpha = chain_signal_factor(sde, x, t) ** 2
  ratio_fn = SNR_NORMS[snr_norm]

  def one_step(carry, j):
    x, _ = carry
    grad = score_fn(x, t)
    noise = example_normal(fold_keys(keys, j), x.shape[1:], x.dtype)
    ratio = jnp.broadcast_to(ratio_fn(grad, noise, snr), x.shape[:1])
    step_size = 2.0 * alpha * sde_lib.expand_to(ratio ** 2, grad)
    x_mean = x + step_size * grad
    return (x_mean + jnp.sqrt(2.0 * step_size) * noise, x_mean), None

  (x, x_mean), _ = jax.lax.scan(one_step, (x, x), jnp.arange(n_steps))
  return x, x_mean


def ald_corrector(sde, score_fn, x, t, keys, snr, n_steps, snr_norm='example'):
  """Annealed Langevin dynamics (NCSN): e = 2 alpha (snr std(t))^2."""
  del snr_norm
  alpha = chain_signal_factor(sde, x, t) ** 2
  _, std = sde_lib.transition_coeffs(sde, t)
  step_size = 2.0 * alpha * sde_lib.expand_to((snr * std) ** 2, x)

  def one_step(carry, j):
    x, _ = carry
    noise = example_normal(fold_keys(keys, j), x.shape[1:], x.dtype)
    x_mean = x + step_size * score_fn(x, t)
    return (x_mean + jnp.sqrt(2.0 * step_size) * noise, x_mean), None

  (x, x_mean), _ = jax.lax.scan(one_step, (x, x), jnp.arange(n_steps))
  return x, x_mean


def none_corrector(sde, score_fn, x, t, keys, snr, n_steps, snr_norm='example'):
  """Leaves x unchanged (predictor-only sampling)."""
  del sde, score_fn, t, keys, snr, n_steps, snr_norm
  return x, x


class Predictor(NamedTuple):
  step: Callable
  score_evals: int           # per step
  allows_probability_flow: bool


class Corrector(NamedTuple):
  step: Callable
  score_evals: int           # per corrector iteration


PREDICTORS = {
    'euler_maruyama': Predictor(euler_maruyama_predictor, 1, True),
    'reverse_diffusion': Predictor(reverse_diffusion_predictor, 1, True),
    'ancestral_sampling': Predictor(ancestral_sampling_predictor, 1, False),
    'none': Predictor(none_predictor, 0, True),
}

CORRECTORS = {
    'langevin': Corrector(langevin_corrector, 1),
    'ald': Corrector(ald_corrector, 1),
    'none': Corrector(none_corrector, 0),
}


# ----------------------------------------------------------------------------
# diffrax solvers
# ----------------------------------------------------------------------------

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


def lookup(mapping: dict, name: str, what: str):
  """mapping[name.lower()], or a ValueError listing the valid names."""
  try:
    return mapping[str(name).lower()]
  except KeyError:
    raise ValueError(f'unknown {what} {name!r}; valid: {sorted(mapping)}.') from None


def solve_ode(vector_field, y0, t0: float, t1: float, *, solver: str = 'tsit5',
              rtol: float = 1e-5, atol: float = 1e-5, num_steps: int = 0,
              max_steps: int = 4096, args=None):
  """Solves one ODE dy/dt = vector_field(t, y, args) from t0 to t1 with diffrax.

  Adaptive (PID controller on rtol / atol) when `num_steps` is 0, else
  `num_steps` equal steps. `y0` is any pytree of arrays (one example: vmap this
  for a batch). Returns (y(t1), nfe), nfe the number of vector-field calls.
  """
  spec = lookup(ODE_SOLVERS, solver, 'ODE solver')
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
  spec = lookup(ODE_SOLVERS, solver, 'ODE solver')
  _check_count('num_steps', num_steps, allow_zero=True)
  _check_count('max_steps', max_steps)
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
  score_flat = per_example_score(score_fn, example_shape)
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
# The samplers: pure functions of (key, score_fn) with static options
# ----------------------------------------------------------------------------

def _identity(x):
  return x


def pc_sampler(key, score_fn: ScoreFn, sde, shape, *, predictor='reverse_diffusion',
               corrector='langevin', snr=0.16, n_steps_each=1, snr_norm='example',
               noise_removal=True, probability_flow=False, num_steps=0, eps=1e-3,
               constrain=_identity) -> tuple[jax.Array, Info]:
  """Predictor-corrector sampling on linspace(T, eps, N), N = num_steps or sde.N."""
  sde = with_num_steps(sde, num_steps)
  pred = PREDICTORS[predictor]
  corr = CORRECTORS[corrector]
  batch, example_shape = shape[0], tuple(shape[1:])
  keys = example_keys(key, batch)
  x = constrain(prior_sample(sde, fold_keys(keys, 0), shape))
  check_score_shape(score_fn, x)

  def step(carry, inputs):
    x, _ = carry
    index, t = inputs
    vec_t = batch_times(t, x)
    step_keys = fold_keys(keys, index + 1)
    x, x_mean = corr.step(sde, score_fn, x, vec_t, fold_keys(step_keys, 1), snr,
                          n_steps_each, snr_norm)
    noise = example_normal(fold_keys(step_keys, 0), example_shape, x.dtype)
    x, x_mean = pred.step(sde, score_fn, x, vec_t, noise, probability_flow)
    return (x, x_mean), None

  timesteps = jnp.linspace(sde.T, eps, sde.N)
  (x, x_mean), _ = jax.lax.scan(step, (x, x), (jnp.arange(sde.N), timesteps))
  nfe = sde.N * (pred.score_evals + corr.score_evals * n_steps_each)
  return (x_mean if noise_removal else x), {'nfe': jnp.asarray(nfe, jnp.int32)}


def ode_sampler(key, score_fn: ScoreFn, sde, shape, *, ode_solver='tsit5', rtol=1e-5,
                atol=1e-5, num_steps=0, noise_removal=True, eps=1e-3, max_steps=4096,
                constrain=_identity) -> tuple[jax.Array, Info]:
  """Probability-flow ODE from the prior at T to eps (diffrax), then Tweedie."""
  keys = example_keys(key, shape[0])
  x = constrain(prior_sample(sde, fold_keys(keys, 0), shape))
  check_score_shape(score_fn, x)
  x, nfe = probability_flow_solve(score_fn, sde, x, sde.T, eps, solver=ode_solver,
                                  rtol=rtol, atol=atol, num_steps=num_steps,
                                  max_steps=max_steps)
  if noise_removal:
    x = tweedie_denoise(sde, score_fn, x, eps)
    nfe = nfe + 1
  return x, {'nfe': jnp.max(nfe), 'nfe_per_example': nfe}


def sde_sampler(key, score_fn: ScoreFn, sde, shape, *, sde_solver='euler', num_steps=0,
                noise_removal=True, eps=1e-3, constrain=_identity) -> tuple[jax.Array, Info]:
  """Reverse SDE with diffrax, forward in s = T - t, fixed steps, one Brownian tree per example."""
  spec = SDE_SOLVERS[sde_solver]
  num_steps = num_steps or sde.N
  batch, example_shape = shape[0], tuple(shape[1:])
  dim = int(np.prod(example_shape))
  keys = example_keys(key, batch)
  x = constrain(prior_sample(sde, fold_keys(keys, 0), shape))
  check_score_shape(score_fn, x)
  score_flat = per_example_score(score_fn, example_shape)
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

  y, nfe = jax.vmap(solve_one)(x.reshape(batch, dim), fold_keys(keys, 1))
  x = y.reshape(shape)
  if noise_removal:
    x = tweedie_denoise(sde, score_fn, x, eps)
    nfe = nfe + 1
  return x, {'nfe': jnp.max(nfe), 'nfe_per_example': nfe}


def ddim_sampler(key, score_fn: ScoreFn, sde, shape, *, ddim_eta=0.0, num_steps=0,
                 noise_removal=True, eps=1e-3, constrain=_identity) -> tuple[jax.Array, Info]:
  """DDIM from T to eps in num_steps steps (0: sde.N) on linspace(T, eps, num_steps + 1)."""
  num_steps = num_steps or sde.N
  batch, example_shape = shape[0], tuple(shape[1:])
  keys = example_keys(key, batch)
  x = constrain(prior_sample(sde, fold_keys(keys, 0), shape))
  check_score_shape(score_fn, x)
  times = jnp.linspace(sde.T, eps, num_steps + 1)

  def step(x, inputs):
    index, t, t_next = inputs
    mean_coeff, std = sde_lib.transition_coeffs(sde, t)
    next_mean_coeff, next_std = sde_lib.transition_coeffs(sde, t_next)
    score = score_fn(x, batch_times(t, x))
    eps_hat = -std * score
    x0_hat = (x + std ** 2 * score) / mean_coeff
    ratio = mean_coeff / next_mean_coeff
    post_var = next_std ** 2 / std ** 2 * (std ** 2 - ratio ** 2 * next_std ** 2)
    sigma = ddim_eta * jnp.sqrt(jnp.maximum(post_var, 0.0))
    noise = example_normal(fold_keys(keys, index + 1), example_shape, x.dtype)
    direction = jnp.sqrt(jnp.maximum(next_std ** 2 - sigma ** 2, 0.0))
    return next_mean_coeff * x0_hat + direction * eps_hat + sigma * noise, None

  x, _ = jax.lax.scan(step, x, (jnp.arange(num_steps), times[:-1], times[1:]))
  nfe = num_steps
  if noise_removal:
    x = tweedie_denoise(sde, score_fn, x, eps)
    nfe += 1
  return x, {'nfe': jnp.asarray(nfe, jnp.int32)}


class Method(NamedTuple):
  sampler: Callable
  defaults: dict             # the options this method takes, with defaults


METHODS = {
    'pc': Method(pc_sampler, dict(
        predictor='reverse_diffusion', corrector='langevin', snr=0.16, n_steps_each=1,
        snr_norm='example', noise_removal=True, probability_flow=False, num_steps=0, eps=1e-3)),
    'ode': Method(ode_sampler, dict(
        ode_solver='tsit5', rtol=1e-5, atol=1e-5, num_steps=0, noise_removal=True,
        eps=1e-3, max_steps=4096)),
    'sde': Method(sde_sampler, dict(
        sde_solver='euler', num_steps=0, noise_removal=True, eps=1e-3)),
    'ddim': Method(ddim_sampler, dict(
        ddim_eta=0.0, num_steps=0, noise_removal=True, eps=1e-3)),
}


# ----------------------------------------------------------------------------
# Option checks (eager, before anything is traced)
# ----------------------------------------------------------------------------

def _check_count(name: str, value, allow_zero: bool = False) -> int:
  if isinstance(value, bool) or int(value) != value or value < (0 if allow_zero else 1):
    bound = '>= 0' if allow_zero else '>= 1'
    raise ValueError(f'{name} must be an integer {bound}; got {value!r}.')
  return int(value)


def _check_shape(shape) -> tuple[int, ...]:
  shape = tuple(shape)
  if len(shape) < 2 or any(isinstance(d, bool) or int(d) != d or d < 1 for d in shape):
    raise ValueError(f'shape must be [B, ...] (a batch size, then the shape of one '
                     f'example) with positive integer sizes; got {shape}.')
  return tuple(int(d) for d in shape)


def resolve_options(sde, method: str, options: dict) -> tuple[Method, dict]:
  """Validated options of `method` (defaults filled in); raises on bad input."""
  spec = lookup(METHODS, method, 'sampling method')
  unknown = sorted(set(options) - set(spec.defaults))
  if unknown:
    raise ValueError(f'unknown option(s) {unknown} for sampling method {method!r}; '
                     f'valid: {sorted(spec.defaults)}.')
  opts = {**spec.defaults, **options}
  eps = float(opts['eps'])
  if not 0.0 < eps < sde.T:
    raise ValueError(f'eps must lie in (0, T) = (0, {sde.T}); got {eps}.')
  opts['eps'] = eps
  opts['num_steps'] = _check_count('num_steps', opts['num_steps'], allow_zero=True)
  for name in ('predictor', 'corrector', 'snr_norm', 'ode_solver', 'sde_solver'):
    if name in opts:
      opts[name] = str(opts[name]).lower()
  if 'predictor' in opts:
    pred = lookup(PREDICTORS, opts['predictor'], 'predictor')
    lookup(CORRECTORS, opts['corrector'], 'corrector')
    lookup(SNR_NORMS, opts['snr_norm'], 'snr_norm')
    if opts['predictor'] == 'none' and opts['corrector'] == 'none':
      raise ValueError('predictor and corrector are both "none": nothing would be '
                       'sampled; choose at least one.')
    if opts['probability_flow'] and not pred.allows_probability_flow:
      raise ValueError(f'predictor {opts["predictor"]!r} has no probability-flow '
                       f'form; use euler_maruyama or reverse_diffusion.')
    if not (math.isfinite(opts['snr']) and opts['snr'] > 0):
      raise ValueError(f'snr must be a positive number; got {opts["snr"]}.')
    opts['snr'] = float(opts['snr'])
    opts['n_steps_each'] = _check_count('n_steps_each', opts['n_steps_each'])
    opts['probability_flow'] = bool(opts['probability_flow'])
  if 'ode_solver' in opts:
    if not (opts['num_steps'] or lookup(ODE_SOLVERS, opts['ode_solver'], 'ODE solver').adaptive):
      opts['num_steps'] = sde.N     # a fixed-step solver: 0 means the SDE's N
    check_ode_options(opts['ode_solver'], opts['num_steps'], opts['rtol'], opts['atol'],
                      opts['max_steps'])
    opts['rtol'], opts['atol'] = float(opts['rtol']), float(opts['atol'])
  if 'sde_solver' in opts:
    lookup(SDE_SOLVERS, opts['sde_solver'], 'SDE solver')
  if 'ddim_eta' in opts:
    eta = float(opts['ddim_eta'])
    if not (math.isfinite(eta) and eta >= 0):
      raise ValueError(f'ddim_eta must be >= 0; got {eta}.')
    opts['ddim_eta'] = eta
  opts['noise_removal'] = bool(opts['noise_removal'])
  return spec, opts


# ----------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------

def build_sampler(sde, score_model_fn: ScoreModelFn, shape, method: str = 'pc',
                  mesh=None, **options) -> Callable:
  """Pure sampler(key, params) -> (x [B, ...], info) for `jax.jit` (not yet jitted).

  score_model_fn(params, x, t) gives the score; options as in `sample`.
  With a mesh the batch is sharded over its 'data' axis.
  """
  shape = _check_shape(shape)
  spec, opts = resolve_options(sde, method, options)
  constrain = _identity
  if mesh is not None:
    parallel.check_batch_divisible(shape[0], mesh, 'number of samples')
    sharding = parallel.batch_sharding(mesh)
    constrain = lambda x: jax.lax.with_sharding_constraint(x, sharding)  # noqa: E731

  def sampler(key, params):
    score_fn = lambda x, t: score_model_fn(params, x, t)  # noqa: E731
    return spec.sampler(key, score_fn, sde, shape, constrain=constrain, **opts)

  return sampler


def jit_sampler(sampler: Callable, mesh=None) -> Callable:
  """jax.jit of sampler(key, params): key and params replicated, samples sharded."""
  if mesh is None:
    return jax.jit(sampler)
  return jax.jit(sampler,
                 in_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
                 out_shardings=(parallel.batch_sharding(mesh), parallel.replicated(mesh)))


def config_options(config) -> tuple[str, dict]:
  """(method, options) read from `config.sampling` (keys of configs/defaults.py)."""
  sampling = config.sampling
  method = str(sampling.method).lower()
  spec = lookup(METHODS, method, 'sampling method (config.sampling.method)')
  options = {name: sampling.get(name, default) for name, default in spec.defaults.items()
             if name not in ('eps', 'max_steps')}
  return method, options


def get_sampling_fn(config, sde, score_model_fn: ScoreModelFn, shape, eps: float,
                    mesh=None) -> Callable:
  """Jitted sampling_fn(key, params) -> (x [B, ...] in model space, info) from the config.

  `config.sampling.method` picks pc | ode | sde | ddim; the other
  `config.sampling` keys set its options (num_steps 0 = the SDE's N, or adaptive
  steps for an adaptive ODE solver; `snr_norm`, if absent, is 'example').
  Parameters enter as an argument, so one compiled program serves every
  checkpoint. Apply the inverse scaler yourself.
  """
  method, options = config_options(config)
  sampler = build_sampler(sde, score_model_fn, shape, method, mesh=mesh, eps=eps,
                          **options)
  return jit_sampler(sampler, mesh)


@functools.lru_cache(maxsize=64)
def _cached_sampler(score_fn, sde, shape, method, option_items, mesh):
  sampler = build_sampler(sde, lambda _, x, t: score_fn(x, t), shape, method, mesh=mesh,
                          **dict(option_items))
  return jit_sampler(sampler, mesh)


def sample(key, score_fn: ScoreFn, sde, shape, method: str = 'pc', *, mesh=None,
           **options) -> tuple[jax.Array, Info]:
  """Draws shape[0] samples with `method` in 'pc' | 'ode' | 'sde' | 'ddim'.

  Args:
    key: PRNG key; example i depends only on (key, i).
    score_fn: score_fn(x [B, ...], t [B]) -> [B, ...].
    sde: the forward SDE (score_sde.sde interface).
    shape: [B, ...], the batch of samples to draw.
    method: 'pc' (options predictor, corrector, snr, n_steps_each, snr_norm,
      probability_flow, noise_removal, num_steps), 'ode' (ode_solver, rtol,
      atol, num_steps: 0 = adaptive, max_steps, noise_removal), 'sde'
      (sde_solver, num_steps, noise_removal), 'ddim' (ddim_eta, num_steps,
      noise_removal). All take eps (default 1e-3). num_steps 0 means sde.N.
    mesh: optional device mesh; samples are sharded over its 'data' axis.

  Returns:
    (x [B, ...], info) with info['nfe'] the number of (batched) score evaluations.

  The compiled sampler is cached per (score_fn, sde, shape, method, options,
  mesh): keep one score_fn object to reuse it.
  """
  shape = _check_shape(shape)
  fn = _cached_sampler(score_fn, sde, shape, str(method).lower(),
                       tuple(sorted(options.items())), mesh)
  return fn(key, None)
