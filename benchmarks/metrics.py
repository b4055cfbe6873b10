"""Reference numbers of the sample-quality metrics; prints one JSON object per measurement.

  python benchmarks/metrics.py digits [--seed 0] [--data-dir DIR] [--classifier PATH]
  python benchmarks/metrics.py inception [--batch 8] [--image-size 299]

digits: trains the digits classifier (or loads --classifier), then scores
  floor_test_vs_train       the test split against the training split's features
  floor_train_vs_test       297 random training digits against the test split
  gaussian_vs_<split>       draws of N(mean, covariance) of the training digits,
                            rounded / clipped to 0..16, N in {64, 297, 1000}
  (the N = 64 rows use the first 64 test digits / 64 draws: FID grows as N falls,
  so compare a model's samples with the baselines at the same N).
inception: compile time and images / s of Inception-v3 features with random
  weights (the speed does not depend on the values), and the time of one
  2048-d Fréchet distance and of KID on 2 x 2000 features.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import defaults  # noqa: E402
from score_sde.cpu import process  # noqa: E402
from score_sde import data
from score_sde.evaluation import metrics  # noqa: E402
from score_sde.evaluation import digits_classifier as dc  # noqa: E402


def _environment() -> dict:
  return {'backend': jax.default_backend(), 'cpu_count': os.cpu_count(),
          'load_average_1min': round(os.getloadavg()[0], 2), 'jax': jax.__version__}


def _emit(**record) -> None:
  print(json.dumps(record), flush=True)


def _rounded(result: dict) -> dict:
  return {k: (round(v, 4) if isinstance(v, float) else
              [round(x, 3) for x in v] if isinstance(v, list) else v)
          for k, v in result.items()}


def digits(args) -> None:
  config = defaults.digits()
  if args.data_dir:
    config.data.data_dir = args.data_dir
  path = args.classifier or os.path.join(tempfile.mkdtemp(), 'cnn.npz')
  if not os.path.isfile(path):
    start = time.perf_counter()
    dc.train_digits_classifier(config, path, seed=args.seed)
    _emit(measurement='digits_classifier_training', seconds=round(time.perf_counter() - start, 2),
          path=path, **_environment())
  classifier = dc.load_digits_classifier(path)
  _emit(measurement='digits_classifier', test_accuracy=classifier.test_accuracy,
        train_accuracy=classifier.train_accuracy, seed=classifier.seed,
        feature_network=dc.feature_network(classifier).name)
  train, test = data.load_split_uint(config, 'train'), data.load_split_uint(config, 'test')
  rng = np.random.default_rng(args.seed)
  runs = [('floor_test_vs_train', test, 'train'), ('floor_test64_vs_train', test[:64], 'train'),
          ('floor_train297_vs_test', train[rng.permutation(1500)[:297]], 'test')]
  for n in (64, 297, 1000):
    samples = dc.gaussian_baseline_samples(config, n, seed=args.seed)
    runs += [(f'gaussian{n}_vs_test', samples, 'test'), (f'gaussian{n}_vs_train', samples, 'train')]
  for name, samples, split in runs:
    start = time.perf_counter()
    result = dc.digits_metrics(samples, config, classifier_path=path, seed=args.seed,
                               reference_split=split)
    _emit(measurement=name, seconds=round(time.perf_counter() - start, 2), **_rounded(result))


def inception_speed(args) -> None:
  from score_sde.evaluation import inception
  params = inception.init_params(jax.random.PRNGKey(0))
  images = np.random.default_rng(0).integers(0, 256, (args.batch, 32, 32, 3), np.uint8)
  start = time.perf_counter()
  inception.features(params, images, image_size=args.image_size)
  first = time.perf_counter() - start
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    inception.features(params, images, image_size=args.image_size)
    times.append(time.perf_counter() - start)
  _emit(measurement='inception_features', batch=args.batch, image_size=args.image_size,
        compile_and_first_call_s=round(first, 2),
        images_per_s=round(args.batch / float(np.median(times)), 2), **_environment())
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(3000, 2048)), rng.normal(size=(3000, 2048)) + 0.1
  sa, sb = metrics.stats_from_features(a), metrics.stats_from_features(b)
  for method in metrics.FRECHET_METHODS:
    start = time.perf_counter()
    value = metrics.frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma, method=method)
    _emit(measurement=f'frechet_2048_{method}', seconds=round(time.perf_counter() - start, 2),
          value=value, **_environment())
  start = time.perf_counter()
  kid, err = metrics.kernel_inception_distance(a[:2000], b[:2000], subset_size=1000)
  _emit(measurement='kid_2x2000_2048d', seconds=round(time.perf_counter() - start, 2),
        kid=kid, stderr=err, **_environment())


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='what', required=True)
  digits_parser = sub.add_parser('digits')
  digits_parser.add_argument('--seed', type=int, default=0)
  digits_parser.add_argument('--data-dir', default='')
  digits_parser.add_argument('--classifier', default='', help='existing classifier .npz')
  speed_parser = sub.add_parser('inception')
  speed_parser.add_argument('--batch', type=int, default=8)
  speed_parser.add_argument('--image-size', type=int, default=299)
  speed_parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args(argv)
  digits(args) if args.what == 'digits' else inception_speed(args)


if __name__ == '__main__':
  process.prepare(restart_for_huge_pages=False)   # XLA:CPU flags, as launch.py
  main()
