"""Speed work changed no numbers: outputs and gradients equal those frozen before it.

tests/data/reference_outputs.npz was written by tests/reference_outputs.py at
commit 749604a (before the FIR rewrite, the attention layout change and the
XLA:CPU flags); the current code, with the flags users run with, must give the
same values within float32 round-off and the same parameter trees, both as
jitted and as compiled with the train step's per-program options.
"""
import numpy as np
import pytest

from score_sde.cpu import xla_flags as xla_cpu
from tests import reference_outputs

REFERENCE_FILE = 'tests/data/reference_outputs.npz'
# float32 round-off through a few dozen layers: differences seen are <= 8e-7
# (relative); a changed kernel, scale or RNG stream moves values by >= 1e-3.
RELATIVE_TOLERANCE = 1e-5
# Leaves whose gradient is exactly zero in exact arithmetic (layers after a
# zero-initialised output layer; attention's key bias, which softmax ignores)
# carry only round-off; their error is measured against this fraction of the
# whole gradient's norm instead of their own.
NORM_FLOOR = 1e-4


@pytest.fixture(scope='module')
def reference():
  import os
  path = os.path.join(reference_outputs.ROOT, REFERENCE_FILE)
  with np.load(path) as stored:
    return {key: stored[key] for key in stored.files}


def _stored(reference, case):
  return {key.split(':', 1)[1]: value for key, value in reference.items()
          if key.startswith(case + ':')}


def _compiled_with_step_options(jitted, *args):
  """The program as the train and eval steps are built (xla_cpu.compile_step)."""
  compiled, used = xla_cpu.compile_step(jitted, *args, options=xla_cpu.STEP_COMPILER_OPTIONS)
  assert used == xla_cpu.STEP_COMPILER_OPTIONS      # compiled with them, not fallen back
  return compiled


@pytest.mark.parametrize('compile_fn', [None, _compiled_with_step_options],
                         ids=['jit', 'step-options'])
@pytest.mark.parametrize('case', sorted(reference_outputs.CASES))
def test_outputs_and_gradients_match_the_frozen_reference(reference, case, compile_fn):
  stored = _stored(reference, case)
  assert stored, f'{REFERENCE_FILE} has no case {case!r}; rerun tests/reference_outputs.py'
  current = reference_outputs.compute(case, compile_fn)

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



def test_attention_equals_the_former_5d_einsum_form():
  """AttnBlockpp's [B, HW, C] matmuls against the 5-D einsum form it replaced, forward
  and backward, with every layer non-zero (init_scale 1)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from score_sde.models import layers

  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 32))
  block = layers.AttnBlockpp(init_scale=1.0)
  params = block.init(jax.random.PRNGKey(1), x)['params']

  def former(params, x):
    b, height, width, c = x.shape
    h = nn.GroupNorm(num_groups=min(c // 4, 32), epsilon=1e-6).apply(
        {'params': params['GroupNorm_0']}, x)
    nin = lambda i, y: y @ params[f'NIN_{i}']['W'] + params[f'NIN_{i}']['b']  # noqa: E731
    q, k, v = nin(0, h), nin(1, h), nin(2, h)
    w = jnp.einsum('bhwc,bHWc->bhwHW', q, k) * (c ** -0.5)
    w = jax.nn.softmax(jnp.reshape(w, (b, height, width, height * width)), axis=-1)
    w = jnp.reshape(w, (b, height, width, height, width))
    return x + nin(3, jnp.einsum('bhwHW,bHWc->bhwc', w, v))

  current = lambda params, x: block.apply({'params': params}, x)  # noqa: E731
  cotangent = jax.random.normal(jax.random.PRNGKey(2), x.shape)
  (out_new, vjp_new), (out_old, vjp_old) = (jax.vjp(f, params, x) for f in (current, former))
  assert float(jnp.max(jnp.abs(out_old - x))) > 0.01          # attention is not a no-op here
  np.testing.assert_allclose(out_new, out_old, rtol=1e-5, atol=1e-5)
  grads_new, grads_old = jax.tree.leaves(vjp_new(cotangent)), jax.tree.leaves(vjp_old(cotangent))
  overall = max(float(jnp.max(jnp.abs(g))) for g in grads_old)
  for new, old in zip(grads_new, grads_old):
    # The key bias's gradient is zero in exact arithmetic (softmax ignores it):
    # round-off only (~4e-8 here), so it is measured against 1 % of the largest
    # gradient; every other leaf here is above that.
    scale = max(float(jnp.max(jnp.abs(old))), 1e-2 * overall)
    assert float(jnp.max(jnp.abs(new - old))) <= RELATIVE_TOLERANCE * scale
