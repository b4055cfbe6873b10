"""NCSN / NCSNv2 networks and their normalisations.

Checked against numpy formulas (normalisations), by construction (output
scaling, per-label conditioning, centring), and against a layer-by-layer
parameter count written out here from the reference architecture.
Forward passes use small widths and parameters drawn on the host with the
shapes of `jax.eval_shape(model.init)`, which traces the whole init path;
running the real initialisers of a whole RefineNet costs ~30 s of XLA compile
on CPU, so they are tested on single layers (conv, normalisations).
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde.models import ncsnv2
from score_sde.models import normalization as norms
from score_sde.models import utils as mutils

EPS = 1e-5
MODELS = {'ncsn': ncsnv2.NCSN, 'ncsnv2': ncsnv2.NCSNv2,
          'ncsnv2_128': ncsnv2.NCSNv2_128, 'ncsnv2_256': ncsnv2.NCSNv2_256}
SMALL_SIZE = {'ncsn': 8, 'ncsnv2': 8, 'ncsnv2_128': 16, 'ncsnv2_256': 16}


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------

def synthetic_params(model, x, labels, seed=0):
  """Parameters with the model's shapes, drawn with numpy (cheap)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, labels))['params']
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      fan_in = int(np.prod(leaf.shape[:-1]))
      value = rng.uniform(-1, 1, leaf.shape) / math.sqrt(fan_in)
    elif name in ('gamma', 'alpha', 'scale'):
      value = 1.0 + 0.1 * rng.normal(size=leaf.shape)
    else:  # conv biases, beta
      value = 0.1 * rng.normal(size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def small_model(name, **kw):
  args = dict(nf=8, num_channels=3, image_size=SMALL_SIZE[name], num_scales=10,
              sigma_min=0.01, sigma_max=1.0)
  args.update(kw)
  return MODELS[name](**args)


def images(key, batch, size, channels=3):
  return jax.random.uniform(key, (batch, size, size, channels))


# Layer-by-layer parameter count written from the reference (yang-song/score_sde,
# models/ncsnv2.py + layers.py + normalization.py), independent of the module code.

def _conv(k, cin, cout, bias=True):
  return k * k * cin * cout + (cout if bias else 0)


def reference_count(arch, nf, num_scales, channels=3):
  conditional = arch == 'ncsn'
  norm = (lambda c: 3 * num_scales * c) if conditional else (lambda c: 3 * c)  # InstanceNorm++
  dec_norm = norm if conditional else (lambda c: 0)       # NCSNv2 decoder: no norms

  def res_block(cin, cout, down, dil):
    p = norm(cin)
    if down:
      p += _conv(3, cin, cin) + norm(cin) + _conv(3, cin, cout)
      p += _conv(3, cin, cout) if dil > 1 else _conv(1, cin, cout)  # shortcut
    else:
      p += _conv(3, cin, cout) + norm(cout) + _conv(3, cout, cout)
      if cin != cout:
        p += _conv(3 if dil > 1 else 1, cin, cout)
    return p

  def rcu(c, n_blocks):
    return n_blocks * 2 * (dec_norm(c) + _conv(3, c, c, bias=False))

  def refine(cins, c, start, end):
    p = sum(rcu(ci, 2) for ci in cins)
    if not start:
      p += sum(dec_norm(ci) + _conv(3, ci, c) for ci in cins)
    p += 2 * (dec_norm(c) + _conv(3, c, c, bias=False))  # chained residual pooling
    return p + rcu(c, 3 if end else 1)

  # (in, out) channel multipliers, resample 'down', dilation; refine: inputs, out, start, end
  if arch in ('ncsn', 'ncsnv2'):
    blocks = [(1, 1, 0, 1), (1, 1, 0, 1), (1, 2, 1, 1), (2, 2, 0, 1),
              (2, 2, 1, 2), (2, 2, 0, 2), (2, 2, 1, 4), (2, 2, 0, 4)]
    refines = [([2], 2, 1, 0), ([2, 2], 2, 0, 0), ([2, 2], 2, 0, 0), ([1, 2], 1, 0, 1)]
  elif arch == 'ncsnv2_128':
    blocks = [(1, 1, 0, 1), (1, 1, 0, 1), (1, 2, 1, 1), (2, 2, 0, 1), (2, 2, 1, 1),
              (2, 2, 0, 1), (2, 4, 1, 2), (4, 4, 0, 2), (4, 4, 1, 4), (4, 4, 0, 4)]
    refines = [([4], 4, 1, 0), ([4, 4], 2, 0, 0), ([2, 2], 2, 0, 0), ([2, 2], 1, 0, 0),
               ([1, 1], 1, 0, 1)]
  else:
    blocks = [(1, 1, 0, 1), (1, 1, 0, 1), (1, 2, 1, 1), (2, 2, 0, 1), (2, 2, 1, 1),
              (2, 2, 0, 1), (2, 2, 1, 1), (2, 2, 0, 1), (2, 4, 1, 2), (4, 4, 0, 2),
              (4, 4, 1, 4), (4, 4, 0, 4)]
    refines = [([4], 4, 1, 0), ([4, 4], 2, 0, 0), ([2, 2], 2, 0, 0), ([2, 2], 2, 0, 0),
               ([2, 2], 1, 0, 0), ([1, 1], 1, 0, 1)]
  total = _conv(3, channels, nf) + norm(nf) + _conv(3, nf, channels)
  total += sum(res_block(a * nf, b * nf, d, dil) for a, b, d, dil in blocks)
  total += sum(refine([c * nf for c in cins], c_out * nf, s, e) for cins, c_out, s, e in refines)
  return total


def eval_shape_count(model, size, channels=3):
  x = jnp.zeros((1, size, size, channels))
  labels = jnp.zeros((1,), jnp.int32)
  shapes = jax.eval_shape(lambda k: model.init(k, x, labels), jax.random.PRNGKey(0))
  return mutils.param_count(shapes['params'])


# ----------------------------------------------------------------------------
# Normalisations
# ----------------------------------------------------------------------------

def np_instance_stats(x):
  x = np.asarray(x, np.float64)
  return x.mean(axis=(1, 2), keepdims=True), x.var(axis=(1, 2), keepdims=True)


def np_group_norm(x, groups, eps):
  """[B, H, W, C] normalised over each group of C / groups channels and all pixels."""
  x = np.asarray(x, np.float64)
  g = x.reshape(x.shape[:3] + (groups, x.shape[3] // groups))
  mean, var = g.mean(axis=(1, 2, 4), keepdims=True), g.var(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)


def np_means_plus(mean):
  m = mean.mean(axis=-1, keepdims=True)
  v = mean.var(axis=-1, keepdims=True)
  return (mean - m) / np.sqrt(v + EPS)


@pytest.fixture(scope='module')
def norm_input():
  key = jax.random.PRNGKey(3)
  offsets = jnp.arange(5.0)[None, None, None, :]  # distinct channel means
  return 2.0 * jax.random.normal(key, (4, 6, 7, 5)) + offsets


def test_cond_instance_norm_plus_identity_params_normalises_each_channel(norm_input):
  x = norm_input
  layer = norms.ConditionalInstanceNormPlus(num_classes=3)
  labels = jnp.array([0, 2, 1, 2])
  params = {'gamma': jnp.ones((3, 5)), 'alpha': jnp.zeros((3, 5)), 'beta': jnp.zeros((3, 5))}
  y = np.asarray(layer.apply({'params': params}, x, labels), np.float64)
  mean, var = np_instance_stats(x)
  np.testing.assert_allclose(y.mean(axis=(1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.var(axis=(1, 2)), (var / (var + EPS))[:, 0, 0, :], rtol=1e-4)
  np.testing.assert_allclose(y, (np.asarray(x) - mean) / np.sqrt(var + EPS), rtol=1e-4, atol=1e-5)


def test_cond_instance_norm_plus_picks_parameters_by_label(norm_input):
  x = norm_input
  num_classes, channels = 4, 5
  layer = norms.ConditionalInstanceNormPlus(num_classes=num_classes)
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.normal(size=(num_classes, channels)), jnp.float32)
            for k in ('gamma', 'alpha', 'beta')}
  labels = np.array([3, 0, 3, 1])
  y = layer.apply({'params': params}, x, jnp.asarray(labels))
  mean, var = np_instance_stats(x)
  g, a, b = (np.asarray(params[k], np.float64)[labels][:, None, None, :]
             for k in ('gamma', 'alpha', 'beta'))
  expected = g * ((np.asarray(x) - mean) / np.sqrt(var + EPS) + a * np_means_plus(mean)) + b
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-4)
  # Examples 0 and 2 share label 3: with the same input they give the same output.
  y_same = layer.apply({'params': params}, jnp.stack([x[0], x[1], x[0], x[3]]),
                       jnp.asarray(labels))
  np.testing.assert_array_equal(np.asarray(y_same[0]), np.asarray(y_same[2]))


@pytest.mark.parametrize('name', ['InstanceNorm', 'InstanceNorm++', 'VarianceNorm'])
def test_unconditional_norms_match_numpy(norm_input, name):
  x = norm_input
  layer = norms.get_normalization(name)()
  params = layer.init(jax.random.PRNGKey(1), x)['params']
  rng = np.random.default_rng(1)
  params = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
  y = np.asarray(layer.apply({'params': params}, x))
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  x64 = np.asarray(x, np.float64)
  mean, var = np_instance_stats(x64)
  if name == 'InstanceNorm':
    expected = p['scale'] * (x64 - mean) / np.sqrt(var + EPS) + p['bias']
  elif name == 'VarianceNorm':
    expected = p['scale'] * x64 / np.sqrt(var + EPS)
  else:
    h = (x64 - mean) / np.sqrt(var + EPS) + p['alpha'] * np_means_plus(mean)
    expected = p['gamma'] * h + p['beta']
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name, conditional', [('InstanceNorm++', False), ('InstanceNorm++', True),
                                               ('VarianceNorm', False), ('VarianceNorm', True)])
def test_unbiased_variance_option_matches_numpy(norm_input, name, conditional):
  """score_sde_pytorch's torch.var: InstanceNorm++ divides the variance of the channel
  means by C - 1, VarianceNorm the spatial variance by H W - 1; the instance
  normalisation's own variance stays biased."""
  x = norm_input
  labels = jnp.array([0, 1, 0, 1])
  layer = norms.get_normalization(name, conditional, 2 if conditional else 0,
                                  unbiased_variance=True)()
  params = layer.init(jax.random.PRNGKey(1), x, labels)['params']
  rng = np.random.default_rng(2)
  params = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
  y = np.asarray(layer.apply({'params': params}, x, labels))
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  if conditional:
    p = {k: v[np.asarray(labels)][:, None, None, :] for k, v in p.items()}
  x64 = np.asarray(x, np.float64)
  mean = x64.mean(axis=(1, 2), keepdims=True)
  if name == 'VarianceNorm':
    var1 = x64.var(axis=(1, 2), keepdims=True, ddof=1)
    scale = p['gamma'] if conditional else p['scale']
    expected = scale * x64 / np.sqrt(var1 + EPS)
  else:
    var0 = x64.var(axis=(1, 2), keepdims=True)
    means = (mean - mean.mean(-1, keepdims=True)) / np.sqrt(mean.var(-1, keepdims=True, ddof=1)
                                                             + EPS)
    expected = p['gamma'] * ((x64 - mean) / np.sqrt(var0 + EPS) + p['alpha'] * means) + p['beta']
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
  biased = norms.get_normalization(name, conditional, 2 if conditional else 0)()
  assert np.abs(np.asarray(biased.apply({'params': params}, x, labels)) - y).max() > 1e-3


@pytest.mark.parametrize('size_in, size_out', [((4, 4), (8, 8)), ((3, 5), (7, 9)), ((1, 2), (4, 4))])
def test_align_corners_resize_matches_linear_interpolation(size_in, size_out):
  """PyTorch's bilinear align_corners=True: output i samples the input at
  i (n_in - 1) / (n_out - 1); computed here with np.interp, axis by axis."""
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, *size_in, 3)), np.float64)
  y = np.asarray(ncsnv2.resize_bilinear_align_corners(jnp.asarray(x, jnp.float32), size_out))

  def along(a, axis, n_out):
    grid = np.linspace(0, a.shape[axis] - 1, n_out)
    return np.apply_along_axis(lambda v: np.interp(grid, np.arange(len(v)), v), axis, a)

  expected = along(along(x, 1, size_out[0]), 2, size_out[1])
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
  if size_in[0] > 1:
    np.testing.assert_allclose(y[:, [0, -1]][:, :, [0, -1]], x[:, [0, -1]][:, :, [0, -1]],
                               rtol=1e-6)


def test_port_options_change_the_network_as_stated():
  """refine_mults sets the RefineBlock widths; the numerics options change the
  function but not the parameters."""
  x = images(jax.random.PRNGKey(7), 2, 8)
  labels = jnp.array([1, 4])
  plain = small_model('ncsnv2')
  narrow = small_model('ncsnv2', refine_mults=(2, 2, 1, 1))
  params = synthetic_params(narrow, x, labels)
  assert params['RefineBlock_2']['MSFBlock_0']['Conv_0']['kernel'].shape == (3, 3, 16, 8)
  assert (mutils.param_count(synthetic_params(plain, x, labels))
          > mutils.param_count(params))
  outputs = [np.asarray(small_model('ncsnv2', refine_mults=(2, 2, 1, 1), **options).apply(
      {'params': params}, x, labels)) for options in (
          {}, {'norm_unbiased_variance': True}, {'resize_align_corners': True})]
  assert np.abs(outputs[1] - outputs[0]).max() > 1e-4
  assert np.abs(outputs[2] - outputs[0]).max() > 1e-4


@pytest.mark.parametrize('options, message', [
    ({'refine_mults': (2, 2, 1)}, r'refine_mults = \(2, 2, 1\) does not fit NCSNv2.*4 positive'),
    ({'refine_mults': (1, 2, 2, 1)}, r"the first equal to the deepest stage's 2"),
    ({'refine_mults': (2, 0, 1, 1)}, r'positive integers'),
    ({'resize_align_corners': True, 'interpolation': 'nearest_neighbor'},
     r"resize_align_corners applies to bilinear resizing"),
])
def test_bad_port_options_raise(options, message):
  with pytest.raises(ValueError, match=message):
    ncsnv2.NCSNv2(nf=8, image_size=8, **options)


def test_group_norm_normalises_groups(norm_input):
  x = jnp.tile(norm_input, (1, 1, 1, 2))  # 10 channels -> gcd(32, 10) = 2 groups
  layer = norms.GroupNorm()
  params = layer.init(jax.random.PRNGKey(0), x)
  y = np.asarray(layer.apply(params, x), np.float64).reshape(4, 6, 7, 2, 5)
  np.testing.assert_allclose(y.mean(axis=(1, 2, 4)), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.var(axis=(1, 2, 4)), 1.0, rtol=1e-3)


def test_group_norm_uses_gcd_32_c_groups_spanning_channels(norm_input):
  """24 channels -> gcd(32, 24) = 8 groups of 3 channels, statistics pooled over each
  group's channels (not per channel): NumPy rebuild."""
  x = jnp.concatenate([norm_input] * 5, axis=-1)[..., :24] * jnp.linspace(0.5, 2.0, 24)
  layer = norms.GroupNorm()
  y = np.asarray(layer.apply(layer.init(jax.random.PRNGKey(0), x), x), np.float64)
  np.testing.assert_allclose(y, np_group_norm(x, 8, EPS), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name', ['InstanceNorm', 'InstanceNorm++', 'VarianceNorm'])
def test_norm_epsilon_is_1e_5_at_small_activations(name):
  """eps = 1e-5 as in both reference code bases, visible when variances are ~1e-5."""
  x = 3e-3 * jax.random.normal(jax.random.PRNGKey(5), (2, 4, 4, 6)) + 1e-3 * jnp.arange(6.0)
  layer = norms.get_normalization(name)()
  params = layer.init(jax.random.PRNGKey(1), x)['params']
  params = {k: jnp.ones_like(v) if k in ('scale', 'gamma', 'alpha') else jnp.zeros_like(v)
            for k, v in params.items()}
  y = np.asarray(layer.apply({'params': params}, x))
  x64 = np.asarray(x, np.float64)
  mean, var = np_instance_stats(x64)
  if name == 'VarianceNorm':
    expected = x64 / np.sqrt(var + 1e-5)
  else:
    expected = (x64 - mean) / np.sqrt(var + 1e-5)
    if name == 'InstanceNorm++':
      m, v = mean.mean(axis=-1, keepdims=True), mean.var(axis=-1, keepdims=True)
      expected = expected + (mean - m) / np.sqrt(v + 1e-5)
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_instance_norm_starts_with_unit_scale_and_zero_bias(norm_input):
  """Unconditional InstanceNorm: scale = 1 exactly (not 1 + N(0, 0.02^2)), bias = 0."""
  params = norms.InstanceNorm().init(jax.random.PRNGKey(0), norm_input)['params']
  np.testing.assert_array_equal(params['scale'], 1.0)
  np.testing.assert_array_equal(params['bias'], 0.0)


@pytest.mark.parametrize('name, bias, per_class', [
    ('InstanceNorm++', True, 3), ('InstanceNorm++', False, 2),
    ('InstanceNorm', True, 2), ('VarianceNorm', False, 1)])
def test_conditional_norm_parameter_count_and_init(name, bias, per_class):
  layer = norms.get_normalization(name, conditional=True, num_classes=7)(bias=bias)
  x = jnp.ones((2, 4, 4, 6))
  params = layer.init(jax.random.PRNGKey(0), x, jnp.array([0, 6]))['params']
  assert mutils.param_count(params) == per_class * 7 * 6
  for key, value in params.items():
    assert value.shape == (7, 6)
    if key == 'beta':
      np.testing.assert_array_equal(value, 0.0)
    else:  # 1 + N(0, 0.02^2)
      assert abs(float(jnp.mean(value)) - 1.0) < 0.02
      assert 0.01 < float(jnp.std(value)) < 0.03


def test_unknown_normalization_names_the_valid_ones():
  with pytest.raises(ValueError, match=r"unknown normalization 'BatchNorm'.*InstanceNorm\+\+"):
    norms.get_normalization('BatchNorm')
  with pytest.raises(ValueError, match="unknown conditional normalization 'GroupNorm'"):
    norms.get_normalization('GroupNorm', conditional=True, num_classes=3)


def test_conditional_norm_needs_labels(norm_input):
  layer = norms.ConditionalInstanceNormPlus(num_classes=2)
  with pytest.raises(ValueError, match='conditional: call it with integer labels'):
    layer.init(jax.random.PRNGKey(0), norm_input)


def test_ncsn_conv_uses_pytorch_default_init():
  class Wrap(nn.Module):
    @nn.compact
    def __call__(self, x):
      return ncsnv2.conv(x, 64, kernel_size=3)

  x = jnp.ones((1, 4, 4, 32))
  params = Wrap().init(jax.random.PRNGKey(0), x)['params']['Conv_0']
  bound = 1 / math.sqrt(9 * 32)
  for value in (params['kernel'], params['bias']):
    value = np.asarray(value)
    assert np.abs(value).max() <= bound
    assert abs(value.std() - bound / math.sqrt(3)) < 0.15 * bound / math.sqrt(3)


# ----------------------------------------------------------------------------
# Parameter counts (full size, jax.eval_shape)
# ----------------------------------------------------------------------------

# Derived by hand from the reference architecture; see also reference_count().
FULL_SIZE_COUNTS = [
    ('ncsn', 32, 10, 34_428_675),
    ('ncsn', 32, 232, 44_828_931),
    ('ncsn', 64, 500, 57_384_195),
    ('ncsnv2', 32, 232, 33_970_563),
    ('ncsnv2_128', 128, 1086, 83_445_379),
    ('ncsnv2_256', 256, 2000, 94_132_611),
]


@pytest.mark.parametrize('arch, size, num_scales, expected', FULL_SIZE_COUNTS)
def test_full_size_parameter_counts(arch, size, num_scales, expected):
  model = MODELS[arch](nf=128, image_size=size, num_scales=num_scales, sigma_max=50.0)
  assert reference_count(arch, 128, num_scales) == expected
  assert eval_shape_count(model, size) == expected


def test_parameter_count_formula_other_widths_and_channels():
  for arch in MODELS:
    model = MODELS[arch](nf=16, num_channels=1, image_size=32, num_scales=7)
    assert eval_shape_count(model, 32, channels=1) == reference_count(arch, 16, 7, channels=1)


# ----------------------------------------------------------------------------
# Forward passes (small)
# ----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def small_setups():
  """name -> (model, params, x, labels) at nf = 8."""
  setups = {}
  for i, name in enumerate(MODELS):
    model = small_model(name)
    x = images(jax.random.PRNGKey(i), 2, SMALL_SIZE[name])
    labels = jnp.array([0, 7])
    setups[name] = (model, synthetic_params(model, x, labels, seed=i), x, labels)
  return setups


@pytest.mark.parametrize('name', list(MODELS))
def test_forward_shape_dtype_train_and_eval(small_setups, name):
  model, params, x, labels = small_setups[name]
  outs = [model.apply({'params': params}, x, labels, train=train) for train in (False, True)]
  for y in outs:
    assert y.shape == x.shape and y.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(y)))
  np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(outs[1]))  # no dropout
  assert float(jnp.std(outs[0])) > 0


def test_bfloat16_compute_close_to_float32(small_setups):
  model, params, x, labels = small_setups['ncsnv2']
  y32 = model.apply({'params': params}, x, labels)
  y16 = model.clone(dtype='bfloat16').apply({'params': params}, x, labels)
  assert y16.dtype == jnp.float32 and y16.shape == x.shape
  rel = float(jnp.linalg.norm(y16 - y32) / jnp.linalg.norm(y32))
  assert rel < 0.1
  assert rel > 0  # the compute dtype is really bfloat16
  shapes = jax.eval_shape(lambda: model.clone(dtype='bfloat16').init(
      jax.random.PRNGKey(0), x, labels))
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype('float32')}


def test_ncsnv2_output_is_unscaled_output_over_sigma(small_setups):
  model, params, x, _ = small_setups['ncsnv2']
  same = jnp.stack([x[0], x[0], x[1]])
  labels = jnp.array([0, 6, 9])
  scaled = np.asarray(model.apply({'params': params}, same, labels), np.float64)
  unscaled = np.asarray(model.clone(scale_by_sigma=False).apply({'params': params}, same, labels),
                        np.float64)
  # Unconditional: the unscaled output does not depend on the label.
  np.testing.assert_allclose(unscaled[0], unscaled[1], rtol=1e-5, atol=1e-6)
  # sigma_i = sigma_max (sigma_min / sigma_max)^(i / (N - 1)), sigma_max = 1, N = 10
  sigmas = 1.0 * (0.01 / 1.0) ** (np.array([0, 6, 9]) / 9)
  np.testing.assert_allclose(scaled, unscaled / sigmas[:, None, None, None], rtol=1e-5)
  np.testing.assert_allclose(scaled[1] / scaled[0], sigmas[0] / sigmas[1], rtol=1e-4)


def test_ncsn_is_conditioned_on_the_noise_index(small_setups):
  model, params, x, _ = small_setups['ncsn']
  same = jnp.stack([x[0], x[0]])
  labels = jnp.array([2, 5])
  y = np.asarray(model.apply({'params': params}, same, labels))
  assert not np.allclose(y[0], y[1], atol=1e-3)  # different levels, different outputs

  # Perturb only row 2 of every per-level table: only the label-2 output moves.
  def bump_row(path, leaf):
    if path[-1].key in ('gamma', 'alpha', 'beta') and leaf.ndim == 2:
      return leaf.at[2].add(0.5)
    return leaf

  bumped = jax.tree_util.tree_map_with_path(bump_row, params)
  y_bumped = np.asarray(model.apply({'params': bumped}, same, labels))
  assert not np.allclose(y_bumped[0], y[0], atol=1e-3)
  np.testing.assert_array_equal(y_bumped[1], y[1])
  assert not model.scale_by_sigma  # NCSN outputs the score directly


def test_integral_float_labels_equal_int_labels(small_setups):
  model, params, x, labels = small_setups['ncsn']
  y_int = model.apply({'params': params}, x, labels)
  y_float = model.apply({'params': params}, x, labels.astype(jnp.float32))
  np.testing.assert_array_equal(np.asarray(y_int), np.asarray(y_float))


def test_centered_input_skips_the_2x_minus_1_map(small_setups):
  model, params, x, labels = small_setups['ncsnv2']
  y = model.apply({'params': params}, x, labels)
  y_centered = model.clone(centered=True).apply({'params': params}, 2 * x - 1, labels)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_centered), rtol=1e-5, atol=1e-5)


def test_out_of_range_labels_give_nan_under_jit(small_setups):
  """Traced labels cannot raise; a bad label poisons its own example only."""
  model, params, x, _ = small_setups['ncsn']
  y = jax.jit(model.apply)({'params': params}, x, jnp.array([3, 10]))
  assert np.all(np.isfinite(np.asarray(y[0])))
  assert np.all(np.isnan(np.asarray(y[1])))
  table = jnp.arange(6.0).reshape(3, 2)
  rows = jax.jit(norms.lookup_per_label)(table, jnp.array([-1, 0, 2, 3]))[:, 0, 0]
  rows = np.asarray(rows)
  assert np.all(np.isnan(rows[[0, 3]]))
  np.testing.assert_array_equal(rows[[1, 2]], [[0.0, 1.0], [4.0, 5.0]])


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------

def test_bad_labels_raise(small_setups):
  model, params, x, _ = small_setups['ncsn']
  apply = lambda labels: model.apply({'params': params}, x, labels)  # noqa: E731
  with pytest.raises(ValueError, match=r'must lie in \[0, num_scales\) = \[0, 10\)'):
    apply(jnp.array([0, 10]))
  with pytest.raises(ValueError, match=r'must lie in \[0, num_scales\)'):
    apply(jnp.array([-1, 0]))
  with pytest.raises(ValueError, match='non-integer labels'):
    apply(jnp.array([0.5, 2.0]))
  with pytest.raises(ValueError, match=r'labels must have shape \[B\]'):
    apply(jnp.array([0, 1, 2]))


def test_bad_inputs_raise(small_setups):
  model, params, x, labels = small_setups['ncsnv2']
  with pytest.raises(ValueError, match='input has 1 channels but config.data.num_channels = 3'):
    model.apply({'params': params}, x[..., :1], labels)
  with pytest.raises(ValueError, match='image sides must be positive multiples of 2'):
    model.apply({'params': params}, x[:, :7, :7], labels)
  with pytest.raises(ValueError, match=r'images \[B, H, W, C\]'):
    model.apply({'params': params}, x[:, 0], labels)


@pytest.mark.parametrize('name, size, factor', [('ncsn', 15, 2), ('ncsnv2_128', 30, 4),
                                                ('ncsnv2_256', 132, 8), ('ncsnv2_256', 4, 8)])
def test_image_size_the_architecture_cannot_take(name, size, factor):
  with pytest.raises(ValueError, match=f'multiples of {factor}; config.data.image_size = {size}'):
    MODELS[name](nf=8, image_size=size)


@pytest.mark.parametrize('field, value, message', [
    ('normalization', 'BatchNorm', "unknown normalization 'BatchNorm'"),
    ('nonlinearity', 'tanh', "unknown config.model.nonlinearity 'tanh'"),
    ('interpolation', 'bicubic', "unknown interpolation 'bicubic'.*nearest_neighbor"),
    ('dtype', 'float16', "unknown config.model.dtype 'float16'"),
])
def test_unknown_names_raise(field, value, message):
  with pytest.raises(ValueError, match=message):
    ncsnv2.NCSNv2(nf=8, image_size=8, **{field: value})


def test_ncsn_rejects_normalizations_without_conditional_version():
  with pytest.raises(ValueError, match="unknown conditional normalization 'GroupNorm'"):
    ncsnv2.NCSN(nf=8, image_size=8, normalization='GroupNorm')
  ncsnv2.NCSNv2(nf=8, image_size=8, normalization='GroupNorm')  # fine unconditionally


@pytest.mark.parametrize('normalization', ['InstanceNorm', 'VarianceNorm'])
def test_other_conditional_normalizations_run(normalization):
  model = small_model('ncsn', normalization=normalization)
  x = images(jax.random.PRNGKey(5), 2, 8)
  labels = jnp.array([1, 4])
  y = model.apply({'params': synthetic_params(model, x, labels)}, x, labels)
  assert y.shape == x.shape and np.all(np.isfinite(np.asarray(y)))
