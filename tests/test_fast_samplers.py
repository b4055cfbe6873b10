"""The few-step samplers (heun, edm, dpmpp_2m, dpmpp_3m, dpmpp_2m_sde, unipc) on every SDE.

Checked against: the exact Gaussian mixture of tests/test_sampling.py (the same
calibrated chi^2-like statistic), a point mass (whose probability-flow ODE
every one of these methods integrates exactly, at any step count), Gaussian data
(heun and dpmpp_2m against the closed form of their steps), the tight-tolerance
adaptive ODE from the same prior draw (convergence orders), counted score calls,
closed-form time grids, and 1 versus 4 devices.
"""
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from score_sde import analytic
from score_sde import parallel
from score_sde import sampling
from score_sde import sde as sde_lib
from score_sde.sampling import multistep
from score_sde.sampling import schedules
from tests.test_sampling import (MIX, SCORES, SDES, count_score_calls, mixture_stat,
                                 threshold)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = jax.random.PRNGKey(0)
FAST = ('heun', 'edm', 'dpmpp_2m', 'dpmpp_3m', 'dpmpp_2m_sde', 'unipc')
DETERMINISTIC = ('heun', 'dpmpp_2m', 'dpmpp_3m', 'unipc')
ALL_SDES = {**SDES, 'cosine': sde_lib.VPSDE(schedule='cosine')}
EVALS_PER_STEP = {'heun': 2, 'edm': 2}


def run(sde_name, method, num_samples=2000, key=KEY, **options):
  sde = ALL_SDES[sde_name]
  score = SCORES.get(sde_name) or _cosine_score()
  return sampling.sample(key, score, sde, (num_samples, 2), method, **options)


_COSINE = []


def _cosine_score():
  if not _COSINE:                      # one object, so its compiled samplers are reused
    _COSINE.append(MIX.score_fn(ALL_SDES['cosine']))
  return _COSINE[0]


# ----------------------------------------------------------------------------
# Distributions
# ----------------------------------------------------------------------------

# 30 steps (50 for edm, whose churn adds noise each step, and 60 for the
# first-order-in-noise dpmpp_2m_sde): every method passes the statistic
# calibrated on true samples (threshold df + 6 sqrt(2 df) = 47.9). Measured for
# dpmpp_2m_sde on the cosine VP, seeds 0-2: 30 steps 62.7 / 34.6 / 55.7,
# 60 steps 13.4 / 23.9 / 19.8, 120 steps 5.8 / 10.7 / 14.1.
STEPS = {'edm': 50, 'dpmpp_2m_sde': 60}
FAST_CASES = [('vp', m) for m in FAST] + [('ve', 'dpmpp_2m'), ('subvp', 'unipc'),
                                           ('cosine', 'heun')]
SLOW_CASES = sorted({(s, m) for s in ALL_SDES for m in FAST} - set(FAST_CASES))


@pytest.mark.parametrize('sde_name,method', FAST_CASES + [
    pytest.param(*case, marks=pytest.mark.slow) for case in SLOW_CASES])
def test_sampler_matches_mixture(sde_name, method):
  x, info = run(sde_name, method, num_steps=STEPS.get(method, 30))
  assert mixture_stat(MIX, x) < threshold(MIX)


# ----------------------------------------------------------------------------
# Exactness and convergence
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('sde_name', list(ALL_SDES))
@pytest.mark.parametrize('method', DETERMINISTIC)
@pytest.mark.parametrize('schedule', schedules.SCHEDULES)
def test_point_mass_flow_is_integrated_exactly(sde_name, method, schedule):
  """Data = a point mu: D(x, t) = mu, and the flow is x_t = m_t (mu + (x_T / m_T - mu)
  sigma_t / sigma_T) (linear in sigma). Exponential integrators with a constant data
  prediction and Heun on a linear path are exact at any step count."""
  sde = ALL_SDES[sde_name]
  mu = jnp.array([0.7, -1.3])

  def score(x, t):
    mean_coeff, std = sde_lib.transition_coeffs(sde, t)
    return -(x - mean_coeff[:, None] * mu) / std[:, None] ** 2

  eps = 1e-3
  x, _ = sampling.sample(KEY, score, sde, (64, 2), method, num_steps=4, time_schedule=schedule,
                         noise_removal=False, eps=eps)
  prior = sampling.prior_sample(sde, sampling.fold_keys(sampling.example_keys(KEY, 64), 0),
                                (64, 2))
  m_end, _ = sde_lib.transition_coeffs(sde, eps)
  m_start, _ = sde_lib.transition_coeffs(sde, sde.T)
  shrink = schedules.edm_sigma(sde, eps) / schedules.edm_sigma(sde, sde.T)
  expected = m_end * (mu + (prior / m_start - mu) * shrink)
  # Heun works on y = x / m(t), up to sigma(T) = 6024 under the cosine VP: float32
  # rounding of |y| ~ 1e4 leaves up to ~4e-3 absolute (measured) after the steps.
  atol = 5e-3 if method == 'heun' else 2e-5
  np.testing.assert_allclose(x, expected, rtol=2e-4, atol=atol)


@pytest.mark.parametrize('sde_name', ['vp', 've'])
def test_edm_churn_follows_algorithm_2_on_a_point_mass(sde_name):
  """EDM's stochastic sampler on a point mu (D = mu at every noise level) is, per step,
  y_hat = y + sqrt(sigma_hat^2 - sigma^2) S_noise z_i, y' = mu + (y_hat - mu) sigma' /
  sigma_hat (Euler and Heun agree), with sigma_hat = min(sigma (1 + gamma), sigma(T)),
  gamma = min(S_churn / K, sqrt(2) - 1) inside [S_tmin, S_tmax], else 0. Rebuilt here in
  float64 from the documented noise keys (z_i: example key folded with i + 1); the churn
  keeps a point mass's marginals, so a statistical test could not see a wrong gamma or
  a slope taken at sigma instead of sigma_hat."""
  sde = ALL_SDES[sde_name]
  mu = np.array([0.7, -1.3])
  num_steps, eps, batch = 10, 1e-3, 16
  s_churn, s_tmin, s_tmax, s_noise = 40.0, 0.05, 20.0, 1.003

  def score(x, t):
    mean_coeff, std = sde_lib.transition_coeffs(sde, t)
    return -(x - mean_coeff[:, None] * mu) / std[:, None] ** 2

  x, _ = sampling.sample(KEY, score, sde, (batch, 2), 'edm', num_steps=num_steps,
                         noise_removal=False, eps=eps, s_churn=s_churn, s_tmin=s_tmin,
                         s_tmax=s_tmax, s_noise=s_noise)
  keys = sampling.example_keys(KEY, batch)
  times = schedules.time_grid(sde, num_steps, eps, schedules.Grid())
  sigmas = np.asarray(schedules.edm_sigma(sde, times), np.float64)
  sigma_top = float(schedules.edm_sigma(sde, sde.T))
  m_top = float(sde_lib.transition_coeffs(sde, sde.T)[0])
  y = np.asarray(sampling.prior_sample(sde, sampling.fold_keys(keys, 0), (batch, 2)),
                 np.float64) / m_top
  gamma_inside = min(s_churn / num_steps, math.sqrt(2.0) - 1.0)
  raised = 0
  for i in range(num_steps):
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    gamma = gamma_inside if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = min(sigma * (1.0 + gamma), sigma_top)
    raised += sigma_hat > sigma * 1.01
    z = np.asarray(jax.vmap(lambda k, i=i: jax.random.normal(
        jax.random.fold_in(k, i + 1), (2,)))(keys), np.float64)
    y_hat = y + math.sqrt(sigma_hat ** 2 - sigma ** 2) * s_noise * z
    y = mu + (y_hat - mu) * sigma_next / sigma_hat
  assert raised >= 3                   # the cap and the window both matter on this grid
  m_end = float(sde_lib.transition_coeffs(sde, eps)[0])
  np.testing.assert_allclose(x, m_end * y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('sde_name', list(ALL_SDES))
@pytest.mark.parametrize('method,schedule', [('heun', 'logsnr'), ('heun', 'karras'),
                                             ('dpmpp_2m', 'logsnr'), ('dpmpp_2m', 'time'),
                                             ('dpmpp_2m', 'karras')])
def test_gaussian_data_follows_the_step_rule_exactly(sde_name, method, schedule):
  """On Gaussian data both samplers are affine in the prior draw; the map equals the
  independent float64 recurrence of their step formulas (`analytic.gaussian_step_map`,
  also the closed form behind benchmarks/step_error_bound.py) on the sampler's own grid."""
  sde = ALL_SDES[sde_name]
  mu, v = np.array([0.5, -1.0]), np.array([0.125, 1.0])

  def score(x, t):
    mean_coeff, std = sde_lib.transition_coeffs(sde, t)
    return -(x - mean_coeff[:, None] * mu) / (mean_coeff[:, None] ** 2 * v + std[:, None] ** 2)

  eps, num_steps = 1e-3, 6
  x, _ = sampling.sample(KEY, score, sde, (64, 2), method, num_steps=num_steps,
                         time_schedule=schedule, eps=eps)
  prior = sampling.prior_sample(sde, sampling.fold_keys(sampling.example_keys(KEY, 64), 0),
                                (64, 2))
  grid = schedules.Grid(time_schedule=schedule)
  times = schedules.time_grid(sde, num_steps, eps, grid)
  sigmas = np.asarray(schedules.edm_sigma(sde, times), np.float64)
  m_top = float(sde_lib.transition_coeffs(sde, sde.T)[0])
  expected = analytic.gaussian_step_map(
      method, sigmas, np.asarray(prior, np.float64) / m_top, mu, v,
      euler_first=method == 'heun' and schedules.top_is_clipped(sde, grid),
      lower_order_final_below=multistep.LOWER_ORDER_FINAL_BELOW)
  np.testing.assert_allclose(x, expected, rtol=1e-4, atol=1e-4)


def test_gaussian_step_map_names_the_methods_it_covers():
  with pytest.raises(ValueError, match="covers 'heun' and 'dpmpp_2m'; got 'unipc'"):
    analytic.gaussian_step_map('unipc', [1.0, 0.1], np.zeros(2), np.zeros(2), np.ones(2))


def test_closed_form_step_error_predicts_the_measured_mixture_gap(monkeypatch):
  """benchmarks/step_error_bound.py's first-order gap (Gaussian components only) against
  the mean log-density gap measured by sampling the 16-D mixture (10000 samples, standard
  error 0.03 nats): heun -2.16 predicted / -2.07 measured, dpmpp_2m -0.20 / -0.26."""
  monkeypatch.syspath_prepend(os.path.join(ROOT, 'benchmarks'))
  import fast_samplers
  import step_error_bound
  sde, eps = fast_samplers.SDES['vp'], fast_samplers.EPS['vp']
  mix = fast_samplers.mixture()
  expected_logp = fast_samplers.expected_log_prob(mix)
  for method in ('heun', 'dpmpp_2m'):
    prediction = step_error_bound.predicted('vp', method, 20)
    x, _ = sampling.sample(KEY, mix.score_fn(sde), sde, (10000, fast_samplers.DIM), method,
                           num_steps=prediction['num_steps'], eps=eps)
    measured = float(jnp.mean(mix.log_prob(x))) - expected_logp
    assert abs(measured - prediction['predicted_gap']) < 0.15, (method, prediction, measured)


@pytest.fixture(scope='module')
def tight_ode_solution():
  x, _ = run('vp', 'ode', 200, rtol=1e-6, atol=1e-6)
  return np.asarray(x)


@pytest.mark.parametrize('method,options,order', [
    ('heun', {}, 2), ('dpmpp_2m', {}, 2), ('dpmpp_3m', {}, 3), ('unipc', {}, 3),
    ('unipc', dict(solver_order=2), 2)])
def test_convergence_order_towards_the_ode_solution(tight_ode_solution, method, options, order):
  """Median distance to the tight adaptive ODE from the same prior draw falls like
  num_steps^-order from 20 to 40 steps (measured: heun 2.2, dpmpp_2m 2.2, dpmpp_3m 3.3,
  unipc 6.3 / 3.0; unipc order 3 meets the reference's own error, ~5e-5, by 80 steps)."""
  errors = []
  for num_steps in (20, 40):
    x, _ = run('vp', method, 200, num_steps=num_steps, **options)
    errors.append(np.median(np.linalg.norm(np.asarray(x) - tight_ode_solution, axis=1)))
  observed = np.log2(errors[0] / errors[1])
  assert observed > order - 0.35, (errors, observed)


@pytest.mark.parametrize('method,options,order', [
    ('unipc', dict(solver_order=1), 2), ('unipc', dict(solver_order=2), 3),
    ('unipc', dict(solver_order=3), 4), ('dpmpp_2m', {}, 2), ('dpmpp_3m', {}, 3),
    ('heun', {}, 2)])
def test_convergence_order_on_a_closed_form_flow(method, options, order):
  """A data prediction that depends on the log-SNR lambda = log(m / s) only, D = (sin
  lambda, cos lambda), makes the probability-flow ODE a quadrature: x(eps) = (s_eps /
  s_T) x_T + s_eps [P(lambda_eps) - P(lambda_T)], P(l) = e^l ((sin l - cos l) / 2,
  (sin l + cos l) / 2). The error from 20 to 40 steps falls like K^-order; UniPC's
  corrector raises its predictor's order p to p + 1 (measured 1.90, 2.89, 3.76;
  dpmpp_2m 2.08, dpmpp_3m 3.15, heun 2.20; UniPC without the corrector 2.10 / 3.15
  at p = 2 / 3, and 0.72 at p = 1 with rho_1 = 1)."""
  sde, eps = sde_lib.VPSDE(), 1e-3

  def log_snr(mean_coeff, std):
    return jnp.log(mean_coeff / std)

  def score(x, t):
    mean_coeff, std = sde_lib.transition_coeffs(sde, t)
    lam = log_snr(mean_coeff, std)
    data = jnp.stack([jnp.sin(lam), jnp.cos(lam)], -1)
    return -(x - mean_coeff[:, None] * data) / std[:, None] ** 2

  def primitive(lam):
    return np.exp(lam) * np.array([np.sin(lam) - np.cos(lam), np.sin(lam) + np.cos(lam)]) / 2

  prior = np.asarray(sampling.prior_sample(
      sde, sampling.fold_keys(sampling.example_keys(KEY, 4), 0), (4, 2)), np.float64)
  m_top, s_top = (float(c) for c in sde_lib.transition_coeffs(sde, sde.T))
  m_end, s_end = (float(c) for c in sde_lib.transition_coeffs(sde, eps))
  expected = s_end / s_top * prior + s_end * (primitive(np.log(m_end / s_end))
                                              - primitive(np.log(m_top / s_top)))
  errors = []
  for num_steps in (20, 40):
    x, _ = sampling.sample(KEY, score, sde, (4, 2), method, num_steps=num_steps,
                           noise_removal=False, eps=eps, **options)
    errors.append(np.abs(np.asarray(x, np.float64) - expected).max())
  observed = np.log2(errors[0] / errors[1])
  assert observed > order - 0.5, (errors, observed)


def test_sde_dpm_solver_drift_is_second_order_on_a_closed_form_mean():
  """SDE-DPM-Solver++(2M) with the log-SNR-only data prediction D(lambda) above: the
  output is (prior and noise terms that do not depend on D) + a D term. Running with D
  and with D = 0 from the same keys leaves the D term, whose exact value under the
  reverse SDE is 2 m_eps e^(-2 lambda_eps) [Q(lambda_eps) - Q(lambda_T)], Q(l) = e^(2l)
  (2 sin l - cos l, 2 cos l + sin l) / 5. Its error falls like K^-2 (measured 2.13 from
  20 to 40 steps; 1.30 with the second-order coefficient 0.5 / r halved)."""
  sde, eps = sde_lib.VPSDE(), 1e-3

  def make_score(scale):
    def score(x, t):
      mean_coeff, std = sde_lib.transition_coeffs(sde, t)
      lam = jnp.log(mean_coeff / std)
      data = scale * jnp.stack([jnp.sin(lam), jnp.cos(lam)], -1)
      return -(x - mean_coeff[:, None] * data) / std[:, None] ** 2
    return score

  def primitive(lam):
    return np.exp(2 * lam) * np.array([2 * np.sin(lam) - np.cos(lam),
                                       2 * np.cos(lam) + np.sin(lam)]) / 5

  m_top, s_top = (float(c) for c in sde_lib.transition_coeffs(sde, sde.T))
  m_end, s_end = (float(c) for c in sde_lib.transition_coeffs(sde, eps))
  lam_top, lam_end = np.log(m_top / s_top), np.log(m_end / s_end)
  expected = 2 * m_end * np.exp(-2 * lam_end) * (primitive(lam_end) - primitive(lam_top))
  with_data, without_data = make_score(1.0), make_score(0.0)
  errors = []
  for num_steps in (20, 40):
    x, _ = sampling.sample(KEY, with_data, sde, (4, 2), 'dpmpp_2m_sde', num_steps=num_steps,
                           noise_removal=False, eps=eps)
    x_zero, _ = sampling.sample(KEY, without_data, sde, (4, 2), 'dpmpp_2m_sde',
                                num_steps=num_steps, noise_removal=False, eps=eps)
    drift = np.asarray(x, np.float64) - np.asarray(x_zero, np.float64)
    errors.append(np.abs(drift - expected).max())
  observed = np.log2(errors[0] / errors[1])
  assert observed > 1.5, (errors, observed)


# ----------------------------------------------------------------------------
# Time grids
# ----------------------------------------------------------------------------

UNCLIPPED = dict(grid_sigma_min=0.0, grid_sigma_max=math.inf)


def test_karras_grid_on_ve_equals_the_closed_form():
  """VE: sigma(t) = sigma_min (sigma_max / sigma_min)^t, so t = log(sigma / sigma_min) /
  log(sigma_max / sigma_min) for EDM's sigma_i (the SDE's range lies inside [0.002, 80])."""
  sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0)
  eps, k, rho = 1e-5, 10, 7.0
  times = np.asarray(schedules.time_grid(sde, k, eps, schedules.Grid('karras', rho)),
                     np.float64)
  lo, hi = 0.01 * (5000.0 ** eps), 0.01 * (5000.0 ** 1.0)
  sigmas = (hi ** (1 / rho) + np.arange(k + 1) / k * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
  np.testing.assert_allclose(times, np.log(sigmas / 0.01) / np.log(5000.0), atol=2e-6)


def test_karras_grid_keeps_edms_sigma_range_inside_a_wider_sde():
  """VE with sigma in [1e-3, 378] (the LSUN configs): the interior points are EDM's
  sigma_i between 80 and 0.002; the ends stay at T and eps."""
  sde = sde_lib.VESDE(sigma_min=0.001, sigma_max=378.0)
  eps, k, rho = 1e-5, 10, 7.0
  times = np.asarray(schedules.time_grid(sde, k, eps, schedules.Grid('karras', rho)),
                     np.float64)
  sigmas = (80.0 ** (1 / rho)
            + np.arange(k + 1) / k * (0.002 ** (1 / rho) - 80.0 ** (1 / rho))) ** rho
  expected = np.log(sigmas / 0.001) / np.log(378000.0)
  expected[0], expected[-1] = 1.0, eps
  np.testing.assert_allclose(times, expected, atol=2e-6)


@pytest.mark.parametrize('sde_name', list(ALL_SDES))
def test_logsnr_and_time_grids(sde_name):
  sde = ALL_SDES[sde_name]
  eps = 1e-3
  times = schedules.time_grid(sde, 8, eps, schedules.Grid('logsnr', **UNCLIPPED))
  lam = np.asarray(schedules.log_snr(sde, times), np.float64)
  np.testing.assert_allclose(np.diff(lam), (lam[-1] - lam[0]) / 8, rtol=2e-3)
  np.testing.assert_array_equal(np.asarray(times)[[0, -1]], np.float32([sde.T, eps]))
  uniform = np.asarray(schedules.time_grid(sde, 8, eps, schedules.Grid('time', **UNCLIPPED)))
  np.testing.assert_allclose(uniform, np.linspace(sde.T, eps, 9), atol=1e-6)
  for schedule in schedules.SCHEDULES:
    for grid in (schedules.Grid(schedule), schedules.Grid(schedule, **UNCLIPPED)):
      assert np.all(np.diff(np.asarray(schedules.time_grid(sde, 8, eps, grid))) < 0)


@pytest.mark.parametrize('sde_name', list(ALL_SDES))
def test_default_logsnr_grid_is_uniform_inside_edms_sigma_range(sde_name):
  """Interior log-SNRs step uniformly from max(lambda(T), -log 80) to
  min(lambda(eps), -log 0.002); the ends stay at T and eps."""
  sde, eps, k = ALL_SDES[sde_name], 1e-3, 8
  times = np.asarray(schedules.time_grid(sde, k, eps, schedules.Grid('logsnr')))
  lam_start = max(float(schedules.log_snr(sde, sde.T)), -math.log(80.0))
  lam_end = min(float(schedules.log_snr(sde, eps)), -math.log(0.002))
  lam = np.asarray(schedules.log_snr(sde, times[1:-1]), np.float64)
  np.testing.assert_allclose(lam, lam_start + np.arange(1, k) / k * (lam_end - lam_start),
                             atol=2e-3)
  np.testing.assert_array_equal(times[[0, -1]], np.float32([sde.T, eps]))
  sigma = np.exp(-lam)
  assert np.all((sigma > 0.002) & (sigma < 80.0))


def test_time_grid_is_uniform_in_t_inside_edms_sigma_range():
  """Cosine VP (sigma(T) = 6024): the interior times are equally spaced, and continuing
  that spacing one step past each end lands on sigma = 80 and sigma = max(sigma(eps), 0.002)."""
  sde, eps, k = ALL_SDES['cosine'], 1e-3, 8
  times = np.asarray(schedules.time_grid(sde, k, eps, schedules.Grid('time')), np.float64)
  interior = times[1:-1]
  spacing = np.diff(interior)
  np.testing.assert_allclose(spacing, spacing.mean(), rtol=1e-4)
  top, bottom = interior[0] - spacing.mean(), interior[-1] + spacing.mean()
  sigma_bottom = max(float(schedules.edm_sigma(sde, eps)), 0.002)
  np.testing.assert_allclose(float(schedules.edm_sigma(sde, top)), 80.0, rtol=1e-3)
  np.testing.assert_allclose(float(schedules.edm_sigma(sde, bottom)), sigma_bottom, rtol=1e-3)
  np.testing.assert_array_equal(times[[0, -1]], np.float32([sde.T, eps]))


def test_step_orders_warm_up_and_lower_the_final_steps():
  np.testing.assert_array_equal(multistep.step_orders(6, 3, True), [1, 2, 3, 3, 2, 1])
  np.testing.assert_array_equal(multistep.step_orders(6, 3, False), [1, 2, 3, 3, 3, 3])
  np.testing.assert_array_equal(multistep.step_orders(20, 2, True)[-3:], [2, 2, 2])


# ----------------------------------------------------------------------------
# Evaluations, randomness, devices
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('method', FAST)
@pytest.mark.parametrize('noise_removal', [True, False])
def test_reported_nfe_counts_score_calls(method, noise_removal):
  calls, info = count_score_calls(method, num_steps=5, noise_removal=noise_removal)
  # heun / edm: the VP's sigma(T) = 152 lies above grid_sigma_max = 80, so their first
  # step is an Euler step (one evaluation); without the clip all five are Heun steps.
  euler_first = int(method in EVALS_PER_STEP)
  assert calls == int(info['nfe']) == (5 * EVALS_PER_STEP.get(method, 1) - euler_first
                                        + noise_removal)
  if euler_first:
    calls, info = count_score_calls(method, num_steps=5, noise_removal=noise_removal,
                                    grid_sigma_max=1e9)
    assert calls == int(info['nfe']) == 10 + noise_removal


@pytest.mark.parametrize('method', ['edm', 'dpmpp_2m_sde'])
def test_stochastic_samplers_draw_per_example_noise(method):
  x1, _ = run('vp', method, 16, num_steps=10)
  x2, _ = run('vp', method, 16, num_steps=10)
  np.testing.assert_array_equal(x1, x2)
  x_small, _ = run('vp', method, 8, num_steps=10)
  np.testing.assert_allclose(x_small, x1[:8], rtol=1e-6, atol=1e-6)
  x_other, _ = run('vp', method, 16, key=jax.random.PRNGKey(1), num_steps=10)
  assert np.all(np.abs(np.asarray(x_other - x1)) > 1e-6)
  x_det, _ = run('vp', 'heun' if method == 'edm' else 'dpmpp_2m', 16, num_steps=10)
  assert np.all(np.abs(np.asarray(x_det - x1)) > 1e-6)     # the noise is really used


@pytest.mark.parametrize('method', ['edm', 'dpmpp_2m_sde', 'unipc'])
def test_samples_do_not_depend_on_device_count(method, four_devices):
  sde = SDES['vp']
  config = ml_collections.ConfigDict()
  config.sampling = ml_collections.ConfigDict(dict(method=method, num_steps=8,
                                                   time_schedule='auto'))
  outputs = []
  for num_devices in (1, 4):
    mesh = parallel.make_mesh(four_devices[:num_devices])
    fn = sampling.get_sampling_fn(config, sde, lambda mix, x, t: mix.score(x, t, sde), (8, 2),
                                  1e-3, mesh)
    x, info = fn(KEY, MIX)
    assert len(x.sharding.device_set) == num_devices
    outputs.append(np.asarray(x))
  assert int(info['nfe']) == 8 * EVALS_PER_STEP.get(method, 1) + 1 - (method == 'edm')
  # Only rounding may differ (XLA fuses per device count; EDM's y = x / m(t) at
  # sigma(T) = 152 amplifies it: 4e-5 measured).
  np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)


def test_config_auto_schedule_is_the_methods_own():
  sde = SDES['vp']
  for method in FAST:
    _, opts = sampling.resolve_options(sde, method, dict(time_schedule='auto'))
    assert opts['grid'].time_schedule == sampling.METHODS[method].defaults['time_schedule']
  _, opts = sampling.resolve_options(sde, 'heun', dict(time_schedule='Karras'))
  assert opts['grid'] == schedules.Grid('karras', 7.0, 0.002, 80.0)



# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('method,options,match', [
    ('heun', dict(time_schedule='cosine'), r"unknown time_schedule 'cosine'; valid: \['karras'"),
    ('dpmpp_2m', dict(rho=0.0), r'rho \(the Karras schedule exponent\) must be > 0'),
    ('unipc', dict(grid_sigma_min=1.0, grid_sigma_max=0.5),
     r'grid_sigma_min / grid_sigma_max must satisfy 0 <= min < max; got 1.0 / 0.5'),
    ('heun', dict(grid_sigma_min=200.0, grid_sigma_max=300.0),
     r"the grid noise levels \[grid_sigma_min, grid_sigma_max\] = \[200, 300\] miss this "
     r"SDE's range \[sigma\(eps\), sigma\(T\)\] = \[0.0105, 152\]"),
    ('edm', dict(s_churn=-1.0), r's_churn must be a number >= 0'),
    ('edm', dict(s_tmin=10.0, s_tmax=1.0), r's_tmin must not exceed s_tmax'),
    ('unipc', dict(solver_order=4), r'solver_order \(UniPC\) must be 1, 2 or 3; got 4'),
    ('dpmpp_2m', dict(solver_order=3), r"unknown option\(s\) \['solver_order'\] for sampling "
                                       r"method 'dpmpp_2m'"),
    ('heun', dict(ddim_eta=1.0), r"unknown option\(s\) \['ddim_eta'\]"),
    ('dpmpp_3m', dict(num_steps=-1), r'num_steps must be an integer >= 0'),
    ('dpmpp_5m', {}, r"unknown sampling method 'dpmpp_5m'; valid: \['ddim', 'dpmpp_2m'"),
])
def test_bad_options_raise_clear_errors(method, options, match):
  with pytest.raises(ValueError, match=match):
    run('vp', method, 4, **options)


def test_pc_without_a_discrete_chain_raises_its_own_error_class():
  """The benchmarks skip exactly this error (PC on the linear VP with N < beta_max)."""
  with pytest.raises(sde_lib.MissingDiscreteChainError, match='use N >= 20'):
    sampling.sample(KEY, lambda x, t: -x, sde_lib.VPSDE(N=10), (4, 2), 'pc')


def test_a_workdir_trained_before_these_samplers_takes_their_options(tmp_path):
  """A stored config without the new sampling keys gets their defaults, so
  --config.sampling.time_schedule=... works on it (configs/workdir.py)."""
  import json
  from configs import defaults
  from configs import workdir as workdir_config
  stored = json.loads(defaults.digits().to_json())
  for key in ('time_schedule', 'rho', 'grid_sigma_min', 'grid_sigma_max', 's_churn',
              'solver_order'):
    del stored['sampling'][key]
  (tmp_path / 'config.json').write_text(json.dumps(stored))
  config = workdir_config.load_stored_config(str(tmp_path))
  assert config.sampling.time_schedule == 'auto' and config.sampling.solver_order == 3
  assert (config.sampling.grid_sigma_min, config.sampling.grid_sigma_max) == (0.002, 80.0)
  assert config.model.to_json() == defaults.digits().model.to_json()


def test_digits_benchmark_summary_gives_seed_spread_and_paired_ode_difference(monkeypatch):
  """benchmarks/fast_samplers_digits.py's summary line, by hand: digits-FID 80, 82, 78 on
  seeds 0-2 -> mean 80, std (ddof 1) 2; against the ODE's 79, 80, 79.5 on the same seeds
  the differences 1, 2, -1.5 -> mean 0.5, standard error sqrt(3.25) / sqrt(3) = 1.0408."""
  monkeypatch.syspath_prepend(os.path.join(ROOT, 'benchmarks'))
  import fast_samplers_digits
  lines = [{'method': 'unipc', 'nfe': 20, 'seed': s, 'digits_fid': f}
           for s, f in zip((0, 1, 2), (80.0, 82.0, 78.0))]
  summary = fast_samplers_digits.seed_summary(lines, {0: 79.0, 1: 80.0, 2: 79.5})
  assert summary['method'] == 'unipc' and summary['nfe'] == 20 and summary['seeds'] == [0, 1, 2]
  np.testing.assert_allclose([summary['digits_fid_mean'], summary['fid_std']], [80.0, 2.0])
  np.testing.assert_allclose([summary['fid_minus_ode'], summary['fid_minus_ode_stderr']],
                             [0.5, math.sqrt(3.25 / 3)])
  alone = fast_samplers_digits.seed_summary(lines[:1], {})
  assert alone['fid_std'] is None and 'fid_minus_ode' not in alone
  assert fast_samplers_digits.seed_summary([{'error': 'N < 20'}], {}) is None
