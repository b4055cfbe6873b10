"""Data: the digits dataset offline, a tfds CIFAR-10 stand-in, sharding, flips, scalers."""
import dataclasses
import os
import shutil

import numpy as np
import pytest

from configs import defaults
from score_sde import data

SHARED_TFDS = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'tfds')


@pytest.fixture(scope='module')
def digits_config(tmp_path_factory):
  config = defaults.digits()
  config.data.data_dir = str(tmp_path_factory.mktemp('tfds'))
  config.data.uniform_dequantization = False
  return config


@pytest.fixture(scope='module')
def cifar_config(tmp_path_factory):
  directory = tmp_path_factory.mktemp('tfds_cifar')
  if not os.path.isdir(SHARED_TFDS):
    pytest.fail(f'the shared test CIFAR-10 is missing at {SHARED_TFDS}')
  shutil.copytree(os.path.join(SHARED_TFDS, 'cifar10'), directory / 'cifar10')
  config = defaults.cifar10()
  config.data.data_dir = str(directory)
  return config


def test_digits_build_offline_with_fixed_split(digits_config):
  from sklearn.datasets import load_digits
  train = data.load_split_uint(digits_config, 'train')
  test = data.load_split_uint(digits_config, 'test')
  assert train.shape == (1500, 8, 8, 1) and test.shape == (297, 8, 8, 1)
  assert train.max() == 16 and train.min() == 0 and data.num_levels(digits_config) == 17
  images = load_digits().images.astype(np.uint8)
  # The split is fixed: test = sklearn indices 1500..1796 (in tfds's stored order).
  as_rows = lambda a: sorted(map(bytes, a.reshape(len(a), -1)))  # noqa: E731
  assert as_rows(test) == as_rows(images[1500:])
  assert as_rows(train) == as_rows(images[:1500])
  assert not any(m.startswith('tensorflow') and m != 'tensorflow_datasets'
                 for m in __import__('sys').modules if m.split('.')[0] == 'tensorflow')


def test_scalers_and_levels(digits_config):
  x = data.load_split(digits_config, 'test', 20)
  raw = data.load_split_uint(digits_config, 'test', 20)
  np.testing.assert_allclose(x, raw / 16.0 * 2 - 1, atol=1e-6)   # centred: [-1, 1]
  inverse = data.get_data_inverse_scaler(digits_config)
  np.testing.assert_allclose(inverse(x), raw / 16.0, atol=1e-6)


def test_uniform_dequantization_stays_in_its_bin(digits_config):
  config = defaults.digits()
  config.data.data_dir = digits_config.data.data_dir
  config.data.centered = False
  config.data.uniform_dequantization = True
  batch = next(data.train_iterator(config, global_batch_size=256, seed=3))
  levels = np.floor(batch * 17)
  np.testing.assert_array_less(-1e-6, batch * 17 - levels)
  assert levels.max() <= 16 and 0.3 < (batch * 17 - levels).mean() < 0.7
  # Each pixel gets its own U[0, 1) draw: over 256 images no two of the 64 positions
  # correlate beyond 5 / sqrt(256) (2016 pairs; one draw per image would give 1).
  offsets = (batch * 17 - levels).reshape(256, 64)
  assert abs(offsets.var() - 1 / 12) < 0.01
  correlations = np.corrcoef(offsets, rowvar=False)[np.triu_indices(64, 1)]
  assert np.abs(correlations).max() < 5 / np.sqrt(256)


def test_epoch_order_is_a_fresh_permutation_each_epoch(digits_config):
  source = data.get_data_source(digits_config, 'train')
  stream = data._GlobalStream(digits_config, source, seed=0)
  n = len(source)
  first = [int(stream._order[i]) for i in range(n)]
  second = [int(stream._order[n + i]) for i in range(n)]
  assert sorted(first) == list(range(n)) and sorted(second) == list(range(n))
  assert first != second
  # The seed picks the order (config.seed; the loop's eval stream reads seed + 1).
  other = data._GlobalStream(digits_config, source, seed=1)
  assert [int(other._order[i]) for i in range(n)] != first


def test_process_shards_are_disjoint_and_make_the_global_batch(digits_config):
  single = data.train_iterator(digits_config, global_batch_size=12, seed=5)
  shards = [data.train_iterator(digits_config, global_batch_size=12, seed=5,
                                process_index=p, process_count=3) for p in range(3)]
  for _ in range(4):
    full = next(single)
    parts = [next(s) for s in shards]
    assert all(p.shape == (4, 8, 8, 1) for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), full)


def test_labelled_batches_pair_each_image_with_its_label(digits_config):
  from sklearn.datasets import load_digits
  digits = load_digits()
  batch = next(data.train_iterator(digits_config, global_batch_size=32, seed=1,
                                   with_labels=True))
  assert batch['image'].shape == (32, 8, 8, 1) and batch['label'].dtype == np.int32
  levels = np.round((batch['image'] + 1) / 2 * 16).astype(np.uint8)[..., 0]
  for image, label in zip(levels, batch['label']):   # find each image among the digits
    matches = np.flatnonzero(np.all(digits.images[:1500] == image, axis=(1, 2)))
    assert len(matches) and label in digits.target[matches]
  unlabelled = next(data.train_iterator(digits_config, global_batch_size=32, seed=1))
  np.testing.assert_array_equal(unlabelled, batch['image'])
  test_images = data.load_split_uint(digits_config, 'test')[..., 0]   # tfds order
  test_labels = data.load_split_labels(digits_config, 'test')
  assert len(test_labels) == 297
  for image, label in zip(test_images, test_labels):
    matches = 1500 + np.flatnonzero(np.all(digits.images[1500:] == image, axis=(1, 2)))
    assert len(matches) and label in digits.target[matches]


def test_toy_data_has_no_labels():
  from configs.toy import vp_mlp_continuous
  with pytest.raises(ValueError, match='no class labels'):
    data.train_iterator(vp_mlp_continuous.get_config(), global_batch_size=8, seed=0,
                        with_labels=True)


def test_tfds_split_names_what_a_split_reads(digits_config, monkeypatch):
  """The final evaluation labels its bits/dim by this ('Test' only for tfds 'test')."""
  assert data.tfds_split(digits_config, 'test') == 'test'
  spec = data.IMAGE_DATASETS['DIGITS']
  monkeypatch.setitem(data.IMAGE_DATASETS, 'DIGITS', dataclasses.replace(
      spec, splits={'train': 'train[:-300]', 'test': 'train[-300:]'}))
  assert data.tfds_split(digits_config, 'test') == 'train[-300:]'
  toy = defaults.toy()
  assert data.tfds_split(toy, 'test') == 'test'
  with pytest.raises(ValueError, match=r"unknown split 'valid' for DIGITS; valid: \['test'"):
    data.tfds_split(digits_config, 'valid')


def test_iterator_state_restores_the_next_batch(digits_config):
  it = data.train_iterator(digits_config, global_batch_size=8, seed=0)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  fresh = data.train_iterator(digits_config, global_batch_size=8, seed=0)
  fresh.set_state(state)
  for batch in expected:
    np.testing.assert_array_equal(next(fresh), batch)


def test_cifar10_through_tfds_with_flips(cifar_config):
  assert data.split_size(cifar_config, 'train') == 250
  plain = data.load_split(cifar_config, 'train')
  stream = data._GlobalStream(cifar_config, data.get_data_source(cifar_config, 'train'),
                              seed=1)
  flipped = 0
  for position in range(64):
    index = int(stream._order[position])
    x = stream[position]
    if np.array_equal(x, plain[index]):
      continue
    np.testing.assert_array_equal(x, plain[index][:, ::-1])
    flipped += 1
  assert 16 < flipped < 48                      # ~ half, binomial(64, 1/2)
  # Without augmentation (the loop's eval stream) no example is flipped, whatever
  # config.data.random_flip says.
  assert cifar_config.data.random_flip
  unflipped = next(data.train_iterator(cifar_config, global_batch_size=64, seed=1,
                                       augment=False))
  np.testing.assert_array_equal(unflipped, plain[[int(stream._order[p]) for p in range(64)]])
  batch = next(data.train_iterator(cifar_config, global_batch_size=4, seed=0))
  assert batch.shape == (4, 32, 32, 3) and batch.dtype == np.float32
  assert 0.0 <= batch.min() and batch.max() <= 1.0
  batches = list(data.eval_batches(cifar_config, 'test', batch_size=32))
  assert len(batches) == 4 and batches[-1][1].sum() == 100 - 96
  assert sum(int(m.sum()) for _, m in batches) == 100


def test_missing_dataset_names_the_command(tmp_path):
  config = defaults.cifar10()
  config.data.data_dir = str(tmp_path)
  with pytest.raises(data.DatasetNotFoundError, match="download_and_prepare") as info:
    data.get_data_source(config, 'train')
  assert "tfds.builder('cifar10'" in str(info.value) and str(tmp_path) in str(info.value)


@pytest.mark.parametrize('edit, message', [
    (lambda c: setattr(c.data, 'num_channels', 3), 'DIGITS images have 1 channel'),
    (lambda c: setattr(c.data, 'image_size', 32), 'DIGITS images are 8x8'),
    (lambda c: setattr(c.data, 'dataset', 'IMAGENET'), "unknown dataset 'IMAGENET'"),
])
def test_config_dataset_mismatch(edit, message):
  config = defaults.digits()
  edit(config)
  with pytest.raises(ValueError, match=message):
    data.check_config_matches_dataset(config)


def test_toy_datasets():
  config = defaults.toy()
  for name in data.TOY_DATASETS:
    config.data.dataset = name
    batch = next(data.train_iterator(config, global_batch_size=256, seed=0))
    assert batch.shape == (256, 2) and np.isfinite(batch).all()
  config.data.dataset = 'MOONS'
  config.data.dim = 3
  with pytest.raises(ValueError, match='set config.data.dim=2'):
    data.get_data_source(config, 'train')
