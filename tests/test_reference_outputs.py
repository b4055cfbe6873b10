"""Speed work changed no numbers: outputs and gradients equal those frozen before it.

tests/data/reference_outputs.npz was written by tests/reference_outputs.py at
commit 749604a (before the FIR rewrite, the attention layout change and the
XLA:CPU flags); the current code, with the flags users run with, must give the
same values within float32 round-off and the same parameter trees.
"""
import numpy as np
import pytest

from tests import reference_outputs

REFERENCE_FILE = 'tests/data/reference_outputs.npz'
# float32 round-off through a few dozen layers: differences seen are <= 8e-7
# (relative); a changed kernel, scale or RNG stream moves values by >= 1e-3.
RELATIVE_TOLERANCE = 1e-5
# Leaves whose gradient is exactly zero in exact arithmetic (after zero-initialised
# output layers) carry only round-off; their error is measured against this
# fraction of the whole gradient's norm instead of their own.
NORM_FLOOR = 1e-6


@pytest.fixture(scope='module')
def reference():
  import os
  path = os.path.join(reference_outputs.ROOT, REFERENCE_FILE)
  with np.load(path) as stored:
    return {key: stored[key] for key in stored.files}


def _stored(reference, case):
  return {key.split(':', 1)[1]: value for key, value in reference.items()
          if key.startswith(case + ':')}


@pytest.mark.parametrize('case', sorted(reference_outputs.CASES))
def test_outputs_and_gradients_match_the_frozen_reference(reference, case):
  stored = _stored(reference, case)
  assert stored, f'{REFERENCE_FILE} has no case {case!r}; rerun tests/reference_outputs.py'
  current = reference_outputs.compute(case)

  assert int(current['param_count']) == int(stored['param_count'])
  np.testing.assert_array_equal(current['leaf_names'], stored['leaf_names'])

  for name in ('output', 'grad_x'):
    scale = np.max(np.abs(stored[name]))
    error = np.max(np.abs(current[name] - stored[name]))
    assert error <= RELATIVE_TOLERANCE * scale, (case, name, error, scale)

  total_norm = np.sqrt(np.sum(stored['grad_norms'] ** 2))
  leaf_scale = np.maximum(stored['grad_norms'], NORM_FLOOR * total_norm)
  projection_error = np.max(np.abs(current['grad_projections'] - stored['grad_projections']),
                            axis=1)
  worst = int(np.argmax(projection_error / leaf_scale))
  assert projection_error[worst] <= RELATIVE_TOLERANCE * leaf_scale[worst], (
      case, stored['leaf_names'][worst], projection_error[worst], leaf_scale[worst])
  norm_error = np.abs(current['grad_norms'] - stored['grad_norms'])
  assert np.all(norm_error <= RELATIVE_TOLERANCE * leaf_scale)

