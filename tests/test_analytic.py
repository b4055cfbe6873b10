"""Gaussian mixtures: exact scores and log-densities of p_t under each SDE."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from score_sde import analytic
from score_sde import sde as sde_lib

SDES = [sde_lib.VESDE(), sde_lib.VPSDE(), sde_lib.SubVPSDE(), sde_lib.VPSDE(schedule='cosine')]
SDE_IDS = ['ve', 'vp', 'subvp', 'vp_cosine']


@pytest.fixture(scope='module', params=[False, True], ids=['diagonal', 'full'])
def mixture(request):
  return analytic.random_mixture(jax.random.PRNGKey(3), dim=5, num_components=3,
                                 full=request.param)


def _scipy_log_prob_t(mixture, x, m, s):
  """Independent float64 computation of log p_t with scipy."""
  x = np.asarray(x, np.float64)
  logs = []
  for w, mu, cov in zip(np.asarray(mixture.weights, np.float64), np.asarray(mixture.means, np.float64),
                        np.asarray(mixture.covs, np.float64)):
    cov = np.diag(cov) if cov.ndim == 1 else cov
    cov_t = m ** 2 * cov + s ** 2 * np.eye(len(mu))
    logs.append(np.log(w) + scipy.stats.multivariate_normal(m * mu, cov_t).logpdf(x))
  return scipy.special.logsumexp(np.stack(logs, -1), axis=-1)


@pytest.mark.parametrize('sde', SDES, ids=SDE_IDS)
def test_score_is_gradient_of_log_prob_t(mixture, sde):
  x = mixture.sample(jax.random.PRNGKey(0), 16) * 1.3
  t = jnp.linspace(0.0, 1.0, 16)
  score = mixture.score(x, t, sde)
  grad = jax.vmap(jax.grad(lambda xx, tt: mixture.log_prob_t(xx, tt, sde)))(x, t)
  scale = jnp.max(jnp.abs(grad), axis=-1, keepdims=True)
  np.testing.assert_allclose(score / scale, grad / scale, atol=2e-5)


@pytest.mark.parametrize('sde', SDES, ids=SDE_IDS)
def test_log_prob_t_matches_scipy(mixture, sde):
  x = mixture.sample(jax.random.PRNGKey(1), 8)
  for t in [0.0, 0.3, 0.8]:
    m, s = (float(v) for v in sde_lib.transition_coeffs(sde, t))
    np.testing.assert_allclose(mixture.log_prob_t(x, t, sde),
                               _scipy_log_prob_t(mixture, x, m, s), rtol=2e-5, atol=2e-4)


def test_log_prob_at_time_zero_of_vp_is_data_density(mixture):
  x = mixture.sample(jax.random.PRNGKey(2), 8)
  np.testing.assert_allclose(mixture.log_prob_t(x, 0.0, sde_lib.VPSDE()), mixture.log_prob(x),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mixture.log_prob(x), _scipy_log_prob_t(mixture, x, 1.0, 0.0),
                             rtol=2e-5, atol=2e-4)


@pytest.mark.parametrize('sde', SDES[:3], ids=SDE_IDS[:3])
def test_marginal_t_matches_forward_diffusion_of_samples(mixture, sde):
  """Samples pushed through x_t = m x_0 + s z have the moments of the mixture p_t."""
  n, t = 200000, 0.4
  k_x, k_z, k_ref = jax.random.split(jax.random.PRNGKey(4), 3)
  x0 = mixture.sample(k_x, n)
  mean, std = sde.marginal_prob(x0, jnp.full((n,), t))
  x_t = mean + std * jax.random.normal(k_z, x0.shape)
  marginal = mixture.marginal_t(sde, t)
  w = np.asarray(marginal.weights, np.float64)[:, None]
  mu = np.asarray(marginal.means, np.float64)
  expected_mean = (w * mu).sum(0)
  covs = np.asarray(marginal.covs, np.float64)
  diag = covs if covs.ndim == 2 else np.diagonal(covs, axis1=1, axis2=2)
  expected_var = (w * (diag + mu ** 2)).sum(0) - expected_mean ** 2
  sample_mean = np.asarray(jnp.mean(x_t, 0), np.float64)
  sample_var = np.asarray(jnp.var(x_t, 0), np.float64)
  np.testing.assert_allclose(sample_mean, expected_mean, atol=5 * np.sqrt(expected_var / n).max())
  np.testing.assert_allclose(sample_var, expected_var, rtol=0.03)
  # And the marginal's log_prob equals log_prob_t.
  np.testing.assert_allclose(marginal.log_prob(x_t[:5]), mixture.log_prob_t(x_t[:5], t, sde),
                             rtol=1e-5, atol=1e-4)


def test_sample_component_weights():
  mixture = analytic.GaussianMixture.create([0.2, 0.8], [[-5.0], [5.0]], [[0.1], [0.1]])
  x, labels = mixture.sample(jax.random.PRNGKey(0), 20000, return_labels=True)
  frac = float(jnp.mean(labels == 1))
  assert abs(frac - 0.8) < 5 * np.sqrt(0.16 / 20000)
  np.testing.assert_array_equal(np.sign(x[:, 0]), np.where(labels == 1, 1, -1))


@pytest.mark.parametrize('sde', SDES, ids=SDE_IDS)
def test_log_posterior_is_bayes_rule(mixture, sde):
  x = mixture.sample(jax.random.PRNGKey(5), 6)
  t = 0.5
  log_post = mixture.log_posterior_t(x, t, sde)
  np.testing.assert_allclose(jnp.sum(jnp.exp(log_post), -1), 1.0, rtol=1e-5)
  m, s = (float(v) for v in sde_lib.transition_coeffs(sde, t))
  joint = np.stack([
      np.log(w) + _scipy_log_prob_t(analytic.GaussianMixture.create([1.0], [mu], [cov]), x, m, s)
      for w, mu, cov in zip(np.asarray(mixture.weights), np.asarray(mixture.means),
                            np.asarray(mixture.covs))], -1)
  expected = joint - scipy.special.logsumexp(joint, -1, keepdims=True)
  np.testing.assert_allclose(log_post, expected, atol=2e-4)


def test_score_fn_works_on_batches_with_scalar_time():
  mixture = analytic.gaussian([1.0, -1.0], [0.5, 2.0])
  sde = sde_lib.VPSDE()
  score_fn = mixture.score_fn(sde)
  x = jnp.array([[0.0, 0.0], [1.0, 1.0]])
  m, s = (float(v) for v in sde_lib.transition_coeffs(sde, 0.3))
  var = m ** 2 * np.array([0.5, 2.0]) + s ** 2
  expected = -(np.asarray(x) - m * np.array([1.0, -1.0])) / var
  np.testing.assert_allclose(score_fn(x, 0.3), expected, rtol=1e-5)
  np.testing.assert_allclose(score_fn(x, jnp.array([0.3, 0.3])), expected, rtol=1e-5)


@pytest.mark.parametrize('args, message', [
    (([1.0], [[0.0, 0.0]], [[1.0]]), r'covs must have shape \[K, D\]'),
    (([1.0, 1.0], [[0.0]], [[1.0]]), r'weights must have shape \[K\]'),
    (([-1.0], [[0.0]], [[1.0]]), 'weights must be positive'),
    (([1.0], [[0.0]], [[-1.0]]), 'variances\\) must be positive'),
    (([1.0], [[0.0, 0.0]], [[[1.0, 2.0], [2.0, 1.0]]]), 'positive definite'),
    (([1.0], [[0.0, 0.0]], [[[1.0, 0.5], [0.0, 1.0]]]), 'symmetric'),
    (([1.0], [0.0], [1.0]), r'means must have shape \[K, D\]'),
])
def test_bad_mixture_errors(args, message):
  with pytest.raises(ValueError, match=message):
    analytic.GaussianMixture.create(*args)
