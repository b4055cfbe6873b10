"""Sample grids and likelihood baselines.

Baselines put a model's bits/dim in context, on the same split and the same
quantisation levels L:
  uniform     log2 L bits/dim (every level equally likely);
  histogram   each pixel position an independent categorical distribution over
              the L levels, fitted to the training split with add-one
              smoothing; bits/dim = mean over test pixels of -log2 p(level).
A continuous model evaluated on uniformly dequantised data gives an upper
bound on its discrete negative log-likelihood, so it compares directly.
"""
from __future__ import annotations

import math

import numpy as np


def uniform_bpd(num_levels: int) -> float:
  """Bits/dim of the uniform distribution over the levels."""
  return math.log2(num_levels)


def pixel_histogram_bpd(train_levels: np.ndarray, test_levels: np.ndarray,
                        num_levels: int) -> float:
  """Bits/dim of independent per-pixel categorical distributions (add-one smoothing).

  train_levels, test_levels: integer arrays [n, ...] with values in [0, L).
  """
  train = np.asarray(train_levels, np.int64).reshape(len(train_levels), -1)
  test = np.asarray(test_levels, np.int64).reshape(len(test_levels), -1)
  if train.shape[1] != test.shape[1]:
    raise ValueError(f'train and test examples differ in size: {train.shape[1]} vs '
                     f'{test.shape[1]}.')
  dims = np.arange(train.shape[1])
  counts = np.ones((train.shape[1], num_levels))
  np.add.at(counts, (np.broadcast_to(dims, train.shape), train), 1.0)
  log_probs = np.log2(counts / counts.sum(axis=1, keepdims=True))
  return float(-np.mean(log_probs[np.broadcast_to(dims, test.shape), test]))
