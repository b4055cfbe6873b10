"""configs/ve/ncsn and configs/ve/ncsnv2: reference hyper-parameters, full-size
parameter counts, and a reduced-width forward pass of every config."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde import sde as sde_lib
from score_sde.models import get_model
from score_sde.models import ncsnv2
from score_sde import score_fn as score_fn_lib
from score_sde.models import utils as mutils

# config -> (model, dataset, image size, num_scales, sigma_max, ema_rate,
#            n_steps_each, snr, lr, full-size parameter count)
REFERENCE = {
    've.ncsn.cifar10': ('ncsn', 'CIFAR10', 32, 10, 1.0, 0.0, 100, 0.316, 1e-3, 34_428_675),
    've.ncsn.cifar10_5': ('ncsn', 'CIFAR10', 32, 10, 1.0, 0.999, 100, 0.316, 1e-3, 34_428_675),
    've.ncsn.cifar10_124': ('ncsn', 'CIFAR10', 32, 232, 50.0, 0.0, 5, 0.176, 1e-3, 44_828_931),
    've.ncsn.cifar10_1245': ('ncsn', 'CIFAR10', 32, 232, 50.0, 0.999, 5, 0.176, 1e-3,
                             44_828_931),
    've.ncsn.celeba': ('ncsn', 'CELEBA', 64, 10, 1.0, 0.0, 100, 0.316, 1e-3, 34_428_675),
    've.ncsn.celeba_5': ('ncsn', 'CELEBA', 64, 10, 1.0, 0.999, 100, 0.316, 1e-3, 34_428_675),
    've.ncsn.celeba_124': ('ncsn', 'CELEBA', 64, 500, 90.0, 0.0, 5, 0.128, 1e-3, 57_384_195),
    've.ncsn.celeba_1245': ('ncsn', 'CELEBA', 64, 500, 90.0, 0.999, 5, 0.128, 1e-3,
                            57_384_195),
    've.ncsnv2.cifar10': ('ncsnv2', 'CIFAR10', 32, 232, 50.0, 0.999, 5, 0.176, 1e-4,
                          33_970_563),
    've.ncsnv2.celeba': ('ncsnv2', 'CELEBA', 64, 500, 90.0, 0.999, 5, 0.128, 1e-4, 33_970_563),
    've.ncsnv2.bedroom': ('ncsnv2_128', 'LSUN', 128, 1086, 190.0, 0.9999, 3, 0.095, 1e-4,
                          83_445_379),
}
CLASSES = {'ncsn': ncsnv2.NCSN, 'ncsnv2': ncsnv2.NCSNv2, 'ncsnv2_128': ncsnv2.NCSNv2_128}


def load(name):
  return importlib.import_module(f'configs.{name}').get_config()


def small(config):
  """The same config at nf = 8 and the smallest image size the model takes x2."""
  config.model.nf = 8
  config.data.image_size = 16 if config.model.name == 'ncsnv2_128' else 8
  return config


def synthetic_params(model, x, labels, seed=0):
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, labels))['params']
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      value = rng.uniform(-1, 1, leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    elif name in ('gamma', 'alpha', 'scale'):
      value = 1.0 + 0.1 * rng.normal(size=leaf.shape)
    else:
      value = 0.1 * rng.normal(size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize('name', sorted(REFERENCE))
def test_reference_hyperparameters(name):
  (model_name, dataset, size, num_scales, sigma_max, ema, n_steps, snr, lr,
   _) = REFERENCE[name]
  config = load(name)
  assert config.model.name == model_name and config.data.dataset == dataset
  assert config.data.image_size == size and config.data.num_channels == 3
  assert not config.data.centered
  assert config.model.num_scales == num_scales and config.model.sigma_min == 0.01
  assert config.model.sigma_max == pytest.approx(sigma_max)
  assert config.model.ema_rate == ema
  assert config.model.scale_by_sigma == (model_name != 'ncsn')
  assert config.model.normalization == 'InstanceNorm++'
  assert (config.model.nonlinearity, config.model.nf, config.model.interpolation) == (
      'elu', 128, 'bilinear')
  assert (config.training.sde, config.training.continuous) == ('vesde', False)
  assert (config.sampling.method, config.sampling.predictor, config.sampling.corrector) == (
      'pc', 'none', 'ald')
  assert config.sampling.n_steps_each == n_steps and config.sampling.snr == snr
  optim = config.optim
  assert (optim.optimizer, optim.lr, optim.beta1, optim.eps) == ('Adam', lr, 0.9, 1e-8)
  assert (optim.warmup, optim.grad_clip, optim.weight_decay, optim.amsgrad) == (0, -1.0, 0, False)
  assert config.training.batch_size == 128


def test_bedroom_specifics():
  config = load('ve.ncsnv2.bedroom')
  assert config.data.category == 'bedroom'
  assert config.training.n_iters == 2400001  # LSUN default


@pytest.mark.parametrize('name', sorted(REFERENCE))
def test_full_size_parameter_count(name):
  config = load(name)
  model = get_model(config)
  assert type(model) is CLASSES[config.model.name]
  size = config.data.image_size
  x = jnp.zeros((1, size, size, 3))
  shapes = jax.eval_shape(lambda k: model.init(k, x, jnp.zeros((1,), jnp.int32)),
                          jax.random.PRNGKey(0))
  assert mutils.param_count(shapes['params']) == REFERENCE[name][-1]


@pytest.mark.parametrize('name', sorted(REFERENCE))
def test_reduced_width_forward_pass(name):
  config = small(load(name))
  model = get_model(config)
  size, num_scales = config.data.image_size, config.model.num_scales
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, size, size, 3))
  labels = jnp.array([0, num_scales - 1])
  params = synthetic_params(model, x, labels)
  outs = [model.apply({'params': params}, x, labels, train=train) for train in (False, True)]
  for y in outs:
    assert y.shape == x.shape and y.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(y)))
  np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(outs[1]))


@pytest.mark.parametrize('name', ['ve.ncsn.cifar10'])
def test_bfloat16_option(name):
  config = small(load(name))
  config.model.dtype = 'bfloat16'
  model = get_model(config)
  size = config.data.image_size
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, size, size, 3))
  labels = jnp.array([1, 3])
  params = synthetic_params(model, x, labels)
  assert {p.dtype for p in jax.tree_util.tree_leaves(params)} == {jnp.dtype('float32')}
  y = model.apply({'params': params}, x, labels)
  assert y.shape == x.shape and y.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(y)))


@pytest.mark.parametrize('name', ['ve.ncsn.cifar10_124', 've.ncsnv2.celeba'])
def test_model_noise_levels_match_the_sde(name):
  """Label i of the model is sigma_i = sigma_max (sigma_min/sigma_max)^(i/(N-1)), the
  VESDE's discrete sigmas in reverse, and score_fn.get_score_fn maps t to that label."""
  config = load(name)
  model = get_model(config)
  sde, _ = sde_lib.sde_from_config(config)
  np.testing.assert_allclose(model.sigmas(), np.asarray(sde.discrete_sigmas)[::-1], rtol=1e-5)

  config = small(config)
  model = get_model(config)
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 3))
  params = synthetic_params(model, x, jnp.array([0, 0]))
  score_fn = score_fn_lib.get_score_fn(sde, model, params, continuous=False)
  t = jnp.array([1.0, 0.25])
  labels = jnp.round((1.0 - t) * (config.model.num_scales - 1)).astype(jnp.int32)
  np.testing.assert_allclose(np.asarray(score_fn(x, t)),
                             np.asarray(model.apply({'params': params}, x, labels)), rtol=1e-6)


def test_missing_model_width_is_a_clear_error():
  config = load('ve.ncsn.cifar10')
  del config.model['nf']
  with pytest.raises(ValueError, match='config.model.nf is missing'):
    get_model(config)


def test_channel_and_size_mismatch_with_the_config():
  config = small(load('ve.ncsnv2.cifar10'))
  config.data.num_channels = 1
  model = get_model(config)
  x = jnp.zeros((1, 8, 8, 3))
  with pytest.raises(ValueError, match='input has 3 channels but config.data.num_channels = 1'):
    model.init(jax.random.PRNGKey(0), x, jnp.array([0]))
  config = load('ve.ncsnv2.bedroom')
  config.data.image_size = 126
  with pytest.raises(ValueError, match='multiples of 4; config.data.image_size = 126'):
    get_model(config)
