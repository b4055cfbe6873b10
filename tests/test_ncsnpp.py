"""NCSN++ / DDPM++: options, label conventions, initialisation, skip rescaling, errors."""
import copy
import importlib

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde.models import get_model, layers
from score_sde.models.ncsnpp import NCSNpp
from tests.test_ncsn_models import np_group_norm

SMALL = dict(image_size=16, nf=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,))
SIGMAS = jnp.array([0.05, 3.0])


def small(**changes) -> NCSNpp:
  return NCSNpp(**{**SMALL, **changes})


def images(key=0, batch=2, size=16, channels=3):
  return jax.random.uniform(jax.random.PRNGKey(key), (batch, size, size, channels))


def init(model, x, labels):
  # An 'rbg' key: much cheaper to compile than threefry for the many init shapes.
  return model.init({'params': jax.random.key(0, impl='rbg')}, x, labels, train=False)['params']


def apply(model, params, x, labels, train=False, key=None):
  rngs = {'dropout': key} if key is not None else {}
  return model.apply({'params': params}, x, labels, train=train, rngs=rngs)


@pytest.mark.parametrize('options', [
    dict(),                                                          # NCSN++ (cont.), VE
    dict(fir=False, progressive_input='none', embedding_type='positional',
         scale_by_sigma=False),                                      # DDPM++, VP
    dict(progressive='output_skip', progressive_input='input_skip'),  # NCSN++ 256 / 1024 px
    dict(progressive='residual', progressive_input='input_skip', progressive_combine='cat'),
    dict(progressive='output_skip', progressive_input='residual', progressive_combine='cat'),
    dict(resblock_type='ddpm'),                                      # FIR Up/Downsample layers
    dict(resblock_type='ddpm', fir=False, resamp_with_conv=False, progressive='residual'),
    dict(resblock_type='biggan', fir=False, resamp_with_conv=False),
    dict(conditional=False),
    dict(conditional=False, embedding_type='positional', skip_rescale=False),
    dict(nonlinearity='elu', conv_size=5, fir_kernel=(1, 2, 1), image_size=8, ch_mult=(1, 2),
         attn_resolutions=(4,)),
])
def test_forward_pass_for_each_option(options):
  model = small(**options)
  x = images(size=model.image_size)
  labels = SIGMAS if model.embedding_type == 'fourier' else jnp.array([3.5, 900.0])
  params = init(model, x, labels)
  out = apply(model, params, x, labels)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()


def test_dropout_uses_the_dropout_rng_only_in_training():
  model = small(dropout=0.5, init_scale=1.0)
  x = images()
  params = init(model, x, SIGMAS)
  evaluation = apply(model, params, x, SIGMAS)
  train_a = apply(model, params, x, SIGMAS, train=True, key=jax.random.PRNGKey(1))
  train_a2 = apply(model, params, x, SIGMAS, train=True, key=jax.random.PRNGKey(1))
  train_b = apply(model, params, x, SIGMAS, train=True, key=jax.random.PRNGKey(2))
  np.testing.assert_array_equal(np.asarray(train_a), np.asarray(train_a2))
  assert not np.allclose(np.asarray(train_a), np.asarray(train_b))
  assert not np.allclose(np.asarray(train_a), np.asarray(evaluation))
  np.testing.assert_array_equal(np.asarray(apply(model, params, x, SIGMAS)), np.asarray(evaluation))
  with pytest.raises(flax.errors.InvalidRngError):
    apply(model, params, x, SIGMAS, train=True)


def test_no_dropout_needs_no_rng():
  model = small(dropout=0.0)
  x = images()
  params = init(model, x, SIGMAS)
  np.testing.assert_array_equal(np.asarray(apply(model, params, x, SIGMAS, train=True)),
                                np.asarray(apply(model, params, x, SIGMAS)))


@pytest.mark.parametrize('progressive', ['none', 'output_skip', 'residual'])
def test_zero_init_scale_gives_a_near_zero_initial_output(progressive):
  x = images()
  zero = small(progressive=progressive, init_scale=0.0, scale_by_sigma=False)
  out = apply(zero, init(zero, x, SIGMAS), x, SIGMAS)
  assert float(jnp.abs(out).max()) < 1e-3
  unit = small(progressive=progressive, init_scale=1.0, scale_by_sigma=False)
  assert float(apply(unit, init(unit, x, SIGMAS), x, SIGMAS).std()) > 0.1


def test_skip_sum_of_independent_unit_branches_has_unit_variance():
  a, b = jax.random.normal(jax.random.PRNGKey(0), (2, 200_000))
  assert abs(float(layers.skip_sum(a, b, True).var()) - 1.0) < 0.02
  assert abs(float(layers.skip_sum(a, b, False).var()) - 2.0) < 0.04


@pytest.mark.parametrize('block', ['biggan', 'ddpm'])
def test_skip_rescale_on_the_residual_block(block):
  """Identity shortcut + a residual branch scaled to unit variance: skip_rescale keeps variance 1."""
  cls = layers.ResnetBlockBigGANpp if block == 'biggan' else layers.ResnetBlockDDPMpp
  plain = cls(act=jax.nn.swish, init_scale=1.0, skip_rescale=False, dropout=0.0)
  rescaled = plain.clone(skip_rescale=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 8, 8, 16))
  params = plain.init(jax.random.PRNGKey(1), x)['params']
  branch = plain.apply({'params': params}, x) - x
  # The branch is linear in its last conv: scale that conv to make the branch unit-variance.
  scale = 1.0 / float(branch.std())
  params = flax.core.unfreeze(params)
  params['Conv_1'] = jax.tree_util.tree_map(lambda p: p * scale, params['Conv_1'])
  branch = plain.apply({'params': params}, x) - x
  assert abs(float(branch.var()) - 1.0) < 1e-3
  assert abs(float(jnp.corrcoef(branch.ravel(), x.ravel())[0, 1])) < 0.1   # ~independent
  out = rescaled.apply({'params': params}, x)
  assert abs(float(out.var()) - 1.0) < 0.1
  assert abs(float(plain.apply({'params': params}, x).var()) - 2.0) < 0.2
  np.testing.assert_allclose(np.asarray(out) * np.sqrt(2.0),
                             np.asarray(plain.apply({'params': params}, x)), rtol=1e-5, atol=1e-5)


def test_skip_rescale_on_the_residual_input_pyramid():
  """With skip_rescale the merge of pyramid and features is (pyramid + h) / sqrt 2, not a sum."""
  x = images()
  on, off = small(skip_rescale=True), small(skip_rescale=False)
  params = init(on, x, SIGMAS)
  assert not np.allclose(np.asarray(apply(on, params, x, SIGMAS)),
                         np.asarray(apply(off, params, x, SIGMAS)))


def test_fourier_label_is_sigma_and_scale_by_sigma_divides_by_it():
  x = images()
  scaled, raw = small(scale_by_sigma=True, init_scale=1.0), small(scale_by_sigma=False,
                                                                  init_scale=1.0)
  params = init(scaled, x, SIGMAS)
  np.testing.assert_allclose(np.asarray(apply(scaled, params, x, SIGMAS) * SIGMAS[:, None, None, None]),
                             np.asarray(apply(raw, params, x, SIGMAS)), rtol=1e-5, atol=1e-6)
  # The network sees log(sigma): different noise levels give different outputs.
  assert not np.allclose(np.asarray(apply(raw, params, x, SIGMAS)),
                         np.asarray(apply(raw, params, x, SIGMAS * 2)))


def test_positional_label_indexes_geometric_sigmas():
  x = images()
  kw = dict(embedding_type='positional', init_scale=1.0, sigma_min=0.01, sigma_max=50.0,
            num_scales=10)
  scaled, raw = small(scale_by_sigma=True, **kw), small(scale_by_sigma=False, **kw)
  labels = jnp.array([0, 9], jnp.int32)
  params = init(scaled, x, labels)
  ratio = apply(raw, params, x, labels) / apply(scaled, params, x, labels)
  np.testing.assert_allclose(np.asarray(ratio[0]), 50.0, rtol=1e-4)   # index 0 = sigma_max
  np.testing.assert_allclose(np.asarray(ratio[1]), 0.01, rtol=1e-4)   # last index = sigma_min
  sigmas = layers.geometric_sigmas(50.0, 0.01, 10)
  np.testing.assert_allclose(sigmas[1] / sigmas[0], (0.01 / 50.0) ** (1 / 9), rtol=1e-5)


def test_labels_float_int_and_scalar():
  x = images()
  model = small(embedding_type='positional', scale_by_sigma=False, init_scale=1.0)
  params = init(model, x, jnp.array([1, 2]))
  as_int = apply(model, params, x, jnp.array([7, 7], jnp.int32))
  as_float = apply(model, params, x, jnp.array([7.0, 7.0]))
  as_scalar = apply(model, params, x, 7.0)
  np.testing.assert_allclose(np.asarray(as_int), np.asarray(as_float), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(as_scalar), np.asarray(as_float), rtol=1e-6)
  fractional = apply(model, params, x, jnp.array([7.5, 7.5]))   # VP: 999 t
  assert not np.allclose(np.asarray(fractional), np.asarray(as_float))
  with pytest.raises(ValueError, match=r'labels must have shape \[B\]'):
    apply(model, params, x, jnp.ones((2, 1)))


def test_centered_data_handling():
  """Not centered: data in [0, 1] is mapped to 2x - 1 first."""
  x = images()
  plain, centered = small(centered=False, init_scale=1.0), small(centered=True, init_scale=1.0)
  params = init(plain, x, SIGMAS)
  np.testing.assert_allclose(np.asarray(apply(plain, params, x, SIGMAS)),
                             np.asarray(apply(centered, params, 2 * x - 1, SIGMAS)),
                             rtol=1e-5, atol=1e-5)


def test_parameter_names_follow_the_reference():
  model = small()
  params = init(model, images(), SIGMAS)
  top = set(params)
  assert {'GaussianFourierProjection_0', 'Dense_0', 'Dense_1', 'Conv_0', 'Conv_1',
          'GroupNorm_0', 'ResnetBlockBigGANpp_0', 'AttnBlockpp_0', 'Downsample_0'} <= top
  assert set(params['ResnetBlockBigGANpp_1']) == {'GroupNorm_0', 'Conv_0', 'Dense_0',
                                                  'GroupNorm_1', 'Conv_1', 'Conv_2'}
  assert set(params['AttnBlockpp_0']) == {'GroupNorm_0', 'NIN_0', 'NIN_1', 'NIN_2', 'NIN_3'}
  assert set(params['Downsample_0']['Conv2d_0']) == {'weight', 'bias'}
  assert params['GaussianFourierProjection_0']['W'].shape == (8,)


def test_gradients_are_finite_and_fourier_features_are_not_trained():
  model = small(progressive='residual', progressive_input='input_skip', ch_mult=(1, 2),
                image_size=8, attn_resolutions=(4,))
  x = images(size=8)
  params = init(model, x, SIGMAS)
  grads = jax.grad(lambda p: jnp.sum(apply(model, p, x, SIGMAS) ** 2))(params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
  assert float(jnp.abs(grads['GaussianFourierProjection_0']['W']).max()) == 0.0
  assert float(jnp.abs(grads['Dense_0']['kernel']).max()) > 0.0


def test_timestep_embedding_formula():
  t = jnp.array([0.0, 3.0, 999.0])
  emb = layers.get_timestep_embedding(t, 8)
  freqs = np.exp(-np.log(10000) * np.arange(4) / 3)
  want = np.concatenate([np.sin(np.asarray(t)[:, None] * freqs), np.cos(np.asarray(t)[:, None] * freqs)], 1)
  np.testing.assert_allclose(np.asarray(emb), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('channels, groups', [(16, 4), (256, 32)])
def test_group_norm_default_groups_and_epsilon(channels, groups):
  """NCSN++'s GroupNorm: min(C // 4, 32) groups, eps 1e-6 (felt at small activations)."""
  x = 1e-3 * jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, channels))

  class Wrapped(nn.Module):
    @nn.compact
    def __call__(self, x):
      return layers.group_norm(x)

  params = Wrapped().init(jax.random.PRNGKey(1), x)
  y = Wrapped().apply(params, x)        # scale 1, bias 0 at initialisation
  np.testing.assert_allclose(np.asarray(y), np_group_norm(x, groups, 1e-6), rtol=2e-4, atol=2e-4)


def test_gaussian_fourier_projection_formula():
  layer = layers.GaussianFourierProjection(embedding_size=6, scale=16.0)
  sigmas = jnp.array([0.01, 0.5, 50.0])
  params = layer.init(jax.random.PRNGKey(0), jnp.log(sigmas))
  w = np.asarray(params['params']['W'], np.float64)
  proj = np.log(np.asarray(sigmas, np.float64))[:, None] * w[None, :] * 2 * np.pi
  want = np.concatenate([np.sin(proj), np.cos(proj)], axis=-1)
  np.testing.assert_allclose(np.asarray(layer.apply(params, jnp.log(sigmas))), want,
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('method', ['cat', 'sum'])
def test_combine_is_conv1x1_of_the_skip_then_cat_or_sum(method):
  """Combine(x, y) = [Conv1x1(x), y] ('cat', skip first as in the reference) or Conv1x1(x) + y."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
  y = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 5))
  layer = layers.Combine(method=method)
  params = layer.init(jax.random.PRNGKey(2), x, y)['params']
  kernel = np.asarray(params['Conv_0']['kernel'], np.float64)[0, 0]        # [3, 5]
  h = np.asarray(x, np.float64) @ kernel + np.asarray(params['Conv_0']['bias'])
  want = np.concatenate([h, y], axis=-1) if method == 'cat' else h + np.asarray(y)
  np.testing.assert_allclose(np.asarray(layer.apply({'params': params}, x, y)), want,
                             rtol=1e-5, atol=1e-5)


def test_from_config_gives_an_immutable_typed_module():
  config = importlib.import_module('configs.ve.cifar10_ncsnpp_continuous').get_config()
  model = get_model(config)
  assert isinstance(model, NCSNpp)
  assert isinstance(model.ch_mult, tuple) and isinstance(model.fir_kernel, tuple)
  assert isinstance(model.attn_resolutions, tuple)
  assert hash(model) == hash(NCSNpp.from_config(config)) and model == NCSNpp.from_config(config)
  assert model.clone(nf=64) != model and model.nf == 128


def test_clear_errors():
  x = images()
  with pytest.raises(ValueError, match=r'config\.data\.image_size = 20 is not divisible .* 8'):
    NCSNpp(image_size=20).check()
  with pytest.raises(ValueError, match=r'config\.model\.attn_resolutions .* \[7\].*never occur'):
    small(attn_resolutions=(7,)).check()
  model = small()
  with pytest.raises(ValueError, match=r'1 channels but config\.data\.num_channels = 3'):
    init(model, images(channels=1), SIGMAS)
  with pytest.raises(ValueError, match=r'config\.data\.image_size'):
    init(model, images(size=32), SIGMAS)
  for key, value in [('resblock_type', 'resnet'), ('progressive', 'skip'),
                     ('progressive_input', 'skip'), ('progressive_combine', 'mean'),
                     ('embedding_type', 'learned'), ('nonlinearity', 'gelu'),
                     ('attention_type', 'flash'), ('normalization', 'InstanceNorm'),
                     ('dtype', 'float16')]:
    with pytest.raises(ValueError, match=rf'config\.model\.{key}'):
      init(small(**{key: value}), x, SIGMAS)
  with pytest.raises(ValueError, match=r'conv_size'):
    small(conv_size=4).check()


def test_errors_from_config():
  base = importlib.import_module('configs.ve.cifar10_ncsnpp_continuous').get_config()
  config = copy.deepcopy(base)
  config.training.continuous = False
  with pytest.raises(ValueError, match=r'config\.training\.continuous'):
    get_model(config)
  config = copy.deepcopy(base)
  config.data.image_size = 36
  with pytest.raises(ValueError, match=r'config\.data\.image_size = 36'):
    get_model(config)
  config = copy.deepcopy(base)
  config.model.attn_resolutions = (16, 12)
  with pytest.raises(ValueError, match=r'config\.model\.attn_resolutions'):
    get_model(config)
  config = copy.deepcopy(base)
  config.model.progressive = 'both'
  with pytest.raises(ValueError, match=r"config\.model\.progressive 'both'"):
    get_model(config)
