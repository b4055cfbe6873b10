"""Inpainting, colourisation and class-conditional sampling against closed forms.

Gaussian data N(mu, Sigma) with the exact score make every predictor and the
annealed-Langevin corrector affine in (x, fresh Gaussian noise), and the
replacement of the known entries draws them afresh from N(m(t) y, s(t)^2 I),
independent of the rest. The mean and covariance of the unknown entries after
the whole replacement sampler therefore follow a recursion computed here in
float64 from the SDE's own coefficients (`replacement_moments`), independently
of the sampler code; the sampler's Monte Carlo moments must match it within
statistical error. When known and unknown parts are independent this is the
exact conditional p(x_unknown | x_known); when they are correlated it is not
(the paper's replacement is an approximation), which the tests also record.

Class-conditional sampling uses a Gaussian mixture whose classes are groups of
components, with the exact classifier log p(class | x_t) = logsumexp of the
exact component posteriors: at scale 1 the guided score is exactly the score
of the class's own mixture, so samples must fall in the class's components in
the proportions of their weights.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde import analytic
from score_sde import controllable
from score_sde import parallel
from score_sde import sampling
from score_sde import sde as sde_lib
from score_sde import losses

KEY = jax.random.PRNGKey(0)
NUM_SAMPLES = 4000
Z = 4.5   # tolerance in standard errors (several dozen checks: false alarms ~1e-4)

# A correlated 3-D Gaussian; entry 2 is observed.
MEAN = np.array([0.5, 0.0, -0.5])
COV = np.array([[1.0, 0.5, 0.3], [0.5, 1.0, 0.2], [0.3, 0.2, 0.5]])
KNOWN = np.array([False, False, True])
OBSERVED = np.array([0.0, 0.0, 1.0])
GAUSS = analytic.gaussian(MEAN, COV)
SDES = {'ve': sde_lib.VESDE(N=100), 'vp': sde_lib.VPSDE(N=100)}
SCORES = {name: GAUSS.score_fn(sde) for name, sde in SDES.items()}


# ----------------------------------------------------------------------------
# The independent closed form: moments of the replacement sampler
# ----------------------------------------------------------------------------

def _schedule(sde, times):
  """Per grid time (float64 numpy [N] each): m(t), s(t), a_i, G_i^2, drift factor, g(t)^2.

  From the SDE's own transition, discretisation and coefficients (drift f = c(t) x).
  """
  t = jnp.asarray(times, jnp.float32)
  ones = jnp.ones_like(t)
  m, s = sde_lib.transition_coeffs(sde, t)
  f_i, g_i = sde.discretize(ones, t)
  drift, diffusion = sde.sde(ones, t)
  as64 = lambda v: np.asarray(v, np.float64).reshape(len(times))  # noqa: E731
  return dict(m=as64(m), s=as64(s), a=1.0 + as64(f_i), g2_chain=as64(g_i) ** 2,
              drift=as64(drift), g2=as64(diffusion) ** 2)


def replacement_moments(sde, mean, cov, known, y, *, predictor='reverse_diffusion',
                        corrector='none', probability_flow=False, snr=0.16, n_steps_each=1,
                        eps=1e-3):
  """Exact (mean, covariance) of the unknown entries returned by the replacement
  PC sampler (noise removal on) for data N(mean, cov) with the exact score."""
  mean, cov = np.asarray(mean, np.float64), np.asarray(cov, np.float64)
  known = np.asarray(known, bool)
  unknown = ~known
  y_known = np.asarray(y, np.float64)[known]
  eye = np.eye(len(mean))
  prior_var = sde.sigma_max ** 2 if isinstance(sde, sde_lib.VESDE) else 1.0
  mu = np.zeros(unknown.sum())
  sigma = prior_var * np.eye(unknown.sum())
  times = np.linspace(sde.T, eps, sde.N)
  coef = _schedule(sde, times)
  weight = 0.5 if probability_flow else 1.0
  dt = sde.T / sde.N

  for i in range(len(times)):
    m, s, a, g2_chain = coef['m'][i], coef['s'][i], coef['a'][i], coef['g2_chain'][i]
    prec = np.linalg.inv(m * m * cov + s * s * eye)      # score = -prec (x - m mean)
    shifted_mean = m * mean

    def update(mu, sigma, a_mat, c, noise_var):
      """x' = A x + c + noise; x_known ~ N(m y, s^2 I), independent of the rest."""
      a_uu, a_uk = a_mat[np.ix_(unknown, unknown)], a_mat[np.ix_(unknown, known)]
      mu = a_uu @ mu + a_uk @ (m * y_known) + c[unknown]
      sigma = a_uu @ sigma @ a_uu.T + s * s * a_uk @ a_uk.T + noise_var * np.eye(len(mu))
      return mu, sigma

    if corrector == 'ald':
      step = 2 * a * a * (snr * s) ** 2
      for _ in range(n_steps_each):
        mu, sigma = update(mu, sigma, eye - step * prec, step * prec @ shifted_mean, 2 * step)
    if predictor == 'reverse_diffusion':      # x - f_i + G_i^2 s + G_i z, f_i = (a - 1) x
      a_mat, scale, noise = (2 - a) * eye, weight * g2_chain, g2_chain
    elif predictor == 'euler_maruyama':       # x - [f - g^2 s] dt + g sqrt(dt) z
      a_mat = (1 - coef['drift'][i] * dt) * eye
      scale, noise = weight * coef['g2'][i] * dt, coef['g2'][i] * dt
    elif predictor == 'ancestral_sampling':   # (x + G^2 s) / a + sigma_i z
      a_mat, scale = eye / a, g2_chain / a
      noise = g2_chain * max(1 - g2_chain / (m * m + s * s), 0.0) / a ** 2
    else:                                      # 'none'
      a_mat, scale, noise = eye, 0.0, 0.0
    last = i == len(times) - 1
    mu, sigma = update(mu, sigma, a_mat - scale * prec, scale * prec @ shifted_mean,
                       0.0 if (last or probability_flow) else noise)
  return mu, sigma


def exact_conditional(mean, cov, known, y):
  """Mean and covariance of x_unknown | x_known = y for N(mean, cov)."""
  known = np.asarray(known, bool)
  u, k = ~known, known
  gain = cov[np.ix_(u, k)] @ np.linalg.inv(cov[np.ix_(k, k)])
  cond_mean = mean[u] + gain @ (np.asarray(y)[k] - mean[k])
  cond_cov = cov[np.ix_(u, u)] - gain @ cov[np.ix_(k, u)]
  return cond_mean, cond_cov


def assert_moments(samples, mean, cov, slack=0.0):
  """Sample mean / covariance within Z standard errors (+ slack) of (mean, cov)."""
  samples = np.asarray(samples, np.float64)
  n = len(samples)
  assert np.all(np.isfinite(samples))
  sd = np.sqrt(np.diag(cov))
  mean_err = np.abs(samples.mean(0) - mean)
  assert np.all(mean_err <= Z * sd / np.sqrt(n) + slack), (samples.mean(0), mean)
  emp = np.cov(samples.T).reshape(cov.shape)
  cov_se = np.sqrt((np.outer(sd ** 2, sd ** 2) + cov ** 2) / n)
  assert np.all(np.abs(emp - cov) <= Z * cov_se + slack), (emp, cov)


def inpaint_vectors(sde_name, key=KEY, n=NUM_SAMPLES, **options):
  observed = jnp.tile(jnp.asarray(OBSERVED, jnp.float32), (n, 1))
  x, info = controllable.inpaint(key, SCORES[sde_name], SDES[sde_name], observed,
                                 KNOWN.astype(np.float32), **options)
  return np.asarray(x), info


# ----------------------------------------------------------------------------
# Inpainting
# ----------------------------------------------------------------------------

def test_inpainting_is_the_exact_conditional_when_known_part_is_independent():
  cov = np.array([[1.0, 0.6, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 0.5]])
  mean = np.array([0.3, -0.4, 1.0])
  sde = sde_lib.VPSDE(N=1000)
  gauss = analytic.gaussian(mean, cov)
  observed = jnp.tile(jnp.asarray([0.0, 0.0, 2.0]), (NUM_SAMPLES, 1))
  x, info = controllable.inpaint(KEY, gauss.score_fn(sde), sde, observed, KNOWN,
                                 corrector='none')
  x = np.asarray(x)
  np.testing.assert_array_equal(x[:, 2], 2.0)                 # known entries unchanged
  cond_mean, cond_cov = exact_conditional(mean, cov, KNOWN, [0, 0, 2.0])
  rec_mean, rec_cov = replacement_moments(sde, mean, cov, KNOWN, [0, 0, 2.0])
  discretisation = max(np.abs(rec_mean - cond_mean).max(), np.abs(rec_cov - cond_cov).max())
  assert discretisation < 0.01                                 # N = 1000 steps
  assert_moments(x[:, :2], cond_mean, cond_cov, slack=discretisation)
  assert int(info['nfe']) == 1000


@pytest.mark.parametrize('sde_name,predictor,corrector,probability_flow', [
    ('ve', 'reverse_diffusion', 'none', False),
    ('ve', 'reverse_diffusion', 'ald', False),
    ('vp', 'reverse_diffusion', 'none', False),
    ('vp', 'euler_maruyama', 'ald', False),
    ('vp', 'ancestral_sampling', 'none', False),
    ('vp', 'none', 'ald', False),
    ('vp', 'reverse_diffusion', 'none', True),
])
def test_inpainting_matches_the_closed_form_of_the_replacement_sampler(
    sde_name, predictor, corrector, probability_flow):
  x, info = inpaint_vectors(sde_name, predictor=predictor, corrector=corrector,
                            probability_flow=probability_flow, snr=0.16)
  np.testing.assert_array_equal(x[:, 2], 1.0)
  mean, cov = replacement_moments(SDES[sde_name], MEAN, COV, KNOWN, OBSERVED,
                                  predictor=predictor, corrector=corrector,
                                  probability_flow=probability_flow)
  assert_moments(x[:, :2], mean, cov)
  evals = (predictor != 'none') + (corrector != 'none')
  assert int(info['nfe']) == 100 * evals


def test_replacement_is_biased_for_correlated_parts_as_documented():
  """The module docstring's numbers: (u, k), rho 0.9, k = 2 observed."""
  cov = np.array([[1.0, 0.9], [0.9, 1.0]])
  known = np.array([False, True])
  for sde in (sde_lib.VESDE(), sde_lib.VPSDE()):
    mean, var = replacement_moments(sde, np.zeros(2), cov, known, [0.0, 2.0])
    np.testing.assert_allclose([mean[0], var[0, 0]], [1.25, 0.32], atol=0.01)
  cond_mean, cond_var = exact_conditional(np.zeros(2), cov, known, [0.0, 2.0])
  np.testing.assert_allclose([cond_mean[0], cond_var[0, 0]], [1.8, 0.19])
  # 5 annealed-Langevin corrector steps per level remove most of the bias.
  for sde, expected in ((sde_lib.VESDE(), [1.78, 0.195]), (sde_lib.VPSDE(), [1.74, 0.207])):
    mean, var = replacement_moments(sde, np.zeros(2), cov, known, [0.0, 2.0],
                                    corrector='ald', n_steps_each=5)
    np.testing.assert_allclose([mean[0], var[0, 0]], expected, atol=0.005)
  # And the sampler indeed lands there (VP, 1000 steps, 2000 samples).
  sde = sde_lib.VPSDE()
  x, _ = controllable.inpaint(KEY, analytic.gaussian([0.0, 0.0], cov).score_fn(sde), sde,
                              jnp.tile(jnp.asarray([0.0, 2.0]), (2000, 1)), known,
                              corrector='none')
  assert abs(float(np.mean(x[:, 0])) - 1.25) < Z * np.sqrt(0.32 / 2000) + 0.01


def test_replacement_draws_known_entries_from_the_diffused_observation():
  """project(x, t, keys): x(Omega) <- m(t) y + s(t) z with z ~ N(0, I) from the keys alone
  (the same z at every t), other entries untouched; finish puts y itself back."""
  sde, n = SDES['vp'], 2000
  observed = jnp.tile(jnp.asarray(OBSERVED, jnp.float32), (n, 1))
  mask = jnp.tile(jnp.asarray(KNOWN, jnp.float32), (n, 1))
  projection = controllable.replacement_projection(sde, observed, mask)
  x = jax.random.normal(jax.random.PRNGKey(4), (n, 3))
  keys = sampling.example_keys(jax.random.PRNGKey(5), n)
  project = jax.jit(projection.project)
  standardised = []
  for t in (0.3, 0.7):
    out = np.asarray(project(x, jnp.float32(t), keys), np.float64)
    np.testing.assert_array_equal(out[:, ~KNOWN], np.asarray(x)[:, ~KNOWN])
    m, s = (float(c) for c in sde_lib.transition_coeffs(sde, t))
    standardised.append((out[:, KNOWN] - m * OBSERVED[KNOWN]) / s)
  np.testing.assert_allclose(standardised[0], standardised[1], atol=1e-5)
  z = standardised[0]
  assert abs(z.mean()) < Z / np.sqrt(n) and abs(z.var() - 1) < Z * np.sqrt(2 / n)
  finished = np.asarray(projection.finish(x))
  np.testing.assert_array_equal(finished[:, KNOWN], np.asarray(observed)[:, KNOWN])
  np.testing.assert_array_equal(finished[:, ~KNOWN], np.asarray(x)[:, ~KNOWN])


def test_langevin_corrector_with_replacement_moves_towards_the_exact_conditional():
  x_none, _ = inpaint_vectors('vp', corrector='none')
  x_lang, _ = inpaint_vectors('vp', corrector='langevin', snr_norm='batch')
  np.testing.assert_array_equal(x_lang[:, 2], 1.0)
  cond_mean, _ = exact_conditional(MEAN, COV, KNOWN, OBSERVED)
  err_none = np.abs(x_none[:, :2].mean(0) - cond_mean)
  err_lang = np.abs(x_lang[:, :2].mean(0) - cond_mean)
  assert np.all(err_lang < err_none - 0.05), (err_none, err_lang)


def test_inpainting_with_nothing_known_is_the_pc_sampler():
  """Replacement is the PC loop plus a projection: an empty mask leaves the loop alone
  (same keys, same steps; bitwise on the CPU, where it was checked)."""
  observed = jnp.zeros((16, 3), jnp.float32)
  for options in (dict(corrector='ald', n_steps_each=2), dict(predictor='ancestral_sampling')):
    x, info = controllable.inpaint(KEY, SCORES['vp'], SDES['vp'], observed, np.zeros(3),
                                   **options)
    x_pc, info_pc = sampling.sample(KEY, SCORES['vp'], SDES['vp'], (16, 3), 'pc', **options)
    np.testing.assert_allclose(np.asarray(x), np.asarray(x_pc), rtol=1e-6, atol=1e-6)
    assert int(info['nfe']) == int(info_pc['nfe'])


def test_image_inpainting_keeps_known_pixels_and_is_reproducible_per_example():
  """Images [B, 4, 4, 1] of i.i.d. N(0.5, 0.1) pixels with a centre box missing."""
  size, n = 4, 8
  sde = sde_lib.VPSDE(N=20)
  pixels = analytic.gaussian(np.full(size * size, 0.5), np.full(size * size, 0.1))

  def score_fn(x, t):
    return pixels.score(x.reshape(x.shape[0], -1), t, sde).reshape(x.shape)

  images = jax.random.uniform(jax.random.PRNGKey(3), (n, size, size, 1))
  mask = controllable.make_mask('center box', size, 1)
  out, _ = controllable.inpaint(KEY, score_fn, sde, images, mask[..., 0])
  out = np.asarray(out)
  known = mask.astype(bool)
  np.testing.assert_array_equal(out[:, known], np.asarray(images)[:, known])
  assert np.all(np.isfinite(out))
  assert np.any(np.abs(out[:, ~known] - np.asarray(images)[:, ~known]) > 1e-3)
  # Example i depends only on (key, i): the first 4 of a batch of 8 equal a batch of 4.
  half, _ = controllable.inpaint(KEY, score_fn, sde, images[:4], mask)
  np.testing.assert_allclose(np.asarray(half), out[:4], rtol=1e-5, atol=1e-5)


def test_inpainting_on_a_mesh_equals_one_device(four_devices):
  sde = SDES['vp']
  mesh = parallel.make_mesh(four_devices)
  observed = jnp.tile(jnp.asarray(OBSERVED, jnp.float32), (8, 1))
  one, _ = controllable.inpaint(KEY, SCORES['vp'], sde, observed, KNOWN, corrector='none')
  sharded, _ = controllable.inpaint(KEY, SCORES['vp'], sde, observed, KNOWN,
                                    corrector='none', mesh=mesh)
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(one), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# Colourisation
# ----------------------------------------------------------------------------

M = controllable.color_decoupling_matrix()


def colour_gaussian(latent_mean, latent_cov):
  """N(M mu_lat, M Sigma_lat M^T) on 1x1 RGB images (latent = M^T x)."""
  return analytic.gaussian(M @ latent_mean, M @ latent_cov @ M.T)


def colorize_1x1(gauss, sde, grey_value, n=NUM_SAMPLES, **options):
  def score_fn(x, t):
    return gauss.score(x.reshape(x.shape[0], 3), t, sde).reshape(x.shape)

  grey = jnp.full((n, 1, 1, 1), grey_value, jnp.float32)
  rgb, _ = controllable.colorize(KEY, score_fn, sde, grey, **options)
  return np.asarray(rgb).reshape(n, 3)


def test_to_grayscale_is_each_pixels_channel_mean():
  images = np.random.default_rng(15).uniform(size=(3, 2, 2, 3)).astype(np.float32)
  for given in (images, jnp.asarray(images)):
    grey = controllable.to_grayscale(given)
    assert grey.shape == (3, 2, 2, 1)
    np.testing.assert_allclose(np.asarray(grey)[..., 0], images.mean(-1), rtol=1e-6)


def test_colour_decoupling_matrix_is_orthogonal_with_a_grey_axis():
  np.testing.assert_allclose(M.T @ M, np.eye(3), atol=1e-12)
  np.testing.assert_allclose(M[:, 0], np.full(3, 1 / np.sqrt(3)))
  x = jax.random.normal(KEY, (2, 4, 4, 3))
  latent = controllable.decouple_colors(x)
  np.testing.assert_allclose(latent[..., 0], np.sqrt(3) * x.mean(-1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(controllable.couple_colors(latent), x, rtol=1e-5, atol=1e-5)


def test_colorization_is_the_exact_conditional_for_a_decoupled_gaussian():
  """Grey independent of chroma: colours must follow N(chroma mean, chroma cov)."""
  latent_mean = np.array([0.4, -0.2, 0.1])
  latent_cov = np.array([[0.5, 0.0, 0.0], [0.0, 0.3, 0.1], [0.0, 0.1, 0.2]])
  sde = sde_lib.VPSDE(N=1000)
  rgb = colorize_1x1(colour_gaussian(latent_mean, latent_cov), sde, 0.3, corrector='none')
  np.testing.assert_allclose(rgb.mean(-1), 0.3, atol=2e-6)     # the grey level is kept
  latent = rgb @ M
  rec_mean, rec_cov = replacement_moments(sde, latent_mean, latent_cov, [True, False, False],
                                          [np.sqrt(3) * 0.3, 0, 0])
  discretisation = max(np.abs(rec_mean - latent_mean[1:]).max(),
                       np.abs(rec_cov - latent_cov[1:, 1:]).max())
  assert discretisation < 0.01
  assert_moments(latent[:, 1:], latent_mean[1:], latent_cov[1:, 1:], slack=discretisation)


def test_colorization_matches_the_closed_form_with_grey_chroma_correlation():
  latent_mean = np.array([0.4, -0.2, 0.1])
  latent_cov = np.array([[0.5, 0.2, -0.1], [0.2, 0.3, 0.1], [-0.1, 0.1, 0.2]])
  sde = SDES['ve']
  rgb = colorize_1x1(colour_gaussian(latent_mean, latent_cov), sde, -0.2, corrector='ald')
  np.testing.assert_allclose(rgb.mean(-1), -0.2, atol=2e-6)
  rec_mean, rec_cov = replacement_moments(sde, latent_mean, latent_cov, [True, False, False],
                                          [np.sqrt(3) * -0.2, 0, 0], corrector='ald')
  assert_moments((rgb @ M)[:, 1:], rec_mean, rec_cov)


# ----------------------------------------------------------------------------
# Class-conditional sampling with the exact classifier
# ----------------------------------------------------------------------------

MIX = analytic.GaussianMixture.create(
    [0.3, 0.2, 0.5], [[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]],
    [[0.25, 0.16], [0.09, 0.25], [0.16, 0.16]])
CLASSES = [[0, 1], [2]]          # class 0 is itself a two-component mixture
MIX_SDE = sde_lib.VPSDE(N=200)
MIX_SCORE = MIX.score_fn(MIX_SDE)


def exact_class_logits(x, t):
  """log p(class | x_t) = logsumexp of the exact component posteriors in the class."""
  log_post = MIX.log_posterior_t(x, t, MIX_SDE)
  return jnp.stack([jax.nn.logsumexp(log_post[..., c], axis=-1) for c in CLASSES], -1)


def components(x):
  return np.asarray(jnp.argmax(MIX.log_posterior_t(jnp.asarray(x), 0.0, MIX_SDE), -1))


@pytest.mark.parametrize('method,options', [
    ('pc', dict(predictor='reverse_diffusion', corrector='langevin', snr_norm='batch')),
    ('ode', dict(rtol=1e-4, atol=1e-4)),
])
def test_class_conditional_samples_come_from_the_requested_class(method, options):
  n = 2000 if method == 'pc' else 400
  labels = np.arange(n) % 2                                   # alternate per example
  x, _ = controllable.conditional_sample(KEY, MIX_SCORE, exact_class_logits, MIX_SDE, (n, 2),
                                         labels, scale=1.0, method=method, **options)
  comp = components(x)
  in_class = np.where(labels == 0, np.isin(comp, CLASSES[0]), np.isin(comp, CLASSES[1]))
  assert in_class.mean() >= 0.995
  # Class 0: its two components in proportion 0.3 : 0.2.
  comp0 = comp[labels == 0]
  share = np.mean(comp0 == 0)
  n0 = len(comp0)
  assert abs(share - 0.6) <= Z * np.sqrt(0.24 / n0)
  # Each component's moments (exact, no guidance error at scale 1).
  x = np.asarray(x)
  for k in range(3):
    xs = x[comp == k]
    var = np.asarray(MIX.covs[k])
    assert np.all(np.abs(xs.mean(0) - np.asarray(MIX.means[k])) <= Z * np.sqrt(var / len(xs)))
    assert np.all(np.abs(xs.var(0) / var - 1) <= Z * np.sqrt(2 / len(xs)) + 0.05)


@pytest.mark.parametrize('method,options,n', [
    ('pc', dict(corrector='none'), 1000), ('ode', dict(rtol=1e-3, atol=1e-3), 200)])
def test_scale_zero_is_unconditional_and_large_scale_keeps_the_class(method, options, n):
  """On the PC path and on the per-example ODE path (the scale reaches both)."""
  x0, _ = controllable.conditional_sample(KEY, MIX_SCORE, exact_class_logits, MIX_SDE, (n, 2),
                                          1, scale=0.0, method=method, **options)
  share_class1 = np.mean(components(x0) == 2)
  assert abs(share_class1 - 0.5) <= Z * np.sqrt(0.25 / n)    # the prior weight of class 1
  x3, _ = controllable.conditional_sample(KEY, MIX_SCORE, exact_class_logits, MIX_SDE, (n, 2),
                                          1, scale=3.0, method=method, **options)
  assert np.mean(components(x3) == 2) >= 0.995


def test_classifier_gradient_is_per_example():
  x = jax.random.normal(KEY, (6, 2)) * 2
  t = jnp.full((6,), 0.3)
  labels = jnp.asarray([0, 1, 1, 0, 1, 0])
  grad = controllable.classifier_log_likelihood_grad(exact_class_logits, x, t, labels)
  single = jax.jit(jax.grad(lambda v, label: jax.nn.log_softmax(
      exact_class_logits(v[None], t[:1]))[0, label]))
  for b in range(6):
    np.testing.assert_allclose(grad[b], single(x[b], labels[b]), rtol=1e-5, atol=1e-6)


def test_classifier_gradient_normalises_unnormalised_logits():
  """A linear classifier's logits W^T x + b are not log-probabilities:
  grad_x log softmax(W^T x + b)_y = W_y - sum_k p_k W_k (float64 closed form)."""
  rng = np.random.default_rng(14)
  w, b = rng.normal(size=(2, 3)), rng.normal(size=3)
  logits_fn = lambda x, t: x @ jnp.asarray(w, jnp.float32) + jnp.asarray(b, jnp.float32)  # noqa
  x = rng.normal(size=(5, 2))
  labels = np.array([0, 2, 1, 1, 0])
  grad = controllable.classifier_log_likelihood_grad(
      logits_fn, jnp.asarray(x, jnp.float32), jnp.full((5,), 0.3), jnp.asarray(labels))
  logits = x @ w + b
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  expected = w.T[labels] - p @ w.T
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# Masks, files and grids
# ----------------------------------------------------------------------------

def test_mask_patterns():
  box = controllable.make_mask('center box', 8, 3, fraction=0.5)
  assert box.shape == (8, 8, 3) and box.dtype == np.float32
  assert np.sum(box[..., 0] == 0) == 16 and np.all(box[2:6, 2:6] == 0)
  left = controllable.make_mask('left_half', 8, 1)
  assert np.all(left[:, :4] == 0) and np.all(left[:, 4:] == 1)
  assert np.all(controllable.make_mask('bottom-half', 8, 1)[4:] == 0)
  rnd = controllable.make_mask('random pixels', 32, 1, fraction=0.25, seed=7)
  missing = np.mean(rnd == 0)
  assert abs(missing - 0.25) <= Z * np.sqrt(0.25 * 0.75 / 1024)
  np.testing.assert_array_equal(rnd, controllable.make_mask('random pixels', 32, 1,
                                                            fraction=0.25, seed=7))
  assert np.any(rnd != controllable.make_mask('random pixels', 32, 1, fraction=0.25, seed=8))


def test_check_mask_broadcasts_pixel_masks_to_channels_and_batches():
  pixel = np.zeros((4, 4))
  pixel[0] = 1
  full = controllable.check_mask(pixel, (4, 4, 3), batch_size=2)
  assert full.shape == (2, 4, 4, 3)
  np.testing.assert_array_equal(full[1, 0], 1.0)
  np.testing.assert_array_equal(full[1, 1:], 0.0)
  per_image = np.stack([np.ones((4, 4, 1)), np.zeros((4, 4, 1))])
  full = controllable.check_mask(per_image, (4, 4, 3), batch_size=2)
  assert full[0].min() == 1 and full[1].max() == 0


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------

def _images(n=2, size=4, channels=3):
  return jnp.zeros((n, size, size, channels))


def _zero_score(x, t):
  return -x


def test_bad_masks_are_rejected():
  sde = SDES['vp']
  with pytest.raises(ValueError, match='mask has shape .* does not fit'):
    controllable.inpaint(KEY, _zero_score, sde, _images(), np.ones((5, 5)))
  with pytest.raises(ValueError, match='binary'):
    controllable.inpaint(KEY, _zero_score, sde, _images(), np.full((4, 4), 0.5))
  with pytest.raises(ValueError, match='unknown mask pattern .* valid'):
    controllable.make_mask('circle', 8, 3)
  with pytest.raises(ValueError, match=r'fraction .* must lie in \(0, 1\)'):
    controllable.make_mask('random pixels', 8, 3, fraction=1.5)
  with pytest.raises(ValueError, match='takes no fraction'):
    controllable.make_mask('left half', 8, 3, fraction=0.3)
  inpainter = controllable.build_inpainter(sde, lambda p, x, t: -x, (2, 4, 4, 3))
  with pytest.raises(ValueError, match="must have the images' shape"):
    inpainter(KEY, None, _images(), jnp.ones((2, 4, 4, 1)))


def test_bad_images_are_rejected():
  sde = SDES['vp']
  inpainter = controllable.build_inpainter(sde, lambda p, x, t: -x, (2, 4, 4, 3))
  with pytest.raises(ValueError, match='have 1 channel.*takes 3'):
    inpainter(KEY, None, _images(channels=1), jnp.ones((2, 4, 4, 3)))
  with pytest.raises(ValueError, match='size .* resize'):
    inpainter(KEY, None, _images(size=8), jnp.ones((2, 4, 4, 3)))
  with pytest.raises(ValueError, match='unknown option'):
    controllable.inpaint(KEY, _zero_score, sde, _images(), np.ones((4, 4)), solver='x')
  with pytest.raises(ValueError, match='unknown predictor .* valid'):
    controllable.inpaint(KEY, _zero_score, sde, _images(), np.ones((4, 4)), predictor='rk4')


def test_bad_grayscale_inputs_are_rejected():
  sde = SDES['vp']
  with pytest.raises(ValueError, match='4x4 but the model makes 8x8'):
    controllable.build_colorizer(sde, lambda p, x, t: -x, (2, 8, 8, 3))(
        KEY, None, jnp.zeros((2, 4, 4, 1)))
  with pytest.raises(ValueError, match='not grey-scale'):
    controllable.colorize(KEY, _zero_score, sde,
                          jax.random.uniform(KEY, (2, 4, 4, 3)))
  with pytest.raises(ValueError, match='1 channel'):
    controllable.colorize(KEY, _zero_score, sde, jnp.zeros((2, 4, 4, 2)))
  with pytest.raises(ValueError, match='needs RGB'):
    controllable.build_colorizer(sde, lambda p, x, t: -x, (2, 4, 4, 1))


def test_bad_class_labels_are_rejected():
  with pytest.raises(ValueError, match=r'class index 2 is out of range.*\[0, 1\]'):
    controllable.conditional_sample(KEY, MIX_SCORE, exact_class_logits, MIX_SDE, (4, 2),
                                    [0, 1, 2, 0])
  with pytest.raises(ValueError, match='class index -1'):
    controllable.conditional_sample(KEY, MIX_SCORE, exact_class_logits, MIX_SDE, (4, 2), -1)
  with pytest.raises(ValueError, match=r'shape \[B\] = \[4\]'):
    controllable.conditional_sample(KEY, MIX_SCORE, exact_class_logits, MIX_SDE, (4, 2),
                                    [0, 1])
  with pytest.raises(ValueError, match='must be integers'):
    losses.check_class_labels([0.5, 1.0], 2, 2)
  with pytest.raises(ValueError, match='scale must be'):
    controllable.conditional_sample(KEY, MIX_SCORE, exact_class_logits, MIX_SDE, (4, 2), 0,
                                    scale=-1.0)
