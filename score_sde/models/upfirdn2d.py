"""FIR resampling of NHWC images (StyleGAN2's upfirdn2d), in pure JAX.

`upfirdn2d(x, k, up, down, pad)` does, per image and channel,

  1. upsample: insert `up - 1` zeros after every pixel (rows and columns),
  2. pad with `pad = (p0, p1)` zeros before / after (negative values crop),
  3. convolve with the 2-D FIR kernel `k` (a true convolution; the output
     keeps only positions where the kernel lies inside the padded image),
  4. downsample: keep every `down`-th pixel, starting with the first,

so that for an input of size H the output has size
  (H * up + p0 + p1 - kh) // down + 1.

On top of it, with a kernel k normalised to sum 1 (`setup_kernel`):

  upsample_2d(x, k, f)         = upfirdn2d(x, k * f^2, up=f, pad=((p+1)//2 + f - 1, p//2)), p = kh - f
  downsample_2d(x, k, f)       = upfirdn2d(x, k, down=f, pad=((p+1)//2, p//2))
  upsample_conv_2d(x, w, k, f) = upsample_2d followed by a conv with w, fused
  conv_downsample_2d(x, w, k, f) = a conv with w followed by downsample_2d, fused

These are the resampling ops of NCSN++ (Song et al. 2021, after Karras et al.
2020), with the default kernel [1, 3, 3, 1]: a constant image stays constant
away from the borders, up- and down-sampling preserve the signal's mean.
Everything works for float32 and bfloat16 inputs (the kernel takes x's dtype).
"""
from __future__ import annotations

from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_KERNEL = (1, 3, 3, 1)

Pad = Union[int, Sequence[int]]


def setup_kernel(k) -> np.ndarray:
  """A 2-D FIR kernel normalised to sum 1; a 1-D kernel means the separable `outer(k, k)`."""
  k = np.asarray(k, dtype=np.float64)
  if k.ndim == 1:
    k = np.outer(k, k)
  if k.ndim != 2 or k.shape[0] != k.shape[1] or k.size == 0:
    raise ValueError(f'FIR kernel must be 1-D or square 2-D; got shape {k.shape}.')
  total = k.sum()
  if total == 0:
    raise ValueError('FIR kernel sums to 0 and cannot be normalised; pass e.g. [1, 3, 3, 1].')
  return (k / total).astype(np.float32)


def _pair(pad: Pad) -> tuple[int, int]:
  if isinstance(pad, (int, np.integer)):
    return int(pad), int(pad)
  pad = tuple(int(p) for p in pad)
  if len(pad) != 2:
    raise ValueError(f'pad must be an int or a pair (before, after); got {pad}.')
  return pad


def upfirdn2d(x: jax.Array, kernel, up: int = 1, down: int = 1, pad: Pad = (0, 0)) -> jax.Array:
  """Upsample (zero insertion), pad, FIR-filter and downsample a batch of images.

  Args:
    x: images [N, H, W, C].
    kernel: FIR kernel [kh, kw] (used as given: not normalised, not made separable).
    up: integer upsampling factor (zeros inserted after each pixel).
    down: integer downsampling factor (every `down`-th pixel kept).
    pad: zeros added (before, after) on both spatial axes, after upsampling;
      negative values crop.

  Returns:
    [N, (H*up + p0 + p1 - kh)//down + 1, (W*up + p0 + p1 - kw)//down + 1, C], x's dtype.
  """
  if x.ndim != 4:
    raise ValueError(f'upfirdn2d expects NHWC images of rank 4; got shape {x.shape}.')
  if int(up) != up or int(down) != down or up < 1 or down < 1:
    raise ValueError(f'up and down must be integers >= 1; got up={up}, down={down}.')
  up, down = int(up), int(down)
  k = np.asarray(kernel, dtype=np.float32)
  if k.ndim != 2:
    raise ValueError(f'upfirdn2d expects a 2-D kernel; got shape {k.shape} '
                     f'(use setup_kernel for a separable 1-D kernel).')
  p0, p1 = _pair(pad)
  kh, kw = k.shape
  _, h, w, c = x.shape
  out_h = h * up + p0 + p1 - kh
  out_w = w * up + p0 + p1 - kw
  if out_h < 0 or out_w < 0:
    raise ValueError(f'upfirdn2d: kernel {k.shape} does not fit the padded image '
                     f'({h * up + p0 + p1} x {w * up + p0 + p1}); increase pad.')

  # Zero insertion (interior padding) plus the trailing up-1 zeros of the last
  # pixel, then pad / crop; lax.pad accepts negative edge padding (crop).
  zero = jnp.zeros((), x.dtype)
  x = jax.lax.pad(x, zero, [(0, 0, 0),
                            (p0, p1 + up - 1, up - 1),
                            (p0, p1 + up - 1, up - 1),
                            (0, 0, 0)])
  # True convolution = cross-correlation with the flipped kernel, written as a
  # sum of strided slices (one per tap; two 1-D passes when the kernel is
  # separable, as setup_kernel's are). XLA fuses it into one elementwise loop.
  # It replaces a depthwise conv_general_dilated (feature_group_count = C),
  # which XLA:CPU runs slowly: with it the FIR resampling took about half of a
  # small NCSN++ train step (the figures: README, 'Speed on this machine';
  # benchmarks/train.py measures them), with the same loss value.
  flipped = k[::-1, ::-1]
  size_h, size_w = out_h // down + 1, out_w // down + 1
  column, row = _rank_one_factors(flipped)
  if column is not None:
    x = _correlate_1d(x, column, axis=1, stride=down, out_len=size_h)
    return _correlate_1d(x, row, axis=2, stride=down, out_len=size_w)
  out = jnp.zeros((x.shape[0], size_h, size_w, c), x.dtype)
  for i in range(kh):                     # a general kernel: one 1-D pass per kernel row
    if np.any(flipped[i]):
      rows = jax.lax.slice_in_dim(x, i, i + out_h + 1, stride=down, axis=1)
      out = out + _correlate_1d(rows, flipped[i], axis=2, stride=down, out_len=size_w)
  return out


def _rank_one_factors(k: np.ndarray):
  """(column [kh], row [kw]) with k = outer(column, row) exactly, else (None, None)."""
  index = np.unravel_index(np.argmax(np.abs(k)), k.shape)
  if k[index] == 0:
    return None, None
  column, row = k[:, index[1]], k[index[0], :] / k[index]
  if not np.array_equal(np.outer(column, row).astype(np.float32), k.astype(np.float32)):
    return None, None
  return column, row


def _correlate_1d(x: jax.Array, taps: np.ndarray, axis: int, stride: int,
                  out_len: int) -> jax.Array:
  """sum_i taps[i] x[..., i + stride n, ...] along `axis`, n < out_len."""
  out = None
  for i, weight in enumerate(taps):
    if weight == 0:
      continue
    term = jax.lax.slice_in_dim(x, i, i + (out_len - 1) * stride + 1, stride=stride,
                                axis=axis) * jnp.asarray(weight, x.dtype)
    out = term if out is None else out + term
  return out


def upsample_2d(x: jax.Array, k=DEFAULT_KERNEL, factor: int = 2, gain: float = 1.0) -> jax.Array:
  """[N, H, W, C] -> [N, H*f, W*f, C]: zero insertion then the FIR filter k (scaled by gain f^2)."""
  k = setup_kernel(k) * (gain * factor ** 2)
  p = k.shape[0] - factor
  return upfirdn2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: jax.Array, k=DEFAULT_KERNEL, factor: int = 2, gain: float = 1.0) -> jax.Array:
  """[N, H, W, C] -> [N, H/f, W/f, C]: the FIR filter k (scaled by gain) then decimation."""
  k = setup_kernel(k) * gain
  p = k.shape[0] - factor
  return upfirdn2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


def _check_weight(w: jax.Array) -> int:
  if w.ndim != 4 or w.shape[0] != w.shape[1] or w.shape[0] % 2 != 1:
    raise ValueError(f'conv weight must be [k, k, in, out] with odd k; got shape {w.shape}.')
  return w.shape[0]


def upsample_conv_2d(x: jax.Array, w: jax.Array, k=DEFAULT_KERNEL, factor: int = 2,
                     gain: float = 1.0) -> jax.Array:
  """`upsample_2d(x, k)` followed by a 'SAME' convolution with w [kc, kc, C_in, C_out], fused.

  The transposed (strided) convolution is done first and the FIR filter after
  it, padding only once, as in StyleGAN2; away from the borders this equals the
  unfused pair of operations.
  """
  kc = _check_weight(w)
  k = setup_kernel(k) * (gain * factor ** 2)
  p = (k.shape[0] - factor) - (kc - 1)
  # Transposed convolution with stride f and 'VALID' padding (TF conv2d_transpose):
  # zero insertion, full correlation with w, output size H*f + max(kc - f, 0).
  x = jax.lax.conv_general_dilated(
      x, w.astype(x.dtype), window_strides=(1, 1),
      padding=[(kc - 1, factor - 1 + max(kc - factor, 0))] * 2,
      lhs_dilation=(factor, factor),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return upfirdn2d(x, k, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(x: jax.Array, w: jax.Array, k=DEFAULT_KERNEL, factor: int = 2,
                       gain: float = 1.0) -> jax.Array:
  """A 'SAME' convolution with w [kc, kc, C_in, C_out] followed by `downsample_2d(., k)`, fused."""
  kc = _check_weight(w)
  k = setup_kernel(k) * gain
  p = (k.shape[0] - factor) + (kc - 1)
  x = upfirdn2d(x, k, pad=((p + 1) // 2, p // 2))
  return jax.lax.conv_general_dilated(
      x, w.astype(x.dtype), window_strides=(factor, factor), padding='VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def naive_upsample_2d(x: jax.Array, factor: int = 2) -> jax.Array:
  """Nearest-neighbour upsampling: every pixel repeated f x f times."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def naive_downsample_2d(x: jax.Array, factor: int = 2) -> jax.Array:
  """Mean over non-overlapping f x f blocks (H and W must be multiples of f)."""
  n, h, w, c = x.shape
  if h % factor or w % factor:
    raise ValueError(f'naive_downsample_2d: image size {h}x{w} is not a multiple of {factor}.')
  x = x.reshape(n, h // factor, factor, w // factor, factor, c)
  return x.mean(axis=(2, 4))
