"""FID / KID / IS against closed forms and direct computations; statistics files."""
import math
import os

import numpy as np
import pytest
import scipy.linalg

from score_sde.evaluation import metrics


def _random_covariance(rng, dim, eigenvalues=None):
  """Q diag(eigenvalues) Q^T with a random orthogonal Q (and its parts)."""
  q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
  if eigenvalues is None:
    eigenvalues = rng.uniform(0.1, 3.0, size=dim)
  return (q * eigenvalues) @ q.T, q, eigenvalues


def _fid_by_sqrtm(mu1, s1, mu2, s2):
  """The textbook formula, written out directly with scipy's sqrtm."""
  root = scipy.linalg.sqrtm(s1 @ s2).real
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root))


# ----------------------------------------------------------------------------
# Fréchet distance
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('dim', [1, 5, 64])
def test_frechet_matches_direct_sqrtm_on_random_gaussians(dim):
  rng = np.random.default_rng(dim)
  s1, _, _ = _random_covariance(rng, dim)
  s2, _, _ = _random_covariance(rng, dim)
  mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
  expected = _fid_by_sqrtm(mu1, s1, mu2, s2)
  for method in metrics.FRECHET_METHODS:
    got = metrics.frechet_distance(mu1, s1, mu2, s2, method=method)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9), method


def test_frechet_one_dimensional_closed_form():
  # d^2(N(m1, s1^2), N(m2, s2^2)) = (m1 - m2)^2 + (s1 - s2)^2
  got = metrics.frechet_distance([1.0], [[4.0]], [-0.5], [[0.25]])
  assert got == pytest.approx(1.5 ** 2 + (2.0 - 0.5) ** 2, rel=1e-12)


def test_frechet_ill_conditioned_matches_sqrtm_and_commuting_closed_form():
  rng = np.random.default_rng(1)
  dim = 32
  # Eigenvalues over 10 orders of magnitude (condition number 1e10).
  eig1 = np.logspace(-8, 2, dim)
  eig2 = rng.permutation(np.logspace(-8, 2, dim))
  s1, q, _ = _random_covariance(rng, dim, eig1)
  s2 = (q * eig2) @ q.T                         # commutes with s1: same eigenvectors
  mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
  # Commuting covariances: tr sqrt(S1 S2) = sum sqrt(a_i b_i), so
  # d^2 = |dmu|^2 + sum (sqrt a_i - sqrt b_i)^2 exactly.
  exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(eig1) - np.sqrt(eig2)) ** 2)
  # (rounding in the tiny eigenvalues limits any method to ~1e-9 relative here)
  assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-8)
  # A generic ill-conditioned pair: agrees with the direct sqrtm computation.
  s3, _, _ = _random_covariance(rng, dim, np.logspace(-6, 2, dim))
  direct = _fid_by_sqrtm(mu1, s1, mu2, s3)
  assert metrics.frechet_distance(mu1, s1, mu2, s3) == pytest.approx(direct, rel=1e-6)


def test_frechet_of_singular_covariances_is_finite_and_zero_on_itself():
  rng = np.random.default_rng(2)
  features = rng.normal(size=(10, 40)) * rng.uniform(0.1, 10, size=40)  # rank 9 < 40
  stats = metrics.stats_from_features(features)
  assert np.linalg.matrix_rank(stats.sigma) == 9
  trace = np.trace(stats.sigma)
  # Exact answer 0; rounding of the ~31 zero eigenvalues costs ~sqrt(eps) relative.
  assert abs(metrics.frechet_distance(stats.mu, stats.sigma, stats.mu, stats.sigma)) < 1e-6 * trace
  other = metrics.stats_from_features(rng.normal(size=(10, 40)))
  d12 = metrics.frechet_distance(stats.mu, stats.sigma, other.mu, other.sigma)
  d21 = metrics.frechet_distance(other.mu, other.sigma, stats.mu, stats.sigma)
  assert np.isfinite(d12) and d12 > 0
  assert d12 == pytest.approx(d21, rel=1e-9)
  # The standard code's eps-offset fallback agrees to about sqrt(eps) relative accuracy.
  standard = metrics.frechet_distance(stats.mu, stats.sigma, other.mu, other.sigma,
                                      method='sqrtm')
  assert standard == pytest.approx(d12, rel=1e-3)


def test_fid_is_symmetric_and_zero_against_own_statistics():
  rng = np.random.default_rng(3)
  a = rng.normal(size=(500, 16))
  b = rng.normal(size=(400, 16)) * 1.3 + 0.2
  sa, sb = metrics.stats_from_features(a), metrics.stats_from_features(b)
  assert metrics.fid_from_stats(sa, sa) == pytest.approx(0.0, abs=1e-10)
  assert metrics.fid_from_stats(sa, sb) == pytest.approx(metrics.fid_from_stats(sb, sa),
                                                         rel=1e-10)
  assert metrics.fid_from_stats(sa, sb) > 0.5


@pytest.mark.parametrize('args, match', [
    ((np.zeros(3), np.eye(3), np.zeros(4), np.eye(4)), 'different feature dimensions'),
    ((np.zeros(3), np.eye(3) + np.triu(np.ones((3, 3)), 1), np.zeros(3), np.eye(3)),
     'not symmetric'),
    ((np.zeros(3), np.full((3, 3), np.nan), np.zeros(3), np.eye(3)), 'NaN'),
    ((np.zeros(3), np.eye(2), np.zeros(3), np.eye(3)), r'expected \[F\] and \[F, F\]'),
])
def test_frechet_rejects_bad_statistics(args, match):
  with pytest.raises(ValueError, match=match):
    metrics.frechet_distance(*args)


def test_frechet_unknown_method_lists_valid_ones():
  with pytest.raises(ValueError, match=r"valid: \['eigh', 'sqrtm'\]"):
    metrics.frechet_distance([0.0], [[1.0]], [0.0], [[1.0]], method='svd')


# ----------------------------------------------------------------------------
# KID
# ----------------------------------------------------------------------------

def test_mmd2_unbiased_matches_explicit_double_sums():
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(6, 3)), rng.normal(size=(5, 3)) + 0.3
  k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
  xx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / (6 * 5)
  yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
  xy = sum(k(x[i], y[j]) for i in range(6) for j in range(5)) / (6 * 5)
  assert metrics.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_is_unbiased_with_honest_standard_errors():
  """Same distribution: KID averages to 0 and the reported errors match the spread
  over 40 trials (8 blocks each: measured ratio 1.02; an error without the
  1 / sqrt(#blocks) would be 2.8 times too large, which a window of 2 let pass)."""
  rng = np.random.default_rng(5)
  kids, errors = [], []
  for trial in range(40):
    x = rng.normal(size=(400, 8))
    y = rng.normal(size=(400, 8))
    kid, err = metrics.kernel_inception_distance(x, y, subset_size=50, seed=trial)
    kids.append(kid)
    errors.append(err)
  kids, errors = np.array(kids), np.array(errors)
  spread = kids.std(ddof=1)
  assert abs(kids.mean()) < 3.5 * spread / math.sqrt(len(kids))      # unbiased
  assert 0.7 < np.median(errors) / spread < 1.45                       # errors are honest
  assert np.mean(np.abs(kids) < 3 * errors) > 0.85


def test_kid_squared_standard_error_is_unbiased_with_two_blocks():
  """Two disjoint blocks give independent estimates e1, e2; the reported error^2,
  var(e1, e2; ddof 1) / 2, is then an unbiased estimate of Var(KID): over 1000 trials of
  one distribution mean(error^2) / var(KID) = 1 (measured 1.13, standard error ~0.07; a ddof-0
  standard deviation would give 1/2)."""
  rng = np.random.default_rng(13)
  kids, errors = [], []
  for trial in range(1000):
    kid, err = metrics.kernel_inception_distance(rng.normal(size=(40, 4)),
                                                 rng.normal(size=(40, 4)), subset_size=20,
                                                 seed=trial)
    kids.append(kid)
    errors.append(err)
  ratio = np.mean(np.square(errors)) / np.var(kids, ddof=1)
  assert 0.75 < ratio < 1.4, ratio


def test_kid_is_clearly_positive_for_different_distributions():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(400, 8))
  y = rng.normal(size=(300, 8)) * 1.5 + 0.5
  kid, err = metrics.kernel_inception_distance(x, y, subset_size=50)
  assert kid > 8 * err > 0


def test_kid_blocks_follow_the_smaller_set():
  rng = np.random.default_rng(7)
  x, y = rng.normal(size=(50, 4)), rng.normal(size=(1000, 4))
  _, err = metrics.kernel_inception_distance(x, y, subset_size=100)
  assert np.isfinite(err)     # 50 // 100 = 0 blocks -> at least 2
  _, err_one = metrics.kernel_inception_distance(x[:3], y[:3], subset_size=100)
  assert np.isnan(err_one)    # 3 rows: a single block, no error estimate


@pytest.mark.parametrize('x, y, kwargs, match', [
    (np.zeros((5, 3)), np.zeros((5, 4)), {}, r'\[m, F\] and \[n, F\]'),
    (np.zeros((1, 3)), np.zeros((5, 3)), {}, 'at least 2 examples'),
    (np.zeros((5, 3)), np.zeros((5, 3)), {'subset_size': 1}, 'subset_size must be'),
])
def test_kid_rejects_bad_input(x, y, kwargs, match):
  with pytest.raises(ValueError, match=match):
    metrics.kernel_inception_distance(x, y, **kwargs)


# ----------------------------------------------------------------------------
# Inception score
# ----------------------------------------------------------------------------

def test_inception_score_of_uniform_predictions_is_one():
  score, std = metrics.inception_score(np.zeros((100, 7)), num_splits=10)
  assert score == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize('num_classes', [2, 10, 1008])
def test_inception_score_of_confident_even_predictions_is_num_classes(num_classes):
  labels = np.tile(np.arange(num_classes), 10 * 3)   # every split holds every class 3 times
  logits = np.where(np.arange(num_classes) == labels[:, None], 50.0, -50.0)
  score, std = metrics.inception_score(logits, num_splits=10)
  assert score == pytest.approx(num_classes, rel=1e-9)
  assert std == pytest.approx(0.0, abs=1e-6 * num_classes)


def test_inception_score_matches_direct_formula():
  rng = np.random.default_rng(8)
  logits = rng.normal(size=(60, 5)) * 3
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  scores = []
  for part in np.split(probs, 3):
    marginal = part.mean(axis=0)
    scores.append(np.exp(np.mean([np.sum(p * np.log(p / marginal)) for p in part])))
  score, std = metrics.inception_score(logits, num_splits=3)
  assert score == pytest.approx(np.mean(scores), rel=1e-10)
  assert std == pytest.approx(np.std(scores), rel=1e-8)


def test_inception_score_rejects_too_many_splits():
  with pytest.raises(ValueError, match=r'num_splits=10 must lie in \[1, 5\]'):
    metrics.inception_score(np.zeros((5, 3)), num_splits=10)


# ----------------------------------------------------------------------------
# Statistics, files, feature networks
# ----------------------------------------------------------------------------

def _flatten_network(name='flatten'):
  """A stand-in feature network: features = pixels, logits = the first 3 pixels."""
  calls = []

  def apply(images):
    calls.append(images.shape)
    flat = images.reshape(len(images), -1).astype(np.float32)
    return flat, flat[:, :3]

  return metrics.FeatureNetwork(name=name, apply=apply, feature_dim=12, num_classes=3), calls


def test_streaming_statistics_match_numpy_moments():
  rng = np.random.default_rng(9)
  images = rng.integers(0, 256, size=(103, 2, 2, 3), dtype=np.uint8)
  network, _ = _flatten_network()
  batches = (images[i:i + 16] for i in range(0, 103, 16))
  stats = metrics.compute_statistics(network, batches, dataset='toy', split='train',
                                     keep_features=40)
  flat = images.reshape(103, -1).astype(np.float64)
  np.testing.assert_allclose(stats.mu, flat.mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose(stats.sigma, np.cov(flat, rowvar=False), rtol=1e-10, atol=1e-9)
  assert stats.num_examples == 103 and stats.features.shape == (40, 12)
  np.testing.assert_array_equal(stats.features, flat[:40])
  assert (stats.feature_network, stats.dataset, stats.split) == ('flatten', 'toy', 'train')


def test_apply_in_fixed_batches_pads_to_one_shape_and_trims():
  network, calls = _flatten_network()
  images = np.arange(7 * 12, dtype=np.uint8).reshape(7, 2, 2, 3)
  feats, logits = metrics.apply_in_fixed_batches(network.apply, images, 3)
  assert calls == [(3, 2, 2, 3)] * 3
  np.testing.assert_array_equal(feats, images.reshape(7, -1))
  assert logits.shape == (7, 3)


def test_stats_file_round_trip(tmp_path):
  rng = np.random.default_rng(10)
  stats = metrics.stats_from_features(rng.normal(size=(30, 5)), feature_network='net/abc',
                                      dataset='CIFAR10', split='train')
  path = metrics.save_stats(str(tmp_path / 'stats.npz'), stats)
  loaded = metrics.load_stats(path)
  np.testing.assert_array_equal(loaded.mu, stats.mu)
  np.testing.assert_array_equal(loaded.sigma, stats.sigma)
  np.testing.assert_array_equal(loaded.features, stats.features.astype(np.float32))
  assert (loaded.num_examples, loaded.feature_network, loaded.dataset, loaded.split) == (
      30, 'net/abc', 'CIFAR10', 'train')
  with np.load(path, allow_pickle=False) as npz:     # only plain arrays in the file
    assert all(npz[k].dtype != object for k in npz.files)


def test_stats_are_written_at_exactly_the_given_path(tmp_path):
  stats = metrics.stats_from_features(np.eye(3))
  path = metrics.save_stats(str(tmp_path / 'sub' / 'cifar10_train_stats'), stats)
  assert path.endswith('cifar10_train_stats') and sorted(os.listdir(tmp_path / 'sub')) == [
      'cifar10_train_stats']
  np.testing.assert_array_equal(metrics.load_stats(path).sigma, stats.sigma)


def test_foreign_stats_files_load(tmp_path):
  rng = np.random.default_rng(11)
  features = rng.normal(size=(20, 4))
  # pytorch-fid writes only mu and sigma.
  np.savez(tmp_path / 'pytorch_fid.npz', mu=features.mean(0), sigma=np.cov(features.T))
  loaded = metrics.load_stats(str(tmp_path / 'pytorch_fid.npz'))
  assert loaded.feature_network == metrics.UNKNOWN and loaded.features is None
  # The reference code stores the raw pool_3 features only.
  np.savez(tmp_path / 'reference.npz', pool_3=features.astype(np.float32))
  loaded = metrics.load_stats(str(tmp_path / 'reference.npz'))
  np.testing.assert_allclose(loaded.sigma, np.cov(features.astype(np.float32).T), rtol=1e-6)
  assert loaded.num_examples == 20 and loaded.features.shape == (20, 4)


def test_stats_loader_refuses_object_arrays_and_explains_missing_files(tmp_path):
  path = tmp_path / 'evil.npz'
  np.savez(path, mu=np.zeros(2), sigma=np.eye(2),
           dataset=np.array([{'not': 'plain'}], dtype=object))
  with pytest.raises(ValueError, match="'dataset' is a pickled object array"):
    metrics.load_stats(str(path))
  with pytest.raises(FileNotFoundError, match='does not exist.*launch.py stats'):
    metrics.load_stats(str(tmp_path / 'nothing.npz'))
  (tmp_path / 'junk.npz').write_bytes(b'not a zip file')
  with pytest.raises(ValueError, match='junk.npz is not an .npz file'):
    metrics.load_stats(str(tmp_path / 'junk.npz'))
  np.savez(tmp_path / 'empty.npz', other=np.zeros(3))
  with pytest.raises(ValueError, match='neither mu/sigma nor raw features'):
    metrics.load_stats(str(tmp_path / 'empty.npz'))


def test_evaluate_samples_against_own_statistics_and_network_mismatch():
  rng = np.random.default_rng(12)
  images = rng.integers(0, 256, size=(64, 2, 2, 3), dtype=np.uint8)
  network, _ = _flatten_network()
  reference = metrics.compute_statistics(network, [images[:32], images[32:]])
  result = metrics.evaluate_samples(network, images, reference, kid_subset_size=16,
                                    is_splits=4)
  assert result['fid'] == pytest.approx(0.0, abs=1e-8)
  flat = images.reshape(64, -1).astype(np.float32)
  assert (result['kid'], result['kid_stderr']) == pytest.approx(
      metrics.kernel_inception_distance(flat, flat, subset_size=16, seed=0))
  expected_is = metrics.inception_score(flat[:, :3], 4)
  assert (result['is'], result['is_std']) == pytest.approx(expected_is)
  assert (result['num_samples'], result['num_reference']) == (64, 64)
  other, _ = _flatten_network('another_network')
  with pytest.raises(ValueError, match="feature network 'flatten'.*'another_network'"):
    metrics.evaluate_samples(other, images, reference)
  no_raw = metrics.FeatureStats(mu=reference.mu, sigma=reference.sigma, num_examples=64)
  assert metrics.evaluate_samples(network, images, no_raw)['kid'] is None
