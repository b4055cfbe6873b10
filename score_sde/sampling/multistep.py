"""Multistep exponential integrators in log-SNR with data prediction, for any SDE:
DPM-Solver++ (`dpmpp_2m`, `dpmpp_3m`, `dpmpp_2m_sde`; Lu et al. 2022b) and UniPC
(`unipc`; Zhao et al. 2023, B(h) = h).

With x_t = alpha_t x_0 + sigma_t z (alpha = m(t), sigma = s(t) of the SDE's
transitions), lambda = log(alpha / sigma) and the data prediction
x0(x, t) = (x + sigma_t^2 score(x, t)) / alpha_t, the probability-flow ODE has
the exact solution

  x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda x0(lambda) dlambda.

Each method approximates x0(lambda) on a step by a polynomial through the data
predictions of earlier steps, so that a step s -> t (h = lambda_t - lambda_s) is

  x_t = ratio x_s + alpha_t sum_j w_j x0_j

with weights w_j over the newest three predictions (x0 at s, and at the two
steps before). Orders: step i (1-based) of K uses min(order, i) points (the
usual warm-up); with `lower_order_final` and K < 15 the last steps drop to
min(order, K - i + 1) points too (as DPM-Solver and diffusers do for few steps).

  dpmpp_2m / 3m   ratio = sigma_t / sigma_s; order 2 / 3 multistep (phi_1 = e^-h - 1,
                  phi_2 = phi_1 / h + 1, phi_3 = phi_2 / h - 1/2)
  dpmpp_2m_sde    ratio = sigma_t / sigma_s e^-h, weights (1 - e^-2h) (1 + 1 / 2r, -1 / 2r),
                  plus sigma_t sqrt(1 - e^-2h) z: the SDE variant (midpoint form),
                  z from the example's own key (fold_in(key_b, step + 1))
  unipc           UniP-p predictor, then UniC-p corrector with the data prediction
                  at the predicted point; that evaluation is the one the next step
                  needs anyway, so the corrector costs no score evaluation. The
                  last step is not corrected (no evaluation follows it).

Every method evaluates the score once per step: num_steps = K steps from T to eps
cost K score evaluations, plus one for `noise_removal` (a Tweedie step at eps).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import sde as sde_lib
from score_sde.sampling import common
from score_sde.sampling import schedules
from score_sde.sampling.common import Info, ScoreFn

HISTORY = 3                  # data predictions kept: x0 at s and the two steps before
LOWER_ORDER_FINAL_BELOW = 15  # steps below which the final steps lower their order


def step_orders(num_steps: int, order: int, lower_order_final: bool) -> np.ndarray:
  """[K] points used by step i = 1..K (warm-up, and the final steps when K is small)."""
  steps = np.arange(1, num_steps + 1)
  orders = np.minimum(order, steps)
  if lower_order_final and num_steps < LOWER_ORDER_FINAL_BELOW:
    orders = np.minimum(orders, num_steps - steps + 1)
  return orders.astype(np.int32)


def _ratios(h, lam_history):
  """r_k = (lambda_k - lambda_s) / h for the two earlier predictions (negative;
  1 where a prediction does not exist yet, which the orders never use)."""
  r = (lam_history[1:] - lam_history[0]) / h
  return jnp.where(r == 0, -1.0, r)


# ----------------------------------------------------------------------------
# Weights over (x0 at s, x0 one step before, x0 two steps before[, x0 at t])
# ----------------------------------------------------------------------------

def dpmpp_weights(order, h, lam_history) -> jax.Array:
  """[3] weights of DPM-Solver++ (multistep, data prediction) for `order` 1, 2 or 3."""
  ratios = _ratios(h, lam_history)
  r0 = -ratios[0]                            # h_0 / h, h_0 = lambda_s - lambda_1
  r1 = ratios[0] - ratios[1]                 # h_1 / h, h_1 = lambda_1 - lambda_2
  phi1 = jnp.expm1(-h)
  phi2 = phi1 / h + 1.0
  phi3 = phi2 / h - 0.5
  first = jnp.stack([-phi1, 0.0, 0.0])
  second = jnp.stack([-phi1 * (1.0 + 0.5 / r0), 0.5 * phi1 / r0, 0.0])
  d1_0 = jnp.stack([1.0, -1.0, 0.0]) / r0    # (x0_s - x0_1) / r0
  d1_1 = jnp.stack([0.0, 1.0, -1.0]) / r1
  # With x0(lambda_s + u) = x0_s + u x0' + u^2 / 2 x0'' through the three points,
  # d1 = h x0' and d2 = h^2 x0'' exactly, and the integral of the docstring is
  # -phi1 x0_s + phi2 h x0' - phi3 h^2 x0''.
  d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
  d2 = 2.0 * (d1_0 - d1_1) / (r0 + r1)
  third = first + phi2 * d1 - phi3 * d2
  return jnp.select([order == 1, order == 2], [first, second], third)


def dpmpp_sde_weights(order, h, lam_history) -> jax.Array:
  """[3] weights of SDE-DPM-Solver++ (order 1 or 2, midpoint form)."""
  r0 = -_ratios(h, lam_history)[0]
  c = -jnp.expm1(-2.0 * h)
  first = jnp.stack([c, 0.0, 0.0])
  second = jnp.stack([c * (1.0 + 0.5 / r0), -c * 0.5 / r0, 0.0])
  return jnp.where(order == 1, first, second)


def _unipc_b(h, count: int) -> jax.Array:
  """[count] right-hand side g_k(h) / B(h) of UniPC with B(h) = h (data prediction)."""
  hh = -h
  phi = jnp.expm1(hh) / hh - 1.0
  values, factorial = [], 1.0
  for k in range(1, count + 1):
    values.append(phi * factorial / hh)
    factorial *= k + 1
    phi = phi / hh - 1.0 / factorial
  return jnp.stack(values)


def _difference_weights(r) -> jax.Array:
  """[2, 4] weights of D_k = (x0_k - x0_s) / r_k, k = 1, 2, over (x0_s, x0_1, x0_2, x0_t)."""
  return jnp.stack([jnp.stack([-1.0, 1.0, 0.0, 0.0]) / r[0],
                    jnp.stack([-1.0, 0.0, 1.0, 0.0]) / r[1]])


def unipc_weights(order, h, lam_history, corrector: bool) -> jax.Array:
  """[4] weights of UniP-p (corrector=False; x0_t unused) or UniC-p over
  (x0_s, x0_1, x0_2, x0_t), B(h) = h, for p = `order` in 1..3."""
  r = _ratios(h, lam_history)
  b = _unipc_b(h, 3)
  diffs = _difference_weights(r)
  d_t = jnp.stack([-1.0, 0.0, 0.0, 1.0])     # (x0_t - x0_s) / 1
  base = jnp.stack([-jnp.expm1(-h), 0.0, 0.0, 0.0])
  if corrector:
    rho_1 = jnp.array([0.5])
    rho_2 = jnp.linalg.solve(jnp.stack([jnp.ones(2), jnp.stack([r[0], 1.0])]), b[:2])
    ks = jnp.stack([r[0], r[1], 1.0])
    rho_3 = jnp.linalg.solve(jnp.stack([jnp.ones(3), ks, ks ** 2]), b)
    corr = [rho_1[0] * d_t,
            rho_2[0] * diffs[0] + rho_2[1] * d_t,
            rho_3[0] * diffs[0] + rho_3[1] * diffs[1] + rho_3[2] * d_t]
  else:
    rho_3 = jnp.linalg.solve(jnp.stack([jnp.ones(2), r]), b[:2])
    corr = [jnp.zeros(4), 0.5 * diffs[0], rho_3[0] * diffs[0] + rho_3[1] * diffs[1]]
  # x_t = ratio x_s - alpha_t (e^-h - 1) x0_s - alpha_t B(h) sum rho D, B(h) = -h
  corr = jnp.select([order == 1, order == 2], corr[:2], corr[2])
  return base + h * corr


# ----------------------------------------------------------------------------
# The samplers
# ----------------------------------------------------------------------------

def _setup(key, score_fn, sde, shape, num_steps, eps, grid, constrain):
  keys = common.example_keys(key, shape[0])
  x = constrain(common.prior_sample(sde, common.fold_keys(keys, 0), shape))
  common.check_score_shape(score_fn, x)
  times = schedules.time_grid(sde, num_steps, eps, grid)
  return keys, x, times


def _push(history, lam_history, x0, lam):
  return (jnp.concatenate([x0[None], history[:-1]]),
          jnp.concatenate([lam[None], lam_history[:-1]]))


def _combine(weights, history):
  """sum_j weights[j] history[j] for history [J, B, ...]."""
  return jnp.tensordot(weights.astype(history.dtype), history, axes=1)


def _finish(score_fn, sde, x, eps, num_steps, noise_removal):
  nfe = num_steps
  if noise_removal:
    x = common.tweedie_denoise(sde, score_fn, x, eps)
    nfe += 1
  return x, {'nfe': jnp.asarray(nfe, jnp.int32)}


def _dpmpp_sampler(key, score_fn, sde, shape, *, order, stochastic, num_steps,
                   grid, lower_order_final, noise_removal, eps, constrain):
  num_steps = num_steps or sde.N
  example_shape = tuple(shape[1:])
  keys, x, times = _setup(key, score_fn, sde, shape, num_steps, eps, grid, constrain)
  orders = step_orders(num_steps, order, lower_order_final)
  history = jnp.zeros((HISTORY,) + x.shape, x.dtype)
  lam_history = jnp.zeros((HISTORY,), jnp.float32)

  def step(carry, inputs):
    x, history, lam_history = carry
    index, p, t, t_next = inputs
    x0 = common.tweedie_denoise(sde, score_fn, x, t)
    history, lam_history = _push(history, lam_history, x0, schedules.log_snr(sde, t))
    lam_next = schedules.log_snr(sde, t_next)
    h = lam_next - lam_history[0]
    alpha_next, sigma_next = sde_lib.transition_coeffs(sde, t_next)
    sigma = sde_lib.transition_coeffs(sde, t)[1]
    if stochastic:
      weights = dpmpp_sde_weights(p, h, lam_history)
      noise = common.example_normal(common.fold_keys(keys, index + 1), example_shape, x.dtype)
      x = (sigma_next / sigma * jnp.exp(-h) * x + alpha_next * _combine(weights, history)
           + sigma_next * jnp.sqrt(-jnp.expm1(-2.0 * h)) * noise)
    else:
      weights = dpmpp_weights(p, h, lam_history)
      x = sigma_next / sigma * x + alpha_next * _combine(weights, history)
    return (x, history, lam_history), None

  (x, _, _), _ = jax.lax.scan(
      step, (x, history, lam_history),
      (jnp.arange(num_steps), jnp.asarray(orders), times[:-1], times[1:]))
  return _finish(score_fn, sde, x, eps, num_steps, noise_removal)


def dpmpp_2m_sampler(key, score_fn: ScoreFn, sde, shape, *, num_steps=0,
                     grid=schedules.Grid(), lower_order_final=True,
                     noise_removal=True, eps=1e-3,
                     constrain=common.identity) -> tuple[jax.Array, Info]:
  """DPM-Solver++(2M): K = num_steps steps, K (+1) score evaluations."""
  return _dpmpp_sampler(key, score_fn, sde, shape, order=2, stochastic=False,
                        num_steps=num_steps, grid=grid,
                        lower_order_final=lower_order_final, noise_removal=noise_removal,
                        eps=eps, constrain=constrain)


def dpmpp_3m_sampler(key, score_fn: ScoreFn, sde, shape, *, num_steps=0,
                     grid=schedules.Grid(), lower_order_final=True,
                     noise_removal=True, eps=1e-3,
                     constrain=common.identity) -> tuple[jax.Array, Info]:
  """DPM-Solver++(3M): K = num_steps steps, K (+1) score evaluations."""
  return _dpmpp_sampler(key, score_fn, sde, shape, order=3, stochastic=False,
                        num_steps=num_steps, grid=grid,
                        lower_order_final=lower_order_final, noise_removal=noise_removal,
                        eps=eps, constrain=constrain)


def dpmpp_2m_sde_sampler(key, score_fn: ScoreFn, sde, shape, *, num_steps=0,
                         grid=schedules.Grid(), lower_order_final=True,
                         noise_removal=True, eps=1e-3,
                         constrain=common.identity) -> tuple[jax.Array, Info]:
  """SDE-DPM-Solver++(2M): K = num_steps steps, K (+1) score evaluations."""
  return _dpmpp_sampler(key, score_fn, sde, shape, order=2, stochastic=True,
                        num_steps=num_steps, grid=grid,
                        lower_order_final=lower_order_final, noise_removal=noise_removal,
                        eps=eps, constrain=constrain)


def unipc_sampler(key, score_fn: ScoreFn, sde, shape, *, num_steps=0, solver_order=3,
                  grid=schedules.Grid(), lower_order_final=True,
                  noise_removal=True, eps=1e-3,
                  constrain=common.identity) -> tuple[jax.Array, Info]:
  """UniPC (B(h) = h), order `solver_order` (2 or 3): K steps, K (+1) evaluations."""
  num_steps = num_steps or sde.N
  keys, x, times = _setup(key, score_fn, sde, shape, num_steps, eps, grid, constrain)
  del keys
  orders = step_orders(num_steps, solver_order, lower_order_final)
  history = jnp.zeros((HISTORY,) + x.shape, x.dtype)
  lam_history = jnp.zeros((HISTORY,), jnp.float32)
  previous_order = np.concatenate([[0], orders[:-1]]).astype(np.int32)   # 0: no corrector

  def step(carry, inputs):
    x_base, x_pred, history, lam_history = carry
    p, p_before, t_before, t, t_next = inputs
    # The prediction at t (the predicted point) corrects the step that reached t.
    x0 = common.tweedie_denoise(sde, score_fn, x_pred, t)
    lam = schedules.log_snr(sde, t)
    h_before = lam - lam_history[0]
    alpha, sigma = sde_lib.transition_coeffs(sde, t)
    sigma_before = sde_lib.transition_coeffs(sde, t_before)[1]
    weights = unipc_weights(jnp.maximum(p_before, 1), h_before, lam_history, corrector=True)
    full = jnp.concatenate([history, x0[None]])
    corrected = sigma / sigma_before * x_base + alpha * _combine(weights, full)
    x = jnp.where(p_before > 0, corrected, x_pred)
    history, lam_history = _push(history, lam_history, x0, lam)
    # The predictor from t to t_next.
    h = schedules.log_snr(sde, t_next) - lam
    alpha_next, sigma_next = sde_lib.transition_coeffs(sde, t_next)
    weights = unipc_weights(p, h, lam_history, corrector=False)
    x_next = sigma_next / sigma * x + alpha_next * _combine(weights[:HISTORY], history)
    return (x, x_next, history, lam_history), None

  t_before = jnp.concatenate([times[:1], times[:-2]])
  (_, x, _, _), _ = jax.lax.scan(
      step, (x, x, history, lam_history),
      (jnp.asarray(orders), jnp.asarray(previous_order), t_before, times[:-1], times[1:]))
  return _finish(score_fn, sde, x, eps, num_steps, noise_removal)


def check_options(sde, opts: dict) -> dict:
  """Options shared by the multistep methods (and UniPC's order), validated."""
  opts = schedules.check_grid(sde, opts)
  opts['lower_order_final'] = bool(opts['lower_order_final'])
  if 'solver_order' in opts:
    order = opts['solver_order']
    if isinstance(order, bool) or order not in (1, 2, 3):
      raise ValueError(f'solver_order (UniPC) must be 1, 2 or 3; got {order!r}.')
    opts['solver_order'] = int(order)
  return opts
