"""The bits/dim baselines of evaluation/baselines.py, on examples worked by hand."""
import math

import numpy as np
import pytest

from score_sde.evaluation import baselines


def test_uniform_is_log2_of_the_levels():
  assert baselines.uniform_bpd(256) == 8.0
  assert baselines.uniform_bpd(17) == pytest.approx(math.log2(17), rel=1e-15)


def test_pixel_histogram_by_hand():
  """Add-one smoothing: train levels (0, 0, 1) with L = 2 give counts (3, 2), so
  p = (0.6, 0.4), and test levels (0, 1) cost -(log2 0.6 + log2 0.4) / 2 bits."""
  bpd = baselines.pixel_histogram_bpd(np.array([[0], [0], [1]]), np.array([[0], [1]]), 2)
  assert bpd == pytest.approx(-(math.log2(0.6) + math.log2(0.4)) / 2, rel=1e-12)


def test_pixel_histogram_fits_each_position_on_its_own():
  """Two positions that always hold 0 and 1 (L = 3, two training examples): counts
  (3, 1, 1) and (1, 3, 1), so the seen pair costs -log2 0.6 per pixel and the swapped
  pair -log2 0.2; images [n, H, W, C] are flattened per example."""
  train = np.array([[0, 1], [0, 1]]).reshape(2, 1, 2, 1)
  seen = baselines.pixel_histogram_bpd(train, np.array([[0, 1]]).reshape(1, 1, 2, 1), 3)
  swapped = baselines.pixel_histogram_bpd(train, np.array([[1, 0]]).reshape(1, 1, 2, 1), 3)
  assert seen == pytest.approx(-math.log2(0.6), rel=1e-12)
  assert swapped == pytest.approx(-math.log2(0.2), rel=1e-12)


def test_pixel_histogram_refuses_examples_of_another_size():
  with pytest.raises(ValueError, match='train and test examples differ in size: 2 vs 3'):
    baselines.pixel_histogram_bpd(np.zeros((4, 2), int), np.zeros((4, 3), int), 2)
