"""Losses against closed forms for Gaussian data N(0, s0^2 I) and their exact scores.

For x_t = m x_0 + s z, the exact score is -x_t / v with v = m^2 s0^2 + s^2, and
per dimension E[(s score + z)^2] = m^2 s0^2 / v. Every objective here is that
quantity under some weighting and time/label distribution.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.stats

from score_sde import analytic
from score_sde import losses
from score_sde import sde as sde_lib

S0 = 0.7         # data standard deviation
DIM = 6
EPS = 1e-3


def _gaussian_batch(key, n):
  return S0 * jax.random.normal(key, (n, DIM))


def _exact_score_model(sde):
  def score_model_fn(params, x, t, train, key):
    m, s = sde_lib.transition_coeffs(sde, t)
    return -x / sde_lib.expand_to(m ** 2 * S0 ** 2 + s ** 2, x)
  return score_model_fn


def _monte_carlo(loss_fn, params=None, n_batches=16, batch=4096, seed=0):
  """Mean and standard error of the loss over independent batches."""
  keys = jax.random.split(jax.random.PRNGKey(seed), n_batches)
  step = jax.jit(lambda k: loss_fn(params, jax.random.fold_in(k, 1),
                                   _gaussian_batch(jax.random.fold_in(k, 0), batch)))
  values = np.array([float(step(k)) for k in keys])
  return values.mean(), values.std(ddof=1) / math.sqrt(n_batches)


def _time_average(fn, eps, n=200001):
  """E_{t ~ U(eps, 1)} fn(t) in float64 (trapezoid on a fine grid)."""
  t = np.linspace(eps, 1.0, n)
  return np.trapezoid(fn(t), t) / (1.0 - eps)


def _ve_coeffs(t):
  return np.ones_like(t), 0.01 * 5000.0 ** t


def _vp_coeffs(t):
  m2 = np.exp(-0.5 * t ** 2 * 19.9 - 0.1 * t)
  return np.sqrt(m2), np.sqrt(1 - m2)


def _q(m, s):
  return m ** 2 * S0 ** 2 / (m ** 2 * S0 ** 2 + s ** 2)


@pytest.mark.parametrize('sde, coeffs, reduce_mean', [
    (sde_lib.VESDE(), _ve_coeffs, False),
    (sde_lib.VPSDE(), _vp_coeffs, True),
    (sde_lib.VPSDE(), _vp_coeffs, False),
], ids=['ve_sum', 'vp_mean', 'vp_sum'])
def test_dsm_loss_of_exact_score_matches_closed_form(sde, coeffs, reduce_mean):
  loss_fn = losses.get_dsm_loss_fn(sde, _exact_score_model(sde), reduce_mean=reduce_mean,
                                   eps=EPS)
  mean, se = _monte_carlo(loss_fn)
  factor = 1.0 if reduce_mean else 0.5 * DIM
  expected = factor * _time_average(lambda t: _q(*coeffs(t)), EPS)
  assert abs(mean - expected) < 4 * se + 1e-4 * expected, (mean, expected, se)


def test_likelihood_weighted_loss_ve_closed_form():
  sde = sde_lib.VESDE()
  loss_fn = losses.get_dsm_loss_fn(sde, _exact_score_model(sde), likelihood_weighting=True,
                                   eps=EPS)
  mean, se = _monte_carlo(loss_fn)
  g2_over_s2 = 2 * math.log(5000.0)                 # VE: g^2 / sigma^2 is constant
  expected = 0.5 * DIM * g2_over_s2 * _time_average(lambda t: _q(*_ve_coeffs(t)), EPS)
  assert abs(mean - expected) < 4 * se, (mean, expected, se)


@pytest.mark.parametrize('eps', [EPS, 0.3])
def test_importance_sampling_is_unbiased_and_reduces_variance_vp(eps):
  """The time average over [eps, 1] of the likelihood-weighted loss, both ways; at
  eps = 0.3 a missing 1 / (T - eps) in the importance weight would be 1.43 times too
  large (measured 1.204 +- 0.009 against the closed form 1.195)."""
  sde = sde_lib.VPSDE()

  def integrand(t):
    m, s = _vp_coeffs(t)
    beta = 0.1 + 19.9 * t
    return beta / s ** 2 * _q(m, s)

  t = np.geomspace(eps, 1.0, 400001)
  expected = 0.5 * DIM * np.trapezoid(integrand(t), t) / (1 - eps)
  weighted = losses.get_dsm_loss_fn(sde, _exact_score_model(sde), likelihood_weighting=True,
                                    importance_sampling=True, eps=eps)
  uniform = losses.get_dsm_loss_fn(sde, _exact_score_model(sde), likelihood_weighting=True,
                                   eps=eps)
  mean_is, se_is = _monte_carlo(weighted)
  mean_u, se_u = _monte_carlo(uniform, seed=1)
  assert abs(mean_is - expected) < 4 * se_is + 1e-4 * expected, (mean_is, expected, se_is)
  assert abs(mean_u - expected) < 5 * se_u, (mean_u, expected, se_u)
  if eps == EPS:               # the weight varies over decades only near t = 0
    assert se_is < 0.5 * se_u, (se_is, se_u)


@pytest.mark.parametrize('sde', [sde_lib.VESDE(), sde_lib.VPSDE(), sde_lib.SubVPSDE()],
                         ids=['ve', 'vp', 'subvp'])
@pytest.mark.parametrize('likelihood_weighting', [False, True])
def test_exact_score_beats_perturbed_scores(sde, likelihood_weighting):
  mixture = analytic.random_mixture(jax.random.PRNGKey(7), dim=2, num_components=3)
  batch = mixture.sample(jax.random.PRNGKey(8), 16384)

  def make(perturb):
    def score_model_fn(params, x, t, train, key):
      return perturb(mixture.score(x, t, sde), x, t)
    return losses.get_dsm_loss_fn(sde, score_model_fn, likelihood_weighting=likelihood_weighting,
                                  eps=1e-2)

  key = jax.random.PRNGKey(9)
  exact = float(make(lambda s, x, t: s)(None, key, batch))
  for perturb in [lambda s, x, t: 1.2 * s,
                  lambda s, x, t: s + 0.3 / sde_lib.transition_coeffs(sde, t)[1][:, None],
                  lambda s, x, t: s - 0.1 * x]:
    assert float(make(perturb)(None, key, batch)) > exact


def test_smld_loss_closed_form():
  sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=5.0, N=10)
  sigmas_desc = np.asarray(sde.discrete_sigmas, np.float64)[::-1]

  def model_fn(params, x, labels, train, key):
    sig = jnp.asarray(sigmas_desc, jnp.float32)[labels]
    return -x / (S0 ** 2 + sig[:, None] ** 2)

  mean, se = _monte_carlo(losses.get_smld_loss_fn(sde, model_fn))
  expected = 0.5 * DIM * np.mean(S0 ** 2 / (S0 ** 2 + sigmas_desc ** 2))
  assert abs(mean - expected) < 4 * se, (mean, expected, se)
  # The NCSN ordering: label 0 is sigma_max.
  assert sigmas_desc[0] == pytest.approx(5.0, rel=1e-5)


def test_ddpm_loss_closed_form():
  sde = sde_lib.VPSDE(N=50)
  ab = np.asarray(sde.alphas_cumprod, np.float64)

  def model_fn(params, x, labels, train, key):
    a = jnp.asarray(ab, jnp.float32)[labels][:, None]
    return jnp.sqrt(1 - a) * x / (a * S0 ** 2 + 1 - a)   # eps = -std * score

  mean, se = _monte_carlo(losses.get_ddpm_loss_fn(sde, model_fn, reduce_mean=True))
  expected = np.mean(_q(np.sqrt(ab), np.sqrt(1 - ab)))
  assert abs(mean - expected) < 4 * se, (mean, expected, se)


@pytest.mark.parametrize('num_levels', [17, 256])
def test_discretized_gaussian_is_a_distribution_over_levels(num_levels):
  levels = jnp.linspace(-1.0, 1.0, num_levels)
  for mean, log_scale in [(0.1, -3.0), (-0.95, -5.0), (0.99, -1.0), (0.3, 1.0), (0.0, -8.0)]:
    log_p = losses.discretized_gaussian_log_likelihood(
        levels, jnp.full_like(levels, mean), jnp.full_like(levels, log_scale), num_levels)
    assert float(jnp.sum(jnp.exp(log_p))) == pytest.approx(1.0, abs=2e-5)
    # Independent float64 computation of the bin probabilities.
    h, sd = 1.0 / (num_levels - 1), math.exp(log_scale)
    lv = np.asarray(levels, np.float64)
    upper = np.where(lv > 1 - h, np.inf, lv + h)
    lower = np.where(lv < -1 + h, -np.inf, lv - h)
    p = np.where(lv > mean,  # difference of survival functions where cdf ~ 1
                 scipy.stats.norm.sf(lower, mean, sd) - scipy.stats.norm.sf(upper, mean, sd),
                 scipy.stats.norm.cdf(upper, mean, sd) - scipy.stats.norm.cdf(lower, mean, sd))
    ok = p > 1e-20
    np.testing.assert_allclose(log_p[ok], np.log(p[ok]), rtol=1e-4, atol=1e-4)


def test_gaussian_kl_closed_form():
  kl = losses.gaussian_kl(0.3, math.log(0.5), -0.2, math.log(2.0))
  expected = math.log(math.sqrt(2.0) / math.sqrt(0.5)) + (0.5 + 0.25) / (2 * 2.0) - 0.5
  assert float(kl) == pytest.approx(expected, rel=1e-6)


def test_hybrid_terms_with_oracle_noise():
  """eps_pred = the true noise puts the model mean on the posterior mean."""
  sde = sde_lib.VPSDE(N=100)
  betas = np.asarray(sde.discrete_betas, np.float64)
  ab = np.cumprod(1 - betas)
  ab_prev = np.concatenate([[1.0], ab[:-1]])
  post_var = betas * (1 - ab_prev) / (1 - ab)
  key_x, key_z = jax.random.split(jax.random.PRNGKey(0))
  levels = 256
  x0 = jnp.round((jax.random.uniform(key_x, (4, 3, 3, 2)) * 2 - 1) * 127.5) / 127.5
  x0 = jnp.clip(x0, -1, 1)
  noise = jax.random.normal(key_z, x0.shape)
  labels = jnp.array([0, 1, 40, 99])
  kw = dict(reduce_mean=True, num_levels=levels)
  # v = 0: Sigma = posterior variance, so the KL vanishes for i > 0.
  simple, vlb = losses.hybrid_terms(sde, x0, labels, noise, noise, jnp.zeros_like(x0), **kw)
  np.testing.assert_allclose(simple, 0.0, atol=1e-10)
  np.testing.assert_allclose(vlb[1:], 0.0, atol=2e-4)
  # i = 0: the decoder NLL of x0 under N(x0, beta~_1) (clipped), in bits per dim.
  sd = math.sqrt(post_var[1])
  h = 1.0 / (levels - 1)
  x = np.asarray(x0[0], np.float64).ravel()
  p = np.where(x < -1 + h, scipy.stats.norm.cdf(h / sd),
               np.where(x > 1 - h, scipy.stats.norm.cdf(h / sd),
                        scipy.stats.norm.cdf(h / sd) - scipy.stats.norm.cdf(-h / sd)))
  assert float(vlb[0]) == pytest.approx(np.mean(-np.log(p)) / math.log(2), rel=1e-3)
  # v = 1: Sigma = beta_i, KL = (log(beta / beta~) + beta~ / beta - 1) / 2 per dim.
  _, vlb1 = losses.hybrid_terms(sde, x0, labels, noise, noise, jnp.ones_like(x0), **kw)
  i = np.array([1, 40, 99])
  expected = 0.5 * (np.log(betas[i] / post_var[i]) + post_var[i] / betas[i] - 1) / math.log(2)
  np.testing.assert_allclose(vlb1[1:], expected, rtol=2e-3, atol=1e-6)


def test_hybrid_loss_vlb_trains_only_the_variance():
  sde = sde_lib.VPSDE(N=100)
  batch = jnp.clip(0.5 * jax.random.normal(jax.random.PRNGKey(1), (64, 4, 4, 1)), -1, 1)

  def model_fn(params, x, labels, train, key):
    eps = params['a'] * x + params['b']
    v = jnp.tanh(params['c'] * x + params['d'])
    return jnp.concatenate([eps, v], axis=-1)

  params = {'a': 0.3, 'b': 0.1, 'c': 0.5, 'd': 0.2}
  key = jax.random.PRNGKey(2)
  hybrid = losses.get_hybrid_loss_fn(sde, model_fn, hybrid_lambda=1e-3)
  simple = losses.get_ddpm_loss_fn(
      sde, lambda p, x, l, tr, k: model_fn(p, x, l, tr, k)[..., :1], reduce_mean=True)
  g_hybrid = jax.grad(hybrid)(params, key, batch)
  g_simple = jax.grad(simple)(params, key, batch)
  # Same perturbation (key) and stop-gradient: the eps parameters see only L_simple.
  for name in 'ab':
    assert float(g_hybrid[name]) == pytest.approx(float(g_simple[name]), rel=1e-5)
  assert abs(float(g_hybrid['c'])) > 0 and abs(float(g_hybrid['d'])) > 0
  # With lambda = 0 the hybrid loss is L_simple.
  no_vlb = losses.get_hybrid_loss_fn(sde, model_fn, hybrid_lambda=0.0)
  assert float(no_vlb(params, key, batch)) == pytest.approx(float(simple(params, key, batch)),
                                                           rel=1e-6)
  # lambda N L_vlb(i): the VLB term of the same draw (labels and noise from the key as
  # the loss splits it), times N = 100 (the estimate of the whole VLB).
  k_label, k_noise = jax.random.split(jax.random.split(key)[0])
  labels = jax.random.randint(k_label, (64,), 0, sde.N)
  noise = jax.random.normal(k_noise, batch.shape)
  abar = sde.alphas_cumprod[labels][:, None, None, None]
  out = model_fn(params, jnp.sqrt(abar) * batch + jnp.sqrt(1 - abar) * noise, labels, True,
                 None)
  simple_terms, vlb_bits = losses.hybrid_terms(sde, batch, labels, noise, out[..., :1],
                                               out[..., 1:], reduce_mean=True)
  assert float(no_vlb(params, key, batch)) == pytest.approx(float(jnp.mean(simple_terms)),
                                                           rel=1e-5)
  assert float(hybrid(params, key, batch)) == pytest.approx(
      float(jnp.mean(simple_terms + 1e-3 * 100 * vlb_bits)), rel=1e-5)
  assert float(1e-3 * 100 * jnp.mean(vlb_bits)) > 1e-3 * float(jnp.mean(simple_terms))
  with pytest.raises(ValueError, match='learned-variance model output'):
    losses.get_hybrid_loss_fn(sde, lambda p, x, l, tr, k: x)(params, key, batch)


def _config(model_name='ncsnpp', **training):
  base = {'sde': 'vesde', 'continuous': True, 'reduce_mean': False,
          'likelihood_weighting': False, 'loss': 'auto'}
  base.update(training)
  return ml_collections.ConfigDict({'training': base, 'model': {'learned_variance': False,
                                                                'name': model_name}})


@pytest.mark.parametrize('training, name', [
    (dict(continuous=True), 'dsm'),
    (dict(continuous=False, sde='vesde'), 'smld'),
    (dict(continuous=False, sde='vpsde'), 'ddpm'),
    (dict(continuous=False, sde='vpsde', loss='hybrid'), 'hybrid'),
    (dict(model_name='glow', flow=True), 'nll'),
    (dict(model_name='nice', loss='nll', flow=True), 'nll'),
])
def test_loss_choice_from_config(training, name):
  flow = training.pop('flow', False)
  assert losses.loss_name_from_config(_config(**training), flow=flow) == name


def test_loss_choice_errors():
  with pytest.raises(ValueError, match="unknown loss 'l1'"):
    losses.loss_name_from_config(_config(loss='l1'))
  with pytest.raises(ValueError, match='no discrete loss'):
    losses.loss_name_from_config(_config(continuous=False, sde='subvpsde'))
  with pytest.raises(ValueError, match="loss 'dsm' does not fit model 'realnvp'.*'nll'"):
    losses.loss_name_from_config(_config(model_name='realnvp', loss='dsm'), flow=True)
  with pytest.raises(ValueError, match="loss 'nll' does not fit model 'ncsnpp'"):
    losses.loss_name_from_config(_config(loss='nll'))
  with pytest.raises(ValueError, match="loss 'nll' does not fit model 'glow'"):
    losses.get_loss_fn(_config(model_name='glow', loss='nll'), sde_lib.VPSDE(), None)
  with pytest.raises(ValueError, match='needs a VESDE'):
    losses.get_smld_loss_fn(sde_lib.VPSDE(), None)
  with pytest.raises(ValueError, match='needs likelihood_weighting'):
    losses.get_dsm_loss_fn(sde_lib.VPSDE(), None, importance_sampling=True)
