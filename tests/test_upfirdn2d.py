"""upfirdn2d and the FIR resampling ops against direct NumPy / SciPy computations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import signal

from score_sde.models import upfirdn2d as fir


def direct_upfirdn2d(x, k, up=1, down=1, pad=(0, 0)):
  """Zero insertion, pad / crop, full 2-D convolution (scipy), decimation; per image and channel."""
  x = np.asarray(x, np.float64)
  k = np.asarray(k, np.float64)
  n, h, w, c = x.shape
  z = np.zeros((n, h * up, w * up, c))
  z[:, ::up, ::up, :] = x
  p0, p1 = pad
  z = np.pad(z, [(0, 0), (max(p0, 0), max(p1, 0)), (max(p0, 0), max(p1, 0)), (0, 0)])
  z = z[:, max(-p0, 0):z.shape[1] - max(-p1, 0), max(-p0, 0):z.shape[2] - max(-p1, 0), :]
  out = np.stack([np.stack([signal.convolve2d(z[i, :, :, j], k, mode='valid')
                            for j in range(c)], axis=-1) for i in range(n)])
  return out[:, ::down, ::down, :]


def conv_same(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@pytest.mark.parametrize('up,down,pad,kernel', [
    (1, 1, (1, 2), [[1., 2., 0.5], [0., 1., 3.], [2., -1., 1.]]),   # odd, asymmetric kernel
    (2, 1, (2, 1), [1, 3, 3, 1]),                                   # even separable (as 2-D)
    (1, 2, (1, 1), [1, 3, 3, 1]),
    (2, 1, (1, 1), [1, 2, 1]),                                      # odd
    (3, 2, (2, 3), [1, 2, 3, 4, 5]),
    (2, 2, (-1, 2), [[0., 1.], [2., 3.]]),                          # negative pad = crop, 2x2
    (1, 3, (0, 0), [1, 1, 1]),
])
def test_upfirdn2d_matches_direct_computation(up, down, pad, kernel):
  k = np.asarray(kernel, np.float32)
  if k.ndim == 1:
    k = np.outer(k, k)
  x = np.random.RandomState(0).randn(2, 7, 9, 3).astype(np.float32)
  got = fir.upfirdn2d(jnp.asarray(x), k, up=up, down=down, pad=pad)
  want = direct_upfirdn2d(x, k, up, down, pad)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('up,down', [(1, 1), (2, 1), (1, 2)])
def test_upfirdn2d_with_an_asymmetric_separable_kernel(up, down):
  """A rank-one kernel outer(col, row) with col != row takes the two-pass path: the
  column taps must filter the rows (H) and the row taps the columns (W)."""
  k = np.outer([1., 2., 4.], [1., 0., -3.]).astype(np.float32)
  x = np.random.RandomState(1).randn(2, 7, 9, 2).astype(np.float32)
  got = fir.upfirdn2d(jnp.asarray(x), k, up=up, down=down, pad=(1, 2))
  want = direct_upfirdn2d(x, k, up, down, (1, 2))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_upfirdn2d_is_a_true_convolution():
  """An impulse comes out as the (unflipped) kernel."""
  x = np.zeros((1, 5, 5, 1), np.float32)
  x[0, 2, 2, 0] = 1.
  k = np.arange(9, dtype=np.float32).reshape(3, 3)
  out = np.asarray(fir.upfirdn2d(jnp.asarray(x), k, pad=(1, 1)))[0, :, :, 0]
  np.testing.assert_allclose(out[1:4, 1:4], k)


def test_resampling_shapes_and_dtypes():
  x = jnp.ones((2, 8, 8, 4), jnp.bfloat16)
  assert fir.upsample_2d(x).shape == (2, 16, 16, 4)
  assert fir.downsample_2d(x).shape == (2, 4, 4, 4)
  assert fir.upsample_2d(x).dtype == jnp.bfloat16
  w = jnp.ones((3, 3, 4, 6), jnp.bfloat16)
  assert fir.upsample_conv_2d(x, w).shape == (2, 16, 16, 6)
  assert fir.conv_downsample_2d(x, w).shape == (2, 4, 4, 6)


def test_constant_image_stays_constant_away_from_borders():
  """FIR resampling with a normalised kernel preserves constants (zeros lie outside the image)."""
  x = jnp.full((1, 16, 16, 2), 3.0)
  down = np.asarray(fir.downsample_2d(x))
  np.testing.assert_allclose(down[:, 1:-1, 1:-1], 3.0, rtol=1e-6)
  up = np.asarray(fir.upsample_2d(x))
  np.testing.assert_allclose(up[:, 2:-2, 2:-2], 3.0, rtol=1e-6)
  down_up = np.asarray(fir.upsample_2d(fir.downsample_2d(x)))
  np.testing.assert_allclose(down_up[:, 4:-4, 4:-4], 3.0, rtol=1e-6)
  # The border deficit is the kernel mass that falls outside: 1/8 of [1,3,3,1]/8 per side.
  np.testing.assert_allclose(down[0, 0, 5, 0], 3.0 * 7 / 8, rtol=1e-6)


def test_downsample_preserves_the_mean_of_a_zero_bordered_image():
  x = np.zeros((1, 16, 16, 1), np.float32)
  x[0, 4:12, 4:12, 0] = np.random.RandomState(1).rand(8, 8)
  np.testing.assert_allclose(np.asarray(fir.downsample_2d(jnp.asarray(x))).sum() * 4, x.sum(),
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(fir.upsample_2d(jnp.asarray(x))).sum() / 4, x.sum(),
                             rtol=1e-5)


@pytest.mark.parametrize('kernel', [(1, 3, 3, 1), (1, 1), (1, 2, 1)])
def test_upsample_conv_equals_upsample_then_conv(kernel):
  """The fused op equals the unfused pair once the intermediate crop cannot cut anything off."""
  rng = np.random.RandomState(2)
  x = jnp.asarray(rng.randn(2, 6, 6, 3).astype(np.float32))
  w = jnp.asarray(rng.randn(3, 3, 3, 5).astype(np.float32))
  m = 4
  x_pad = jnp.pad(x, [(0, 0), (m, m), (m, m), (0, 0)])
  unfused = conv_same(fir.upsample_2d(x_pad, kernel), w)[:, 2 * m:-2 * m, 2 * m:-2 * m]
  fused = fir.upsample_conv_2d(x, w, kernel)
  np.testing.assert_allclose(np.asarray(fused), np.asarray(unfused), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('kernel', [(1, 3, 3, 1), (1, 1), (1, 2, 1)])
def test_conv_downsample_equals_conv_then_downsample(kernel):
  rng = np.random.RandomState(3)
  x = jnp.asarray(rng.randn(2, 8, 8, 3).astype(np.float32))
  w = jnp.asarray(rng.randn(3, 3, 3, 4).astype(np.float32))
  m = 4
  x_pad = jnp.pad(x, [(0, 0), (2 * m, 2 * m), (2 * m, 2 * m), (0, 0)])
  unfused = fir.downsample_2d(conv_same(x_pad, w), kernel)[:, m:-m, m:-m]
  fused = fir.conv_downsample_2d(x, w, kernel)
  np.testing.assert_allclose(np.asarray(fused), np.asarray(unfused), rtol=1e-4, atol=1e-4)


def test_upsample_conv_matches_the_reference_transposed_conv_recipe():
  """StyleGAN2 / score_sde: flip w, swap its in/out axes, then conv_transpose(transpose_kernel=True)."""
  rng = np.random.RandomState(4)
  x = jnp.asarray(rng.randn(2, 5, 5, 3).astype(np.float32))
  w = jnp.asarray(rng.randn(3, 3, 3, 4).astype(np.float32))
  factor, k = 2, fir.setup_kernel((1, 3, 3, 1)) * 4
  p = (k.shape[0] - factor) - (w.shape[0] - 1)
  wt = jnp.transpose(w.reshape(3, 3, 3, 1, 4)[::-1, ::-1], [0, 1, 4, 3, 2]).reshape(3, 3, 4, 3)
  y = jax.lax.conv_transpose(x, wt, strides=(2, 2), padding='VALID', transpose_kernel=True,
                             dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  want = fir.upfirdn2d(y, k, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))
  np.testing.assert_allclose(np.asarray(fir.upsample_conv_2d(x, w)), np.asarray(want),
                             rtol=1e-5, atol=1e-5)


def test_naive_resampling():
  x = jnp.arange(16.).reshape(1, 4, 4, 1)
  up = fir.naive_upsample_2d(x)
  assert up.shape == (1, 8, 8, 1) and float(up[0, 1, 1, 0]) == float(x[0, 0, 0, 0])
  np.testing.assert_allclose(np.asarray(fir.naive_downsample_2d(up)), np.asarray(x))


def test_gradients_flow_through_upfirdn2d():
  x = jnp.ones((1, 4, 4, 1))
  g = jax.grad(lambda x: fir.upsample_2d(x).sum())(x)
  np.testing.assert_allclose(np.asarray(g)[0, 1:-1, 1:-1, 0], 4.0, rtol=1e-6)


def test_bad_inputs_are_explained():
  with pytest.raises(ValueError, match='rank 4'):
    fir.upfirdn2d(jnp.ones((4, 4)), np.ones((2, 2)))
  with pytest.raises(ValueError, match='sums to 0'):
    fir.setup_kernel([1, -1])
  with pytest.raises(ValueError, match='odd k'):
    fir.upsample_conv_2d(jnp.ones((1, 4, 4, 1)), jnp.ones((2, 2, 1, 1)))
