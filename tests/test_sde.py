"""Forward SDEs: closed-form marginals, Monte-Carlo simulation, discrete chains, schedules."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.stats

from score_sde import analytic
from score_sde import sde as sde_lib

ALL_SDES = {
    've': sde_lib.VESDE(),
    'vp': sde_lib.VPSDE(),
    'subvp': sde_lib.SubVPSDE(),
    'vp_cosine': sde_lib.VPSDE(schedule='cosine'),
    'subvp_cosine': sde_lib.SubVPSDE(schedule='cosine'),
}
TIMES = np.array([0.0, 1e-3, 0.1, 0.37, 0.5, 0.9, 1.0])


def _closed_form(name, t):
  """(m(t), s(t)) of Song et al. 2021, written out independently in float64."""
  if name == 've':
    return np.ones_like(t), 0.01 * (50 / 0.01) ** t
  b0, b1 = 0.1, 20.0
  if name.endswith('cosine'):
    u = lambda tt: np.cos((tt + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    mean2 = u(t) / u(0.0)
  else:
    mean2 = np.exp(-0.5 * t ** 2 * (b1 - b0) - t * b0)
  m = np.sqrt(mean2)
  return m, (1 - mean2) if name.startswith('subvp') else np.sqrt(1 - mean2)


@pytest.mark.parametrize('name', ['ve', 'vp', 'subvp', 'vp_cosine', 'subvp_cosine'])
def test_marginal_prob_matches_closed_form(name):
  sde = ALL_SDES[name]
  t = TIMES if 'cosine' not in name else TIMES[TIMES < 0.99]  # cosine: below the rate cap
  x0 = jnp.full((len(t), 3), 2.0)
  mean, std = sde.marginal_prob(x0, jnp.asarray(t))
  m, s = _closed_form(name, t)
  np.testing.assert_allclose(mean[:, 0], 2 * m, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(std[:, 0], s, rtol=2e-5, atol=1e-6)
  assert std.shape == (len(t), 1)


@pytest.mark.parametrize('name', ['ve', 'vp', 'subvp', 'vp_cosine'])
def test_marginals_match_monte_carlo_simulation(name):
  """Euler-Maruyama paths of dx = f dt + g dw from x0 have the transition moments."""
  sde = ALL_SDES[name]
  n_paths, n_steps, x0 = 20000, 1000, 1.5
  dt = sde.T / n_steps

  def step(x, inputs):
    t, key = inputs
    drift, diffusion = sde.sde(x, t)
    return x + drift * dt + diffusion * jnp.sqrt(dt) * jax.random.normal(key, x.shape), x

  ts = jnp.arange(n_steps) * dt
  keys = jax.random.split(jax.random.PRNGKey(1), n_steps)
  x_end, path = jax.jit(lambda x: jax.lax.scan(step, x, (ts, keys)))(jnp.full((n_paths,), x0))
  # t = 1 is left out: the capped cosine rate (~6900) makes Euler-Maruyama
  # with dt = 1e-3 unstable there, whatever the SDE's marginals.
  checks = [(n_steps // 2, path[n_steps // 2]), (9 * n_steps // 10, path[9 * n_steps // 10])]
  if 'cosine' not in name:
    checks.append((n_steps, x_end))
  for index, x_t in checks:
    t = index * dt
    m, s = sde_lib.transition_coeffs(sde, t)
    s0 = sde_lib.transition_coeffs(sde, 0.0)[1]
    # Transition from time 0 to t of the process started at x0 (VE: s(0) = sigma_min).
    var = float(s) ** 2 - float(m) ** 2 * float(s0) ** 2
    sample_mean, sample_var = float(jnp.mean(x_t)), float(jnp.var(x_t))
    se_mean = math.sqrt(var / n_paths)
    se_var = var * math.sqrt(2 / (n_paths - 1))
    # 5 standard errors plus the O(dt) Euler-Maruyama bias.
    assert abs(sample_mean - float(m) * x0) < 5 * se_mean + 2e-3 * max(1, abs(x0)), (t, sample_mean)
    assert abs(sample_var - var) < 5 * se_var + 5e-3 * var, (t, sample_var, var)


def test_ve_discretization_is_smld_chain():
  sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0, N=10)
  sigmas = np.exp(np.linspace(np.log(0.01), np.log(50.0), 10))
  x = jnp.ones((10, 2))
  t = (jnp.arange(10) + 0.5) / 9                    # mid-points: label i = floor(t (N-1))
  f, G = sde.discretize(x, t.clip(0, 1))
  expected = np.sqrt(sigmas ** 2 - np.concatenate([[0.0], sigmas[:-1]]) ** 2)
  np.testing.assert_allclose(G[:, 0], expected, rtol=1e-5)
  np.testing.assert_array_equal(f, 0.0)
  # The chain x_i = x_{i-1} + G_i z reaches variance sigma_i^2 (telescoping).
  np.testing.assert_allclose(np.cumsum(G[:, 0] ** 2), sigmas ** 2, rtol=1e-5)


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_vp_discretization_is_ddpm_chain(schedule):
  sde = sde_lib.VPSDE(N=20, schedule=schedule)
  betas = np.asarray(sde.discrete_betas, np.float64)
  if schedule == 'linear':
    np.testing.assert_allclose(betas, np.linspace(0.1 / 20, 20 / 20, 20), rtol=1e-6)
  x = jnp.full((20, 3), 0.7)
  t = (jnp.arange(20) + 0.5) / 19
  f, G = sde.discretize(x, t.clip(0, 1))
  np.testing.assert_allclose(x + f, np.broadcast_to(np.sqrt(1 - betas)[:, None] * 0.7, x.shape),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(G[:, 0], np.sqrt(betas), rtol=1e-6)
  # Mean and variance recursions of x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z.
  mean, var = 1.0, 0.0
  for beta in betas:
    mean, var = math.sqrt(1 - beta) * mean, (1 - beta) * var + beta
  np.testing.assert_allclose(mean ** 2, sde.alphas_cumprod[-1], rtol=1e-4)
  np.testing.assert_allclose(var, 1 - sde.alphas_cumprod[-1], rtol=1e-5)


def test_continuous_vp_converges_to_discrete_ddpm_chain():
  errors = []
  for n in [20, 100, 1000]:
    sde = sde_lib.VPSDE(N=n)
    t = (jnp.arange(n) + 1.0) / n
    m, _ = sde_lib.transition_coeffs(sde, t)
    errors.append(float(jnp.max(jnp.abs(m ** 2 - sde.alphas_cumprod))))
  assert errors[0] > 5 * errors[1] > 25 * errors[2], errors
  assert errors[2] < 5e-3


def test_default_euler_maruyama_discretization_of_subvp():
  sde = sde_lib.SubVPSDE(N=50)
  x = jnp.ones((3, 2))
  t = jnp.array([0.1, 0.5, 0.9])
  f, G = sde.discretize(x, t)
  drift, diffusion = sde.sde(x, t)
  np.testing.assert_allclose(f, drift / 50, rtol=1e-6)
  np.testing.assert_allclose(G, diffusion * np.sqrt(1 / 50), rtol=1e-6)


def test_cosine_schedule_values():
  t = np.linspace(0, 1, 11)
  f = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
  np.testing.assert_allclose(sde_lib.cosine_alpha_bar(t), f / f[0], rtol=1e-5, atol=1e-7)
  betas = np.asarray(sde_lib.cosine_betas(1000), np.float64)
  assert betas.max() <= 0.999 + 1e-7 and betas[-1] == pytest.approx(0.999)
  ab = np.cumprod(1 - betas)
  unclipped = betas < 0.999
  tt = np.arange(1, 1001) / 1000
  ft = np.cos((tt + 0.008) / 1.008 * np.pi / 2) ** 2 / np.cos(0.008 / 1.008 * np.pi / 2) ** 2
  np.testing.assert_allclose(ab[unclipped], ft[unclipped], rtol=1e-4, atol=1e-7)
  # Continuous time: beta(t) = -d/dt log alpha_bar(t) below the rate cap.
  sde = sde_lib.VPSDE(schedule='cosine')
  ts = jnp.array([0.05, 0.3, 0.6, 0.9, 0.99])
  beta, _ = sde.beta_and_integral(ts)
  grad = jax.vmap(jax.grad(lambda s: -jnp.log(sde_lib.cosine_alpha_bar(s))))(ts)
  np.testing.assert_allclose(beta, grad, rtol=1e-3)
  cap = -math.log(1 - 0.999) * 1000
  assert float(sde.beta_and_integral(1.0)[0]) == pytest.approx(cap, rel=1e-5)


@pytest.mark.parametrize('sde', [sde_lib.VPSDE(schedule='cosine'),
                                 sde_lib.SubVPSDE(schedule='cosine', N=100)], ids=['vp', 'subvp'])
def test_capped_cosine_integral_and_marginals_up_to_t_equals_1(sde):
  """Above the rate cap (t > ~0.9997 at N = 1000), B(t) = int_0^t min(beta, cap) keeps
  growing at the cap rate: float64 quadrature of the capped rate, not the closed form."""
  scale = np.pi / (2 * 1.008)
  cap = -math.log(1 - 0.999) * sde.N
  rate = lambda s: min(2 * scale * math.tan((s + 0.008) / 1.008 * np.pi / 2), cap)  # noqa: E731
  t_cap = ((math.atan(cap / (2 * scale)) / (np.pi / 2)) * 1.008 - 0.008)
  ts = np.array([0.5, 0.99, t_cap, 0.5 * (t_cap + 1), 1.0])
  B = np.array([scipy.integrate.quad(rate, 0.0, t, points=[min(t_cap, t)], limit=200)[0]
                for t in ts])
  _, integral = sde.beta_and_integral(jnp.asarray(ts))
  np.testing.assert_allclose(integral, B, rtol=1e-4)
  mean, std = sde.marginal_prob(jnp.ones((len(ts), 2)), jnp.asarray(ts))
  m = np.exp(-0.5 * B)
  np.testing.assert_allclose(mean[:, 0], m, rtol=1e-3)
  s = 1 - m ** 2 if isinstance(sde, sde_lib.SubVPSDE) else np.sqrt(1 - m ** 2)
  np.testing.assert_allclose(std[:, 0], s, rtol=1e-5)


def test_geometric_sigmas_are_ncsn_ladder():
  sigmas = np.asarray(sde_lib.geometric_sigmas(50.0, 0.01, 232))
  assert sigmas[0] == pytest.approx(50.0, rel=1e-5) and sigmas[-1] == pytest.approx(0.01, rel=1e-5)
  ratios = sigmas[:-1] / sigmas[1:]
  np.testing.assert_allclose(ratios, ratios[0], rtol=1e-4)
  np.testing.assert_allclose(sigmas[::-1], sde_lib.VESDE(N=232).discrete_sigmas, rtol=1e-4)


@pytest.mark.parametrize('name', ['ve', 'vp', 'subvp'])
def test_prior_sampling_and_logp(name, key):
  sde = ALL_SDES[name]
  z = sde.prior_sampling(key, (4000, 3))
  scale = 50.0 if name == 've' else 1.0
  assert abs(float(jnp.std(z)) / scale - 1) < 0.03
  expected = scipy.stats.norm.logpdf(np.asarray(z[:5], np.float64), scale=scale).sum(-1)
  np.testing.assert_allclose(sde.prior_logp(z[:5]), expected, rtol=1e-5)
  img = z[:2].reshape(2, 1, 3, 1)  # prior_logp sums over all non-batch axes
  np.testing.assert_allclose(sde.prior_logp(img), sde.prior_logp(z[:2]), rtol=1e-6)


@pytest.mark.parametrize('name', ['ve', 'vp', 'subvp'])
@pytest.mark.parametrize('probability_flow', [False, True])
def test_reverse_sde(name, probability_flow, key):
  sde = ALL_SDES[name]
  mixture = analytic.random_mixture(key, 4, 2)
  score_fn = mixture.score_fn(sde)
  rsde = sde_lib.reverse(sde, score_fn, probability_flow)
  x = mixture.sample(key, 5)
  t = jnp.linspace(0.1, 0.9, 5)
  drift, diffusion = sde.sde(x, t)
  rdrift, rdiffusion = rsde.sde(x, t)
  w = 0.5 if probability_flow else 1.0
  np.testing.assert_allclose(rdrift, drift - w * diffusion ** 2 * score_fn(x, t), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(rdiffusion, 0.0 if probability_flow else diffusion)
  f, G = sde.discretize(x, t)
  rf, rG = rsde.discretize(x, t)
  np.testing.assert_allclose(rf, f - w * G ** 2 * score_fn(x, t), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(rG, 0.0 if probability_flow else G)
  assert (rsde.T, rsde.N) == (sde.T, sde.N)


@pytest.mark.parametrize('name', ['ve', 'vp', 'subvp'])
def test_broadcasting_any_rank_and_time_shape(name):
  sde = ALL_SDES[name]
  images = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3) / 50
  vectors = images.reshape(2, -1)
  t = jnp.array([0.3, 0.3])
  for method in ('sde', 'marginal_prob', 'discretize'):
    a_img, b_img = getattr(sde, method)(images, t)
    a_scalar, b_scalar = getattr(sde, method)(images, 0.3)
    a_vec, b_vec = getattr(sde, method)(vectors, t)
    np.testing.assert_allclose(a_img, a_scalar, rtol=1e-6)
    np.testing.assert_allclose(jnp.broadcast_to(b_img, images.shape),
                               jnp.broadcast_to(b_scalar, images.shape), rtol=1e-6)
    np.testing.assert_allclose(a_img.reshape(2, -1), a_vec, rtol=1e-6)
    np.testing.assert_allclose(jnp.broadcast_to(b_img, images.shape).reshape(2, -1),
                               jnp.broadcast_to(b_vec, vectors.shape), rtol=1e-6)


def test_sdes_are_immutable_pytrees_usable_under_jit():
  sde = sde_lib.VPSDE(beta_min=0.2)
  with pytest.raises(Exception):
    sde.beta_min = 3.0  # frozen
  assert jax.tree_util.tree_leaves(sde) == []
  f = jax.jit(lambda s, x, t: s.marginal_prob(x, t)[1])
  np.testing.assert_allclose(f(sde, jnp.ones(2), jnp.array([0.5, 0.5])),
                             sde.marginal_prob(jnp.ones(2), jnp.array([0.5, 0.5]))[1])
  assert sde == sde_lib.VPSDE(beta_min=0.2) and hash(sde) == hash(sde_lib.VPSDE(beta_min=0.2))


def test_sde_from_config():
  import ml_collections
  config = ml_collections.ConfigDict({
      'training': {'sde': 'subvpsde'},
      'model': {'sigma_min': 0.01, 'sigma_max': 50., 'num_scales': 100, 'beta_min': 0.1,
                'beta_max': 20., 'beta_schedule': 'cosine'}})
  sde, eps = sde_lib.sde_from_config(config)
  assert sde == sde_lib.SubVPSDE(N=100, schedule='cosine') and eps == 1e-3
  config.training.sde = 'vesde'
  sde, eps = sde_lib.sde_from_config(config)
  assert sde == sde_lib.VESDE(N=100) and eps == 1e-5


@pytest.mark.parametrize('make, message', [
    (lambda: sde_lib.get_sde('ousde'), "unknown SDE 'ousde'; valid names"),
    (lambda: sde_lib.VESDE(sigma_min=-0.1), 'sigma_min must be a positive'),
    (lambda: sde_lib.VESDE(sigma_min=10., sigma_max=1.), 'sigma_min < sigma_max'),
    (lambda: sde_lib.VPSDE(beta_min=30., beta_max=20.), 'beta_min must not exceed beta_max'),
    (lambda: sde_lib.SubVPSDE(beta_min=-1.), 'beta_min must be >= 0'),
    (lambda: sde_lib.VPSDE(N=0), 'positive integer'),
    (lambda: sde_lib.VPSDE(N=10).discretize(jnp.ones(2), 0.5),
     r'beta_max / N = 20.0 / 10 = 2 .*use N >= 20'),
    (lambda: sde_lib.VPSDE(schedule='sigmoid'), "unknown noise schedule 'sigmoid'"),
    (lambda: sde_lib.VESDE().marginal_prob(jnp.ones(2), 1.5), r'time must lie in \[0, T\]'),
    (lambda: sde_lib.VPSDE().marginal_prob(jnp.ones(2), jnp.array([-0.1, 0.2])),
     r'time must lie in \[0, T\]'),
    (lambda: sde_lib.VPSDE().sde(jnp.ones((2, 3)), jnp.ones(3) * 0.5), 'not a leading part'),
])
def test_bad_input_errors(make, message):
  with pytest.raises(ValueError, match=message):
    make()
