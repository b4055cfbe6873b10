"""A small CNN on the 8x8 digits: the feature network of digits-FID / KID / IS.

Inception-v3 does not fit 8x8 images, so the embedded DIGITS dataset (pixels
0..16) gets its own fixed classifier, trained on the training split in a few
seconds on CPU and frozen in a file:

  levels k in 0..16 -> x = 2 k / 16 - 1 in [-1, 1], [B, 8, 8, 1]
  -> conv 3x3, 32 (8x8) -> swish -> conv 3x3 stride 2, 64 (4x4) -> swish
  -> dense 64 -> swish  = the features f(x) [B, 64] (penultimate layer)
  -> dense 10           = the logits [B, 10]

Training: 1000 AdamW steps (lr 2e-3 with cosine decay, weight decay 1e-4) on
batches of 100 drawn with replacement, each image shifted by up to one pixel
(background fill); every random choice follows `seed`.

Metrics of uint8 samples [N, 8, 8, 1] against a split's features (test by
default), named with a 'digits_' prefix so they are never mistaken for
Inception numbers: digits_fid, digits_kid (+ standard error), digits_is (10
splits). Samples have no labels, so instead of an accuracy we report

  confident_fraction   share of samples whose top class probability is >= 0.9
                       (what the task calls the classifier's confident accuracy:
                       how many samples are recognisably *some* digit);
  class_histogram      share of each predicted class among the confident samples;
  class_entropy_bits   entropy of that histogram, log2(10) = 3.32 bits when every
                       digit is produced equally often (low: mode dropping).

Classifier file (`.npz`, read with allow_pickle=False): 'params/<layer>/<name>'
float32 arrays, 'test_accuracy', 'train_accuracy' (float64 scalars), 'seed',
'steps' (int64), 'format' (string, = CLASSIFIER_FORMAT), 'train_split' and
'test_split' (the tfds splits it was trained and tested on; absent in files
written before 2026-12-07). The default file is addressed by seed, steps and
those two splits, so a classifier trained on other splits (e.g. under
benchmarks/flows_validation.py, which holds digits out of training) is never
picked up in their place.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from score_sde import data as data_lib
from score_sde import io
from score_sde.evaluation import metrics

NUM_CLASSES = 10
FEATURE_DIM = 64
NUM_LEVELS = 17
IMAGE_SHAPE = (8, 8, 1)
CLASSIFIER_FORMAT = 'score_sde/digits_cnn/v1'
CONFIDENCE = 0.9
TRAIN_STEPS = 1000
BATCH_SIZE = 100
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 1e-4


def patches_3x3(x: jax.Array, stride: int = 1) -> jax.Array:
  """[B, H, W, C] -> [B, H / stride, W / stride, 9 C]: zero-padded 3x3 neighbourhoods.

  A dense layer on these is a 3x3 'SAME' convolution; on 8x8 images it trains
  about 3x faster on CPU than lax.conv (measured), which keeps training short.
  """
  h, w = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  shifted = [padded[:, i:i + h:stride, j:j + w:stride] for i in range(3) for j in range(3)]
  return jnp.concatenate(shifted, axis=-1)


class DigitsCNN(nn.Module):
  """x: float32 [B, 8, 8, 1] in [-1, 1] -> (features [B, 64], logits [B, 10])."""

  @nn.compact
  def __call__(self, x):
    x = nn.swish(nn.Dense(32, name='conv1')(patches_3x3(x)))              # [B, 8, 8, 32]
    x = nn.swish(nn.Dense(64, name='conv2')(patches_3x3(x, stride=2)))    # [B, 4, 4, 64]
    features = nn.swish(nn.Dense(FEATURE_DIM, name='features')(x.reshape(len(x), -1)))
    return features, nn.Dense(NUM_CLASSES, name='logits')(features)


@dataclasses.dataclass(frozen=True)
class DigitsClassifier:
  """A trained classifier: parameters and how well it did on the digits splits."""
  params: dict
  test_accuracy: float
  train_accuracy: float
  seed: int
  splits: tuple[str, str] | None = None    # tfds (train, test) splits; None: not recorded


# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------

def check_levels(images, what: str = 'images') -> np.ndarray:
  """uint8 [N, 8, 8, 1] integer levels 0..16 (also accepts [N, 8, 8]); clear errors."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.shape[1:] != IMAGE_SHAPE:
    raise ValueError(f'{what} must be digits of shape [N, 8, 8, 1]; got {images.shape}.')
  if not np.issubdtype(images.dtype, np.integer):
    raise ValueError(f'{what} must be integer levels 0..16, got dtype {images.dtype}; '
                     f'convert samples in [0, 1] with np.round(x * 16).astype(np.uint8).')
  if images.size and (images.min() < 0 or images.max() > NUM_LEVELS - 1):
    raise ValueError(f'{what} must lie in 0..16; got values in [{images.min()}, '
                     f'{images.max()}].')
  return images.astype(np.uint8)


def _to_model_input(levels: jax.Array) -> jax.Array:
  return levels.astype(jnp.float32) * (2.0 / (NUM_LEVELS - 1)) - 1.0


@jax.jit
def apply(params, levels: jax.Array):
  """(features [B, 64], logits [B, 10]) of uint8 levels [B, 8, 8, 1]."""
  return DigitsCNN().apply({'params': params}, _to_model_input(levels))


def classify(classifier: DigitsClassifier, images) -> tuple[np.ndarray, np.ndarray]:
  """(features [N, 64], logits [N, 10]) as numpy, in batches of 500."""
  images = check_levels(images)
  return metrics.apply_in_fixed_batches(
      lambda chunk: apply(classifier.params, chunk), images, 500)


def feature_network(classifier: DigitsClassifier) -> metrics.FeatureNetwork:
  name = f'digits_cnn/{metrics.params_fingerprint(classifier.params)}'
  return metrics.FeatureNetwork(name=name, apply=lambda x: classify(classifier, x),
                                feature_dim=FEATURE_DIM, num_classes=NUM_CLASSES)


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------

def _random_shift(key, image):
  """Shifts one [8, 8, 1] model-space image by -1..1 pixels each way; fills with level 0."""
  padded = jnp.pad(image, ((1, 1), (1, 1), (0, 0)), constant_values=-1.0)
  dy, dx = jax.random.randint(key, (2,), 0, 3)
  return jax.lax.dynamic_slice(padded, (dy, dx, 0), IMAGE_SHAPE)


def _loss(params, x, labels):
  _, logits = DigitsCNN().apply({'params': params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.partial(jax.jit, static_argnames=('steps',))
def _train(key, images, labels, steps: int):
  """Trained parameters after `steps` AdamW steps on (uint8 images [n, 8, 8, 1], labels [n])."""
  init_key, loop_key = jax.random.split(key)
  x_all = _to_model_input(images)
  params = DigitsCNN().init(init_key, x_all[:1])['params']
  optimizer = optax.adamw(optax.cosine_decay_schedule(LEARNING_RATE, steps),
                          weight_decay=WEIGHT_DECAY)

  def step(carry, step_index):
    params, opt_state = carry
    batch_key, shift_key = jax.random.split(jax.random.fold_in(loop_key, step_index))
    rows = jax.random.randint(batch_key, (BATCH_SIZE,), 0, len(x_all))
    x = jax.vmap(_random_shift)(jax.random.split(shift_key, BATCH_SIZE), x_all[rows])
    loss, grads = jax.value_and_grad(_loss)(params, x, labels[rows])
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), jnp.arange(steps))
  return params, losses


def _accuracy(params, images, labels) -> float:
  _, logits = metrics.apply_in_fixed_batches(lambda c: apply(params, c), images, 500)
  return float(np.mean(np.argmax(logits, axis=1) == labels))


def _labelled_split(config, split: str):
  source = data_lib.get_data_source(config, split)
  images = np.stack([np.asarray(source[i]['image']) for i in range(len(source))])
  labels = np.array([int(source[i]['label']) for i in range(len(source))])
  return check_levels(images, f'the {split} split'), labels


def _check_digits_config(config) -> None:
  if data_lib.dataset_name(config) != 'DIGITS':
    raise ValueError(f'the digits classifier needs config.data.dataset = "DIGITS"; got '
                     f'{config.data.dataset!r}.')


def train_digits_classifier(config, path: str, seed: int = 0, steps: int = TRAIN_STEPS) -> float:
  """Trains on the DIGITS training split, writes `path`; returns the test accuracy."""
  _check_digits_config(config)
  train_images, train_labels = _labelled_split(config, 'train')
  test_images, test_labels = _labelled_split(config, 'test')
  params, _ = _train(jax.random.PRNGKey(seed), jnp.asarray(train_images),
                     jnp.asarray(train_labels), steps)
  params = jax.device_get(params)
  test_accuracy = _accuracy(params, test_images, test_labels)
  train_accuracy = _accuracy(params, train_images, train_labels)
  arrays = {f'params/{k}': np.asarray(v, np.float32)
            for k, v in traverse_util.flatten_dict(params, sep='/').items()}
  train_split, test_split = training_splits(config)
  io.savez_atomic(path, **arrays, test_accuracy=np.float64(test_accuracy),
                  train_accuracy=np.float64(train_accuracy), seed=np.int64(seed),
                  steps=np.int64(steps), format=np.str_(CLASSIFIER_FORMAT),
                  train_split=np.str_(train_split), test_split=np.str_(test_split))
  return test_accuracy


def training_splits(config) -> tuple[str, str]:
  """The tfds (train, test) splits behind our 'train' and 'test' split names."""
  return data_lib.tfds_split(config, 'train'), data_lib.tfds_split(config, 'test')


@functools.cache
def _param_shapes() -> dict:
  abstract = jax.eval_shape(DigitsCNN().init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1,) + IMAGE_SHAPE, jnp.float32))['params']
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract, sep='/').items()}


def load_digits_classifier(path: str) -> DigitsClassifier:
  """The classifier stored at `path` by `train_digits_classifier` (shapes checked)."""
  arrays = io.load_npz_plain(path, 'digits classifier', missing_hint=(
      'Train it with digits_classifier.train_digits_classifier(config, path) (seconds on '
      'CPU).'))
  fmt = str(arrays.get('format', ''))
  if fmt != CLASSIFIER_FORMAT:
    raise ValueError(f'{path} has format {fmt!r}, expected {CLASSIFIER_FORMAT!r}: it is '
                     f'not a digits classifier file.')
  flat = {k[len('params/'):]: v for k, v in arrays.items() if k.startswith('params/')}
  expected = _param_shapes()
  if set(flat) != set(expected):
    raise ValueError(f'{path}: parameters {sorted(set(expected) - set(flat))} are missing and '
                     f'{sorted(set(flat) - set(expected))} unexpected; retrain the classifier.')
  for key, shape in expected.items():
    if flat[key].shape != shape:
      raise ValueError(f'{path}: parameter {key!r} has shape {flat[key].shape}, expected '
                       f'{shape}; retrain the classifier.')
  params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep='/')
  splits = ((str(arrays['train_split']), str(arrays['test_split']))
            if 'train_split' in arrays and 'test_split' in arrays else None)
  return DigitsClassifier(params=params, test_accuracy=float(arrays['test_accuracy']),
                          train_accuracy=float(arrays['train_accuracy']),
                          seed=int(arrays['seed']), splits=splits)


def default_classifier_path(config, seed: int = 0) -> str:
  """<data dir>/score_sde_digits_classifier/cnn_seed<seed>_<id>.npz, where <id> (8 hex
  digits) names the tfds splits it trains and tests on, its steps and its format."""
  train_split, test_split = training_splits(config)
  text = json.dumps({'train': train_split, 'test': test_split, 'steps': TRAIN_STEPS,
                     'format': CLASSIFIER_FORMAT}, sort_keys=True)
  return os.path.join(data_lib.data_dir(config), 'score_sde_digits_classifier',
                      f'cnn_seed{seed}_{hashlib.sha256(text.encode()).hexdigest()[:8]}.npz')


def get_digits_classifier(config, path: str | None = None, seed: int = 0) -> DigitsClassifier:
  """Loads the classifier at `path` (default: `default_classifier_path`), training it first
  if the file does not exist. A file that records other tfds splits than the config's is
  refused: its features and test accuracy belong to another division of the digits."""
  path = default_classifier_path(config, seed) if path is None else path
  if not os.path.isfile(path):
    train_digits_classifier(config, path, seed)
  classifier = load_digits_classifier(path)
  expected = training_splits(config)
  if classifier.splits is not None and classifier.splits != expected:
    raise ValueError(f'{path} was trained on tfds {classifier.splits[0]!r} and tested on '
                     f'{classifier.splits[1]!r}, but this config reads train {expected[0]!r} '
                     f'and test {expected[1]!r}; leave the classifier path at its default '
                     f'(one file per pair of splits) or train one for these splits.')
  return classifier


# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------

def confidence_summary(logits: np.ndarray, threshold: float = CONFIDENCE) -> dict:
  """confident_fraction, class_histogram (of confident samples), class_entropy_bits."""
  if not 0.0 < threshold < 1.0:
    raise ValueError(f'the confidence threshold must lie in (0, 1); got {threshold}.')
  logits = np.asarray(logits, np.float64)
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  probs /= probs.sum(axis=1, keepdims=True)
  confident = probs.max(axis=1) >= threshold
  counts = np.bincount(np.argmax(probs[confident], axis=1), minlength=logits.shape[1])
  histogram = counts / max(int(counts.sum()), 1)
  nonzero = histogram[histogram > 0]
  return {'confident_fraction': float(confident.mean()),
          'class_histogram': [float(h) for h in histogram],
          'class_entropy_bits': float(-(nonzero * np.log2(nonzero)).sum())}


def reference_stats(config, classifier: DigitsClassifier, split: str) -> metrics.FeatureStats:
  """Moments and raw features of the classifier's features on a DIGITS split."""
  network = feature_network(classifier)
  images = check_levels(data_lib.load_split_uint(config, split), f'the {split} split')
  features, _ = network.apply(images)
  return metrics.stats_from_features(features, feature_network=network.name,
                                     dataset='DIGITS', split=split)


def digits_metrics(samples, config, *, classifier_path: str | None = None, seed: int = 0,
                   reference_split: str = 'test', confidence: float = CONFIDENCE,
                   kid_subset_size: int = 50, is_splits: int = 10) -> dict:
  """All digits metrics of uint8 samples [N, 8, 8, 1] (levels 0..16) vs a DIGITS split.

  The classifier is loaded from `classifier_path` (default
  `default_classifier_path(config, seed)`, trained there if missing). Returns
  digits_fid, digits_kid, digits_kid_stderr, digits_is, digits_is_std, digits_is_splits,
  confident_fraction, class_histogram, class_entropy_bits, num_samples,
  num_reference, reference_split, feature_network, classifier_test_accuracy.
  """
  _check_digits_config(config)
  samples = check_levels(samples, 'samples')
  if len(samples) < 2:
    raise ValueError(f'digits metrics need at least 2 samples; got {len(samples)}.')
  path = default_classifier_path(config, seed) if classifier_path is None else classifier_path
  classifier = get_digits_classifier(config, path, seed)
  network = feature_network(classifier)
  reference = reference_stats(config, classifier, reference_split)
  features, logits = network.apply(samples)
  result = metrics.evaluate_features(features, logits, reference,
                                     feature_network=network.name,
                                     kid_subset_size=kid_subset_size, is_splits=is_splits,
                                     seed=seed, prefix='digits_')
  result.update(confidence_summary(logits, confidence))
  result.update(reference_split=reference_split,
                classifier_test_accuracy=classifier.test_accuracy)
  return result


def label_agreement(samples, labels, config, *, classifier_path: str | None = None,
                    seed: int = 0) -> dict:
  """How often this (independent) digits classifier reads the requested class in
  class-conditional samples: uint8 samples [N, 8, 8, 1] (levels 0..16), labels [N].

  Returns agreement (fraction), per_class agreement [10] (NaN for classes not
  requested) and the classifier's own test accuracy (the ceiling to compare with).
  """
  _check_digits_config(config)
  labels = np.asarray(labels)
  classifier = get_digits_classifier(config, classifier_path, seed)
  _, logits = classify(classifier, samples)
  hits = np.argmax(logits, axis=-1) == labels
  per_class = [float(np.mean(hits[labels == c])) if np.any(labels == c) else float('nan')
               for c in range(NUM_CLASSES)]
  return {'agreement': float(np.mean(hits)), 'per_class': per_class,
          'classifier_test_accuracy': classifier.test_accuracy}


def gaussian_baseline_samples(config, num_samples: int, seed: int = 0) -> np.ndarray:
  """uint8 [num_samples, 8, 8, 1]: draws of N(mean, covariance) of the training split's
  levels, rounded and clipped to 0..16 (a poor baseline: no digit structure beyond
  second moments)."""
  train = data_lib.load_split_uint(config, 'train').reshape(-1, math.prod(IMAGE_SHAPE))
  train = train.astype(np.float64)
  rng = np.random.default_rng(seed)
  draws = rng.multivariate_normal(train.mean(axis=0), np.cov(train, rowvar=False),
                                  size=num_samples, method='eigh')
  levels = np.clip(np.round(draws), 0, NUM_LEVELS - 1)
  return levels.astype(np.uint8).reshape((num_samples,) + IMAGE_SHAPE)
