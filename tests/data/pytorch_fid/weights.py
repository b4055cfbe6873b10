"""The random FID-Inception weights of make_fixture.py, in numpy only (no torch): the
fixture script and tests/test_inception.py draw the same arrays from layout.json."""
import numpy as np


def random_arrays(entries) -> dict:
  """{state-dict name: float32 array} for [(name, shape)] in state-dict order, drawn
  from numpy's legacy RandomState(0) stream (bit-stable across numpy versions);
  'num_batches_tracked' entries are skipped (they draw nothing).

  conv weights normal * sqrt(2 / fan_in); fc.weight normal * sqrt(1 / fan_in);
  batch-norm weight and running_var uniform(0.8, 1.2); every other entry (batch-norm
  bias, running_mean, fc.bias) uniform(-0.1, 0.1).
  """
  rng = np.random.RandomState(0)
  arrays = {}
  for name, shape in entries:
    if name.endswith('num_batches_tracked'):
      continue
    if name.endswith('conv.weight') or name == 'fc.weight':
      gain = 2.0 if name.endswith('conv.weight') else 1.0
      value = rng.standard_normal(shape) * np.sqrt(gain / int(np.prod(shape[1:])))
    elif name.endswith(('bn.weight', 'bn.running_var')):
      value = rng.uniform(0.8, 1.2, shape)
    else:
      value = rng.uniform(-0.1, 0.1, shape)
    arrays[name] = np.asarray(value, np.float32)
  return arrays
