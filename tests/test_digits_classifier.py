"""The digits feature network: training, files, and digits-FID / KID / IS / confidence."""
import math
import os
import shutil

import numpy as np
import pytest

from configs import defaults
from score_sde import data
from score_sde.evaluation import metrics
from score_sde.evaluation import digits_classifier as dc


@pytest.fixture(scope='module')
def config(tmp_path_factory):
  config = defaults.digits()
  config.data.data_dir = str(tmp_path_factory.mktemp('tfds'))
  return config


@pytest.fixture(scope='module')
def classifier_path(config, tmp_path_factory):
  path = str(tmp_path_factory.mktemp('classifier') / 'cnn.npz')
  accuracy = dc.train_digits_classifier(config, path, seed=0)
  assert accuracy > 0.93          # measured 0.973 (289 / 297 test digits)
  return path


@pytest.fixture(scope='module')
def classifier(classifier_path):
  return dc.load_digits_classifier(classifier_path)


@pytest.fixture(scope='module')
def splits(config):
  return data.load_split_uint(config, 'train'), data.load_split_uint(config, 'test')


@pytest.fixture(scope='module')
def floor(config, classifier_path, splits):
  """The test split scored against the training split's features."""
  return dc.digits_metrics(splits[1], config, classifier_path=classifier_path,
                           reference_split='train')


@pytest.fixture(scope='module')
def gaussian(config, classifier_path):
  samples = dc.gaussian_baseline_samples(config, 297, seed=0)
  return dc.digits_metrics(samples, config, classifier_path=classifier_path,
                           reference_split='train')


def test_classifier_file_holds_accuracies_and_features_have_the_right_shape(
    config, classifier, classifier_path, splits):
  assert classifier.test_accuracy > 0.93 and classifier.train_accuracy > 0.98
  features, logits = dc.classify(classifier, splits[1])
  assert features.shape == (297, dc.FEATURE_DIM) and logits.shape == (297, 10)
  assert np.isfinite(features).all()
  # The stored accuracy is the accuracy of the stored parameters on the labelled split.
  source = data.get_data_source(config, 'test')
  labels = np.array([int(source[i]['label']) for i in range(len(source))])
  images = np.stack([np.asarray(source[i]['image']) for i in range(len(source))])
  _, logits = dc.classify(classifier, images)
  assert np.mean(np.argmax(logits, axis=1) == labels) == pytest.approx(classifier.test_accuracy)
  with np.load(classifier_path, allow_pickle=False) as npz:
    assert str(npz['format']) == dc.CLASSIFIER_FORMAT


def test_test_split_against_training_statistics_is_the_floor(floor, gaussian):
  # Measured: floor digits-FID 53, Gaussian baseline 159 (vs train 125); see the report.
  assert floor['digits_fid'] < 0.6 * gaussian['digits_fid']
  assert floor['digits_kid'] < 0.5 * gaussian['digits_kid']
  assert gaussian['digits_kid'] > 5 * gaussian['digits_kid_stderr']
  assert floor['digits_is'] > 7.5 > gaussian['digits_is']
  assert floor['confident_fraction'] > 0.9 > 0.75 > gaussian['confident_fraction']
  assert floor['class_entropy_bits'] > 3.25            # all ten digits, evenly (max 3.32)
  assert floor['class_entropy_bits'] > gaussian['class_entropy_bits']
  assert sum(floor['class_histogram']) == pytest.approx(1.0)
  assert (floor['num_samples'], floor['num_reference']) == (297, 1500)


def test_a_split_against_itself_scores_fid_zero(config, classifier_path, classifier, splits):
  result = dc.digits_metrics(splits[1], config, classifier_path=classifier_path)
  assert result['reference_split'] == 'test'
  assert abs(result['digits_fid']) < 1e-6
  _, logits = dc.classify(classifier, splits[1])
  assert (result['digits_is'], result['digits_is_std']) == pytest.approx(
      metrics.inception_score(logits, 10))
  assert result['classifier_test_accuracy'] == classifier.test_accuracy


def test_default_classifier_path_is_used_when_present(config, classifier_path, splits):
  default = dc.default_classifier_path(config, seed=0)
  os.makedirs(os.path.dirname(default), exist_ok=True)
  shutil.copy(classifier_path, default)
  result = dc.digits_metrics(splits[1][:50], config)
  explicit = dc.digits_metrics(splits[1][:50], config, classifier_path=classifier_path)
  assert result == explicit


def test_a_classifier_is_addressed_and_checked_by_the_splits_it_learned(
    config, classifier_path, monkeypatch):
  """benchmarks/flows_validation.py holds training digits out; a classifier trained on
  all of them (or on the held-in part) must not stand in for the other."""
  standard = dc.default_classifier_path(config, seed=0)
  assert dc.load_digits_classifier(classifier_path).splits == ('train', 'test')
  import dataclasses
  spec = data.IMAGE_DATASETS['DIGITS']
  monkeypatch.setitem(data.IMAGE_DATASETS, 'DIGITS', dataclasses.replace(
      spec, splits={'train': 'train[:-300]', 'test': 'train[-300:]'}))
  held_out = dc.default_classifier_path(config, seed=0)
  assert os.path.dirname(held_out) == os.path.dirname(standard) and held_out != standard
  assert dc.default_classifier_path(config, seed=1) != held_out
  with pytest.raises(ValueError, match=r"trained on tfds 'train' and tested on 'test', but "
                                       r"this config reads train 'train\[:-300\]'"):
    dc.get_digits_classifier(config, classifier_path)


def test_confidence_summary_closed_form():
  big = 20.0
  logits = np.zeros((4, 10))
  logits[0, 3] = logits[1, 3] = logits[2, 5] = big      # three confident, one uniform
  summary = dc.confidence_summary(logits, threshold=0.9)
  assert summary['confident_fraction'] == 0.75
  expected = np.zeros(10)
  expected[3], expected[5] = 2 / 3, 1 / 3
  np.testing.assert_allclose(summary['class_histogram'], expected)
  entropy = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
  assert summary['class_entropy_bits'] == pytest.approx(entropy)
  with pytest.raises(ValueError, match=r'threshold must lie in \(0, 1\)'):
    dc.confidence_summary(logits, threshold=1.0)


def test_gaussian_baseline_matches_training_moments(config, splits):
  samples = dc.gaussian_baseline_samples(config, 4000, seed=1)
  assert samples.shape == (4000, 8, 8, 1) and samples.dtype == np.uint8
  assert samples.max() <= 16
  train = splits[0].reshape(1500, -1).astype(np.float64)
  # Rounding and clipping move the mean a little; the pixel means still track the data.
  assert np.corrcoef(samples.reshape(4000, -1).mean(0), train.mean(0))[0, 1] > 0.98


@pytest.mark.parametrize('samples, match', [
    (np.zeros((5, 8, 8, 1), np.float32), 'integer levels 0..16'),
    (np.full((5, 8, 8, 1), 17, np.uint8), r'must lie in 0..16; got values in \[17, 17\]'),
    (np.zeros((5, 16, 16, 1), np.uint8), r'shape \[N, 8, 8, 1\]'),
    (np.zeros((1, 8, 8, 1), np.uint8), 'at least 2 samples'),
])
def test_bad_samples_are_refused(config, classifier_path, samples, match):
  with pytest.raises(ValueError, match=match):
    dc.digits_metrics(samples, config, classifier_path=classifier_path)


def test_non_digits_config_is_refused(classifier_path):
  with pytest.raises(ValueError, match='needs config.data.dataset = "DIGITS"'):
    dc.digits_metrics(np.zeros((4, 8, 8, 1), np.uint8), defaults.cifar10(),
                      classifier_path=classifier_path)


def test_classifier_file_checks(classifier_path, tmp_path):
  with np.load(classifier_path, allow_pickle=False) as npz:
    arrays = {k: npz[k] for k in npz.files}
  with pytest.raises(FileNotFoundError, match='train_digits_classifier'):
    dc.load_digits_classifier(str(tmp_path / 'absent.npz'))
  bad = dict(arrays, **{'params/logits/kernel': np.zeros((10, 64), np.float32)})
  np.savez(tmp_path / 'shape.npz', **bad)
  with pytest.raises(ValueError, match=r"'logits/kernel' has shape \(10, 64\), expected "
                                       r"\(64, 10\)"):
    dc.load_digits_classifier(str(tmp_path / 'shape.npz'))
  pickled = dict(arrays, seed=np.array([None], dtype=object))
  np.savez(tmp_path / 'pickled.npz', **pickled)
  with pytest.raises(ValueError, match="'seed' is a pickled object array"):
    dc.load_digits_classifier(str(tmp_path / 'pickled.npz'))
  np.savez(tmp_path / 'other.npz', mu=np.zeros(3))
  with pytest.raises(ValueError, match='not a digits classifier file'):
    dc.load_digits_classifier(str(tmp_path / 'other.npz'))
