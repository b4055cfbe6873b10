"""NCSN (Song & Ermon 2019) and NCSNv2 (Song & Ermon 2020): RefineNet score networks.

Both estimate s_theta(x, i) ~ grad_x log p_{sigma_i}(x) for the geometric noise
levels sigma_i = sigma_max (sigma_min / sigma_max)^(i / (N - 1)), i = 0..N-1
(label 0 = sigma_max, N = config.model.num_scales).

  NCSN      conditions every normalisation on the noise index i
            (conditional InstanceNorm++, one (gamma, alpha, beta) per level)
            and outputs s_theta(x, i) directly.
  NCSNv2    is unconditional, s_theta(x, i) = f_theta(x) / sigma_i
            ("output scaling", technique 3 of NCSNv2; `scale_by_sigma`).

Architecture (as in the reference implementation): a 3x3 conv, a ResNet
backbone of stages with two residual blocks each (norm, act, conv, norm, act,
conv); stages double the channels and either halve the resolution by
conv + 2x2 mean pooling or keep it and dilate the convolutions (2, then 4);
then a RefineNet decoder from the deepest stage up, each RefineBlock =
residual conv units (RCU) on every input, multi-resolution fusion (3x3 convs,
bilinear upsampling, sum), chained residual pooling (5x5 pools + 3x3 convs),
an output RCU; finally norm, act, 3x3 conv to the data channels.

  NCSN, NCSNv2 (32/64 px):  stages nf, 2nf, 2nf (dil 2), 2nf (dil 4); resolution /2
  NCSNv2_128:               nf, 2nf, 2nf, 4nf (dil 2), 4nf (dil 4);  resolution /4
  NCSNv2_256:               nf, 2nf, 2nf, 2nf, 4nf (dil 2), 4nf (dil 4); resolution /8

Decoder widths follow the original JAX reference (yang-song/score_sde): for
NCSN / NCSNv2 the third RefineBlock outputs 2nf channels. The PyTorch port
(and ermongroup/ncsnv2) use nf there (model.refine_mults = (2, 2, 1, 1)), which
gives fewer parameters (NCSNv2 CIFAR-10: 29,694,083 instead of 33,970,563);
the 128 / 256 px variants agree in both.

Options for the numerics of score_sde_pytorch (set by `import_checkpoint` for
its NCSN / NCSNv2 files; absent from the configs, so the Flax original's apply):
  model.refine_mults             RefineBlock widths (x nf) from the deepest level up,
                                 e.g. (2, 2, 1, 1) for the port's NCSN / NCSNv2
  model.norm_unbiased_variance   InstanceNorm++ / VarianceNorm divide by n - 1
                                 where the port calls torch.var
  model.resize_align_corners     bilinear upsampling in the fusion blocks with
                                 align_corners=True (corner pixels map onto corners)

The conditional blocks of NCSN normalise before every conv of the decoder and
use average pooling in the chained residual pooling; NCSNv2's decoder has no
normalisation and uses max pooling. Convolutions use the PyTorch default
initialisation (uniform, bound 1 / sqrt(fan_in)), as the reference does.

Inputs: x [B, H, W, C] in [0, 1] (mapped to 2x - 1) or already centred in
[-1, 1] (`config.data.centered`); labels [B] integer noise indices (ints, or
floats holding integers). Output: [B, H, W, C] float32.
"""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from score_sde.models import layers
from score_sde.models import normalization as norms

# config.model.interpolation -> jax.image.resize method
INTERPOLATIONS = {'bilinear': 'bilinear', 'nearest_neighbor': 'nearest'}


def discrete_sigmas(sigma_max: float, sigma_min: float, num_scales: int) -> np.ndarray:
  """[num_scales] geometric noise levels, index 0 = sigma_max (float64)."""
  return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_scales))


def _is_concrete(value) -> bool:
  return not isinstance(value, jax.core.Tracer)


def noise_indices(labels, batch_size: int, num_scales: int) -> jax.Array:
  """Checks and converts labels (scalar or [B], int or integral float) to int32 [B].

  Concrete labels outside [0, num_scales) or with a fractional part raise;
  under `jit` they cannot, and out-of-range labels then give NaN outputs.
  """
  labels = jnp.asarray(labels)
  if labels.ndim == 0:
    labels = jnp.broadcast_to(labels, (batch_size,))
  if labels.shape != (batch_size,):
    raise ValueError(f'labels must have shape [B] = ({batch_size},) (one noise '
                     f'index per example); got {labels.shape}.')
  if _is_concrete(labels):
    values = np.asarray(labels, np.float64)
    if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
      raise ValueError(
          'NCSN / NCSNv2 take integer noise indices i in [0, num_scales) '
          f'(0 = sigma_max); got non-integer labels, e.g. {values[:4]}. Train '
          'them with the discrete VE objective (training.continuous = False).')
    if values.min() < 0 or values.max() >= num_scales:
      raise ValueError(
          f'noise indices must lie in [0, num_scales) = [0, {num_scales}); got '
          f'values in [{values.min():g}, {values.max():g}]. Check '
          'config.model.num_scales against the labels you pass.')
  if jnp.issubdtype(labels.dtype, jnp.floating):
    labels = jnp.round(labels)
  return labels.astype(jnp.int32)


# ----------------------------------------------------------------------------
# Convolutions and pooling
# ----------------------------------------------------------------------------

def _uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def conv(x, features: int, kernel_size: int = 3, dilation: int = 1,
         use_bias: bool = True, dtype=None):
  """'SAME' conv with the PyTorch default initialisation (NCSN's ncsn_conv).

  Must be called inside a compact module method (the conv becomes its child).
  """
  fan_in = kernel_size * kernel_size * x.shape[-1]
  return nn.Conv(
      features, (kernel_size, kernel_size), padding='SAME',
      kernel_dilation=(dilation, dilation), use_bias=use_bias, dtype=dtype,
      kernel_init=nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform'),
      bias_init=_uniform(1 / math.sqrt(fan_in)))(x)


def _align_corners_weights(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] linear interpolation weights with the corners aligned:
  output i samples the input at i (size_in - 1) / (size_out - 1)."""
  weights = np.zeros((size_out, size_in))
  scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
  for i in range(size_out):
    source = i * scale
    low = min(int(np.floor(source)), size_in - 1)
    high = min(low + 1, size_in - 1)
    frac = source - low
    weights[i, low] += 1.0 - frac
    weights[i, high] += frac
  return weights


def resize_bilinear_align_corners(x, shape: tuple[int, int]):
  """Bilinear resize of x [B, H, W, C] to [B, *shape, C] with align_corners=True
  (PyTorch's F.interpolate option; jax.image.resize samples at pixel centres).
  Separable: one interpolation matrix per axis, applied at full precision."""
  rows = jnp.asarray(_align_corners_weights(x.shape[1], shape[0]), x.dtype)
  cols = jnp.asarray(_align_corners_weights(x.shape[2], shape[1]), x.dtype)
  full = jax.lax.Precision.HIGHEST
  x = jnp.einsum('oh,bhwc->bowc', rows, x, precision=full)
  return jnp.einsum('pw,bowc->bopc', cols, x, precision=full)


def mean_pool(x):
  """2x2 mean pooling, stride 2: [B, H, W, C] -> [B, H/2, W/2, C] (H, W even)."""
  return (x[:, ::2, ::2] + x[:, 1::2, ::2] + x[:, ::2, 1::2] + x[:, 1::2, 1::2]) / 4


# ----------------------------------------------------------------------------
# Blocks. `normalize` builds a norm layer called as norm(x, labels); None
# means no normalisation (the unconditional decoder of NCSNv2).
# ----------------------------------------------------------------------------

class ResidualBlock(nn.Module):
  """norm, act, conv, norm, act, conv (+ shortcut).

  resample='down': the first conv keeps the channels; with dilation 1 the
  second conv is followed by 2x2 mean pooling (shortcut: 1x1 conv + pooling),
  with dilation > 1 nothing is pooled (shortcut: dilated 3x3 conv).
  resample=None: a shortcut conv only if the channel count changes.
  """
  features: int
  normalize: Callable
  act: Callable
  resample: Optional[str] = None
  dilation: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, labels):
    in_features = x.shape[-1]
    out, dil, dt = self.features, self.dilation, self.dtype
    h = self.act(self.normalize()(x, labels))
    if self.resample == 'down':
      h = conv(h, in_features, dilation=dil, dtype=dt)
      h = self.act(self.normalize()(h, labels))
      if dil > 1:
        h = conv(h, out, dilation=dil, dtype=dt)
        shortcut = conv(x, out, dilation=dil, dtype=dt)
      else:
        h = mean_pool(conv(h, out, dtype=dt))
        shortcut = mean_pool(conv(x, out, kernel_size=1, dtype=dt))
    elif self.resample is None:
      h = conv(h, out, dilation=dil, dtype=dt)
      h = self.act(self.normalize()(h, labels))
      h = conv(h, out, dilation=dil, dtype=dt)
      if out == in_features:
        shortcut = x
      elif dil > 1:
        shortcut = conv(x, out, dilation=dil, dtype=dt)
      else:
        shortcut = conv(x, out, kernel_size=1, dtype=dt)
    else:
      raise ValueError(f"resample must be None or 'down'; got {self.resample!r}.")
    return h + shortcut


class RCUBlock(nn.Module):
  """Residual conv units: n_blocks x (n_stages x [norm], act, 3x3 conv w/o bias)."""
  features: int
  n_blocks: int
  act: Callable
  normalize: Optional[Callable] = None
  n_stages: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, labels):
    for _ in range(self.n_blocks):
      residual = x
      for _ in range(self.n_stages):
        if self.normalize is not None:
          x = self.normalize()(x, labels)
        x = conv(self.act(x), self.features, use_bias=False, dtype=self.dtype)
      x = x + residual
    return x


class CRPBlock(nn.Module):
  """Chained residual pooling: act, then n_stages x ([norm], 5x5 pool, 3x3 conv),
  each stage's output added to the running sum. Max pooling, or average pooling
  (zero padding counted) in the conditional NCSN decoder."""
  features: int
  act: Callable
  normalize: Optional[Callable] = None
  n_stages: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, labels):
    x = self.act(x)
    path = x
    pool = nn.max_pool if self.normalize is None else nn.avg_pool
    for _ in range(self.n_stages):
      if self.normalize is not None:
        path = self.normalize()(path, labels)
      path = pool(path, (5, 5), strides=(1, 1), padding='SAME')
      path = conv(path, self.features, use_bias=False, dtype=self.dtype)
      x = path + x
    return x


class MSFBlock(nn.Module):
  """Multi-resolution fusion: sum_k resize([norm], 3x3 conv (x_k)) to `shape`."""
  features: int
  shape: tuple[int, int]
  interpolation: str = 'bilinear'
  normalize: Optional[Callable] = None
  align_corners: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, xs, labels):
    total = 0.0
    for x in xs:
      h = x if self.normalize is None else self.normalize()(x, labels)
      h = conv(h, self.features, dtype=self.dtype)
      if h.shape[1:3] != tuple(self.shape) and self.align_corners:
        h = resize_bilinear_align_corners(h, tuple(self.shape))
      elif h.shape[1:3] != tuple(self.shape):
        h = jax.image.resize(h, (h.shape[0], *self.shape, h.shape[-1]),
                             INTERPOLATIONS[self.interpolation])
      total = total + h
    return total


class RefineBlock(nn.Module):
  """RefineNet block: RCU(2) per input, fusion (unless `start`), CRP, RCU(1 or 3)."""
  features: int
  shape: tuple[int, int]
  act: Callable
  normalize: Optional[Callable] = None
  interpolation: str = 'bilinear'
  start: bool = False
  end: bool = False
  align_corners: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, xs, labels):
    kw = dict(act=self.act, normalize=self.normalize, dtype=self.dtype)
    hs = [RCUBlock(x.shape[-1], n_blocks=2, **kw)(x, labels) for x in xs]
    if self.start:
      h = hs[0]
      if h.shape[-1] != self.features:
        raise ValueError(f'the first RefineBlock needs {self.features} input '
                         f'channels; got {h.shape[-1]}.')
    else:
      h = MSFBlock(self.features, self.shape, self.interpolation, self.normalize,
                   self.align_corners, self.dtype)(hs, labels)
    h = CRPBlock(self.features, self.act, self.normalize, dtype=self.dtype)(h, labels)
    return RCUBlock(self.features, n_blocks=3 if self.end else 1, **kw)(h, labels)


# ----------------------------------------------------------------------------
# The networks
# ----------------------------------------------------------------------------

def _required(section, key: str, where: str):
  if key not in section:
    raise ValueError(f'{where}.{key} is missing from the config; set it in the '
                     f'experiment file.')
  return section[key]


class RefineNet(nn.Module):
  """Shared body of NCSN / NCSNv2; subclasses fix the architecture constants.

  STAGES: per backbone stage (channel multiplier of nf, first block resamples
  'down', dilation); REFINE_MULTS: features (x nf) of the RefineBlocks from the
  deepest level up (config.model.refine_mults overrides them); CONDITIONAL:
  normalisations conditioned on the noise index.
  """
  STAGES: ClassVar[tuple] = ()
  REFINE_MULTS: ClassVar[tuple] = ()
  CONDITIONAL: ClassVar[bool] = False
  SCALE_BY_SIGMA: ClassVar[bool] = True

  nf: int = 128
  num_channels: int = 3
  image_size: int = 32
  num_scales: int = 10
  sigma_min: float = 0.01
  sigma_max: float = 1.0
  normalization: str = 'InstanceNorm++'
  nonlinearity: str = 'elu'
  interpolation: str = 'bilinear'
  centered: bool = False
  scale_by_sigma: bool = True
  refine_mults: Optional[tuple] = None
  norm_unbiased_variance: bool = False
  resize_align_corners: bool = False
  dtype: str = 'float32'

  def __post_init__(self):
    name = type(self).__name__
    norms.check_normalization(self.normalization, self.CONDITIONAL)
    layers.get_act(self.nonlinearity)
    layers.compute_dtype(self.dtype)
    if self.interpolation not in INTERPOLATIONS:
      raise ValueError(f'unknown interpolation {self.interpolation!r} '
                       f'(config.model.interpolation); valid: {sorted(INTERPOLATIONS)}.')
    if self.nf < 1 or self.num_channels < 1 or self.num_scales < 1:
      raise ValueError(f'{name} needs nf, num_channels and num_scales >= 1; got '
                       f'{self.nf}, {self.num_channels}, {self.num_scales}.')
    if self.scale_by_sigma and not 0 < self.sigma_min < self.sigma_max:
      raise ValueError(f'{name} needs 0 < sigma_min < sigma_max; got '
                       f'{self.sigma_min}, {self.sigma_max}.')
    self._check_size(self.image_size, 'config.data.image_size')
    self._check_refine_mults()
    if self.resize_align_corners and self.interpolation != 'bilinear':
      raise ValueError('config.model.resize_align_corners applies to bilinear resizing; '
                       f'config.model.interpolation is {self.interpolation!r}.')
    super().__post_init__()

  def _check_refine_mults(self):
    if self.refine_mults is None:
      return
    mults, deepest = tuple(self.refine_mults), self.STAGES[-1][0]
    if (len(mults) != len(self.STAGES)
        or not all(isinstance(m, (int, np.integer)) and m >= 1 for m in mults)
        or mults[0] != deepest):
      raise ValueError(
          f'config.model.refine_mults = {mults} does not fit {type(self).__name__}: it '
          f'needs {len(self.STAGES)} positive integers (one per RefineBlock, deepest '
          f'first), the first equal to the deepest stage\'s {deepest}; this network\'s '
          f'own are {self.REFINE_MULTS}.')

  def decoder_mults(self) -> tuple:
    """RefineBlock widths (x nf), deepest level first."""
    return self.REFINE_MULTS if self.refine_mults is None else tuple(self.refine_mults)

  @classmethod
  def downsampling_factor(cls) -> int:
    """Total spatial reduction of the backbone (mean-pooled stages)."""
    return 2 ** sum(1 for _, down, dil in cls.STAGES if down and dil == 1)

  def _check_size(self, size: int, what: str):
    factor = self.downsampling_factor()
    if size < factor or size % factor:
      raise ValueError(
          f'{type(self).__name__} halves the resolution {int(math.log2(factor))} '
          f'time(s), so image sides must be positive multiples of {factor}; '
          f'{what} = {size}. Pick another size or model (ncsnv2 for < 96 px, '
          'ncsnv2_128 for 96-128 px, ncsnv2_256 for 129-256 px).')

  @classmethod
  def from_config(cls, config):
    model, data = config.model, config.data
    return cls(
        nf=int(_required(model, 'nf', 'config.model')),
        num_channels=int(data.num_channels),
        image_size=int(data.image_size),
        num_scales=int(model.num_scales),
        sigma_min=float(model.sigma_min),
        sigma_max=float(model.sigma_max),
        normalization=str(model.get('normalization', 'InstanceNorm++')),
        nonlinearity=str(model.get('nonlinearity', 'elu')),
        interpolation=str(model.get('interpolation', 'bilinear')),
        centered=bool(data.centered),
        scale_by_sigma=bool(model.get('scale_by_sigma', cls.SCALE_BY_SIGMA)),
        refine_mults=(tuple(model.refine_mults) if model.get('refine_mults') is not None
                      else None),
        norm_unbiased_variance=bool(model.get('norm_unbiased_variance', False)),
        resize_align_corners=bool(model.get('resize_align_corners', False)),
        dtype=str(model.get('dtype', 'float32')))

  def sigmas(self) -> np.ndarray:
    """[num_scales] noise levels, index 0 = sigma_max."""
    return discrete_sigmas(self.sigma_max, self.sigma_min, self.num_scales)

  @nn.compact
  def __call__(self, x, labels, train: bool = False):
    """x: [B, H, W, C]; labels: [B] noise indices. Returns [B, H, W, C] float32."""
    del train  # no dropout or batch statistics
    if x.ndim != 4:
      raise ValueError(f'{type(self).__name__} takes images [B, H, W, C]; got '
                       f'shape {x.shape}.')
    if x.shape[-1] != self.num_channels:
      raise ValueError(f'input has {x.shape[-1]} channels but config.data.num_channels'
                       f' = {self.num_channels}; x must be NHWC.')
    self._check_size(x.shape[1], 'the input height')
    self._check_size(x.shape[2], 'the input width')
    idx = noise_indices(labels, x.shape[0], self.num_scales)
    act = layers.get_act(self.nonlinearity)
    dt = layers.compute_dtype(self.dtype)
    num_classes = self.num_scales if self.CONDITIONAL else 0
    block_norm = norms.get_normalization(self.normalization, self.CONDITIONAL, num_classes,
                                         self.norm_unbiased_variance)
    decoder_norm = block_norm if self.CONDITIONAL else None

    h = x if self.centered else 2 * x - 1.0
    h = conv(h.astype(dt), self.nf, dtype=dt)
    levels = []
    for mult, down, dil in self.STAGES:
      h = ResidualBlock(mult * self.nf, block_norm, act, 'down' if down else None,
                        dil, dt)(h, idx)
      h = ResidualBlock(mult * self.nf, block_norm, act, None, dil, dt)(h, idx)
      levels.append(h)

    ref = None
    deepest_first = levels[::-1]
    for k, (level, mult) in enumerate(zip(deepest_first, self.decoder_mults())):
      xs = [level] if ref is None else [level, ref]
      ref = RefineBlock(mult * self.nf, tuple(level.shape[1:3]), act, decoder_norm,
                        self.interpolation, start=k == 0, end=k == len(levels) - 1,
                        align_corners=self.resize_align_corners, dtype=dt)(xs, idx)

    h = act(block_norm()(ref, idx))
    h = conv(h, x.shape[-1], dtype=dt).astype(jnp.float32)
    if self.scale_by_sigma:
      sigmas = jnp.asarray(self.sigmas(), jnp.float32)
      used = jnp.take(sigmas, jnp.where(idx < self.num_scales, idx, self.num_scales),
                      mode='fill', fill_value=jnp.nan)
      h = h / used[:, None, None, None]
    return h


class NCSN(RefineNet):
  """NCSN (Song & Ermon 2019): RefineNet with conditional InstanceNorm++ on the
  noise index; no output scaling unless config.model.scale_by_sigma."""
  STAGES = ((1, False, 1), (2, True, 1), (2, True, 2), (2, True, 4))
  REFINE_MULTS = (2, 2, 2, 1)
  CONDITIONAL = True
  SCALE_BY_SIGMA = False
  scale_by_sigma: bool = False


class NCSNv2(RefineNet):
  """NCSNv2 for 32-64 px (reference name 'ncsnv2_64'): unconditional, output / sigma_i."""
  STAGES = ((1, False, 1), (2, True, 1), (2, True, 2), (2, True, 4))
  REFINE_MULTS = (2, 2, 2, 1)


class NCSNv2_128(RefineNet):  # noqa: N801  (reference name)
  """NCSNv2 for 96-128 px: one more stage (4nf) and two mean-pooled stages."""
  STAGES = ((1, False, 1), (2, True, 1), (2, True, 1), (4, True, 2), (4, True, 4))
  REFINE_MULTS = (4, 2, 2, 1, 1)


class NCSNv2_256(RefineNet):  # noqa: N801  (reference name)
  """NCSNv2 for 129-256 px: three mean-pooled stages before the dilated ones."""
  STAGES = ((1, False, 1), (2, True, 1), (2, True, 1), (2, True, 1), (4, True, 2),
            (4, True, 4))
  REFINE_MULTS = (4, 2, 2, 2, 1, 1)
