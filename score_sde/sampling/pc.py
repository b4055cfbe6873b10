"""Predictor-corrector sampling: predictors, correctors and the one PC loop,
with an optional projection hook for constrained (controllable) sampling.

On the reference grid t_i = linspace(T, eps, N), one predictor step per t_i
(a step of length T / N, as in the reference) preceded by `n_steps_each`
corrector iterations at the same t_i:

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

Interfaces. A predictor is one step `(sde, score_fn, x, t [B], noise,
probability_flow) -> (x, x_mean)`; a corrector is built at each noise level,
`(sde, score_fn, x, t [B], snr, snr_norm) -> update`, and `update(x, noise) ->
(x, x_mean)` is one iteration. The loop draws all noise, so a new predictor or
corrector is one function and one entry in PREDICTORS / CORRECTORS.

Projection hook (`Projection`): a constrained sampler is this loop plus a
projection of the state, applied after the prior draw, after every corrector
iteration and after every predictor step, and a last map of the output
(controllable.py's replacement of observed entries is one).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import sde as sde_lib
from score_sde.sampling import common
from score_sde.sampling.common import Info, ScoreFn

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
  signal = common.chain_signal_factor(sde, x, t)
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
# Correctors: (sde, score_fn, x, t [B], snr, snr_norm) -> update, one iteration
#   update(x, noise) -> (x, x_mean) at the noise level t
# ----------------------------------------------------------------------------

def _example_snr_ratio(grad, noise, snr):
  """snr E|z| / |s_b| for each example b: [B]."""
  del noise
  noise_norm = common.expected_normal_norm(int(np.prod(grad.shape[1:])))
  return snr * noise_norm / common.per_example_norm(grad)


def _batch_snr_ratio(grad, noise, snr):
  """snr mean_b |z_b| / mean_b |s_b| over the whole (global) batch: scalar."""
  return (snr * jnp.mean(common.per_example_norm(noise))
          / jnp.mean(common.per_example_norm(grad)))


# How the Langevin corrector measures |z| / |s| in its snr rule.
SNR_NORMS = {
    'example': _example_snr_ratio,   # per example; needs high dimension (images)
    'batch': _batch_snr_ratio,       # the reference: means over the batch
}


def langevin_corrector(sde, score_fn, x, t, snr, snr_norm='example') -> Callable:
  """Langevin MCMC with the snr rule e = 2 alpha (snr |z| / |s|)^2.

  snr_norm 'example': |s| per example and |z| -> E|z|, so an example's step
  does not depend on its batch; the norms concentrate only in high dimension
  (images), and in a few dimensions |s| -> 0 near a mode makes the step
  explode. 'batch': the reference's means of |z| and |s| over the whole
  (global) batch, which is stable in any dimension but couples the examples
  (not the devices: the mean over a sharded batch is the same mean).
  """
  alpha = common.chain_signal_factor(sde, x, t) ** 2
  ratio_fn = SNR_NORMS[snr_norm]

  def update(x, noise):
    grad = score_fn(x, t)
    ratio = jnp.broadcast_to(ratio_fn(grad, noise, snr), x.shape[:1])
    step_size = 2.0 * alpha * sde_lib.expand_to(ratio ** 2, grad)
    x_mean = x + step_size * grad
    return x_mean + jnp.sqrt(2.0 * step_size) * noise, x_mean

  return update


def ald_corrector(sde, score_fn, x, t, snr, snr_norm='example') -> Callable:
  """Annealed Langevin dynamics (NCSN): e = 2 alpha (snr std(t))^2."""
  del snr_norm
  alpha = common.chain_signal_factor(sde, x, t) ** 2
  _, std = sde_lib.transition_coeffs(sde, t)
  step_size = 2.0 * alpha * sde_lib.expand_to((snr * std) ** 2, x)

  def update(x, noise):
    x_mean = x + step_size * score_fn(x, t)
    return x_mean + jnp.sqrt(2.0 * step_size) * noise, x_mean

  return update


class Predictor(NamedTuple):
  step: Callable
  score_evals: int           # per step
  allows_probability_flow: bool


class Corrector(NamedTuple):
  make: Callable | None      # None: no corrector (predictor-only sampling)
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
    'none': Corrector(None, 0),
}


# ----------------------------------------------------------------------------
# The PC loop
# ----------------------------------------------------------------------------

class Projection(NamedTuple):
  """A constraint on the PC loop's state: pure functions, traced with the loop.

  project(x [B, ...], t, keys [B]) -> x: called after the prior draw (t = T),
    after every corrector iteration (t = t_i) and after every predictor step
    (t = t_{i+1}, the time the step reached; eps after the last), with keys of
    its own (see `pc_sampler`).
  finish(x [B, ...]) -> x: applied to the returned samples.
  """
  project: Callable
  finish: Callable = common.identity


def pc_sampler(key, score_fn: ScoreFn, sde, shape, *, predictor='reverse_diffusion',
               corrector='langevin', snr=0.16, n_steps_each=1, snr_norm='example',
               noise_removal=True, probability_flow=False, num_steps=0, eps=1e-3,
               constrain=common.identity,
               projection: Projection | None = None) -> tuple[jax.Array, Info]:
  """Predictor-corrector sampling on linspace(T, eps, N), N = num_steps or sde.N.

  `constrain` is applied to the prior draw (the batch's sharding); `projection`
  (a `Projection`, optional) constrains the state after every update.
  Returns (x [B, ...], info {'nfe'}).

  Keys of example b (k_b = fold_in(key, b)): fold_in(k_b, 0) draws the prior;
  step i uses s = fold_in(k_b, i + 1): fold_in(s, 0) the predictor noise,
  fold_in(fold_in(s, 1), j) the noise of corrector iteration j, and for a
  projection fold_in(fold_in(s, 2), j) after corrector iteration j and
  fold_in(s, 3) after the predictor; the projection of the prior draw uses
  fold_in(k_b, N + 1). Without a projection no key of the projection is made.
  """
  sde = common.with_num_steps(sde, num_steps)
  pred = PREDICTORS[predictor]
  corr = CORRECTORS[corrector]
  batch, example_shape = shape[0], tuple(shape[1:])
  keys = common.example_keys(key, batch)
  x = constrain(common.prior_sample(sde, common.fold_keys(keys, 0), shape))
  common.check_score_shape(score_fn, x)
  if projection is not None:
    x = projection.project(x, sde.T, common.fold_keys(keys, sde.N + 1))

  def correct(x, t, vec_t, step_keys):
    """n_steps_each corrector iterations at the level t."""
    noise_keys = common.fold_keys(step_keys, 1)
    update = corr.make(sde, score_fn, x, vec_t, snr, snr_norm)

    def iteration(carry, j):
      x, _ = carry
      noise = common.example_normal(common.fold_keys(noise_keys, j), example_shape, x.dtype)
      x, x_mean = update(x, noise)
      if projection is not None:
        x = projection.project(x, t, common.fold_keys(common.fold_keys(step_keys, 2), j))
      return (x, x_mean), None

    (x, x_mean), _ = jax.lax.scan(iteration, (x, x), jnp.arange(n_steps_each))
    return x, x_mean

  def step(carry, inputs):
    x, _ = carry
    index, t, t_end = inputs
    vec_t = common.batch_times(t, x)
    step_keys = common.fold_keys(keys, index + 1)
    if corr.make is not None:
      x, _ = correct(x, t, vec_t, step_keys)
    noise = common.example_normal(common.fold_keys(step_keys, 0), example_shape, x.dtype)
    x, x_mean = pred.step(sde, score_fn, x, vec_t, noise, probability_flow)
    if projection is not None:
      x = projection.project(x, t_end, common.fold_keys(step_keys, 3))
    return (x, x_mean), None

  timesteps = jnp.linspace(sde.T, eps, sde.N)
  ends = None                      # where each step ends (the projection's time), else nothing
  if projection is not None:
    ends = jnp.concatenate([timesteps[1:], jnp.full((1,), eps, timesteps.dtype)])
  (x, x_mean), _ = jax.lax.scan(step, (x, x), (jnp.arange(sde.N), timesteps, ends))
  nfe = sde.N * (pred.score_evals + corr.score_evals * n_steps_each)
  out = x_mean if noise_removal else x
  if projection is not None:
    out = projection.finish(out)
  return out, {'nfe': jnp.asarray(nfe, jnp.int32)}


def check_options(sde, opts: dict) -> dict:
  """The PC options, validated (names lower-case); raises on bad input."""
  del sde
  for name in ('predictor', 'corrector', 'snr_norm'):
    opts[name] = str(opts[name]).lower()
  pred = common.lookup(PREDICTORS, opts['predictor'], 'predictor')
  common.lookup(CORRECTORS, opts['corrector'], 'corrector')
  common.lookup(SNR_NORMS, opts['snr_norm'], 'snr_norm')
  if opts['predictor'] == 'none' and opts['corrector'] == 'none':
    raise ValueError('predictor and corrector are both "none": nothing would be '
                     'sampled; choose at least one.')
  if opts['probability_flow'] and not pred.allows_probability_flow:
    raise ValueError(f'predictor {opts["predictor"]!r} has no probability-flow '
                     f'form; use euler_maruyama or reverse_diffusion.')
  if not (math.isfinite(opts['snr']) and opts['snr'] > 0):
    raise ValueError(f'snr must be a positive number; got {opts["snr"]}.')
  opts['snr'] = float(opts['snr'])
  opts['n_steps_each'] = common.check_count('n_steps_each', opts['n_steps_each'])
  opts['probability_flow'] = bool(opts['probability_flow'])
  return opts
