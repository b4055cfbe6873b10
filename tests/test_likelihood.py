"""Probability-flow likelihood, encode / decode, dequantisation and bits/dim
against the exact Gaussian-mixture answers of score_sde.analytic.

The prior at T. `log_likelihood` returns prior_logp(z) + int div, the model's
log-likelihood with p_T replaced by the SDE's prior. With the exact score the
ODE carries p_eps to p_T exactly, so

  logp - prior_logp(z) + log p_T(z) = log p_eps(x)

holds exactly; that is what the tests compare (the replaced term log prior(z)
- log p_T(z) is 5e-3 to 5e-2 bits/dim for these mixtures, far above the 1e-3
tolerance, so it cannot be ignored).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde import analytic
from score_sde import likelihood
from score_sde import parallel
from score_sde import sde as sde_lib

SDES = {'ve': sde_lib.VESDE(), 'vp': sde_lib.VPSDE(), 'subvp': sde_lib.SubVPSDE()}
EPS = 1e-5
KEY = jax.random.PRNGKey(0)


@pytest.fixture(scope='module')
def mixtures():
  return {dim: analytic.random_mixture(jax.random.PRNGKey(3), dim, 3) for dim in (2, 64)}


@pytest.fixture(scope='module')
def scores(mixtures):
  """One score function object per (dim, sde): compiled solvers are reused."""
  return {(dim, name): mix.score_fn(sde) for dim, mix in mixtures.items()
          for name, sde in SDES.items()}


def model_logp_with_exact_prior(mix, sde, logp, z):
  """Replace prior_logp(z) by the exact log p_T(z) (see the module docstring)."""
  return logp - sde.prior_logp(z) + mix.log_prob_t(z, sde.T, sde)


@pytest.mark.parametrize('dim', [2, pytest.param(64, marks=pytest.mark.slow)])
@pytest.mark.parametrize('sde_name', ['ve', 'vp', 'subvp'])
def test_exact_divergence_matches_analytic_log_density(mixtures, scores, dim, sde_name):
  mix, sde = mixtures[dim], SDES[sde_name]
  x = mix.sample(jax.random.PRNGKey(1), 32)
  logp, z, info = likelihood.log_likelihood(KEY, scores[dim, sde_name], sde, x,
                                            divergence='exact', rtol=1e-5, atol=1e-5, eps=EPS)
  assert logp.shape == (32,) and z.shape == x.shape
  truth = mix.log_prob_t(x, EPS, sde)
  error_bpd = jnp.abs(model_logp_with_exact_prior(mix, sde, logp, z) - truth) / (dim * math.log(2))
  assert float(jnp.max(error_bpd)) < 1e-3
  assert 10 < int(info['nfe']) < 1000


def test_exact_divergence_in_64_dims_vp(mixtures, scores):
  """The D = 64 case of the test above for one SDE in the default run."""
  mix, sde = mixtures[64], SDES['vp']
  x = mix.sample(jax.random.PRNGKey(1), 16)
  logp, z, _ = likelihood.log_likelihood(KEY, scores[64, 'vp'], sde, x, divergence='exact',
                                         eps=EPS)
  error_bpd = jnp.abs(model_logp_with_exact_prior(mix, sde, logp, z)
                      - mix.log_prob_t(x, EPS, sde)) / (64 * math.log(2))
  assert float(jnp.max(error_bpd)) < 1e-3


@pytest.mark.parametrize('divergence', ['hutchinson_rademacher', 'hutchinson_gaussian'])
def test_hutchinson_estimate_is_unbiased(mixtures, scores, divergence):
  """The same point repeated: each copy gets its own probe, from fold_in(key, i)."""
  mix, sde = mixtures[64], SDES['vp']
  copies = 128
  x = jnp.repeat(mix.sample(jax.random.PRNGKey(2), 1), copies, axis=0)
  score_fn = scores[64, 'vp']
  options = dict(rtol=1e-4, atol=1e-4, eps=EPS)
  estimates, z, _ = likelihood.log_likelihood(KEY, score_fn, sde, x, divergence=divergence,
                                              **options)
  exact, _, _ = likelihood.log_likelihood(KEY, score_fn, sde, x[:1], divergence='exact',
                                          **options)
  estimates = np.asarray(estimates, np.float64)
  std_error = estimates.std(ddof=1) / np.sqrt(copies)
  assert estimates.std() > 0.01                  # the probes really differ
  assert abs(estimates.mean() - float(exact[0])) < 3 * std_error
  # Latents do not depend on the probe (up to the solver error: the probe changes
  # delta_logp and so the adaptive steps).
  spread = jnp.max(jnp.linalg.norm(z - z[:1], axis=1)) / jnp.linalg.norm(z[0])
  assert float(spread) < 1e-2


def test_hutchinson_averages_its_probes():
  """mean_p v_p^T A v_p: with the D probes sqrt(D) e_i it is tr A exactly, and with
  two probes it is the mean of their two single-probe estimates."""
  a = jax.random.normal(jax.random.PRNGKey(3), (5, 5))
  jvp_fn = lambda v: a @ v   # noqa: E731
  scaled_units = math.sqrt(5) * jnp.eye(5)
  np.testing.assert_allclose(likelihood.hutchinson_divergence(jvp_fn, scaled_units),
                             np.trace(np.asarray(a)), rtol=1e-5)
  np.testing.assert_allclose(likelihood.exact_divergence(jvp_fn, scaled_units),
                             np.trace(np.asarray(a)), rtol=1e-5)
  probes = jnp.array([[1.0, -1, 1, 1, -1], [-1.0, -1, 1, -1, 1]])
  singles = [float(p @ a @ p) for p in probes]
  np.testing.assert_allclose(likelihood.hutchinson_divergence(jvp_fn, probes),
                             np.mean(singles), rtol=1e-5)


@pytest.mark.slow
def test_more_probes_reduce_the_variance(mixtures, scores):
  mix, sde = mixtures[64], SDES['vp']
  x = jnp.repeat(mix.sample(jax.random.PRNGKey(2), 1), 48, axis=0)
  spreads = []
  for num_probes in (1, 8):
    logp, _, _ = likelihood.log_likelihood(KEY, scores[64, 'vp'], sde, x, num_probes=num_probes,
                                           rtol=1e-3, atol=1e-3, eps=EPS)
    spreads.append(float(jnp.std(logp)))
  # Variance falls as 1 / num_probes: std ratio sqrt(8) ~ 2.8 (allow sampling error).
  assert spreads[0] / spreads[1] > 1.8


def test_reported_nfe_counts_vector_field_calls(mixtures):
  mix, sde = mixtures[2], SDES['vp']
  calls = []

  def counting_score(x, t):
    jax.debug.callback(lambda _: calls.append(1), t)
    return mix.score(x, t, sde)

  x = mix.sample(jax.random.PRNGKey(1), 1)
  likelihood.log_likelihood(KEY, counting_score, sde, x, rtol=1e-3, atol=1e-3)
  jax.effects_barrier()
  calls.clear()
  _, _, info = likelihood.log_likelihood(KEY, counting_score, sde, x, rtol=1e-3, atol=1e-3)
  jax.effects_barrier()
  assert len(calls) == int(info['nfe'])


def test_batch_nfe_is_the_most_any_example_takes(mixtures, scores):
  """Each example is solved with its own adaptive steps (exact divergence: no probe, so
  an example's solve does not depend on its position); the batch reports per example what
  that example takes alone, and as 'nfe' the largest (the batched solve runs that long)."""
  mix, sde = mixtures[2], SDES['vp']
  x = mix.sample(jax.random.PRNGKey(8), 6) * jnp.array([[1.0], [0.2], [3.0], [1.0], [0.5], [2.0]])
  options = dict(divergence='exact', rtol=1e-3, atol=1e-3, eps=EPS)
  _, _, info = likelihood.log_likelihood(KEY, scores[2, 'vp'], sde, x, **options)
  alone = [int(likelihood.log_likelihood(KEY, scores[2, 'vp'], sde, x[i:i + 1], **options)[2]
               ['nfe']) for i in range(len(x))]
  assert len(set(alone)) > 1                       # the examples really differ
  np.testing.assert_array_equal(info['nfe_per_example'], alone)
  assert int(info['nfe']) == max(alone)


def test_probe_distributions_on_a_linear_drift():
  """Data N(0, v0 I): the drift is c(t) x, its Jacobian c(t) I, so a probe v (fixed during
  the solve) gives |v|^2 / D times the exact integral of the divergence: exactly 1 for
  Rademacher probes, chi^2_D / D for Gaussian ones (mean 1, variance 2 / D; a uniform
  probe of unit variance would give 0.8 / D). 2000 copies of one point, D = 2: the
  variance's standard error is sqrt(8 / 2000) = 0.063 (exponential fourth moment)."""
  sde, dim, copies = SDES['vp'], 2, 2000
  gauss = analytic.gaussian(np.zeros(dim), np.full(dim, 0.25))
  score_fn = gauss.score_fn(sde)
  x = jnp.tile(jnp.array([[0.3, -0.2]]), (copies, 1))
  options = dict(eps=EPS, rtol=1e-5, atol=1e-5)
  _, _, exact = likelihood.log_likelihood(KEY, score_fn, sde, x[:1], divergence='exact',
                                          **options)
  exact = float(exact['delta_logp'][0])
  assert abs(exact) > 0.5                          # a divergence far from zero
  _, _, rademacher = likelihood.log_likelihood(KEY, score_fn, sde, x,
                                               divergence='hutchinson_rademacher', **options)
  np.testing.assert_allclose(np.asarray(rademacher['delta_logp']) / exact, 1.0, rtol=1e-4)
  _, _, gaussian = likelihood.log_likelihood(KEY, score_fn, sde, x,
                                             divergence='hutchinson_gaussian', **options)
  ratio = np.asarray(gaussian['delta_logp'], np.float64) / exact
  assert abs(ratio.mean() - 1) < 5 * math.sqrt(2 / dim / copies)
  assert abs(ratio.var() - 2 / dim) < 5 * math.sqrt(8 / copies)


# ----------------------------------------------------------------------------
# Encoding and decoding
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('sde_name', [pytest.param('ve', marks=pytest.mark.slow), 'vp'])
def test_decode_inverts_encode(mixtures, scores, sde_name):
  mix, sde = mixtures[64], SDES[sde_name]
  x = mix.sample(jax.random.PRNGKey(5), 8)
  score_fn = scores[64, sde_name]
  z = likelihood.encode(score_fn, sde, x, eps=EPS)
  x_back = likelihood.decode(score_fn, sde, z, eps=EPS)
  assert float(jnp.linalg.norm(z - x) / jnp.linalg.norm(x)) > 0.5     # really moved
  relative_error = jnp.linalg.norm(x_back - x, axis=1) / jnp.linalg.norm(x, axis=1)
  assert float(jnp.max(relative_error)) < 1e-3


@pytest.mark.parametrize('sde_name', ['ve', 'vp'])
def test_encodings_are_distributed_as_p_T(mixtures, scores, sde_name):
  mix, sde = mixtures[2], SDES[sde_name]
  n = 2000
  x = mix.sample(jax.random.PRNGKey(6), n)
  z = np.asarray(likelihood.encode(scores[2, sde_name], sde, x, eps=EPS, rtol=1e-4,
                                   atol=1e-4), np.float64)
  p_T = mix.marginal_t(sde, sde.T)
  w = np.asarray(p_T.weights, np.float64)[:, None]
  means = np.asarray(p_T.means, np.float64)
  mean = (w * means).sum(0)
  var = (w * (np.asarray(p_T.covs, np.float64) + means ** 2)).sum(0) - mean ** 2
  np.testing.assert_array_less(np.abs(z.mean(0) - mean), 4 * np.sqrt(var / n))
  np.testing.assert_array_less(np.abs(z.var(0) / var - 1), 4 * np.sqrt(2 / n))
  # Independent coordinates (p_T is nearly isotropic) and Gaussian tails.
  assert abs(np.corrcoef(z.T)[0, 1]) < 4 / np.sqrt(n)
  kurtosis = ((z - z.mean(0)) ** 4).mean(0) / z.var(0) ** 2
  np.testing.assert_array_less(np.abs(kurtosis - 3), 4 * np.sqrt(24 / n))


@pytest.mark.parametrize('sde_name', ['ve', 'vp'])
def test_encode_and_decode_follow_the_closed_form_flow_of_gaussian_data(sde_name):
  """Data N(mu, v0) (diagonal): the probability-flow ODE is affine, x(t) = m(t) mu +
  sqrt(v(t) / v(t')) (x(t') - m(t') mu) with v = m^2 v0 + s^2. eps = 0.2 makes the
  end time of both maps matter (encode: eps -> T, decode: T -> eps)."""
  sde, eps = SDES[sde_name], 0.2
  mu, v0 = np.array([1.0, -0.5]), np.array([0.3, 0.1])
  score_fn = analytic.gaussian(mu, v0).score_fn(sde)
  coeffs = lambda t: [float(c) for c in sde_lib.transition_coeffs(sde, t)]  # noqa: E731
  (m_eps, s_eps), (m_T, s_T) = coeffs(eps), coeffs(sde.T)
  v_eps, v_T = m_eps ** 2 * v0 + s_eps ** 2, m_T ** 2 * v0 + s_T ** 2
  x = jax.random.normal(jax.random.PRNGKey(9), (4, 2))
  z = likelihood.encode(score_fn, sde, x, eps=eps)
  x64 = np.asarray(x, np.float64)
  expected_z = m_T * mu + np.sqrt(v_T / v_eps) * (x64 - m_eps * mu)
  scale_z = np.sqrt(v_T)
  np.testing.assert_allclose(np.asarray(z) / scale_z, expected_z / scale_z, atol=1e-4)
  x_back = likelihood.decode(score_fn, sde, jnp.asarray(expected_z, jnp.float32), eps=eps)
  np.testing.assert_allclose(np.asarray(x_back), x64, atol=1e-4 * np.sqrt(v_eps).max() + 1e-5)


# ----------------------------------------------------------------------------
# Dequantisation and bits/dim
# ----------------------------------------------------------------------------

def test_uniform_dequantize_fills_each_level_cell():
  levels = 256
  k = jax.random.randint(jax.random.PRNGKey(0), (500, 3, 4), 0, levels)
  x = k / (levels - 1)
  u = likelihood.uniform_dequantize(jax.random.PRNGKey(1), x, levels)
  np.testing.assert_array_equal(np.floor(np.asarray(u) * levels), np.asarray(k))
  offsets = np.asarray(u * levels - k).ravel()
  assert abs(offsets.mean() - 0.5) < 4 * np.sqrt(1 / 12 / offsets.size)
  assert abs(offsets.var() - 1 / 12) < 0.01                     # uniform: variance 1 / 12
  # Each pixel gets its own draw: across 500 examples no two of the 12 positions
  # correlate beyond 4 / sqrt(500) = 0.18 (measured 0.13; one draw per example: 1).
  per_position = offsets.reshape(500, 12)
  correlations = np.corrcoef(per_position, rowvar=False)[np.triu_indices(12, 1)]
  assert np.abs(correlations).max() < 4 / np.sqrt(500)
  # Few levels, and examples independent of the batch.
  u2 = likelihood.uniform_dequantize(jax.random.PRNGKey(1), jnp.array([[0.0, 1.0]]), 2)
  assert 0 <= float(u2[0, 0]) < 0.5 <= float(u2[0, 1]) < 1
  np.testing.assert_array_equal(
      likelihood.uniform_dequantize(jax.random.PRNGKey(1), x[:7], levels), u[:7])


def test_bits_per_dim_offsets_and_scaler_invariance():
  dim = 10
  # The uniform density on the unit cube, written in [0, 1] and in [-1, 1] model space.
  logp_unit = jnp.zeros((3,))
  logp_centered = jnp.full((3,), -dim * math.log(2.0))
  identity = lambda y: y              # noqa: E731
  from_centered = lambda y: (y + 1) / 2   # noqa: E731
  np.testing.assert_allclose(likelihood.bits_per_dim(logp_unit, dim, identity), 8.0)
  np.testing.assert_allclose(likelihood.bits_per_dim(logp_centered, dim, from_centered), 8.0)
  # The reference offsets: 8 for [0, 1], 7 for [-1, 1].
  np.testing.assert_allclose(likelihood.bits_per_dim(jnp.zeros(1), dim, from_centered), 7.0)
  # L levels: offset log2(L); a data density of 1 bit per dim more, one bpd more.
  np.testing.assert_allclose(likelihood.bits_per_dim(logp_unit, dim, identity, 2), 1.0)
  np.testing.assert_allclose(
      likelihood.bits_per_dim(jnp.full((1,), -dim * math.log(2.0)), dim, identity, 16), 5.0)


def test_bits_per_dim_of_exact_model_on_discretised_gaussian():
  """bpd of a dequantised discrete Gaussian is within the dequantisation gap of its entropy."""
  levels, dim, n = 32, 4, 4000
  std = 0.1
  k = jnp.clip(jnp.round((0.5 + std * jax.random.normal(jax.random.PRNGKey(0), (n, dim)))
                         * (levels - 1)), 0, levels - 1)
  u = likelihood.uniform_dequantize(jax.random.PRNGKey(1), k / (levels - 1), levels)
  density = analytic.gaussian(np.full(dim, 0.5), np.full(dim, std ** 2))
  bpd = likelihood.bits_per_dim(density.log_prob(u), dim, lambda y: y, levels)
  # The continuous Gaussian's differential entropy + log2 L is the discrete entropy
  # up to O(bin^2 / std^2); bpd >= discrete entropy (Jensen) and close to it here.
  entropy_bits = 0.5 * math.log2(2 * math.pi * math.e * std ** 2) + math.log2(levels)
  assert abs(float(jnp.mean(bpd)) - entropy_bits) < 0.05


# ----------------------------------------------------------------------------
# Launcher variant: parameters as arguments, mesh-aware
# ----------------------------------------------------------------------------

def test_likelihood_fn_does_not_depend_on_device_count(mixtures, four_devices):
  mix, sde = mixtures[2], SDES['vp']
  score_model_fn = lambda m, x, t: m.score(x, t, sde)   # noqa: E731
  x = mix.sample(jax.random.PRNGKey(7), 8)
  results = []
  for num_devices in (1, 4):
    mesh = parallel.make_mesh(four_devices[:num_devices])
    fn = likelihood.get_likelihood_fn(sde, score_model_fn, rtol=1e-4, atol=1e-4, mesh=mesh)
    logp, z, _ = fn(KEY, mix, x)
    assert len(logp.sharding.device_set) == num_devices
    results.append((np.asarray(logp), np.asarray(z)))
  # The separately compiled 1- and 4-device programs round differently in the last bits
  # (LLVM -O1, score_sde/cpu/xla_flags.py): measured 6.3e-6 in logp and z of size ~3.6,
  # ~26 float32 ulps after ~100 adaptive steps. Round-off may also flip one step's
  # accept / reject, which moves the solution within the solver's own tolerance, so that
  # is the bound (rtol = atol = 1e-4, as solved). A program that depended on the device
  # count (other probes or data per device) would differ by O(1).
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-4, atol=1e-4)
  assert fn._cache_size() == 1   # noqa: SLF001 - one compilation per mesh


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------

def test_bad_input_raises_clear_errors(mixtures, scores):
  sde = SDES['vp']
  x = mixtures[2].sample(KEY, 4)
  score_fn = scores[2, 'vp']
  big = jnp.zeros((2, likelihood.EXACT_DIVERGENCE_MAX_DIM + 1))
  with pytest.raises(ValueError, match=r"'exact' .* limited to D <= 1024; the data have D = 1025"):
    likelihood.log_likelihood(KEY, lambda y, t: -y, sde, big, divergence='exact')
  with pytest.raises(ValueError, match=r"unknown divergence 'skilling'; valid: \['exact'"):
    likelihood.log_likelihood(KEY, score_fn, sde, x, divergence='skilling')
  with pytest.raises(ValueError, match=r"unknown ODE solver 'rk45'; valid"):
    likelihood.log_likelihood(KEY, score_fn, sde, x, solver='rk45')
  with pytest.raises(ValueError, match=r"'euler' has no error estimate.*num_steps > 0"):
    likelihood.log_likelihood(KEY, score_fn, sde, x, solver='euler')
  with pytest.raises(ValueError, match=r'num_probes must be an integer >= 1'):
    likelihood.log_likelihood(KEY, score_fn, sde, x, num_probes=0)
  with pytest.raises(ValueError, match=r'atol must be a positive number'):
    likelihood.log_likelihood(KEY, score_fn, sde, x, atol=-1.0)
  with pytest.raises(ValueError, match=r'eps must lie in \(0, T\)'):
    likelihood.log_likelihood(KEY, score_fn, sde, x, eps=1.5)
  with pytest.raises(ValueError, match=r'x must be a batch \[B, ...\]'):
    likelihood.log_likelihood(KEY, score_fn, sde, x[0])
  with pytest.raises(ValueError, match=r'score function failed on data of shape \(4, 3\)'):
    likelihood.log_likelihood(KEY, score_fn, sde, jnp.zeros((4, 3)))
  with pytest.raises(ValueError, match=r'expects data in \[0, 1\]'):
    likelihood.uniform_dequantize(KEY, jnp.array([[-1.0, 1.0]]))
  with pytest.raises(ValueError, match=r'num_levels must be an integer >= 2'):
    likelihood.uniform_dequantize(KEY, jnp.zeros((1, 2)), num_levels=1)
  with pytest.raises(ValueError, match=r'inverse_scaler must be affine'):
    likelihood.bits_per_dim(jnp.zeros(1), 2, jnp.square)
  with pytest.raises(ValueError, match=r'inverse_scaler must be increasing'):
    likelihood.bits_per_dim(jnp.zeros(1), 2, lambda y: -y)
  with pytest.raises(ValueError, match=r'dim must be a positive integer'):
    likelihood.bits_per_dim(jnp.zeros(1), 0, lambda y: y)
