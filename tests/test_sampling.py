"""Samplers against the exact Gaussian-mixture scores of score_sde.analytic.

Distribution check: samples are assigned to mixture components by the exact
posterior p(k | x) (the components are > 8 standard deviations apart, so
assignment is essentially exact), and

  stat = sum_k [ (w_k_hat - w_k)^2 / (w_k (1 - w_k) / n)
               + sum_d (mu_kd_hat - mu_kd)^2 / (var_kd / n_k)
               + sum_d (var_kd_hat / var_kd - 1)^2 / (2 / (n_k - 1)) ]

is approximately chi^2 with K + 2 K D degrees of freedom for true samples. The
threshold df + 6 sqrt(2 df) is calibrated on true samples below (false alarm
rate ~ 1e-5); with 2000 samples a 15 % error in the variances, or a shift of
0.08 (a quarter of the smallest standard deviation), exceeds it.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from score_sde import analytic
from score_sde import parallel
from score_sde import sampling
from score_sde import sde as sde_lib

NUM_SAMPLES = 2000
MIX = analytic.GaussianMixture.create(
    [0.5, 0.3, 0.2], [[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]],
    [[0.25, 0.16], [0.09, 0.25], [0.16, 0.16]])
SDES = {'ve': sde_lib.VESDE(), 'vp': sde_lib.VPSDE(), 'subvp': sde_lib.SubVPSDE()}
# One score function object per SDE, so compiled samplers are reused.
SCORES = {name: MIX.score_fn(sde) for name, sde in SDES.items()}
KEY = jax.random.PRNGKey(0)


def threshold(mix) -> float:
  df = mix.num_components * (1 + 2 * mix.dim)
  return df + 6 * np.sqrt(2 * df)


def mixture_stat(mix, x) -> float:
  """The chi^2-like discrepancy of the module docstring."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  n = len(x)
  if not np.all(np.isfinite(x)):
    return np.inf
  labels = np.asarray(jnp.argmax(mix.log_posterior_t(jnp.asarray(x, jnp.float32), 0.0,
                                                     SDES['vp']), -1))
  w = np.asarray(mix.weights, np.float64)
  mu = np.asarray(mix.means, np.float64)
  var = np.asarray(mix.covs, np.float64)
  stat = 0.0
  for k in range(len(w)):
    xk = x[labels == k]
    nk = len(xk)
    if nk < 3:
      return np.inf
    stat += (nk / n - w[k]) ** 2 / (w[k] * (1 - w[k]) / n)
    stat += np.sum((xk.mean(0) - mu[k]) ** 2 / (var[k] / nk))
    stat += np.sum((xk.var(0, ddof=1) / var[k] - 1) ** 2 / (2 / (nk - 1)))
  return float(stat)


def run(sde_name, method, num_samples=NUM_SAMPLES, key=KEY, **options):
  return sampling.sample(key, SCORES[sde_name], SDES[sde_name], (num_samples, 2), method,
                         **options)


# ----------------------------------------------------------------------------
# The test statistic itself
# ----------------------------------------------------------------------------

def test_statistic_is_calibrated_on_true_samples_and_detects_errors():
  stats = [mixture_stat(MIX, MIX.sample(jax.random.PRNGKey(i), NUM_SAMPLES))
           for i in range(10)]
  df = 3 * (1 + 2 * 2)
  assert max(stats) < threshold(MIX)
  assert abs(np.mean(stats) - df) < 3 * np.sqrt(2 * df / 10)   # mean of chi^2_df
  x, labels = MIX.sample(jax.random.PRNGKey(0), NUM_SAMPLES, return_labels=True)
  means = MIX.means[labels]
  too_wide = means + (x - means) * np.sqrt(1.15)
  assert mixture_stat(MIX, too_wide) > threshold(MIX)
  shifted = x + jnp.array([0.08, 0.0])
  assert mixture_stat(MIX, shifted) > threshold(MIX)


# ----------------------------------------------------------------------------
# Every sampler matches the mixture at its documented step count
# ----------------------------------------------------------------------------

# (sde, predictor, corrector, extra options). Documented step counts: 500
# predictor steps (snr_norm='batch' in 2-D, see sampling.langevin_corrector);
# corrector-only sampling: 100 noise levels x 20 corrector steps.
PC_CASES = [
    ('vp', 'euler_maruyama', 'langevin', {}),
    ('vp', 'reverse_diffusion', 'langevin', {}),
    ('vp', 'ancestral_sampling', 'langevin', {}),
    ('vp', 'euler_maruyama', 'ald', {}),
    ('vp', 'reverse_diffusion', 'ald', {}),
    ('vp', 'ancestral_sampling', 'ald', {}),
    ('vp', 'euler_maruyama', 'none', {}),
    ('vp', 'reverse_diffusion', 'none', {}),
    ('vp', 'ancestral_sampling', 'none', {}),
    ('ve', 'reverse_diffusion', 'langevin', {}),
    ('ve', 'ancestral_sampling', 'none', {}),
    ('ve', 'euler_maruyama', 'ald', {}),
    ('subvp', 'reverse_diffusion', 'langevin', {}),
    ('subvp', 'ancestral_sampling', 'none', {}),
    ('ve', 'none', 'langevin', dict(num_steps=100, n_steps_each=20)),
    ('ve', 'none', 'ald', dict(num_steps=100, n_steps_each=20)),
    ('vp', 'none', 'langevin', dict(num_steps=100, n_steps_each=20)),
    ('vp', 'reverse_diffusion', 'none', dict(probability_flow=True)),
    ('ve', 'euler_maruyama', 'none', dict(probability_flow=True)),
]
# The default run keeps one case per predictor, corrector, SDE and the
# probability flow; the rest run with the slow tests.
FAST_PC = {1, 2, 7, 10, 12, 14, 17}
SLOW_PC = set(range(len(PC_CASES))) - FAST_PC


@pytest.mark.parametrize(
    'case', [pytest.param(c, marks=pytest.mark.slow) if i in SLOW_PC else c
             for i, c in enumerate(PC_CASES)],
    ids=[f'{s}-{p}-{c}' + ('-pf' if o.get('probability_flow') else '')
         for s, p, c, o in PC_CASES])
def test_pc_sampler_matches_mixture(case):
  sde_name, predictor, corrector, extra = case
  options = {'num_steps': 500, 'snr_norm': 'batch', **extra}
  x, info = run(sde_name, 'pc', predictor=predictor, corrector=corrector, **options)
  assert mixture_stat(MIX, x) < threshold(MIX)
  evals = ((predictor != 'none') + (corrector != 'none') * options.get('n_steps_each', 1))
  assert int(info['nfe']) == options['num_steps'] * evals


@pytest.mark.parametrize('sde_name', ['ve', 'vp', 'subvp'])
def test_ode_sampler_adaptive_matches_mixture(sde_name):
  x, info = run(sde_name, 'ode', rtol=1e-4, atol=1e-4)
  assert mixture_stat(MIX, x) < threshold(MIX)
  assert 20 < int(info['nfe']) < 500
  assert int(info['nfe']) == int(jnp.max(info['nfe_per_example']))


@pytest.mark.slow
@pytest.mark.parametrize('solver,options', [('dopri5', dict(rtol=1e-4, atol=1e-4)),
                                            ('heun', dict(num_steps=100))])
def test_ode_sampler_other_solvers_match_mixture(solver, options):
  x, info = run('vp', 'ode', ode_solver=solver, **options)
  assert mixture_stat(MIX, x) < threshold(MIX)
  if 'num_steps' in options:
    assert int(info['nfe']) == 2 * options['num_steps'] + 1   # Heun: 2 per step, + Tweedie


@pytest.mark.parametrize('solver', ['euler', 'shark',
                                    pytest.param('sra1', marks=pytest.mark.slow)])
def test_reverse_sde_sampler_matches_mixture(solver):
  num_steps = 200 if solver == 'euler' else 50
  x, info = run('vp', 'sde', sde_solver=solver, num_steps=num_steps)
  assert mixture_stat(MIX, x) < threshold(MIX)
  per_step = 1 if solver == 'euler' else 2
  assert int(info['nfe']) == per_step * num_steps + 1


@pytest.mark.parametrize('sde_name,eta', [('vp', 0.0), ('vp', 1.0), ('subvp', 0.0),
                                          pytest.param('ve', 0.5, marks=pytest.mark.slow)])
def test_ddim_sampler_matches_mixture(sde_name, eta):
  x, info = run(sde_name, 'ddim', ddim_eta=eta, num_steps=100)
  assert mixture_stat(MIX, x) < threshold(MIX)
  assert int(info['nfe']) == 101


@pytest.mark.parametrize('sde_name,eta', [('vp', 1.0), ('vp', 0.5), ('ve', 1.0)])
def test_ddim_noise_is_the_papers_on_a_point_mass(sde_name, eta):
  """On a point mu (x0_hat = mu, eps_hat = (x - m mu) / s exactly) a DDIM step is
  x' = m' mu + sqrt(s'^2 - sigma^2) eps_hat + sigma z_i with, at eta = 1, the DDPM
  posterior: VP sigma^2 = (1 - abar') / (1 - abar) (1 - abar / abar') (DDIM paper eq.
  16, abar = m^2), VE sigma^2 = s'^2 (s^2 - s'^2) / s^2 (SMLD's ancestral step).
  Rebuilt in float64 from the documented keys: any sigma keeps the marginals, so the
  mixture test could not see a wrong one."""
  sde, mu, num_steps, eps, batch = SDES[sde_name], np.array([0.7, -1.3]), 5, 1e-3, 8

  def score(x, t):
    mean_coeff, std = sde_lib.transition_coeffs(sde, t)
    return -(x - mean_coeff[:, None] * mu) / std[:, None] ** 2

  x, _ = sampling.sample(KEY, score, sde, (batch, 2), 'ddim', ddim_eta=eta,
                         num_steps=num_steps, noise_removal=False, eps=eps)
  keys = sampling.example_keys(KEY, batch)
  y = np.asarray(sampling.prior_sample(sde, sampling.fold_keys(keys, 0), (batch, 2)),
                 np.float64)
  times = np.linspace(sde.T, eps, num_steps + 1)
  for i in range(num_steps):
    m, s = (float(c) for c in sde_lib.transition_coeffs(sde, times[i]))
    m_next, s_next = (float(c) for c in sde_lib.transition_coeffs(sde, times[i + 1]))
    if sde_name == 'vp':
      # 1 - abar taken as s^2: near t = 0 a float32 m is too close to 1 to give it
      var = s_next ** 2 / s ** 2 * (1 - (m / m_next) ** 2)
    else:
      var = s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2
    sigma = eta * np.sqrt(var)
    z = np.asarray(sampling.example_normal(sampling.fold_keys(keys, i + 1), (2,)), np.float64)
    y = m_next * mu + np.sqrt(s_next ** 2 - sigma ** 2) * (y - m * mu) / s + sigma * z
  # compared standardised (an O(1) draw): the point mass leaves x within s(eps) of mu
  m_end, s_end = (float(c) for c in sde_lib.transition_coeffs(sde, eps))
  standardised = (np.asarray(x, np.float64) - m_end * mu) / s_end
  np.testing.assert_allclose(standardised, (y - m_end * mu) / s_end, atol=2e-4)


def test_langevin_with_per_example_norms_in_high_dimension():
  """The default snr_norm='example' is meant for high-dimensional data."""
  mix = analytic.random_mixture(jax.random.PRNGKey(3), 64, 2, spread=3.0, scale=0.5)
  sde = SDES['vp']
  x, _ = sampling.sample(KEY, mix.score_fn(sde), sde, (600, 64), 'pc', num_steps=200,
                         predictor='reverse_diffusion', corrector='langevin', snr=0.16)
  assert mixture_stat(mix, x) < threshold(mix)


# ----------------------------------------------------------------------------
# Errors shrink as steps grow (same keys, so the comparison is not noisy)
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('sde_name,method,options,coarse,fine', [
    ('ve', 'pc', dict(predictor='reverse_diffusion', corrector='none'), 20, 500),
    ('vp', 'ddim', {}, 3, 100),
    ('vp', 'ode', dict(ode_solver='euler'), 5, 200),
    pytest.param('vp', 'sde', dict(sde_solver='euler'), 10, 200, marks=pytest.mark.slow),
])
def test_error_shrinks_with_steps(sde_name, method, options, coarse, fine):
  stats = [mixture_stat(MIX, run(sde_name, method, num_steps=n, **options)[0])
           for n in (coarse, fine)]
  assert stats[0] > 3 * threshold(MIX) > 3 * stats[1]


# ----------------------------------------------------------------------------
# Interface-level formulas reduce to the reference's
# ----------------------------------------------------------------------------

def step_inputs(dim: int = 3):
  """(x, z): [4, dim] states and noise for the one-step tests."""
  return (jax.random.normal(jax.random.PRNGKey(1), (4, dim)),
          jax.random.normal(jax.random.PRNGKey(2), (4, dim)))


def affine_score(y, t):
  """A score with a non-zero offset, so drift and score terms cannot cancel."""
  del t
  return -2.0 * y + 0.5


def test_ancestral_step_is_the_ddpm_step_for_vp():
  sde = sde_lib.VPSDE(N=50)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
  t = jnp.full((4,), 0.6)
  score_fn = lambda y, tt: -y   # noqa: E731
  noise = jax.random.normal(jax.random.PRNGKey(2), (4, 3))
  step = jax.jit(lambda *a: sampling.ancestral_sampling_predictor(sde, score_fn, *a, False))
  out, mean = step(x, t, noise)
  beta = sde.discrete_betas[int(0.6 * 49)]
  expected_mean = (x + beta * score_fn(x, t)) / jnp.sqrt(1 - beta)
  np.testing.assert_allclose(mean, expected_mean, rtol=1e-5)
  np.testing.assert_allclose(out, expected_mean + jnp.sqrt(beta) * noise, rtol=1e-4, atol=1e-6)


def test_ancestral_step_for_ve_is_the_exact_reverse_step_for_unit_data():
  """SMLD chain x_i = x_{i-1} + G z, G^2 = sigma_i^2 - sigma_{i-1}^2, on data N(0, I):
  x_{i-1} | x_i is Gaussian with mean x_i + G^2 s(x_i) and variance (1 + sigma_{i-1}^2)
  G^2 / (1 + sigma_i^2) (the product of two Gaussians), s(x) = -x / (1 + sigma_i^2)."""
  sde = sde_lib.VESDE(N=50)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 3)) * 3.0
  index = 30
  t = jnp.full((4,), index / 49)
  sigmas = np.exp(np.linspace(np.log(sde.sigma_min), np.log(sde.sigma_max), 50))
  var_i, var_before = 1 + sigmas[index] ** 2, 1 + sigmas[index - 1] ** 2
  score_fn = lambda y, tt: -y / var_i   # noqa: E731
  noise = jax.random.normal(jax.random.PRNGKey(2), (4, 3))
  step = jax.jit(lambda *a: sampling.ancestral_sampling_predictor(sde, score_fn, *a, False))
  out, mean = step(x, t, noise)
  g2 = sigmas[index] ** 2 - sigmas[index - 1] ** 2
  expected_mean = np.asarray(x, np.float64) * (1 - g2 / var_i)
  np.testing.assert_allclose(mean, expected_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out, expected_mean + np.sqrt(var_before * g2 / var_i) * noise,
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('snr_norm', ['example', 'batch'])
def test_one_langevin_iteration_follows_the_snr_rule(snr_norm):
  """x + e s + sqrt(2 e) z with e = 2 alpha (snr |z| / |s|)^2, alpha = 1 - beta_i (VP):
  |z| -> E|z| = sqrt(2) Gamma((D + 1) / 2) / Gamma(D / 2) and |s| per example
  ('example'), or the batch means of both norms ('batch', the reference's rule)."""
  sde, snr, dim = sde_lib.VPSDE(N=100), 0.16, 5
  x, noise = step_inputs(dim)
  t = jnp.full((4,), 30 / 99)
  update = sampling.langevin_corrector(sde, affine_score, x, t, snr, snr_norm)
  out, mean = jax.jit(update)(x, noise)
  alpha = 1 - float(sde.discrete_betas[30])
  x64, z64 = np.asarray(x, np.float64), np.asarray(noise, np.float64)
  s64 = -2.0 * x64 + 0.5
  if snr_norm == 'example':
    expected_z = math.sqrt(2) * math.exp(math.lgamma((dim + 1) / 2) - math.lgamma(dim / 2))
    ratio = snr * expected_z / np.linalg.norm(s64, axis=1, keepdims=True)
  else:
    ratio = (snr * np.linalg.norm(z64, axis=1).mean() / np.linalg.norm(s64, axis=1).mean())
  step = 2 * alpha * ratio ** 2
  np.testing.assert_allclose(mean, x64 + step * s64, rtol=1e-5)
  np.testing.assert_allclose(out, x64 + step * s64 + np.sqrt(2 * step) * z64, rtol=1e-5,
                             atol=1e-6)


def test_euler_maruyama_step_has_the_reference_step_length():
  """x - [f - g^2 s] dt + g sqrt(dt) z with dt = T / N (the reference's step), not the
  grid spacing (T - eps) / (N - 1); VP: f = -beta(t) x / 2, g^2 = beta(t) = 0.1 + 19.9 t."""
  sde, t_value = sde_lib.VPSDE(N=50), 0.6
  x, noise = step_inputs()
  step = jax.jit(lambda *a: sampling.euler_maruyama_predictor(sde, affine_score, *a, False))
  out, mean = step(x, jnp.full((4,), t_value), noise)
  x64, z64 = np.asarray(x, np.float64), np.asarray(noise, np.float64)
  beta, dt = 0.1 + 19.9 * t_value, 1.0 / 50
  expected_mean = x64 - (-0.5 * beta * x64 - beta * (-2.0 * x64 + 0.5)) * dt
  np.testing.assert_allclose(mean, expected_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out, expected_mean + np.sqrt(beta * dt) * z64, rtol=1e-5,
                             atol=1e-6)


def test_one_ald_iteration_follows_the_ncsn_rule():
  """x + e s + sqrt(2 e) z with e = 2 alpha_i (snr std(t))^2 and alpha_i = 1 - beta_i, the
  square of the chain's signal factor (VP: std(t)^2 = 1 - exp(-0.1 t - 9.95 t^2))."""
  sde, snr, index = sde_lib.VPSDE(N=100), 0.16, 30
  t_value = index / 99
  x, noise = step_inputs()
  update = sampling.ald_corrector(sde, affine_score, x, jnp.full((4,), t_value), snr)
  out, mean = jax.jit(update)(x, noise)
  alpha = 1 - float(sde.discrete_betas[index])
  var = 1 - math.exp(-0.1 * t_value - 9.95 * t_value ** 2)
  step = 2 * alpha * snr ** 2 * var
  x64, z64 = np.asarray(x, np.float64), np.asarray(noise, np.float64)
  expected_mean = x64 + step * (-2.0 * x64 + 0.5)
  np.testing.assert_allclose(mean, expected_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out, expected_mean + np.sqrt(2 * step) * z64, rtol=1e-5,
                             atol=1e-6)


def test_pc_noise_removal_drops_only_the_last_predictor_noise():
  """noise_removal returns the last step's mean: with the reverse-diffusion predictor and
  no corrector the two outputs differ by G z, G^2 = beta_min / N (VP's chain at t = eps)
  and z the last step's predictor noise, fold_in(fold_in(k_b, N), 0) (documented keys)."""
  key, batch, num_steps = jax.random.PRNGKey(5), 3, 20
  options = dict(key=key, predictor='reverse_diffusion', corrector='none',
                 num_steps=num_steps)
  removed, _ = run('vp', 'pc', batch, noise_removal=True, **options)
  kept, _ = run('vp', 'pc', batch, noise_removal=False, **options)
  fold = jax.random.fold_in
  z = np.stack([np.asarray(jax.random.normal(fold(fold(fold(key, b), num_steps), 0), (2,)))
                for b in range(batch)])
  np.testing.assert_allclose(np.asarray(kept) - np.asarray(removed),
                             math.sqrt(0.1 / num_steps) * z, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('sde_name', ['ve', 'vp', 'subvp'])
def test_tweedie_denoiser_recovers_a_point_mass_at_any_time(sde_name):
  """E[x_0 | x_t] = mu for data at mu, at t = 0.5 where m(t) is far from 1 (VP: 0.28)."""
  sde, mu = SDES[sde_name], jnp.array([0.7, -1.3])

  def score(x, t):
    mean_coeff, std = sde_lib.transition_coeffs(sde, t)
    return -(x - mean_coeff[:, None] * mu) / std[:, None] ** 2

  x = jax.random.normal(jax.random.PRNGKey(1), (4, 2)) * 3.0
  denoised = sampling.tweedie_denoise(sde, score, x, 0.5)
  np.testing.assert_allclose(denoised, np.broadcast_to(mu, (4, 2)), rtol=1e-5, atol=1e-5)


def test_reverse_sde_sampler_stops_at_eps():
  """Without noise removal the reverse SDE returns draws of p_eps: for data N(mu, v0) on VP
  and eps = 0.5, N(m mu, m^2 v0 + s^2) with m^2 = exp(-0.05 - 2.4875) = 0.079, far from the
  data (statistical error 4.5 SE, Euler's bias at ds = 0.005 below 0.03)."""
  sde, eps, n = SDES['vp'], 0.5, 1000
  mu, v0 = np.array([1.0, -2.0]), np.array([0.25, 0.09])
  gauss = analytic.gaussian(mu, v0)
  x, _ = sampling.sample(KEY, gauss.score_fn(sde), sde, (n, 2), 'sde', num_steps=100,
                         eps=eps, noise_removal=False)
  x = np.asarray(x, np.float64)
  m2 = math.exp(-0.1 * eps - 9.95 * eps ** 2)
  mean, var = math.sqrt(m2) * mu, m2 * v0 + (1 - m2)
  np.testing.assert_array_less(np.abs(x.mean(0) - mean), 4.5 * np.sqrt(var / n) + 0.03)
  np.testing.assert_array_less(np.abs(x.var(0) / var - 1), 4.5 * np.sqrt(2 / n) + 0.03)


def test_langevin_alpha_is_one_minus_beta_for_vp_and_one_for_ve():
  x = jnp.ones((2, 3))
  t = jnp.full((2,), 0.3)
  vp = sde_lib.VPSDE(N=100)
  alpha = jax.jit(lambda sde: sampling.chain_signal_factor(sde, x, t) ** 2, static_argnums=0)
  np.testing.assert_allclose(alpha(vp), 1 - vp.discrete_betas[int(0.3 * 99)], rtol=1e-6)
  alpha_ve = alpha(sde_lib.VESDE())
  np.testing.assert_allclose(alpha_ve, 1.0)


def test_expected_normal_norm_matches_monte_carlo():
  for dim in (1, 2, 64):
    z = np.random.default_rng(0).standard_normal((200000, dim))
    np.testing.assert_allclose(sampling.expected_normal_norm(dim),
                               np.linalg.norm(z, axis=1).mean(), rtol=5e-3)


# ----------------------------------------------------------------------------
# NFE is what the samplers really evaluate
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('method,options', [
    ('pc', dict(num_steps=20, n_steps_each=2)),   # VP's DDPM chain needs N >= 20
    ('ode', dict(rtol=1e-3, atol=1e-3)),
    ('ode', dict(ode_solver='dopri5', rtol=1e-3, atol=1e-3)),
    ('ode', dict(ode_solver='heun', num_steps=7)),       # 2 calls a step, none first
    ('ode', dict(ode_solver='euler', num_steps=5)),
    pytest.param('sde', dict(sde_solver='shark', num_steps=10), marks=pytest.mark.slow),
    ('ddim', dict(num_steps=10)),
])
def test_reported_nfe_counts_score_calls(method, options):
  calls, info = count_score_calls(method, **options)
  assert calls == int(info['nfe'])


def count_score_calls(method, **options) -> tuple[int, dict]:
  """(score calls made by one compiled run of `method` on the VP mixture, its info);
  the first run compiles, so the second is the one counted."""
  calls = []
  sde = SDES['vp']

  def counting_score(x, t):
    jax.debug.callback(lambda _: calls.append(1), t)
    return MIX.score(x, t, sde)

  for _ in range(2):
    calls.clear()
    _, info = sampling.sample(KEY, counting_score, sde, (1, 2), method, **options)
    jax.effects_barrier()
  return len(calls), info


# ----------------------------------------------------------------------------
# The PC loop: its keys and its projection hook
# ----------------------------------------------------------------------------

def test_pc_sampler_uses_the_documented_keys():
  """20 steps by hand from the key tree of `pc_sampler`'s docstring give its samples."""
  sde = sampling.with_num_steps(SDES['vp'], 20)
  score_fn, key, batch = SCORES['vp'], jax.random.PRNGKey(5), 3
  x_sampler, _ = run('vp', 'pc', batch, key=key, predictor='reverse_diffusion',
                     corrector='ald', n_steps_each=2, noise_removal=False, num_steps=20)
  example = [jax.random.fold_in(key, b) for b in range(batch)]
  normal = lambda keys: jnp.stack([jax.random.normal(k, (2,)) for k in keys])  # noqa: E731
  x = jnp.stack([sde.prior_sampling(jax.random.fold_in(k, 0), (2,)) for k in example])
  for i, t in enumerate(jnp.linspace(sde.T, 1e-3, sde.N)):
    step = [jax.random.fold_in(k, i + 1) for k in example]
    vec_t = jnp.full((batch,), t)
    update = sampling.ald_corrector(sde, score_fn, x, vec_t, 0.16)
    for j in range(2):
      x, _ = update(x, normal([jax.random.fold_in(jax.random.fold_in(s, 1), j) for s in step]))
    noise = normal([jax.random.fold_in(s, 0) for s in step])
    x, _ = sampling.reverse_diffusion_predictor(sde, score_fn, x, vec_t, noise, False)
  np.testing.assert_allclose(x_sampler, x, rtol=1e-4, atol=1e-5)


def _pc(projection=None, key=KEY, batch=4, **options):
  options = {'num_steps': 20, 'n_steps_each': 2, 'corrector': 'ald', **options}
  fn = jax.jit(lambda k: sampling.pc_sampler(k, SCORES['vp'], SDES['vp'], (batch, 2),
                                             projection=projection, **options))
  return fn(key)


def test_identity_projection_leaves_the_samples_bitwise_unchanged():
  identity = sampling.Projection(project=lambda x, t, keys: x)
  for options in ({}, dict(corrector='langevin', snr_norm='batch', noise_removal=False)):
    np.testing.assert_array_equal(_pc(identity, **options)[0], _pc(None, **options)[0])


def test_projection_is_called_after_the_prior_every_corrector_iteration_and_predictor():
  """At T, then n_steps_each times at t_i and once at t_(i+1) per step, with its own keys."""
  calls = []

  def project(x, t, keys):
    jax.debug.callback(lambda t, k: calls.append((float(t), np.asarray(k))), t, keys,
                       ordered=True)
    return x

  batch, num_steps, n_each = 2, 20, 2
  x, _ = _pc(sampling.Projection(project, finish=lambda x: x + 100.0), batch=batch,
             num_steps=num_steps, n_steps_each=n_each)
  jax.effects_barrier()
  assert np.all(np.asarray(x) > 50.0)                   # finish maps the output
  grid = np.asarray(jnp.linspace(1.0, 1e-3, num_steps))
  times = [1.0] + [t for i in range(num_steps)
                   for t in [grid[i]] * n_each + [grid[i + 1] if i + 1 < num_steps else 1e-3]]
  np.testing.assert_allclose([t for t, _ in calls], times, rtol=1e-6)
  # Keys: fold_in(k_b, N + 1) for the prior; per step s = fold_in(k_b, i + 1),
  # fold_in(fold_in(s, 2), j) after corrector iteration j, fold_in(s, 3) after the predictor.
  fold = jax.random.fold_in
  example = [fold(KEY, b) for b in range(batch)]
  expected = [[fold(k, num_steps + 1) for k in example]]
  for i in range(num_steps):
    step = [fold(k, i + 1) for k in example]
    expected += [[fold(fold(s, 2), j) for s in step] for j in range(n_each)]
    expected.append([fold(s, 3) for s in step])
  np.testing.assert_array_equal(np.stack([k for _, k in calls]),
                                np.asarray([np.stack(keys) for keys in expected]))


# ----------------------------------------------------------------------------
# Determinism, batch and device independence
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('method,options', [
    ('pc', dict(num_steps=30)), ('ode', dict(rtol=1e-3, atol=1e-3)),
    pytest.param('sde', dict(num_steps=20), marks=pytest.mark.slow),
    ('ddim', dict(num_steps=10, ddim_eta=1.0))])
def test_same_key_same_samples_and_examples_independent_of_batch(method, options):
  x1, _ = run('vp', method, 16, **options)
  x2, _ = run('vp', method, 16, **options)
  np.testing.assert_array_equal(x1, x2)
  x_small, _ = run('vp', method, 8, **options)
  np.testing.assert_allclose(x_small, x1[:8], rtol=1e-6, atol=1e-6)
  x_other, _ = run('vp', method, 16, key=jax.random.PRNGKey(1), **options)
  assert np.all(np.abs(np.asarray(x_other - x1)) > 1e-6)


def test_image_shaped_samples_equal_flat_samples():
  sde = SDES['vp']
  mix = analytic.random_mixture(jax.random.PRNGKey(0), 8, 2)
  flat_score = mix.score_fn(sde)
  image_score = lambda x, t: flat_score(x.reshape(x.shape[0], -1), t).reshape(x.shape)  # noqa
  options = dict(num_steps=10, ddim_eta=1.0)
  flat, _ = sampling.sample(KEY, flat_score, sde, (4, 8), 'ddim', **options)
  image, _ = sampling.sample(KEY, image_score, sde, (4, 2, 2, 2), 'ddim', **options)
  np.testing.assert_allclose(image.reshape(4, 8), flat, atol=1e-6)


def _config(method, **sampling_options):
  config = ml_collections.ConfigDict()
  config.sampling = ml_collections.ConfigDict(dict(
      method=method, predictor='reverse_diffusion', corrector='langevin', snr=0.16,
      n_steps_each=1, noise_removal=True, probability_flow=False, num_steps=20,
      ode_solver='tsit5', sde_solver='euler', rtol=1e-3, atol=1e-3, ddim_eta=0.0))
  config.sampling.update(sampling_options)
  return config


def _mixture_score_model(sde):
  return lambda mix, x, t: mix.score(x, t, sde)


@pytest.mark.parametrize('method,options', [
    ('pc', {}), ('ode', {}), pytest.param('sde', {}, marks=pytest.mark.slow),
    pytest.param('pc', dict(snr_norm='batch'), marks=pytest.mark.slow)])
def test_samples_do_not_depend_on_device_count(method, options, four_devices):
  """Batch means ('batch' snr norms) are global means: only rounding may differ, at
  the scale of the samples (|x| ~ 3; the 1- and 4-device programs round differently on
  some CPUs: 1.2e-6 measured on one whose coordinate was 0.0066)."""
  sde = SDES['vp']
  config = _config(method, **options)
  shape = (8, 2)
  outputs = []
  for num_devices in (1, 4):
    mesh = parallel.make_mesh(four_devices[:num_devices])
    fn = sampling.get_sampling_fn(config, sde, _mixture_score_model(sde), shape, 1e-3, mesh)
    x, _ = fn(KEY, MIX)
    assert len(x.sharding.device_set) == num_devices
    outputs.append(np.asarray(x))
  np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5,
                             atol=1e-6 * np.abs(outputs[1]).max())


def test_sampling_fn_takes_params_without_recompiling():
  sde = SDES['vp']
  fn = sampling.get_sampling_fn(_config('ddim', num_steps=50), sde, _mixture_score_model(sde),
                                (500, 2), 1e-3)
  x, info = fn(KEY, MIX)
  shifted = MIX.replace(means=MIX.means + 10.0)
  y, _ = fn(KEY, shifted)
  assert fn._cache_size() == 1   # noqa: SLF001 - one compilation for both mixtures
  assert int(info['nfe']) == 51
  # Same noise, means moved by 10: DDIM (eta = 0) maps the prior draw to the shifted data.
  assert mixture_stat(MIX, x) < threshold(MIX)
  assert mixture_stat(MIX, y - 10.0) < threshold(MIX)
  # The same sampler through `sample` gives the same samples.
  x_direct, _ = run('vp', 'ddim', 500, num_steps=50)
  np.testing.assert_allclose(x, x_direct, atol=1e-5)


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('method,options,match', [
    ('pc', dict(predictor='heun'), r"unknown predictor 'heun'; valid: \['ancestral_sampling'"),
    ('pc', dict(corrector='mala'), r"unknown corrector 'mala'; valid: \['ald', 'langevin'"),
    ('pc', dict(snr_norm='median'), r"unknown snr_norm 'median'; valid: \['batch', 'example'"),
    ('ode', dict(ode_solver='rk45'), r"unknown ODE solver 'rk45'; valid: \['dopri5', 'euler'"),
    ('sde', dict(sde_solver='milstein'), r"unknown SDE solver 'milstein'; valid: \['euler'"),
    ('langevin', {}, r"unknown sampling method 'langevin'; valid: \['ddim', 'dpmpp_2m'"),
    ('pc', dict(num_steps=-5), r'num_steps must be an integer >= 0'),
    ('pc', dict(n_steps_each=0), r'n_steps_each must be an integer >= 1'),
    ('pc', dict(snr=0.0), r'snr must be a positive number'),
    ('pc', dict(snr=-0.1), r'snr must be a positive number'),
    ('pc', dict(predictor='none', corrector='none'), r'both "none"'),
    ('pc', dict(predictor='ancestral_sampling', probability_flow=True),
     r'no probability-flow form'),
    ('ode', dict(rtol=0.0), r'rtol must be a positive number'),
    ('ode', dict(max_steps=0), r'max_steps must be an integer >= 1'),
    ('ddim', dict(ddim_eta=-1.0), r'ddim_eta must be >= 0'),
    ('ddim', dict(eps=0.0), r'eps must lie in \(0, T\)'),
    ('ddim', dict(snr=0.1), r"unknown option\(s\) \['snr'\] for sampling method 'ddim'"),
])
def test_bad_options_raise_clear_errors(method, options, match):
  with pytest.raises(ValueError, match=match):
    run('vp', method, 4, **options)


def test_shape_mismatch_raises():
  with pytest.raises(ValueError, match=r'score function failed on data of shape \(4, 3\)'):
    sampling.sample(KEY, SCORES['vp'], SDES['vp'], (4, 3), 'ddim', num_steps=2)
  wrong_output = lambda x, t: x[:, :1]   # noqa: E731
  with pytest.raises(ValueError, match=r'returned shape \(4, 1\) for data of shape \(4, 2\)'):
    sampling.sample(KEY, wrong_output, SDES['vp'], (4, 2), 'pc', num_steps=2)
  with pytest.raises(ValueError, match=r'shape must be \[B, ...\]'):
    sampling.sample(KEY, SCORES['vp'], SDES['vp'], (4,), 'pc')
  with pytest.raises(ValueError, match=r'shape must be \[B, ...\]'):
    sampling.sample(KEY, SCORES['vp'], SDES['vp'], (0, 2), 'pc')


def test_batch_not_divisible_by_devices_raises(four_devices):
  mesh = parallel.make_mesh(four_devices)
  with pytest.raises(ValueError,
                     match=r'number of samples 6 does not divide by the number of devices 4'):
    sampling.get_sampling_fn(_config('pc'), SDES['vp'], _mixture_score_model(SDES['vp']),
                             (6, 2), 1e-3, mesh)


@pytest.mark.parametrize('noise_removal', [True, False])
def test_pc_noise_removal_costs_no_score_evaluation(noise_removal):
  """PC returns the last predictor step's mean: 20 steps x (1 predictor + 2 corrector
  iterations) = 60 score calls with or without noise_removal (the other methods add one)."""
  calls, info = count_score_calls('pc', num_steps=20, n_steps_each=2,
                                  noise_removal=noise_removal)
  assert calls == int(info['nfe']) == 20 * 3
