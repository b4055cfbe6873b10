"""Building blocks shared by the DDPM U-Net and NCSN++ / DDPM++ (Flax linen, NHWC).

The blocks follow the reference implementation (Song et al. 2021, after Ho et
al. 2020 and Karras et al. 2020) layer for layer: the same layers in the same
order, the same biases, initialisers and GroupNorm group counts, and the same
module class names, so parameter trees get the same automatic names
(`Conv_0`, `GroupNorm_1`, `NIN_3`, `ResnetBlockBigGANpp_7`, ...).

Initialisation ("DDPM init"): kernels ~ variance_scaling(scale, fan_avg,
uniform), biases zero; `scale = 0` means 1e-10, i.e. a (near-)zero layer, used
for the last layer of every residual branch and the output layer.

Precision: every layer takes a compute `dtype` (float32 or bfloat16) and keeps
its parameters in float32. Time embeddings, attention softmax and GroupNorm
statistics are computed in float32.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from score_sde.models import upfirdn2d as fir_lib

Dtype = Any
Array = jax.Array


# ----------------------------------------------------------------------------
# Initialisers, activations, small helpers
# ----------------------------------------------------------------------------

def default_init(scale: float = 1.0):
  """DDPM initialiser: variance_scaling(scale, 'fan_avg', 'uniform'); scale 0 -> 1e-10."""
  scale = 1e-10 if scale == 0 else scale
  return jax.nn.initializers.variance_scaling(scale, 'fan_avg', 'uniform')


ACTIVATIONS = {
    'elu': nn.elu,
    'relu': nn.relu,
    'lrelu': functools.partial(nn.leaky_relu, negative_slope=0.2),
    'swish': nn.swish,
}


def get_act(nonlinearity: str) -> Callable[[Array], Array]:
  """The activation named by config.model.nonlinearity."""
  try:
    return ACTIVATIONS[nonlinearity.lower()]
  except KeyError:
    raise ValueError(f'unknown config.model.nonlinearity {nonlinearity!r}; valid: '
                     f'{sorted(ACTIVATIONS)}.') from None


def compute_dtype(name: str) -> Dtype:
  """'float32' | 'bfloat16' (config.model.dtype) -> the jnp dtype."""
  dtypes = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
  try:
    return dtypes[str(name).lower()]
  except KeyError:
    raise ValueError(f'unknown config.model.dtype {name!r}; valid: {sorted(dtypes)}.') from None


def conv2d(x: Array, features: int, kernel_size: int = 3, stride: int = 1, bias: bool = True,
           init_scale: float = 1.0, dtype: Dtype = jnp.float32) -> Array:
  """k x k convolution, 'SAME' padding, DDPM initialisation (an `nn.Conv` in the caller's scope)."""
  return nn.Conv(features, kernel_size=(kernel_size, kernel_size), strides=(stride, stride),
                 padding='SAME', use_bias=bias, kernel_init=default_init(init_scale),
                 bias_init=jax.nn.initializers.zeros, dtype=dtype,
                 param_dtype=jnp.float32)(x)


def conv3x3(x: Array, features: int, stride: int = 1, bias: bool = True, init_scale: float = 1.0,
            dtype: Dtype = jnp.float32, kernel_size: int = 3) -> Array:
  """The reference's `ddpm_conv3x3`; `kernel_size` (config.model.conv_size) defaults to 3."""
  return conv2d(x, features, kernel_size, stride, bias, init_scale, dtype)


def conv1x1(x: Array, features: int, stride: int = 1, bias: bool = True, init_scale: float = 1.0,
            dtype: Dtype = jnp.float32) -> Array:
  """The reference's `ddpm_conv1x1`."""
  return conv2d(x, features, 1, stride, bias, init_scale, dtype)


def group_norm(x: Array, num_groups: Optional[int] = None, dtype: Dtype = jnp.float32) -> Array:
  """GroupNorm (eps 1e-6, affine). `num_groups=None`: min(C // 4, 32) as in NCSN++."""
  channels = x.shape[-1]
  groups = min(channels // 4, 32) if num_groups is None else num_groups
  if groups < 1 or channels % groups:
    raise ValueError(f'GroupNorm: {channels} channels cannot be split into {groups} groups; '
                     f'choose config.model.nf (and ch_mult) so that every channel count is '
                     f'a multiple of the group count (NCSN++: >= 4 channels; DDPM: multiples of 32).')
  return nn.GroupNorm(num_groups=groups, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32)(x)


def skip_sum(x: Array, h: Array, skip_rescale: bool) -> Array:
  """x + h, divided by sqrt(2) when `skip_rescale` (unit variance for independent unit branches)."""
  # A Python float is weakly typed: bfloat16 activations stay bfloat16.
  return (x + h) / math.sqrt(2.0) if skip_rescale else x + h


def dense(x: Array, features: int, dtype: Dtype = jnp.float32) -> Array:
  """Dense layer with DDPM initialisation (zero bias)."""
  return nn.Dense(features, kernel_init=default_init(), bias_init=jax.nn.initializers.zeros,
                  dtype=dtype, param_dtype=jnp.float32)(x)


# ----------------------------------------------------------------------------
# Time / noise-level embeddings (computed in float32)
# ----------------------------------------------------------------------------

def get_timestep_embedding(timesteps: Array, embedding_dim: int,
                           max_positions: int = 10000) -> Array:
  """Sinusoidal embedding [B] -> [B, embedding_dim] (DDPM / transformers).

  emb[:, j] = sin(t w_j), emb[:, half + j] = cos(t w_j), w_j = max_positions^(-j/(half-1)).
  """
  timesteps = jnp.asarray(timesteps, jnp.float32)
  if timesteps.ndim != 1:
    raise ValueError(f'timesteps must have shape [B]; got {timesteps.shape}.')
  half_dim = embedding_dim // 2
  if half_dim < 2:
    raise ValueError(f'embedding_dim must be >= 4 (config.model.nf); got {embedding_dim}.')
  freq = math.log(max_positions) / (half_dim - 1)
  freq = jnp.exp(jnp.arange(half_dim, dtype=jnp.float32) * -freq)
  emb = timesteps[:, None] * freq[None, :]
  emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=1)
  if embedding_dim % 2 == 1:
    emb = jnp.pad(emb, [[0, 0], [0, 1]])
  return emb


class GaussianFourierProjection(nn.Module):
  """Random Fourier features [sin(2 pi x W), cos(2 pi x W)], W ~ N(0, scale^2), not trained.

  W is a parameter (so it is saved with the model) behind a stop_gradient.
  """
  embedding_size: int = 256
  scale: float = 1.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    w = self.param('W', jax.nn.initializers.normal(stddev=self.scale), (self.embedding_size,),
                   jnp.float32)
    w = jax.lax.stop_gradient(w)
    x_proj = jnp.asarray(x, jnp.float32)[:, None] * w[None, :] * 2 * jnp.pi
    return jnp.concatenate([jnp.sin(x_proj), jnp.cos(x_proj)], axis=-1)


# ----------------------------------------------------------------------------
# Network-in-network (1x1 "dense over channels") and attention
# ----------------------------------------------------------------------------

class NIN(nn.Module):
  """y = x W + b over the channel axis (params `W` [C_in, C_out], `b`)."""
  num_units: int
  init_scale: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_dim = x.shape[-1]
    w = self.param('W', default_init(scale=self.init_scale), (in_dim, self.num_units), jnp.float32)
    b = self.param('b', jax.nn.initializers.zeros, (self.num_units,), jnp.float32)
    x = x.astype(self.dtype)
    return jnp.einsum('...c,cd->...d', x, w.astype(self.dtype)) + b.astype(self.dtype)


class AttnBlockpp(nn.Module):
  """Self-attention over all H*W positions (single head), residual (DDPM++ / NCSN++).

  GroupNorm -> q, k, v (NIN) -> softmax(q k^T / sqrt(C)) v -> NIN(init_scale) -> + x.
  `num_groups=None` uses min(C // 4, 32) groups.
  """
  skip_rescale: bool = False
  init_scale: float = 0.0
  num_groups: Optional[int] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, height, width, c = x.shape
    h = group_norm(x, self.num_groups, self.dtype)
    q = NIN(c, dtype=self.dtype)(h)
    k = NIN(c, dtype=self.dtype)(h)
    v = NIN(c, dtype=self.dtype)(h)
    # Positions flattened to [B, HW, C]: batched matmuls with plain layouts (the
    # 5-D einsum form made XLA:CPU transpose the [B, HW, HW] weights in the
    # backward pass; same values to round-off, vjp at 16x16x256 11.8 -> 8.8 ms).
    q, k, v = (jnp.reshape(a, (b, height * width, c)) for a in (q, k, v))
    w = jnp.einsum('bqc,bkc->bqk', q, k, preferred_element_type=jnp.float32) * (c ** -0.5)
    w = jax.nn.softmax(w, axis=-1).astype(v.dtype)
    h = jnp.reshape(jnp.einsum('bqk,bkc->bqc', w, v), (b, height, width, c))
    h = NIN(c, init_scale=self.init_scale, dtype=self.dtype)(h)
    return skip_sum(x.astype(h.dtype), h, self.skip_rescale)


class AttnBlock(AttnBlockpp):
  """The DDPM attention block: GroupNorm with 32 groups, zero-initialised output, no rescale."""
  skip_rescale: bool = False
  init_scale: float = 0.0
  num_groups: Optional[int] = 32


# ----------------------------------------------------------------------------
# Resampling
# ----------------------------------------------------------------------------

class Conv2d(nn.Module):
  """k x k convolution fused with FIR up- or down-sampling (StyleGAN2); params `weight`, `bias`."""
  fmaps: int
  kernel: int = 3
  up: bool = False
  down: bool = False
  resample_kernel: Sequence[int] = fir_lib.DEFAULT_KERNEL
  use_bias: bool = True
  init_scale: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.up and self.down:
      raise ValueError('Conv2d: up and down are exclusive.')
    w = self.param('weight', default_init(self.init_scale),
                   (self.kernel, self.kernel, x.shape[-1], self.fmaps), jnp.float32)
    x = x.astype(self.dtype)
    w = w.astype(self.dtype)
    if self.up:
      x = fir_lib.upsample_conv_2d(x, w, k=self.resample_kernel)
    elif self.down:
      x = fir_lib.conv_downsample_2d(x, w, k=self.resample_kernel)
    else:
      x = jax.lax.conv_general_dilated(x, w, window_strides=(1, 1), padding='SAME',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.use_bias:
      b = self.param('bias', jax.nn.initializers.zeros, (x.shape[-1],), jnp.float32)
      x = x + b.astype(self.dtype).reshape((1, 1, 1, -1))
    return x


class Upsample(nn.Module):
  """2x upsampling: nearest (+ conv) or FIR (`fir`; + fused conv when `with_conv`)."""
  out_ch: Optional[int] = None
  with_conv: bool = False
  fir: bool = False
  fir_kernel: Sequence[int] = fir_lib.DEFAULT_KERNEL
  conv_size: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    out_ch = self.out_ch if self.out_ch else x.shape[-1]
    if not self.fir:
      h = fir_lib.naive_upsample_2d(x, 2)
      if self.with_conv:
        h = conv3x3(h, out_ch, dtype=self.dtype, kernel_size=self.conv_size)
    elif not self.with_conv:
      h = fir_lib.upsample_2d(x, self.fir_kernel, factor=2)
    else:
      h = Conv2d(out_ch, kernel=self.conv_size, up=True, resample_kernel=self.fir_kernel,
                 dtype=self.dtype)(x)
    if not self.with_conv and h.shape[-1] != out_ch:
      raise ValueError(f'Upsample without a conv cannot change channels ({x.shape[-1]} -> {out_ch}).')
    return h


class Downsample(nn.Module):
  """2x downsampling: stride-2 conv or 2x2 average pool, or FIR (+ fused conv when `with_conv`)."""
  out_ch: Optional[int] = None
  with_conv: bool = False
  fir: bool = False
  fir_kernel: Sequence[int] = fir_lib.DEFAULT_KERNEL
  conv_size: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    out_ch = self.out_ch if self.out_ch else x.shape[-1]
    if not self.fir:
      if self.with_conv:
        # 'SAME' with stride 2 on an even size pads (0, 1): the reference's F.pad(0, 1) + conv.
        x = conv3x3(x, out_ch, stride=2, dtype=self.dtype, kernel_size=self.conv_size)
      else:
        x = fir_lib.naive_downsample_2d(x, 2)
    elif not self.with_conv:
      x = fir_lib.downsample_2d(x, self.fir_kernel, factor=2)
    else:
      x = Conv2d(out_ch, kernel=self.conv_size, down=True, resample_kernel=self.fir_kernel,
                 dtype=self.dtype)(x)
    if not self.with_conv and x.shape[-1] != out_ch:
      raise ValueError(f'Downsample without a conv cannot change channels ({x.shape[-1]} -> {out_ch}).')
    return x


# ----------------------------------------------------------------------------
# Residual blocks
# ----------------------------------------------------------------------------

class ResnetBlockDDPMpp(nn.Module):
  """DDPM residual block (NCSN++ variant).

  h = Conv(act(GN(x))) + Dense(act(temb)); h = Conv_init(Dropout(act(GN(h))));
  shortcut NIN (or conv) when the channel count changes; out = x + h
  (/ sqrt 2 with `skip_rescale`). The Dense exists only when temb is given.
  """
  act: Callable[[Array], Array]
  out_ch: Optional[int] = None
  conv_shortcut: bool = False
  dropout: float = 0.1
  skip_rescale: bool = False
  init_scale: float = 0.0
  num_groups: Optional[int] = None
  conv_size: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Optional[Array] = None, train: bool = False) -> Array:
    c = x.shape[-1]
    out_ch = self.out_ch if self.out_ch else c
    h = self.act(group_norm(x, self.num_groups, self.dtype))
    h = conv3x3(h, out_ch, dtype=self.dtype, kernel_size=self.conv_size)
    if temb is not None:
      h = h + dense(self.act(temb), out_ch, self.dtype)[:, None, None, :]
    h = self.act(group_norm(h, self.num_groups, self.dtype))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = conv3x3(h, out_ch, init_scale=self.init_scale, dtype=self.dtype,
                kernel_size=self.conv_size)
    if c != out_ch:
      if self.conv_shortcut:
        x = conv3x3(x, out_ch, dtype=self.dtype, kernel_size=self.conv_size)
      else:
        x = NIN(out_ch, dtype=self.dtype)(x)
    return skip_sum(x.astype(h.dtype), h, self.skip_rescale)


class ResnetBlockDDPM(ResnetBlockDDPMpp):
  """The DDPM U-Net block: GroupNorm with 32 groups, zero-initialised last conv, no rescale."""
  dropout: float = 0.1
  skip_rescale: bool = False
  init_scale: float = 0.0
  num_groups: Optional[int] = 32


class ResnetBlockBigGANpp(nn.Module):
  """BigGAN-style residual block, optionally resampling (`up` / `down`) both branches.

  h = act(GN(x)); resample h and x (FIR or nearest / mean); h = Conv(h) +
  Dense(act(temb)); h = Conv_init(Dropout(act(GN(h)))); shortcut = Conv1x1(x)
  when the channels change or the block resamples; out = (x + h) / sqrt 2 with
  `skip_rescale`.
  """
  act: Callable[[Array], Array]
  up: bool = False
  down: bool = False
  out_ch: Optional[int] = None
  dropout: float = 0.1
  fir: bool = False
  fir_kernel: Sequence[int] = fir_lib.DEFAULT_KERNEL
  skip_rescale: bool = True
  init_scale: float = 0.0
  conv_size: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Optional[Array] = None, train: bool = False) -> Array:
    c = x.shape[-1]
    out_ch = self.out_ch if self.out_ch else c
    h = self.act(group_norm(x, None, self.dtype))
    if self.up:
      if self.fir:
        h = fir_lib.upsample_2d(h, self.fir_kernel, factor=2)
        x = fir_lib.upsample_2d(x, self.fir_kernel, factor=2)
      else:
        h = fir_lib.naive_upsample_2d(h, factor=2)
        x = fir_lib.naive_upsample_2d(x, factor=2)
    elif self.down:
      if self.fir:
        h = fir_lib.downsample_2d(h, self.fir_kernel, factor=2)
        x = fir_lib.downsample_2d(x, self.fir_kernel, factor=2)
      else:
        h = fir_lib.naive_downsample_2d(h, factor=2)
        x = fir_lib.naive_downsample_2d(x, factor=2)
    h = conv3x3(h, out_ch, dtype=self.dtype, kernel_size=self.conv_size)
    if temb is not None:
      h = h + dense(self.act(temb), out_ch, self.dtype)[:, None, None, :]
    h = self.act(group_norm(h, None, self.dtype))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = conv3x3(h, out_ch, init_scale=self.init_scale, dtype=self.dtype,
                kernel_size=self.conv_size)
    if c != out_ch or self.up or self.down:
      x = conv1x1(x, out_ch, dtype=self.dtype)
    return skip_sum(x.astype(h.dtype), h, self.skip_rescale)


class Combine(nn.Module):
  """Merge a skip input x into y: Conv1x1(x) to y's channels, then concatenate ('cat') or add ('sum')."""
  method: str = 'cat'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, y: Array) -> Array:
    h = conv1x1(x, y.shape[-1], dtype=self.dtype)
    if self.method == 'cat':
      return jnp.concatenate([h, y.astype(h.dtype)], axis=-1)
    if self.method == 'sum':
      return h + y
    raise ValueError(f'unknown config.model.progressive_combine {self.method!r}; valid: cat, sum.')


# ----------------------------------------------------------------------------
# Checks and label helpers shared by the U-Nets
# ----------------------------------------------------------------------------

NORMALIZATIONS = ('groupnorm',)


def choice(value: str, valid, key: str) -> str:
  """`value` lower-cased if it is one of `valid`, else an error naming config.model.<key>."""
  v = str(value).lower()
  if v not in valid:
    raise ValueError(f'unknown config.model.{key} {value!r}; valid: {list(valid)}.')
  return v


def geometric_sigmas(sigma_max: float, sigma_min: float, num_scales: int) -> np.ndarray:
  """[num_scales] noise levels, geometric from sigma_max down to sigma_min (the NCSN ordering)."""
  return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_scales)).astype(np.float32)


def unet_resolutions(image_size: int, num_levels: int) -> Tuple[int, ...]:
  """Feature-map sizes of the U-Net levels: image_size / 2^i, i < num_levels."""
  return tuple(image_size // (2 ** i) for i in range(num_levels))


def check_unet_geometry(image_size: int, ch_mult, attn_resolutions) -> None:
  """Errors (naming the config keys) for sizes the U-Net cannot realise."""
  factor = 2 ** (len(ch_mult) - 1)
  if image_size <= 0 or image_size % factor:
    raise ValueError(
        f'config.data.image_size = {image_size} is not divisible by the total '
        f'down-sampling factor 2^(len(config.model.ch_mult) - 1) = {factor} '
        f'(ch_mult = {tuple(ch_mult)}); use an image size that is a multiple of {factor} '
        f'or fewer levels in ch_mult.')
  levels = unet_resolutions(image_size, len(ch_mult))
  missing = [r for r in attn_resolutions if r not in levels]
  if missing:
    raise ValueError(
        f'config.model.attn_resolutions = {tuple(attn_resolutions)} contains {missing}, '
        f'which never occur: with image_size {image_size} and ch_mult {tuple(ch_mult)} '
        f'the feature maps are {levels}; pick attention resolutions among these.')


def check_labels(labels, batch: int) -> jax.Array:
  """Labels as a [B] array (a scalar is broadcast); anything else is an error."""
  labels = jnp.asarray(labels)
  if labels.ndim == 0:
    labels = jnp.broadcast_to(labels, (batch,))
  if labels.shape != (batch,):
    raise ValueError(f'labels must have shape [B] = ({batch},) (one noise level or time per '
                     f'example); got shape {labels.shape}.')
  return labels


def check_input(x, image_size: int, num_channels: int) -> None:
  """Errors for inputs that are not [B, image_size, image_size, num_channels]."""
  if x.ndim != 4:
    raise ValueError(f'the network expects NHWC images [B, H, W, C]; got shape {x.shape}.')
  if x.shape[-1] != num_channels:
    raise ValueError(f'input has {x.shape[-1]} channels but config.data.num_channels = '
                     f'{num_channels}; set config.data.num_channels = {x.shape[-1]} or pass '
                     f'[B, H, W, {num_channels}] images.')
  if x.shape[1] != image_size or x.shape[2] != image_size:
    raise ValueError(f'input images are {x.shape[1]}x{x.shape[2]} but config.data.image_size = '
                     f'{image_size}; set config.data.image_size to the data\'s size.')
