"""Normalizing flows (NICE, RealNVP, Glow): every layer and model inverts to round-off, its
log-determinant equals the autodiff Jacobian's, ActNorm's data-dependent initialisation, the
LU 1x1 convolution, an all-affine flow against the closed-form Gaussian, priors, sampling."""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from score_sde import flows
from score_sde import parallel
from score_sde.models import flow_layers as fl
from score_sde.models import glow, nice, realnvp
from score_sde.models import utils as model_utils

IMAGE = (4, 4, 2)         # small enough for dense Jacobians (32 dimensions per example)


def _perturb(params, key, scale=0.3):
  """Every parameter moved by N(0, scale^2): couplings are no longer the identity."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [p + scale * jax.random.normal(k, p.shape)
                                      for p, k in zip(leaves, keys)])


def _jacobian_logdet(fn, x):
  """log |det d fn(x_i) / d x_i| per example, from the dense autodiff Jacobian (float64 slogdet)."""
  def flat_fn(xi):
    return fn(xi[None].reshape((1,) + x.shape[1:])).reshape(-1)
  out = []
  for xi in x.reshape(x.shape[0], -1):
    jac = np.asarray(jax.jacfwd(flat_fn)(xi), np.float64)
    out.append(np.linalg.slogdet(jac)[1])
  return np.asarray(out)


LAYERS = {
    'actnorm': lambda: fl.ActNorm(),
    'invconv_1x1': lambda: fl.InvConv1x1(seed=3),
    'coupling_checkerboard_affine_resnet': lambda: fl.Coupling(
        mask='checkerboard', parity=1, network='resnet', features=8, depth=1),
    'coupling_channel_affine_glow': lambda: fl.Coupling(
        mask='channel', parity=0, network='glow', features=8, log_scale='sigmoid'),
    'coupling_channel_additive_glow': lambda: fl.Coupling(
        mask='channel', parity=1, network='glow', features=8, transform='additive'),
    'diagonal_scaling': lambda: fl.DiagonalScaling(),
    'top_prior': lambda: fl.TopPrior(),
}


def _layer_and_params(name, x, key):
  layer = LAYERS[name]()
  params = layer.init(key, x)['params']
  return layer, _perturb(params, jax.random.fold_in(key, 1))


@pytest.mark.parametrize('name', sorted(LAYERS))
def test_each_layer_inverts_and_its_logdet_is_the_jacobians(name):
  x = jax.random.normal(jax.random.PRNGKey(0), (3,) + IMAGE)
  layer, params = _layer_and_params(name, x, jax.random.PRNGKey(1))
  y, logdet = layer.apply({'params': params}, x)
  x_back, logdet_back = layer.apply({'params': params}, y, reverse=True)
  np.testing.assert_allclose(x_back, x, atol=2e-5)
  np.testing.assert_allclose(logdet_back, -logdet, rtol=1e-6, atol=1e-6)
  expected = _jacobian_logdet(lambda v: layer.apply({'params': params}, v)[0], x)
  np.testing.assert_allclose(logdet, expected, rtol=1e-4, atol=1e-4)
  if 'additive' in name:                  # volume preserving, but not the identity
    assert np.abs(expected).max() < 1e-5 and np.abs(np.asarray(y - x)).max() > 0.1
  else:
    assert np.abs(expected).max() > 0.1


def test_alternating_additive_coupling_on_vectors_is_volume_preserving_and_inverts():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 10))
  layer = fl.Coupling(mask='alternate', parity=0, network='mlp', features=16, depth=2,
                      transform='additive')
  params = _perturb(layer.init(jax.random.PRNGKey(1), x)['params'], jax.random.PRNGKey(2))
  y, logdet = layer.apply({'params': params}, x)
  assert np.abs(np.asarray(y - x)).max() > 0.1 and np.all(np.asarray(logdet) == 0.0)
  np.testing.assert_allclose(layer.apply({'params': params}, y, reverse=True)[0], x, atol=1e-5)
  expected = _jacobian_logdet(lambda v: layer.apply({'params': params}, v)[0], x)
  np.testing.assert_allclose(expected, 0.0, atol=1e-5)
  # the kept half (even dimensions) passes unchanged
  np.testing.assert_array_equal(np.asarray(y)[:, ::2], np.asarray(x)[:, ::2])


def test_split_prior_inverts_and_its_logdet_is_the_jacobians():
  x = jax.random.normal(jax.random.PRNGKey(0), (3,) + IMAGE)
  layer = fl.SplitPrior()
  params = _perturb(layer.init(jax.random.PRNGKey(1), x)['params'], jax.random.PRNGKey(2))

  def forward(v):
    (h, eps), _ = layer.apply({'params': params}, v)
    return jnp.concatenate([h, eps], axis=-1)

  (h, eps), logdet = layer.apply({'params': params}, x)
  back, logdet_back = layer.apply({'params': params}, (h, eps), reverse=True)
  np.testing.assert_allclose(back, x, atol=1e-5)
  np.testing.assert_allclose(logdet_back, -logdet, rtol=1e-6)
  np.testing.assert_allclose(logdet, _jacobian_logdet(forward, x), rtol=1e-4, atol=1e-4)


def test_squeeze_is_a_permutation_and_unsqueeze_its_inverse():
  x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
  y = fl.squeeze(x)
  assert y.shape == (2, 2, 3, 12)
  np.testing.assert_array_equal(np.sort(np.asarray(y).ravel()), np.asarray(x).ravel())
  np.testing.assert_array_equal(fl.unsqueeze(y), x)
  # channel block k of output pixel (i, j) is input pixel (2i + k // 2, 2j + k % 2)
  np.testing.assert_array_equal(y[:, 1, 2, 3:6], x[:, 2, 5, :])
  with pytest.raises(ValueError, match='even height and width'):
    fl.squeeze(jnp.zeros((1, 3, 4, 1)))


def test_actnorm_data_dependent_init_gives_zero_mean_unit_variance_per_channel():
  x = 3.0 + 5.0 * jax.random.normal(jax.random.PRNGKey(0), (64, 4, 4, 3)) * jnp.arange(1, 4)
  layer = fl.ActNorm()
  params = layer.init(jax.random.PRNGKey(1), x)['params']
  y, logdet = layer.apply({'params': params}, x)
  y = np.asarray(y).reshape(-1, 3)
  np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.std(axis=0), 1.0, atol=1e-4)
  stds = np.asarray(x).reshape(-1, 3).std(axis=0)
  np.testing.assert_allclose(logdet, -16 * np.log(stds).sum(), rtol=1e-5)


def test_invconv_lu_form_is_its_dense_matrix_with_the_dense_determinant():
  layer = fl.InvConv1x1(seed=7)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 3, 6))
  params = _perturb(layer.init(jax.random.PRNGKey(1), x)['params'], jax.random.PRNGKey(2), 0.1)
  w, log_s, p, l_mat, u_mat = fl.invconv_weights(params, seed=7)
  w = np.asarray(w, np.float64)
  np.testing.assert_allclose(w, np.asarray(p) @ np.asarray(l_mat) @ np.asarray(u_mat),
                             rtol=1e-5, atol=1e-6)
  assert np.allclose(np.tril(np.asarray(l_mat)), np.asarray(l_mat))       # lower, unit diagonal
  np.testing.assert_array_equal(np.diag(np.asarray(l_mat)), 1.0)
  assert np.allclose(np.triu(np.asarray(u_mat)), np.asarray(u_mat))
  # log|det W| = sum log|s| is a small sum of larger terms: round-off scales with the terms
  terms = float(jnp.sum(jnp.abs(log_s)))
  np.testing.assert_allclose(float(jnp.sum(log_s)), np.linalg.slogdet(w)[1], rtol=1e-5,
                             atol=1e-6 * terms)
  y, logdet = layer.apply({'params': params}, x)
  np.testing.assert_allclose(y, np.einsum('bhwc,dc->bhwd', np.asarray(x), w), atol=1e-5)
  np.testing.assert_allclose(logdet, 9 * np.linalg.slogdet(w)[1], rtol=1e-5, atol=9e-6 * terms)
  # the initial W is a rotation: |det| = 1
  w0 = fl.invconv_weights(layer.init(jax.random.PRNGKey(1), x)['params'], seed=7)[0]
  np.testing.assert_allclose(np.asarray(w0) @ np.asarray(w0).T, np.eye(6), atol=1e-5)


# ----------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------

MODELS = {
    'nice': lambda: nice.NICE(IMAGE, num_couplings=4, hidden_layers=2, hidden_features=16),
    'realnvp': lambda: realnvp.RealNVP(IMAGE, num_levels=2, num_res_blocks=1,
                                       hidden_features=8),
    'glow_affine': lambda: glow.Glow(IMAGE, num_levels=2, num_steps=2, hidden_features=8),
    'glow_additive': lambda: glow.Glow(IMAGE, num_levels=2, num_steps=2, hidden_features=8,
                                       coupling='additive', learn_top=False),
}


@pytest.mark.parametrize('name', sorted(MODELS))
def test_each_model_inverts_and_its_logdet_is_the_jacobians(name):
  model = MODELS[name]()
  x = jax.random.normal(jax.random.PRNGKey(0), (3,) + IMAGE)
  params = model.init(jax.random.PRNGKey(1), x, method='forward')['params']
  params = _perturb(params, jax.random.PRNGKey(2), 0.1)
  z, logdet = model.apply({'params': params}, x, method='forward')
  assert z.shape == (3, int(np.prod(IMAGE))) == (3, model_utils.flow_functions(model).latent_dim)
  back = model.apply({'params': params}, z, method='inverse')
  # The perturbed affine Glow's inverse amplifies a change of z 100-fold and more, so
  # float32 round-off alone moves x by ~5e-4 there (by how much depends on the CPU's
  # kernels). So: the bijection in float64, where it is exact; the float32 forward
  # against the float64 one; the float32 inverse (explicit W^-1, as Glow's code) against
  # the exact inverse of the same z, within 10x of what rounding z to float32 costs.
  with jax.enable_x64(True):
    params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    z64, _ = model.apply({'params': params64}, jnp.asarray(x, jnp.float64), method='forward')
    back64 = model.apply({'params': params64}, z64, method='inverse')
    back_of_z = model.apply({'params': params64}, jnp.asarray(z, jnp.float64), method='inverse')
    assert z64.dtype == back64.dtype == back_of_z.dtype == jnp.float64
    z64, back64, back_of_z = (np.asarray(a) for a in (z64, back64, back_of_z))
  np.testing.assert_allclose(back64, np.asarray(x, np.float64), atol=1e-9)
  np.testing.assert_allclose(z, z64, atol=2e-6 * np.abs(z64).max())
  rounding_cost = float(np.abs(back_of_z - np.asarray(x, np.float64)).max())  # affine Glow: ~5e-4
  np.testing.assert_allclose(back, back_of_z, atol=max(1e-4, 10 * rounding_cost))
  expected = _jacobian_logdet(
      lambda v: model.apply({'params': params}, v, method='forward')[0], x)
  np.testing.assert_allclose(logdet, expected, rtol=1e-4, atol=2e-3)
  assert np.abs(expected).max() > 0.1


DROPOUT_MODELS = {
    'nice': lambda rate: nice.NICE(IMAGE, num_couplings=4, hidden_layers=2, hidden_features=16,
                                   dropout=rate),
    'realnvp': lambda rate: realnvp.RealNVP(IMAGE, num_levels=2, num_res_blocks=1,
                                            hidden_features=8, dropout=rate),
    'glow': lambda rate: glow.Glow(IMAGE, num_levels=2, num_steps=2, hidden_features=8,
                                   dropout=rate),
}


@pytest.mark.parametrize('name', sorted(DROPOUT_MODELS))
def test_coupling_dropout_acts_only_with_a_key_and_keeps_the_flow_exact(name):
  """Without a dropout key (likelihood, sampling) a model with dropout is the same map
  as without; with one, its masks change the map, which stays a bijection: the inverse
  under the same key gives x back and logdet is the masked map's Jacobian."""
  x = jax.random.normal(jax.random.PRNGKey(0), (3,) + IMAGE)
  plain, dropped = DROPOUT_MODELS[name](0.0), DROPOUT_MODELS[name](0.5)
  params = plain.init(jax.random.PRNGKey(1), x, method='forward')['params']
  # (a smaller perturbation than the model test's: dropout at 0.5 doubles the kept
  # hidden units, and Glow's perturbed split priors amplify the round-off of its inverse)
  params = _perturb(params, jax.random.PRNGKey(2), 0.05)
  forward = model_utils.flow_functions(dropped).forward
  z_plain, logdet_plain = model_utils.flow_functions(plain).forward(params, x)
  z_eval, logdet_eval = forward(params, x)
  np.testing.assert_array_equal(z_eval, z_plain)
  np.testing.assert_array_equal(logdet_eval, logdet_plain)
  key = jax.random.PRNGKey(5)
  z_train, logdet_train = forward(params, x, key)
  assert np.abs(np.asarray(z_train - z_plain)).max() > 1e-3
  np.testing.assert_array_equal(forward(params, x, key)[0], z_train)     # one mask per key
  assert np.abs(np.asarray(forward(params, x, jax.random.PRNGKey(6))[0] - z_train)).max() > 1e-3
  x_back = dropped.apply({'params': params}, z_train, method='inverse', rngs={'dropout': key})
  np.testing.assert_allclose(x_back, x, atol=1e-4)
  # The masks depend on the batch shape: differentiate the whole batch's map and take
  # each example's diagonal block (examples do not mix).
  dim = int(np.prod(IMAGE))
  jac = np.asarray(jax.jacfwd(lambda v: forward(params, v.reshape(x.shape), key)[0].reshape(-1))(
      x.reshape(-1)), np.float64).reshape(3, dim, 3, dim)
  expected = [np.linalg.slogdet(jac[i, :, i, :])[1] for i in range(3)]
  np.testing.assert_allclose(logdet_train, expected, rtol=1e-4, atol=2e-3)


def test_flow_train_loss_draws_dropout_masks_from_its_key_and_the_eval_loss_is_exact():
  from score_sde import losses
  x = jax.random.normal(jax.random.PRNGKey(0), (4,) + IMAGE)
  losses_by_rate = {}
  for rate in (0.0, 0.5):
    model = DROPOUT_MODELS['glow'](rate)
    params = _perturb(model.init(jax.random.PRNGKey(1), x, method='forward')['params'],
                      jax.random.PRNGKey(2), 0.1)
    loss_fn = losses.get_flow_nll_loss_fn(
        flows.get_log_prob_fn(model_utils.flow_functions(model).forward),
        dim=int(np.prod(IMAGE)), inverse_scaler=lambda v: v, num_levels=256)
    eval_loss_fn = losses.get_flow_nll_loss_fn(
        flows.get_log_prob_fn(model_utils.flow_functions(model).forward),
        dim=int(np.prod(IMAGE)), inverse_scaler=lambda v: v, num_levels=256, train=False)
    losses_by_rate[rate] = [float(fn(params, jax.random.PRNGKey(k), x))
                            for fn in (loss_fn, eval_loss_fn) for k in (0, 1)]
  assert len(set(losses_by_rate[0.0])) == 1            # no dropout: one value
  train_0, train_1, eval_0, eval_1 = losses_by_rate[0.5]
  assert train_0 != train_1 and eval_0 == eval_1 == losses_by_rate[0.0][0]


def test_flow_loss_is_bits_per_dim_with_the_levels_and_scaler_offset():
  """With a standard-normal density on [-1, 1]-scaled data of L = 17 levels, the loss is
  mean(-log p) / (D ln 2) + log2 L + log2(1 / 2) (the scaler's slope, [0, 1] -> [-1, 1])."""
  from score_sde import losses
  x = jax.random.uniform(jax.random.PRNGKey(0), (6, 3, 2, 1), minval=-1.0, maxval=1.0)

  def log_prob_fn(params, batch, dropout_key=None):
    flat = batch.reshape(len(batch), -1)
    return jnp.sum(jax.scipy.stats.norm.logpdf(flat), axis=-1), flat

  loss_fn = losses.get_flow_nll_loss_fn(log_prob_fn, dim=6, inverse_scaler=lambda v: (v + 1) / 2,
                                        num_levels=17)
  logp = scipy.stats.norm.logpdf(np.asarray(x, np.float64).reshape(6, 6)).sum(-1)
  expected = np.mean(-logp) / (6 * np.log(2)) + np.log2(17) - 1
  assert float(loss_fn(None, jax.random.PRNGKey(1), x)) == pytest.approx(expected, rel=1e-6)


def test_an_all_affine_flow_has_the_closed_form_gaussian_density():
  """Glow with additive couplings whose networks stay zero, and split priors whose
  convolutions have only a bias, is an affine map x = M z + c of a standard normal z:
  its density is N(c, M M^T), computed here by dense linear algebra in float64."""
  model = glow.Glow(IMAGE, num_levels=2, num_steps=2, hidden_features=8,
                    coupling='additive', learn_top=True)
  x0 = jax.random.normal(jax.random.PRNGKey(0), (16,) + IMAGE)
  params = flax.core.unfreeze(model.init(jax.random.PRNGKey(1), x0, method='forward')['params'])
  perturbed = _perturb(params, jax.random.PRNGKey(2), 0.2)

  def keep_affine(path, original, moved):
    names = [getattr(k, 'key', str(k)) for k in path]
    if any(n.startswith('couplings') for n in names):
      return original                           # zero networks: identity couplings
    if any(n.startswith('splits') for n in names) and names[-1] == 'kernel':
      return original                           # mean / log-std constant in h
    return moved

  params = jax.tree_util.tree_map_with_path(keep_affine, params, perturbed)
  dim = int(np.prod(IMAGE))
  inverse = jax.jit(lambda z: model.apply({'params': params}, z, method='inverse'))
  c = np.asarray(inverse(jnp.zeros((1, dim))), np.float64).reshape(-1)
  m = np.asarray(inverse(jnp.eye(dim)), np.float64).reshape(dim, dim).T - c[:, None]
  x = jax.random.normal(jax.random.PRNGKey(3), (8,) + IMAGE) * 1.5
  expected = scipy.stats.multivariate_normal(c, m @ m.T).logpdf(
      np.asarray(x, np.float64).reshape(8, dim))
  logp, _ = flows.get_log_prob_fn(model_utils.flow_functions(model).forward)(params, x)
  np.testing.assert_allclose(logp, expected, rtol=1e-5, atol=1e-3)
  assert abs(np.linalg.slogdet(m)[1]) > 1.0     # not a near-identity map


def test_priors_are_the_standard_densities_and_reject_unknown_names():
  z = jnp.linspace(-6.0, 6.0, 24).reshape(2, 12)
  np.testing.assert_allclose(flows.prior_log_prob(z, 'gaussian'),
                             scipy.stats.norm.logpdf(np.asarray(z)).sum(-1), rtol=1e-6)
  np.testing.assert_allclose(flows.prior_log_prob(z, 'logistic'),
                             scipy.stats.logistic.logpdf(np.asarray(z)).sum(-1), rtol=1e-6)
  with pytest.raises(ValueError, match="unknown flow prior 'laplace'.*gaussian"):
    flows.prior_log_prob(z, 'laplace')


@pytest.mark.parametrize('prior,distribution', [('gaussian', scipy.stats.norm),
                                                ('logistic', scipy.stats.logistic)])
def test_the_sampler_draws_latents_from_its_prior(prior, distribution):
  """An identity inverse shows the latents: 20000 draws pass a KS test against the
  prior (p > 1e-3) and have its variance (1, or pi^2 / 3 for the logistic) within 5 %,
  and temperature scales them."""
  sampler = flows.get_sampler(lambda params, z: z, 4, 5000, prior=prior)
  z = np.asarray(sampler(jax.random.PRNGKey(0), None)[0], np.float64).ravel()
  assert scipy.stats.kstest(z, distribution.cdf).pvalue > 1e-3
  assert z.var() == pytest.approx(distribution.var(), rel=0.05)
  # One draw per example (no two share a latent), and example i's latent does not depend
  # on the batch size: the first 8 of 5000 are a batch of 8.
  latents = z.reshape(5000, 4)
  assert len(np.unique(latents, axis=0)) == 5000
  eight = flows.get_sampler(lambda params, z: z, 4, 8, prior=prior)
  np.testing.assert_array_equal(np.asarray(eight(jax.random.PRNGKey(0), None)[0]), latents[:8])
  hot = flows.get_sampler(lambda params, z: z, 4, 5000, prior=prior, temperature=0.5)
  np.testing.assert_allclose(np.asarray(hot(jax.random.PRNGKey(0), None)[0]).ravel(),
                             0.5 * z, rtol=1e-6)


def _sampler(model, n, **options):
  flow = model_utils.flow_functions(model)
  return flows.get_sampler(flow.inverse, flow.latent_dim, n, **options)


def test_sampler_temperature_scales_the_latent_and_sharding_does_not_change_samples(
    four_devices):
  model = MODELS['glow_affine']()
  x0 = jax.random.normal(jax.random.PRNGKey(0), (4,) + IMAGE)
  params = _perturb(model.init(jax.random.PRNGKey(1), x0, method='forward')['params'],
                    jax.random.PRNGKey(2), 0.02)
  key = jax.random.PRNGKey(5)
  one, info = _sampler(model, 8)(key, params)
  assert np.all(np.isfinite(np.asarray(one)))
  assert one.shape == (8,) + IMAGE and int(info['nfe']) == 1
  mesh = parallel.make_mesh(four_devices)
  four, _ = _sampler(model, 8, mesh=mesh)(key, params)
  np.testing.assert_allclose(np.asarray(four), np.asarray(one), rtol=1e-6, atol=1e-6)
  # the inverse keeps the batch sharded: no device gathers the whole batch
  compiled = _sampler(model, 8, mesh=mesh).lower(key, params).compile().as_text()
  assert 'all-gather' not in compiled
  # temperature T: the latents of the samples are T times those at temperature 1
  log_prob = flows.get_log_prob_fn(model_utils.flow_functions(model).forward)
  cold, _ = _sampler(model, 8, temperature=0.5)(key, params)
  np.testing.assert_allclose(log_prob(params, cold)[1], 0.5 * log_prob(params, one)[1],
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match='temperature must be > 0'):
    _sampler(model, 8, temperature=0.0)


def test_flow_likelihood_fn_is_exact_and_sharded_alike(four_devices):
  model = MODELS['realnvp']()
  x = jax.random.normal(jax.random.PRNGKey(0), (8,) + IMAGE)
  params = _perturb(model.init(jax.random.PRNGKey(1), x, method='forward')['params'],
                    jax.random.PRNGKey(2), 0.1)
  log_prob = flows.get_log_prob_fn(model_utils.flow_functions(model).forward)
  logp, z, info = flows.get_likelihood_fn(log_prob)(jax.random.PRNGKey(3), params, x)
  direct_z, logdet = model.apply({'params': params}, x, method='forward')
  np.testing.assert_allclose(logp, scipy.stats.norm.logpdf(np.asarray(direct_z)).sum(-1)
                             + np.asarray(logdet), rtol=1e-5)
  assert int(info['nfe']) == 1 and np.all(np.asarray(info['nfe_per_example']) == 1)
  mesh = parallel.make_mesh(four_devices)
  sharded = flows.get_likelihood_fn(log_prob, mesh=mesh)(
      jax.random.PRNGKey(3), params, parallel.host_to_global(np.asarray(x), mesh))[0]
  np.testing.assert_allclose(parallel.gather(sharded), logp, rtol=1e-6)


def test_flow_likelihood_program_runs_every_dot_and_convolution_at_highest_precision():
  model = MODELS['glow_affine']()
  x = jnp.zeros((2,) + IMAGE)
  params = model.init(jax.random.PRNGKey(1), x + 1.0, method='forward')['params']
  log_prob = flows.get_log_prob_fn(model_utils.flow_functions(model).forward)
  fn = flows.get_likelihood_fn(log_prob, precision='highest')
  hlo = fn.lower(jax.random.PRNGKey(0), params, x).as_text()
  ops = [line for line in hlo.splitlines()
         if 'stablehlo.dot_general' in line or 'stablehlo.convolution' in line]
  assert ops and all('HIGHEST' in line for line in ops), [o for o in ops if 'HIGHEST' not in o]


@pytest.mark.parametrize('kind, match', [
    ('bad_mask', 'unknown coupling mask'), ('odd_channels', 'even channel count'),
    ('bad_network', 'unknown coupling network'), ('bad_log_scale', 'unknown log_scale'),
    ('bad_glow_coupling', "unknown glow coupling 'affin'"),
    ('bad_latent', r'latent z must be \[B, 32\]')])
def test_bad_flow_options_are_clear_errors(kind, match):
  x = jnp.ones((1,) + IMAGE)
  with pytest.raises(ValueError, match=match):
    if kind == 'bad_mask':
      fl.coupling_mask('stripes', 0, IMAGE)
    elif kind == 'odd_channels':
      fl.coupling_mask('channel', 0, (4, 4, 3))
    elif kind == 'bad_network':
      fl.Coupling(mask='channel', parity=0, network='unet', features=4).init(
          jax.random.PRNGKey(0), x)
    elif kind == 'bad_log_scale':
      fl.Coupling(mask='channel', parity=0, network='glow', features=4,
                  log_scale='exp').init(jax.random.PRNGKey(0), x)
    elif kind == 'bad_glow_coupling':
      glow.Glow(IMAGE, 1, 1, 4, coupling='affin').init(jax.random.PRNGKey(0), x,
                                                       method='forward')
    else:
      model = MODELS['nice']()
      params = model.init(jax.random.PRNGKey(0), x, method='forward')['params']
      model.apply({'params': params}, jnp.zeros((1, 31)), method='inverse')
