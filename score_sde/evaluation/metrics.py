"""Sample-quality metrics on the features of a fixed network: FID, KID, IS.

Fréchet distance (FID, Heusel et al. 2017) between Gaussians fitted to two
feature sets, N(mu1, S1) and N(mu2, S2):

  d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

tr((S1 S2)^(1/2)) equals the sum of the square roots of the eigenvalues of the
symmetric PSD matrix S1^(1/2) S2 S1^(1/2); computed so (float64, `eigh`) it
needs no inverse and stays finite for singular covariances (fewer examples
than features). FRECHET_METHODS also has 'sqrtm', the standard code's
scipy.linalg.sqrtm(S1 S2) with an eps I offset when the result is not finite.

Kernel inception distance (KID, Binkowski et al. 2018): the unbiased estimate
of MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3,

  MMD^2_u = sum_{i!=j} k(x_i, x_j) / (m (m-1)) + sum_{i!=j} k(y_i, y_j) / (n (n-1))
            - 2 sum_{i,j} k(x_i, y_j) / (m n),

averaged over disjoint random blocks of both sets (like TF-GAN, which the
reference code uses; here the smaller set's blocks hold ~subset_size rows).
The blocks' estimates are independent, so their standard deviation /
sqrt(#blocks) is the standard error of the reported mean.

Inception score (IS, Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) on each
of `num_splits` consecutive splits (p(y) the split's mean prediction); the
mean and standard deviation over the splits.

Statistics files (`.npz`, read with allow_pickle=False):

  mu [F] float64, sigma [F, F] float64         mean, covariance (ddof 1)
  num_examples   int64 scalar                  examples the moments were taken over
  feature_network, dataset, split, format      strings (numpy unicode scalars)
  features [n, F] float32 (optional)           raw features of the first n examples (KID)

pytorch-fid statistics files (only mu, sigma) and the reference code's files
(only `pool_3`, the raw features) load too; their feature network is 'unknown'
(pytorch-fid's statistics match our Inception with resize_method='pytorch').
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Callable, Iterable, Iterator

import numpy as np
import scipy.linalg
import scipy.special

from score_sde import io

STATS_FORMAT = 'score_sde/feature_stats/v1'
UNKNOWN = 'unknown'


# ----------------------------------------------------------------------------
# Feature networks and statistics
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FeatureNetwork:
  """A fixed network: uint8 images [B, H, W, C] -> (features [B, F], logits [B, K])."""
  name: str                     # recorded in statistics files; must match to compare
  apply: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
  feature_dim: int
  num_classes: int


@dataclasses.dataclass(frozen=True)
class FeatureStats:
  """Gaussian moments of a feature set (+ optionally raw features for KID)."""
  mu: np.ndarray                # [F] float64
  sigma: np.ndarray             # [F, F] float64
  num_examples: int
  feature_network: str = UNKNOWN
  dataset: str = ''
  split: str = ''
  features: np.ndarray | None = None   # [n, F] float32, n <= num_examples


def apply_in_fixed_batches(fn, images: np.ndarray, batch_size: int):
  """Applies fn to [batch_size]-row chunks (the last zero-padded); concatenated outputs."""
  images = np.asarray(images)
  if len(images) == 0:
    raise ValueError('no images were given.')
  outputs = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    rows = len(chunk)
    if rows < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - rows,) + chunk.shape[1:],
                                              chunk.dtype)])
    outputs.append(tuple(np.asarray(o)[:rows] for o in fn(chunk)))
  return tuple(np.concatenate(parts) for parts in zip(*outputs))


def _batches(images) -> Iterator[np.ndarray]:
  """One array [N, ...] (as one batch) or an iterable of batches."""
  if isinstance(images, np.ndarray):
    yield images
  else:
    yield from images


def _merge_moments(moments, batch: np.ndarray):
  """Chan et al.'s pairwise update of (n, mean, sum of centred outer products)."""
  n_a, mean_a, m2_a = moments
  batch = np.asarray(batch, np.float64)
  n_b = len(batch)
  if n_b == 0:
    return moments
  mean_b = batch.mean(axis=0)
  centred = batch - mean_b
  m2_b = centred.T @ centred
  n = n_a + n_b
  delta = mean_b - mean_a
  return n, mean_a + delta * (n_b / n), m2_a + m2_b + np.outer(delta, delta) * (n_a * n_b / n)


def moments_to_stats(moments, **metadata) -> FeatureStats:
  n, mean, m2 = moments
  if n < 2:
    raise ValueError(f'a covariance needs at least 2 examples; got {n}.')
  return FeatureStats(mu=mean, sigma=m2 / (n - 1), num_examples=int(n), **metadata)


def stats_from_features(features: np.ndarray, keep_features: bool = True,
                        **metadata) -> FeatureStats:
  """Moments (float64) of a feature array [n, F]."""
  features = np.asarray(features)
  if features.ndim != 2:
    raise ValueError(f'features must be [examples, dim]; got shape {features.shape}.')
  dim = features.shape[1]
  moments = _merge_moments((0, np.zeros(dim), np.zeros((dim, dim))), features)
  kept = features.astype(np.float32) if keep_features else None
  return moments_to_stats(moments, features=kept, **metadata)


def extract(network: FeatureNetwork, images) -> tuple[np.ndarray, np.ndarray]:
  """(features [N, F], logits [N, K]) of an image array or an iterable of batches."""
  parts = [network.apply(np.asarray(batch)) for batch in _batches(images)]
  if not parts:
    raise ValueError('no images were given.')
  return (np.concatenate([p[0] for p in parts]).astype(np.float32),
          np.concatenate([p[1] for p in parts]).astype(np.float32))


def compute_statistics(network: FeatureNetwork, batches: Iterable[np.ndarray], *,
                       dataset: str = '', split: str = '',
                       keep_features: int | None = None) -> FeatureStats:
  """Streaming moments of the network's features over uint8 image batches.

  keep_features: how many raw features to keep for KID (the first ones seen);
  None keeps all (the reference code's CIFAR-10 file keeps all 50k), 0 none.
  """
  moments = (0, np.zeros(network.feature_dim), np.zeros((network.feature_dim,) * 2))
  kept, num_kept = [], 0
  for batch in _batches(batches):
    feats, _ = network.apply(np.asarray(batch))
    moments = _merge_moments(moments, feats)
    if keep_features is None or num_kept < keep_features:
      take = len(feats) if keep_features is None else min(len(feats), keep_features - num_kept)
      kept.append(np.asarray(feats[:take], np.float32))
      num_kept += take
  features = np.concatenate(kept) if kept else None
  return moments_to_stats(moments, feature_network=network.name, dataset=dataset,
                          split=split, features=features)


def save_stats(path: str, stats: FeatureStats) -> str:
  """Writes a statistics file (format in the module docstring); returns the path."""
  arrays = dict(mu=np.asarray(stats.mu, np.float64), sigma=np.asarray(stats.sigma, np.float64),
                num_examples=np.int64(stats.num_examples),
                feature_network=np.str_(stats.feature_network), dataset=np.str_(stats.dataset),
                split=np.str_(stats.split), format=np.str_(STATS_FORMAT))
  if stats.features is not None:
    arrays['features'] = np.asarray(stats.features, np.float32)
  return io.savez_atomic(path, **arrays)


def params_fingerprint(params) -> str:
  """Short hash of a parameter tree's names and float32 values (names a feature network)."""
  digest = hashlib.sha256()
  for key, value in sorted(_flatten(params).items()):
    digest.update(key.encode())
    digest.update(np.ascontiguousarray(np.asarray(value, np.float32)).tobytes())
  return digest.hexdigest()[:12]


def _flatten(tree, prefix: str = '') -> dict:
  if not hasattr(tree, 'items'):
    return {prefix: tree}
  flat = {}
  for key, value in tree.items():
    flat.update(_flatten(value, f'{prefix}/{key}' if prefix else str(key)))
  return flat


def load_stats(path: str) -> FeatureStats:
  """A statistics file written by `save_stats` (or pytorch-fid's / the reference's)."""
  arrays = io.load_npz_plain(path, 'statistics', missing_hint=(
      'Compute it first (metrics.compute_statistics + save_stats, e.g. via '
      '`launch.py stats`).'))
  text = lambda key, default: str(arrays[key]) if key in arrays else default  # noqa: E731
  features = arrays.get('features', arrays.get('pool_3'))
  if 'mu' in arrays and 'sigma' in arrays:
    mu, sigma = np.asarray(arrays['mu'], np.float64), np.asarray(arrays['sigma'], np.float64)
    num = int(arrays['num_examples']) if 'num_examples' in arrays else (
        len(features) if features is not None else 0)
    stats = FeatureStats(mu=mu, sigma=sigma, num_examples=num)
  elif features is not None:
    stats = stats_from_features(features, keep_features=False)
  else:
    raise ValueError(f'{path} holds neither mu/sigma nor raw features (keys: '
                     f'{sorted(arrays)}); it is not a statistics file.')
  if stats.mu.ndim != 1 or stats.sigma.shape != (len(stats.mu),) * 2:
    raise ValueError(f'{path}: mu has shape {stats.mu.shape} and sigma {stats.sigma.shape}; '
                     f'expected [F] and [F, F].')
  if features is not None and (features.ndim != 2 or features.shape[1] != len(stats.mu)):
    raise ValueError(f'{path}: features have shape {features.shape}, expected [n, '
                     f'{len(stats.mu)}].')
  return dataclasses.replace(
      stats, feature_network=text('feature_network', UNKNOWN), dataset=text('dataset', ''),
      split=text('split', ''),
      features=None if features is None else np.asarray(features, np.float32))


def check_compatible(stats: FeatureStats, feature_network: str, what: str = 'reference') -> None:
  """Raises when statistics were made by another feature network (unknown passes)."""
  if UNKNOWN in (stats.feature_network, feature_network):
    return
  if stats.feature_network != feature_network:
    raise ValueError(f'the {what} statistics were computed with feature network '
                     f'{stats.feature_network!r}, but the samples with {feature_network!r}; '
                     f'recompute the statistics with the same weights and resizing.')


# ----------------------------------------------------------------------------
# Fréchet distance
# ----------------------------------------------------------------------------

def _trace_sqrt_eigh(sigma1, sigma2, eps):
  del eps  # no offset needed: nothing is inverted
  # S1 = V diag(w) V^T; S1^(1/2) S2 S1^(1/2) is orthogonally similar to
  # diag(sqrt w) V^T S2 V diag(sqrt w), whose eigenvalues we need.
  w, v = np.linalg.eigh(sigma1)
  root_w = np.sqrt(np.clip(w, 0.0, None))
  inner = (v.T @ sigma2 @ v) * root_w[:, None] * root_w[None, :]
  eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
  return float(np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None))))


def _trace_sqrt_sqrtm(sigma1, sigma2, eps):
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    offset = np.eye(len(sigma1)) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    imaginary = np.max(np.abs(covmean.imag))
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f'sqrtm(S1 S2) has an imaginary component {imaginary:.3g}; use '
                       f"method='eigh'.")
    covmean = covmean.real
  return float(np.trace(covmean))


FRECHET_METHODS = {'eigh': _trace_sqrt_eigh, 'sqrtm': _trace_sqrt_sqrtm}


def _check_moments(mu, sigma, name):
  if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
    raise ValueError(f'{name}: mean has shape {mu.shape} and covariance {sigma.shape}; '
                     f'expected [F] and [F, F].')
  if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
    raise ValueError(f'{name}: the mean or covariance has NaN or infinite entries '
                     f'(are the features finite?).')
  scale = max(np.max(np.abs(sigma)), 1e-300)
  if np.max(np.abs(sigma - sigma.T)) > 1e-6 * scale:
    raise ValueError(f'{name}: the covariance is not symmetric.')


def frechet_distance(mu1, sigma1, mu2, sigma2, *, method: str = 'eigh',
                     eps: float = 1e-6) -> float:
  """d^2 between N(mu1, sigma1) and N(mu2, sigma2), in float64 (see module docstring).

  eps: the diagonal offset the 'sqrtm' method adds when sqrtm(S1 S2) is not finite.
  """
  if method not in FRECHET_METHODS:
    raise ValueError(f'unknown Fréchet method {method!r}; valid: {sorted(FRECHET_METHODS)}.')
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  _check_moments(mu1, sigma1, 'first statistics')
  _check_moments(mu2, sigma2, 'second statistics')
  if mu1.shape != mu2.shape:
    raise ValueError(f'the statistics have different feature dimensions {len(mu1)} and '
                     f'{len(mu2)}: they come from different feature networks.')
  diff = mu1 - mu2
  trace_sqrt = FRECHET_METHODS[method](sigma1, sigma2, eps)
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def fid_from_stats(stats1: FeatureStats, stats2: FeatureStats, **kwargs) -> float:
  check_compatible(stats1, stats2.feature_network)
  return frechet_distance(stats1.mu, stats1.sigma, stats2.mu, stats2.sigma, **kwargs)


# ----------------------------------------------------------------------------
# Kernel inception distance
# ----------------------------------------------------------------------------

def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0):
  """(x y^T / d + coef0)^degree, [m, n] float64."""
  return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 of two feature sets [m, F], [n, F] (m, n >= 2), cubic kernel."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  m, n = len(x), len(y)
  k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
  within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
  within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
  return float(within_x + within_y - 2.0 * k_xy.mean())


def kernel_inception_distance(x: np.ndarray, y: np.ndarray, *, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
  """(KID, its standard error) of feature sets [m, F], [n, F].

  Both sets are shuffled (seed) and cut into the same number of disjoint blocks,
  min(m, n) // subset_size but at least 2 (when both sets have >= 4 rows), so
  the smaller set's blocks hold about `subset_size` rows. KID is the mean of the
  blocks' unbiased MMD^2, the error their std / sqrt(#blocks) (NaN for 1 block).
  """
  x, y = np.asarray(x), np.asarray(y)
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
    raise ValueError(f'KID needs feature arrays [m, F] and [n, F]; got {x.shape} and '
                     f'{y.shape}.')
  if min(len(x), len(y)) < 2:
    raise ValueError(f'KID needs at least 2 examples in each set; got {len(x)} and {len(y)}.')
  if subset_size < 2:
    raise ValueError(f'subset_size must be at least 2; got {subset_size}.')
  rng = np.random.default_rng(seed)
  x, y = x[rng.permutation(len(x))], y[rng.permutation(len(y))]
  smaller = min(len(x), len(y))
  blocks = max(smaller // subset_size, min(2, smaller // 2))
  estimates = np.array([mmd2_unbiased(bx, by) for bx, by in
                        zip(np.array_split(x, blocks), np.array_split(y, blocks))])
  stderr = float(estimates.std(ddof=1) / math.sqrt(blocks)) if blocks > 1 else float('nan')
  return float(estimates.mean()), stderr


# ----------------------------------------------------------------------------
# Inception score
# ----------------------------------------------------------------------------

def inception_score(logits: np.ndarray, num_splits: int = 10) -> tuple[float, float]:
  """(mean, std) over consecutive splits of exp(E KL(p(y|x) || p(y))); logits [N, K]."""
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2:
    raise ValueError(f'logits must be [examples, classes]; got shape {logits.shape}.')
  if not 1 <= num_splits <= len(logits):
    raise ValueError(f'num_splits={num_splits} must lie in [1, {len(logits)}] (the number '
                     f'of examples).')
  log_p = scipy.special.log_softmax(logits, axis=1)
  scores = []
  for part in np.array_split(log_p, num_splits):
    log_marginal = scipy.special.logsumexp(part, axis=0) - math.log(len(part))
    kl = np.sum(np.exp(part) * (part - log_marginal), axis=1)
    scores.append(math.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------
# All metrics of a set of samples
# ----------------------------------------------------------------------------

def evaluate_samples(network: FeatureNetwork, samples, reference: FeatureStats,
                     **kwargs) -> dict:
  """FID, KID (if the reference has raw features), IS of uint8 samples.

  samples: uint8 [N, H, W, C] or an iterable of such batches; keyword arguments
  as `evaluate_features`.
  """
  check_compatible(reference, network.name)
  features, logits = extract(network, samples)
  return evaluate_features(features, logits, reference, feature_network=network.name,
                           **kwargs)


def evaluate_features(features: np.ndarray, logits: np.ndarray, reference: FeatureStats, *,
                      feature_network: str = UNKNOWN, kid_subset_size: int = 1000,
                      is_splits: int = 10, seed: int = 0, prefix: str = '') -> dict:
  """Metrics of sample features [N, F] and logits [N, K] against reference statistics.

  Returns {prefix + 'fid', 'kid', 'kid_stderr', 'is', 'is_std', 'is_splits'} (the
  KID values are None when the reference has no raw features; IS over
  min(is_splits, N) splits), 'num_samples', 'num_reference' and 'feature_network'.
  """
  check_compatible(reference, feature_network)
  samples = stats_from_features(features, keep_features=False)
  kid = stderr = None
  if reference.features is not None:
    kid, stderr = kernel_inception_distance(features, reference.features,
                                            subset_size=kid_subset_size, seed=seed)
  splits = min(is_splits, len(logits))
  score, score_std = inception_score(logits, splits)
  return {
      prefix + 'fid': frechet_distance(samples.mu, samples.sigma, reference.mu,
                                       reference.sigma),
      prefix + 'kid': kid, prefix + 'kid_stderr': stderr,
      prefix + 'is': score, prefix + 'is_std': score_std, prefix + 'is_splits': splits,
      'num_samples': int(len(features)), 'num_reference': int(reference.num_examples),
      'feature_network': feature_network,
  }


def dataset_batches(config, split: str, batch_size: int,
                    max_examples: int | None = None) -> Iterator[np.ndarray]:
  """uint8 [b, H, W, C] batches of a dataset split, in order, cropped / resized as
  config.data says (the inputs of `compute_statistics`)."""
  from score_sde import data as data_lib
  source = data_lib.get_data_source(config, split)
  stop = len(source) if max_examples is None else min(max_examples, len(source))
  for start in range(0, stop, batch_size):
    yield np.stack([data_lib.decode_image(config, source[i])
                    for i in range(start, min(start + batch_size, stop))])
