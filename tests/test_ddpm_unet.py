"""The DDPM U-Net: shapes, conditioning, learned variance, sigma scaling, errors."""
import copy
import importlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde.models import get_model
from score_sde.models.ddpm import DDPM

SMALL = dict(image_size=16, nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))
T = jnp.array([10.0, 900.0])


def small(**changes) -> DDPM:
  return DDPM(**{**SMALL, **changes})


def images(batch=2, size=16, channels=3):
  return jax.random.uniform(jax.random.PRNGKey(0), (batch, size, size, channels))


def init(model, x, labels):
  # An 'rbg' key: much cheaper to compile than threefry for the many init shapes.
  return model.init({'params': jax.random.key(0, impl='rbg')}, x, labels, train=False)['params']


def apply(model, params, x, labels, train=False, key=None):
  rngs = {'dropout': key} if key is not None else {}
  return model.apply({'params': params}, x, labels, train=train, rngs=rngs)


def with_unit_output_layer(params):
  """Replace the zero-initialised output conv by a unit-scale one (non-trivial outputs)."""
  params = flax.core.unfreeze(params)
  name = max((k for k in params if k.startswith('Conv_')), key=lambda k: int(k.split('_')[1]))
  kernel = params[name]['kernel']
  params[name]['kernel'] = jax.random.normal(jax.random.PRNGKey(3), kernel.shape) * 0.05
  return params, name


def test_forward_train_and_eval():
  model = small(dropout=0.3)
  x = images()
  params = init(model, x, T)
  out = apply(model, params, x, T)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert float(jnp.abs(out).max()) < 1e-3      # zero-initialised output layer
  params, _ = with_unit_output_layer(params)
  train = apply(model, params, x, T, train=True, key=jax.random.PRNGKey(1))
  assert train.shape == x.shape and not np.allclose(np.asarray(train),
                                                    np.asarray(apply(model, params, x, T)))


def test_conditioning_on_the_timestep():
  x = images()
  cond, uncond = small(), small(conditional=False)
  params, _ = with_unit_output_layer(init(cond, x, T))
  assert not np.allclose(np.asarray(apply(cond, params, x, T)),
                         np.asarray(apply(cond, params, x, T + 100)))
  uparams = init(uncond, x, T)
  assert 'Dense_0' not in uparams and 'Dense_0' not in uparams['ResnetBlockDDPM_0']
  uparams, _ = with_unit_output_layer(uparams)
  np.testing.assert_array_equal(np.asarray(apply(uncond, uparams, x, T)),
                                np.asarray(apply(uncond, uparams, x, T + 100)))


def test_learned_variance_doubles_the_output_as_eps_then_v():
  x = images()
  lv, plain = small(learned_variance=True), small()
  params, out_conv = with_unit_output_layer(init(lv, x, T))
  out = apply(lv, params, x, T)
  assert out.shape == (2, 16, 16, 6) and out.dtype == jnp.float32
  # The first C output channels are exactly the eps network's output ...
  eps_params = copy.deepcopy(params)
  eps_params[out_conv] = {'kernel': params[out_conv]['kernel'][..., :3],
                          'bias': params[out_conv]['bias'][:3]}
  np.testing.assert_allclose(np.asarray(out[..., :3]), np.asarray(apply(plain, eps_params, x, T)),
                             rtol=1e-5, atol=1e-6)
  # ... and the last C are v, a separate (initially zero) head.
  zero = apply(lv, init(lv, x, T), x, T)
  assert float(jnp.abs(zero[..., 3:]).max()) < 1e-3
  assert not np.allclose(np.asarray(out[..., 3:]), np.asarray(out[..., :3]))


def test_scale_by_sigma_with_noise_indices():
  """VE training of the DDPM U-Net (ve/cifar10_ddpm): output / sigma_i for index label i."""
  x = images()
  kw = dict(sigma_max=50.0, sigma_min=0.01, num_scales=5)
  scaled, raw = small(scale_by_sigma=True, **kw), small(**kw)
  labels = jnp.array([0, 4], jnp.int32)
  params, _ = with_unit_output_layer(init(scaled, x, labels))
  ratio = apply(raw, params, x, labels) / apply(scaled, params, x, labels)
  np.testing.assert_allclose(np.asarray(ratio[0]), 50.0, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(ratio[1]), 0.01, rtol=1e-4)


def test_centered_and_uncentered_inputs():
  x = images()
  plain, centered = small(centered=False), small(centered=True)
  params, _ = with_unit_output_layer(init(plain, x, T))
  np.testing.assert_allclose(np.asarray(apply(plain, params, x, T)),
                             np.asarray(apply(centered, params, 2 * x - 1, T)),
                             rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_with_float32_parameters():
  x = images()
  model, model16 = small(), small(dtype='bfloat16')
  params, _ = with_unit_output_layer(init(model16, x, T))
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  out16, out = apply(model16, params, x, T), apply(model, params, x, T)
  assert out16.dtype == jnp.float32
  assert float(jnp.linalg.norm(out16 - out) / jnp.linalg.norm(out)) < 0.05


def test_parameter_names_follow_the_reference():
  params = init(small(), images(), T)
  assert {'Dense_0', 'Dense_1', 'Conv_0', 'Conv_1', 'GroupNorm_0', 'ResnetBlockDDPM_0',
          'AttnBlock_0', 'Downsample_0', 'Upsample_0'} <= set(params)
  assert set(params['ResnetBlockDDPM_1']) == {'GroupNorm_0', 'Conv_0', 'Dense_0', 'GroupNorm_1',
                                              'Conv_1', 'NIN_0'}
  assert params['GroupNorm_0']['scale'].shape == (32,)


def test_from_config():
  config = importlib.import_module('configs.vp.ddpm.cifar10').get_config()
  model = get_model(config)
  assert isinstance(model, DDPM) and model.ch_mult == (1, 2, 2, 2) and not model.learned_variance
  config.model.learned_variance = True
  assert get_model(config).learned_variance
  hash(model)


def test_clear_errors():
  with pytest.raises(ValueError, match=r'config\.data\.image_size = 20 is not divisible'):
    DDPM(image_size=20).check()
  with pytest.raises(ValueError, match=r'config\.model\.attn_resolutions'):
    small(attn_resolutions=(4,)).check()
  with pytest.raises(ValueError, match=r'config\.model\.nf .* multiples of 32'):
    small(nf=16).check()
  with pytest.raises(ValueError, match=r'learned_variance .*scale_by_sigma = True'):
    small(learned_variance=True, scale_by_sigma=True).check()
  with pytest.raises(ValueError, match=r'config\.data\.num_channels = 3'):
    init(small(), images(channels=1), T)
  with pytest.raises(ValueError, match=r'config\.model\.normalization'):
    small(normalization='InstanceNorm++').check()
  config = importlib.import_module('configs.vp.ddpm.cifar10').get_config()
  config.data.image_size = 28
  with pytest.raises(ValueError, match=r'config\.data\.image_size = 28'):
    get_model(config)
