"""The noise-conditional Wide-ResNet classifier and its training objective.

Architecture: parameter counts against the closed form of WRN-d-k with the
noise embedding, forward shapes, examples independent of each other (GroupNorm,
so per-example input gradients are exact), the noise level changes the output.

Training: two classes of 8x8 images, +-mu plus N(0, 0.04) pixel noise, under
the VP SDE. The Bayes-optimal classifier of x_t is known in closed form
(two Gaussians with equal covariance), so its cross-entropy averaged over
t ~ U(eps, 1) is the floor of the loss; 160 steps of
`train.make_train_step` must bring the loss from log 2 most of the way there.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from score_sde import sde as sde_lib
from score_sde import train
from score_sde.models import utils as model_utils
from score_sde.cpu import flat_state
from score_sde.models import wideresnet
from score_sde import experiment as experiment_lib
from score_sde import losses
from score_sde import score_fn

KEY = jax.random.PRNGKey(0)
TINY = dict(num_classes=2, blocks_per_group=1, channel_multiplier=1, base_channels=8,
            embedding_size=16, image_size=8, num_channels=1)


def expected_param_count(depth, k, channels_in, num_classes, base=16, emb=128):
  """Closed-form parameter count of WRN-depth-k with the noise embedding."""
  n = (depth - 4) // 6
  count = 9 * channels_in * base                           # initial conv, no bias
  count += emb + (2 * emb * 4 * emb + 4 * emb) + (16 * emb * emb + 4 * emb)  # W, 2 Dense
  c_in = base
  for group in range(3):
    c = base * 2 ** group * k
    for _ in range(n):
      count += 2 * c_in + 9 * c_in * c                     # GroupNorm, conv 1
      count += 4 * emb * c + c                             # Dense(temb)
      count += 2 * c + 9 * c * c                           # GroupNorm, conv 2
      c_in = c
  return count + 2 * c_in + c_in * num_classes + num_classes


@pytest.fixture(scope='module')
def tiny():
  model = wideresnet.WideResNet(**TINY)
  params = model.init(KEY, jnp.zeros((1, 8, 8, 1)), jnp.ones((1,)))['params']
  return model, params


def test_wrn_28_10_has_the_closed_form_parameter_count():
  model = wideresnet.WideResNet(num_classes=10)
  assert model.depth == 28
  shapes = jax.eval_shape(model.init, KEY, jnp.zeros((1, 32, 32, 3)), jnp.ones((1,)))
  assert model_utils.param_count(shapes['params']) == expected_param_count(28, 10, 3, 10)
  small = wideresnet.WideResNet(**TINY)
  shapes = jax.eval_shape(small.init, KEY, jnp.zeros((1, 8, 8, 1)), jnp.ones((1,)))
  assert model_utils.param_count(shapes['params']) == expected_param_count(
      10, 1, 1, 2, base=8, emb=16)


def test_forward_shapes_and_examples_are_independent(tiny):
  model, params = tiny
  x = jax.random.normal(KEY, (5, 8, 8, 1))
  sigma = jnp.asarray([0.01, 0.1, 1.0, 10.0, 50.0])
  logits = model.apply({'params': params}, x, sigma)
  assert logits.shape == (5, 2) and logits.dtype == jnp.float32
  for b in range(5):
    one = model.apply({'params': params}, x[b:b + 1], sigma[b:b + 1])
    np.testing.assert_allclose(one[0], logits[b], rtol=1e-4, atol=1e-5)


def test_noise_level_conditioning_changes_the_output(tiny):
  model, params = tiny
  x = jnp.tile(jax.random.normal(KEY, (1, 8, 8, 1)), (3, 1, 1, 1))
  logits = model.apply({'params': params}, x, jnp.asarray([0.01, 1.0, 50.0]))
  assert np.min(np.abs(np.diff(np.asarray(logits), axis=0))) > 1e-3
  positional = wideresnet.WideResNet(**{**TINY, 'embedding_type': 'positional'})
  p = positional.init(KEY, x[:1], jnp.zeros((1,)))['params']
  out = positional.apply({'params': p}, x, jnp.asarray([0.0, 500.0, 999.0]))
  assert np.min(np.abs(np.diff(np.asarray(out), axis=0))) > 1e-3


def test_logits_model_fn_feeds_the_noise_level_or_the_time(tiny):
  model, params = tiny
  sde = sde_lib.VPSDE()
  x = jax.random.normal(KEY, (3, 8, 8, 1))
  t = jnp.asarray([0.1, 0.5, 0.9])
  got = score_fn.get_logits_model_fn(sde, model)(params, x, t)
  std = sde_lib.transition_coeffs(sde, t)[1]
  np.testing.assert_allclose(got, model.apply({'params': params}, x, std), rtol=1e-6)
  positional = wideresnet.WideResNet(**{**TINY, 'embedding_type': 'positional'})
  p = positional.init(KEY, x[:1], jnp.zeros((1,)))['params']
  got = score_fn.get_logits_model_fn(sde, positional)(p, x, t)
  np.testing.assert_allclose(got, positional.apply({'params': p}, x, 999 * t), rtol=1e-6)


def test_from_config_and_bad_settings():
  config = ml_collections.ConfigDict({
      'model': {'name': 'wideresnet', 'depth': 16, 'channel_multiplier': 2},
      'data': {'dataset': 'CIFAR10', 'image_size': 32, 'num_channels': 3}})
  model = wideresnet.WideResNet.from_config(config)
  assert (model.blocks_per_group, model.channel_multiplier, model.num_classes) == (2, 2, 10)
  with pytest.raises(ValueError, match='6 n \\+ 4'):
    wideresnet.depth_to_blocks(27)
  config.data.dataset = 'CELEBA'
  with pytest.raises(ValueError, match='set config.model.num_classes'):
    wideresnet.WideResNet.from_config(config)
  with pytest.raises(ValueError, match='unknown embedding_type .* valid'):
    wideresnet.WideResNet(embedding_type='learned')
  with pytest.raises(ValueError, match='multiple of 4'):
    wideresnet.WideResNet(image_size=30)
  model = wideresnet.WideResNet(**TINY)
  with pytest.raises(ValueError, match='input images are 16x16 but config.data.image_size = 8'):
    model.init(KEY, jnp.zeros((1, 16, 16, 1)), jnp.ones((1,)))
  with pytest.raises(ValueError, match='3 channels but config.data.num_channels = 1'):
    model.init(KEY, jnp.zeros((1, 8, 8, 3)), jnp.ones((1,)))
  with pytest.raises(ValueError, match='noise levels sigma = s\\(t\\) > 0'):
    model.init(KEY, jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))


# ----------------------------------------------------------------------------
# The training objective
# ----------------------------------------------------------------------------

SDE = sde_lib.VPSDE()
PATTERN = np.concatenate([np.ones((4, 8)), -np.ones((4, 8))])[..., None].astype(np.float32)
AMPLITUDE, NOISE_STD = 0.5, 0.2


def two_class_batch(key, n):
  k_y, k_z = jax.random.split(key)
  labels = jax.random.bernoulli(k_y, 0.5, (n,)).astype(jnp.int32)
  sign = (1 - 2 * labels).astype(jnp.float32)[:, None, None, None]
  images = sign * AMPLITUDE * PATTERN + NOISE_STD * jax.random.normal(k_z, (n, 8, 8, 1))
  return {'image': images, 'label': labels}


def bayes_cross_entropy(eps=1e-5, num_t=400, num_z=4001):
  """E_t of the Bayes-optimal cross-entropy of the two classes at time t."""
  d2 = float(np.sum((2 * AMPLITUDE * PATTERN) ** 2))      # |mu_0 - mu_1|^2
  z = np.linspace(-8, 8, num_z)
  weights = np.exp(-z ** 2 / 2) / np.sqrt(2 * np.pi) * (z[1] - z[0])
  total = 0.0
  times = np.linspace(eps, 1.0, num_t)
  m, s = (np.asarray(v, np.float64) for v in sde_lib.transition_coeffs(SDE, times))
  for mi, si in zip(m, s):
    var = mi ** 2 * NOISE_STD ** 2 + si ** 2
    snr = mi ** 2 * d2 / var                           # the log-odds ~ N(snr / 2, snr)
    margin = snr / 2 + np.sqrt(snr) * z
    total += np.sum(weights * np.logaddexp(0.0, -margin))
  return total / num_t


def test_classifier_loss_matches_an_independent_computation(tiny):
  model, params = tiny
  loss_fn = losses.get_classifier_loss_fn(SDE, score_fn.get_logits_model_fn(
      SDE, model), train=False)
  batch = two_class_batch(KEY, 16)
  key = jax.random.PRNGKey(7)
  k_t, k_z, _ = jax.random.split(key, 3)
  t = jax.random.uniform(k_t, (16,), minval=1e-5, maxval=1.0)
  mean, std = SDE.marginal_prob(batch['image'], t)
  x_t = mean + std * jax.random.normal(k_z, (16, 8, 8, 1))
  logits = model.apply({'params': params}, x_t, sde_lib.transition_coeffs(SDE, t)[1])
  expected = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
  np.testing.assert_allclose(loss_fn(params, key, batch), expected, rtol=1e-5)
  bad = {'image': batch['image'], 'label': batch['label'].at[0].set(2)}
  assert np.isnan(float(loss_fn(params, key, bad)))
  with pytest.raises(ValueError, match='class index 2 is out of range'):
    losses.check_classifier_batch(bad, 2)
  with pytest.raises(ValueError, match="a classifier batch is a dict"):
    loss_fn(params, key, batch['image'])


@pytest.mark.slow
def test_classifier_training_brings_the_loss_near_the_bayes_floor():
  model = wideresnet.WideResNet(**TINY)
  params = model.init(KEY, jnp.zeros((1, 8, 8, 1)), jnp.ones((1,)))['params']
  logits_model_fn = score_fn.get_logits_model_fn(SDE, model)
  loss_fn = losses.get_classifier_loss_fn(SDE, logits_model_fn)
  schedule = lambda count: 2e-3 * jnp.ones_like(count, jnp.float32)  # noqa: E731
  optimizer = optax.adam(schedule)
  state = experiment_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                    opt_state=optimizer.init(params), ema_params=params,
                                    key=jax.random.PRNGKey(1))
  state = flat_state.flatten_state(state, optimizer)     # the form the CPU train loop runs
  step = jax.jit(train.make_train_step(loss_fn, optimizer, schedule, ema_rate=0.9))
  eval_batch = two_class_batch(jax.random.PRNGKey(99), 2048)
  eval_loss = jax.jit(lambda p: jnp.mean(jnp.stack(
      [loss_fn(p, jax.random.PRNGKey(i), eval_batch) for i in range(4)])))
  before = float(eval_loss(state.unravel(state.params)))
  make_batch = jax.jit(lambda k: two_class_batch(k, 64))
  for i in range(160):                                     # 160 steps, batch 64
    state, metrics = step(state, make_batch(jax.random.PRNGKey(100 + i)))
  params = state.unravel(state.params)
  after = float(eval_loss(params))
  floor = bayes_cross_entropy()
  print(f'classifier loss: {before:.4f} -> {after:.4f}; Bayes floor {floor:.4f}')
  assert floor < after < floor + 0.35 * (math.log(2) - floor) < before, (before, after, floor)
  accuracy = losses.classifier_accuracy(
      score_fn.get_logits_fn(SDE, model, params), SDE, KEY, eval_batch, 0.05)
  assert float(accuracy) > 0.99
