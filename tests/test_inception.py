"""FID Inception-v3 in Flax with random weights: shapes, layout, resizing, weights files."""
import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from score_sde import parallel
from score_sde.evaluation import inception, metrics

SMALL = inception.MIN_IMAGE_SIZE     # fast compile / run; the architecture is the same


@pytest.fixture(scope='module')
def params():
  return inception.init_params(jax.random.PRNGKey(0))


@pytest.fixture(scope='module')
def weights_file(params, tmp_path_factory):
  return inception.save_params(str(tmp_path_factory.mktemp('inception') / 'random.npz'), params)


@pytest.fixture(scope='module')
def images():
  return np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)


def _trainable_count(shapes):
  return sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith(('/mean', '/var')))


def test_parameter_count_matches_torchvision_inception_v3():
  # torchvision's inception_v3 has 27,161,264 trainable parameters with its
  # auxiliary head (3,326,696) and 1000 classes; the FID graph has no auxiliary
  # head and 1008 classes (8 more fc rows of 2048 weights + bias).
  expected = 27_161_264 - 3_326_696 + 8 * (2048 + 1)
  assert _trainable_count(inception.param_shapes()) == expected
  shapes = inception.param_shapes()
  assert shapes['fc/kernel'] == (2048, 1008)
  assert shapes['Mixed_7c/branch_pool/kernel'] == (1, 1, 2048, 192)
  assert shapes['Mixed_6b/branch7x7_2/kernel'] == (1, 7, 128, 128)


def test_output_shapes_at_299(params, images):
  pool, logits = inception.features(params, images[:2])
  assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
  assert pool.dtype == np.float32 and np.isfinite(pool).all() and np.isfinite(logits).all()
  assert (pool >= 0).all() and pool.std() > 0            # mean of ReLU outputs


def test_grey_images_are_repeated_to_three_channels(params, images):
  grey = images[:2, :, :, :1]
  pool_grey, logits_grey = inception.features(params, grey, image_size=SMALL)
  pool_rgb, logits_rgb = inception.features(params, np.repeat(grey, 3, axis=-1),
                                            image_size=SMALL)
  np.testing.assert_array_equal(pool_grey, pool_rgb)
  np.testing.assert_array_equal(logits_grey, logits_rgb)


def test_sharded_features_equal_single_device(params, images, four_devices):
  mesh = parallel.make_mesh(four_devices)
  placed = inception.replicate_params(params, mesh)
  pool_mesh, logits_mesh = inception.features(placed, images, mesh=mesh, image_size=SMALL)
  pool, logits = inception.features(params, images, image_size=SMALL)
  np.testing.assert_allclose(pool_mesh, pool, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits_mesh, logits, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='does not divide by the number of devices 4'):
    inception.features(placed, images[:3], mesh=mesh, image_size=SMALL)


def test_feature_network_pads_batches_and_names_the_weights(params, images):
  network = inception.feature_network(params, batch_size=4, image_size=SMALL)
  pool, logits = network.apply(np.concatenate([images, images[:1]]))   # 5 -> 4 + 4 (padded)
  reference = inception.features(params, images, image_size=SMALL)
  np.testing.assert_allclose(pool[:4], reference[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(pool[4], reference[0][0], rtol=1e-5, atol=1e-6)
  assert logits.shape == (5, 1008)
  assert network.name == (f'inception_v3_fid_pool3/tf1/{SMALL}/'
                          f'{inception.weights_fingerprint(params)}')
  other = inception.init_params(jax.random.PRNGKey(1))
  assert inception.weights_fingerprint(other) != inception.weights_fingerprint(params)


def test_input_checks(params, images):
  with pytest.raises(ValueError, match='must be uint8'):
    inception.features(params, images.astype(np.float32))
  with pytest.raises(ValueError, match='1 or 3 channels'):
    inception.features(params, images[..., :2], image_size=SMALL)
  with pytest.raises(ValueError, match='too small for Inception-v3; use at least 75'):
    inception.features(params, images, image_size=64)
  with pytest.raises(ValueError, match=r"valid: \['pytorch', 'tf1'\]"):
    inception.features(params, images, resize_method='bicubic')


# ----------------------------------------------------------------------------
# Layers against independent numpy implementations of the PyTorch ops
# ----------------------------------------------------------------------------

def _torch_conv2d(x_nchw, weight_oihw, stride, padding):
  """Cross-correlation as torch.nn.functional.conv2d (zero padding), float64."""
  (ph, pw) = padding
  x = np.pad(x_nchw, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
  out_c, _, kh, kw = weight_oihw.shape
  oh = (x.shape[2] - kh) // stride + 1
  ow = (x.shape[3] - kw) // stride + 1
  out = np.zeros((x.shape[0], out_c, oh, ow))
  for i in range(oh):
    for j in range(ow):
      window = x[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
      out[:, :, i, j] = np.einsum('bchw,ochw->bo', window, weight_oihw)
  return out


@pytest.mark.parametrize('kernel, stride, padding', [((3, 3), 2, (0, 0)), ((1, 7), 1, (0, 3)),
                                                     ((3, 1), 1, (1, 0))])
def test_conv_bn_matches_pytorch_layout_after_conversion(kernel, stride, padding):
  rng = np.random.default_rng(1)
  torch_weight = rng.normal(size=(5, 3) + kernel)              # [out, in, kh, kw]
  bn = {k: rng.uniform(0.5, 1.5, 5) for k in ('weight', 'bias', 'running_mean', 'running_var')}
  x = rng.normal(size=(2, 3, 9, 9))                            # NCHW
  conv = _torch_conv2d(x, torch_weight, stride, padding)
  bn_shape = (1, 5, 1, 1)
  expected = np.maximum(
      (conv - bn['running_mean'].reshape(bn_shape)) / np.sqrt(bn['running_var'].reshape(bn_shape)
                                                              + 1e-3)
      * bn['weight'].reshape(bn_shape) + bn['bias'].reshape(bn_shape), 0)
  params = {'kernel': torch_weight.transpose(2, 3, 1, 0), 'scale': bn['weight'],
            'bias': bn['bias'], 'mean': bn['running_mean'], 'var': bn['running_var']}
  layer = inception.ConvBN(5, kernel, stride, padding)
  got = layer.apply({'params': jax.tree.map(jnp.float32, params)},
                    jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32))
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, rtol=1e-4,
                             atol=1e-4)


def test_pools_use_tensorflow_padding_rules():
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  average = np.asarray(inception._avg_pool_3x3(x))[0, :, :, 0]
  assert average[0, 0] == pytest.approx(np.mean([0, 1, 4, 5]))      # padding not counted
  assert average[1, 1] == pytest.approx(np.mean([0, 1, 2, 4, 5, 6, 8, 9, 10]))
  maximum = np.asarray(inception._max_pool_3x3(-x))[0, :, :, 0]
  assert maximum[0, 0] == 0.0                                        # padding is -inf
  assert maximum[3, 3] == -10.0


# ----------------------------------------------------------------------------
# Resizing
# ----------------------------------------------------------------------------

def test_pytorch_resize_matches_jax_bilinear_upsampling():
  x = np.random.default_rng(2).uniform(size=(7, 5))
  matrix_h = inception.interpolation_matrix(19, 7, 'pytorch')
  matrix_w = inception.interpolation_matrix(13, 5, 'pytorch')
  ours = matrix_h @ x @ matrix_w.T
  theirs = jax.image.resize(jnp.asarray(x), (19, 13), 'bilinear', antialias=False)
  np.testing.assert_allclose(ours, np.asarray(theirs), rtol=1e-5, atol=1e-6)


def test_tf1_resize_closed_form():
  # TF1 resize_bilinear(align_corners=False): out[o] samples in[o * in / out].
  matrix = inception.interpolation_matrix(4, 2, 'tf1')
  np.testing.assert_allclose(matrix @ np.array([6.0, 10.0]), [6.0, 8.0, 10.0, 10.0])
  matrix = inception.interpolation_matrix(5, 3, 'tf1')           # sources 0, .6, 1.2, 1.8, 2.4
  np.testing.assert_allclose(matrix @ np.array([0.0, 10.0, 20.0]), [0, 6, 12, 18, 20],
                             atol=1e-5)


@pytest.mark.parametrize('method', sorted(inception.RESIZE_METHODS))
def test_resize_keeps_constants_and_identity(method):
  for out_size, in_size in [(299, 32), (299, 8), (299, 299), (75, 256)]:
    matrix = inception.interpolation_matrix(out_size, in_size, method)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(inception.interpolation_matrix(9, 9, method), np.eye(9))
  x = jnp.full((1, 8, 8, 3), 255, jnp.uint8)
  np.testing.assert_allclose(inception.preprocess(x, 75, method), 1.0, rtol=1e-6)


# ----------------------------------------------------------------------------
# Weights files and conversion
# ----------------------------------------------------------------------------

def test_npz_round_trip(params, weights_file, images):
  loaded = inception.load_params(weights_file)
  flat, flat_loaded = inception.flatten_params(params), inception.flatten_params(loaded)
  assert flat.keys() == flat_loaded.keys()
  for key in flat:
    np.testing.assert_array_equal(flat[key], flat_loaded[key])
  np.testing.assert_array_equal(inception.features(loaded, images, image_size=SMALL)[0],
                                inception.features(params, images, image_size=SMALL)[0])
  assert inception.weights_fingerprint(loaded) == inception.weights_fingerprint(params)


def _rewrite(source, target, **changes):
  with np.load(source, allow_pickle=False) as npz:
    arrays = {k: npz[k] for k in npz.files}
  arrays.update(changes)
  arrays = {k: v for k, v in arrays.items() if v is not None}
  np.savez(target, **arrays)
  return str(target)


def test_missing_weights_file_says_how_to_make_it(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match=r'(?s)does not exist.*python -m score_sde.evaluation.inception'):
    inception.load_params(str(tmp_path / 'absent.npz'))
  monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / 'from_env.npz'))
  with pytest.raises(FileNotFoundError, match='from_env.npz does not exist'):
    inception.load_params()


def test_wrong_shape_names_the_key(weights_file, tmp_path):
  bad = _rewrite(weights_file, tmp_path / 'bad.npz',
                 **{'Mixed_6b/branch7x7_2/kernel': np.zeros((7, 1, 128, 128), np.float32)})
  with pytest.raises(inception.WeightsError,
                     match=r"'Mixed_6b/branch7x7_2/kernel' has shape \(7, 1, 128, 128\), "
                           r"expected \(1, 7, 128, 128\)"):
    inception.load_params(bad)


def test_missing_and_unexpected_keys_are_listed(weights_file, tmp_path):
  bad = _rewrite(weights_file, tmp_path / 'missing.npz', **{'fc/bias': None,
                                                            'AuxLogits/fc/bias': np.zeros(3)})
  with pytest.raises(inception.WeightsError,
                     match=r"missing 1 key\(s\) \['fc/bias'\], unexpected 1 key\(s\) "
                           r"\['AuxLogits/fc/bias'\]"):
    inception.load_params(bad)


def test_object_arrays_and_junk_are_refused(weights_file, tmp_path):
  bad = _rewrite(weights_file, tmp_path / 'pickled.npz',
                 **{'fc/bias': np.array([object()] * 1008, dtype=object)})
  with pytest.raises(inception.WeightsError, match="'fc/bias' is a pickled object array"):
    inception.load_params(bad)
  (tmp_path / 'junk.npz').write_bytes(b'\x00' * 100)
  with pytest.raises(inception.WeightsError, match='junk.npz is not'):
    inception.load_params(str(tmp_path / 'junk.npz'))
  nan = _rewrite(weights_file, tmp_path / 'nan.npz', **{'fc/bias': np.full(1008, np.nan)})
  with pytest.raises(inception.WeightsError, match="'fc/bias' is not a finite"):
    inception.load_params(nan)
  other = _rewrite(weights_file, tmp_path / 'format.npz', **{'meta/format': np.str_('v0')})
  with pytest.raises(inception.WeightsError, match="format 'v0'"):
    inception.load_params(other)


def test_conversion_from_a_pytorch_state_dict(params):
  """A state dict laid out as pytorch-fid's (built here by hand) converts back exactly."""
  renames = {'kernel': 'conv.weight', 'scale': 'bn.weight', 'bias': 'bn.bias',
             'mean': 'bn.running_mean', 'var': 'bn.running_var'}
  state_dict = {}
  for key, value in inception.flatten_params(params).items():
    value = np.asarray(value)
    layer, name = key.rsplit('/', 1)
    if layer == 'fc':
      state_dict[f'fc.{"weight" if name == "kernel" else "bias"}'] = (
          value.T if name == 'kernel' else value)
      continue
    torch_name = f'{layer.replace("/", ".")}.{renames[name]}'
    state_dict[torch_name] = value.transpose(3, 2, 0, 1) if name == 'kernel' else value
    if name == 'var':
      state_dict[f'{layer.replace("/", ".")}.bn.num_batches_tracked'] = np.array(0)
  converted = inception.convert_torch_state_dict(state_dict)
  flat = inception.flatten_params(params)
  assert converted.keys() == flat.keys()
  for key in flat:
    np.testing.assert_array_equal(converted[key], np.asarray(flat[key]))
  state_dict['Mixed_5b.branch1x1.conv.bias'] = np.zeros(64)
  with pytest.raises(inception.WeightsError, match="'Mixed_5b.branch1x1.conv.bias' is not"):
    inception.convert_torch_state_dict(state_dict)


PYTORCH_FID = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'pytorch_fid')


def _pytorch_fid_weights():
  """The random FID-Inception weights of tests/data/pytorch_fid (its weights.py, numpy
  only) as our parameter tree, through the pytorch-fid state-dict converter."""
  spec = importlib.util.spec_from_file_location('pytorch_fid_weights',
                                                os.path.join(PYTORCH_FID, 'weights.py'))
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  with open(os.path.join(PYTORCH_FID, 'layout.json')) as f:
    entries = json.load(f)['state_dict']
  converted = inception.convert_torch_state_dict(recipe.random_arrays(entries))
  return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in converted.items()},
                                      sep='/')


def test_network_equals_pytorch_fids_on_the_same_weights():
  """pool_3 features and logits of the whole network against pytorch-fid's own
  InceptionV3 (the network of its FID numbers) run by tests/data/pytorch_fid/
  make_fixture.py on the same random weights and 139 x 139 images (no resize on either
  side; the last blocks see 3 x 3 maps, where a max and a mean pool differ): every
  layer's padding, pooling rule, branch order and concatenation, and the state-dict
  conversion, within float32 round-off (1e-4 of the largest value; measured 1e-6)."""
  expected = np.load(os.path.join(PYTORCH_FID, 'expected.npz'))
  size = expected['images'].shape[1]
  network = inception.feature_network(_pytorch_fid_weights(), batch_size=2, image_size=size)
  pool3, logits = network.apply(expected['images'])
  for ours, theirs in ((pool3, expected['pool3']), (logits, expected['logits'])):
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * np.abs(theirs).max())
  # pytorch-fid's resize (F.interpolate, bilinear, align_corners=False) is 'pytorch'
  resized = inception.preprocess(jnp.asarray(expected['small']), SMALL, 'pytorch')
  np.testing.assert_allclose((np.asarray(resized) + 1) / 2, expected['resized_75'],
                             rtol=0, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec('torch') is not None,
                    reason='torch is installed here, so the message for a machine without '
                           'torch cannot be produced')
def test_pth_conversion_without_torch_explains_itself(tmp_path):
  with pytest.raises(ImportError, match='pip install torch'):
    inception.convert_pytorch_fid_weights(str(tmp_path / 'x.pth'), str(tmp_path / 'x.npz'))


def test_pth_conversion_refuses_a_torch_that_would_unpickle(tmp_path, monkeypatch):
  # torch < 1.13 has no weights_only: loading would run arbitrary pickled code. A stand-in
  # torch module of that kind must be refused before any unrestricted load happens.
  import types
  calls = []

  def old_load(path, map_location=None, **kwargs):
    calls.append(kwargs)
    if 'weights_only' in kwargs:
      raise TypeError("load() got an unexpected keyword argument 'weights_only'")
    raise AssertionError('an unrestricted torch.load must never be called')

  monkeypatch.setitem(sys.modules, 'torch', types.SimpleNamespace(load=old_load,
                                                                 __version__='1.12.1'))
  with pytest.raises(ImportError, match='torch 1.12.1 cannot load .* upgrade torch'):
    inception.convert_pytorch_fid_weights(str(tmp_path / 'x.pth'), str(tmp_path / 'x.npz'))
  assert calls == [{'weights_only': True}]
  assert not os.path.exists(tmp_path / 'x.npz')


@pytest.mark.slow   # ~10-20 s on 2 CPU cores: two 2048-d eigendecompositions
def test_statistics_with_random_weights_end_to_end(params, images, tmp_path):
  """Statistics streamed over two batches, saved and loaded, equal numpy's moments of
  the network's features in one call; the sample metrics equal FID 0 against
  themselves and the Inception score of the network's own logits."""
  network = inception.feature_network(params, batch_size=4, image_size=SMALL)
  features, logits = (np.asarray(a, np.float64) for a in network.apply(images))
  stats = metrics.compute_statistics(network, [images[:2], images[2:]], dataset='toy',
                                     split='train')
  path = metrics.save_stats(str(tmp_path / 'stats.npz'), stats)
  loaded = metrics.load_stats(path)
  scale = np.abs(features).max()
  np.testing.assert_allclose(loaded.mu, features.mean(0), rtol=1e-5, atol=1e-6 * scale)
  np.testing.assert_allclose(loaded.sigma, np.cov(features, rowvar=False), rtol=1e-4,
                             atol=1e-5 * scale ** 2)
  # the kept features, batch by batch in order (equal to round-off: on some CPUs a
  # row's features depend on its place in the padded batch in the last bits)
  np.testing.assert_allclose(loaded.features, features, rtol=1e-5, atol=1e-6 * scale)
  result = metrics.evaluate_samples(network, images, loaded, kid_subset_size=2, is_splits=2)
  assert result['fid'] == pytest.approx(0.0, abs=1e-3 * np.trace(stats.sigma))
  assert result['is'] == pytest.approx(metrics.inception_score(logits, 2)[0], rel=1e-5)
  assert result['num_samples'] == 4 and result['feature_network'] == network.name
