"""A noise-conditional Wide-ResNet classifier p_phi(y | x_t, t) (Flax linen, NHWC).

Class-conditional sampling adds grad_x log p_phi(y | x_t) to the score (Song
et al. 2021, section 5 and appendix I.1), so the classifier must read *noisy*
images x_t = m(t) x_0 + s(t) z at every noise level. The network is the
Wide-ResNet of Zagoruyko & Komodakis (2016), WRN-d-k with d = 6 n + 4 and n
`blocks_per_group`, k = `channel_multiplier` (WRN-28-10: n = 4, k = 10, as in
the reference's `wideresnet_noise_conditional.py`), with the noise level added
inside every block:

  x      <- (x - mean(x)) / max(std(x), 1 / sqrt(D))   per image (optional)
  e      = Fourier(log sigma) [B, 2E]   ('fourier': label = sigma = s(t))
         | sinusoid(label)    [B, E]    ('positional': label = 999 t)
  temb   = Dense_4E(swish(Dense_4E(e)))
  h      = Conv3x3_c0(x),  c0 = base_channels (16)
  group g = 1, 2, 3 with c_g = c0 2^(g-1) k channels, stride 1, 2, 2; n blocks each:
    block: u = act(x);  v = Conv3x3_c(u, stride);  v += Dense_c(swish(temb));
           v = Conv3x3_c(dropout(act(v)));  out = v + shortcut
    shortcut = x (the first block of group 1: act(x)), average-pooled by the
               stride and zero-padded to c channels (no parameters)
  logits = Dense_K(mean_HW(act(h)))     [B, K]

act = GroupNorm (min(C / 4, 32) groups) then ReLU; GroupNorm instead of
batch norm keeps every example independent, so per-example input gradients
are exact. Convolutions: He-normal (fan_out) initialisation without bias; the
output layer U[-1/sqrt(K), 1/sqrt(K)].

Call: `model.apply({'params': p}, x [B, H, W, C], labels [B], train)` ->
logits [B, K] float32; `labels` is the noise level s(t) ('fourier') or 999 t
('positional'), as chosen by `score_sde.score_fn.get_logits_model_fn`.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from score_sde.models import layers

EMBEDDING_TYPES = ('fourier', 'positional')
# Number of classes of the datasets that have labels (config.model.num_classes
# overrides; other datasets must set it).
DATASET_CLASSES = {'CIFAR10': 10, 'SVHN': 10, 'DIGITS': 10}

conv_init = jax.nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def output_init(key, shape, dtype=jnp.float32):
  """U[-1/sqrt(K), 1/sqrt(K)] for a [features, K] kernel (the autoaugment WRN's)."""
  limit = 1.0 / math.sqrt(shape[-1])
  return jax.random.uniform(key, shape, dtype, -limit, limit)


def depth_to_blocks(depth: int) -> int:
  """Blocks per group n of WRN-depth: depth = 6 n + 4 (28 -> 4, 16 -> 2, 10 -> 1)."""
  if depth < 10 or (depth - 4) % 6:
    raise ValueError(f'a Wide-ResNet depth is 6 n + 4 with n >= 1 (10, 16, 22, 28, ...); '
                     f'got {depth}.')
  return (depth - 4) // 6


def _activation(x, dtype):
  groups = max(min(x.shape[-1] // 4, 32), 1)
  x = nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32)(x)
  return nn.relu(x)


def _shortcut(x, channels: int, stride: int):
  """x average-pooled by `stride` and zero-padded to `channels` channels."""
  if stride > 1:
    x = nn.avg_pool(x, (stride, stride), (stride, stride))
  extra = channels - x.shape[-1]
  if extra > 0:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])
  return x


class WideResNetBlock(nn.Module):
  """Pre-activation residual block with the noise embedding added after conv 1."""
  channels: int
  stride: int = 1
  activate_before_residual: bool = False
  dropout: float = 0.0
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x, temb, train: bool = False):
    dt = layers.compute_dtype(self.dtype)
    activated = _activation(x, dt)
    shortcut = activated if self.activate_before_residual else x
    h = nn.Conv(self.channels, (3, 3), (self.stride, self.stride), padding='SAME',
                use_bias=False, kernel_init=conv_init, dtype=dt,
                param_dtype=jnp.float32)(activated)
    h = h + nn.Dense(self.channels, dtype=dt, param_dtype=jnp.float32)(
        nn.swish(temb))[:, None, None, :].astype(h.dtype)
    h = nn.Dropout(self.dropout)(_activation(h, dt), deterministic=not train)
    h = nn.Conv(self.channels, (3, 3), padding='SAME', use_bias=False, kernel_init=conv_init,
                dtype=dt, param_dtype=jnp.float32)(h)
    return h + _shortcut(shortcut, self.channels, self.stride).astype(h.dtype)


class WideResNet(nn.Module):
  """Noise-conditional WRN classifier; `__call__(x, labels, train) -> logits [B, K]`."""
  num_classes: int = 10
  blocks_per_group: int = 4
  channel_multiplier: int = 10
  base_channels: int = 16
  embedding_type: str = 'fourier'
  embedding_size: int = 128
  fourier_scale: float = 16.0
  standardize: bool = True
  dropout: float = 0.0
  image_size: int = 32
  num_channels: int = 3
  dtype: str = 'float32'

  def __post_init__(self):
    if self.num_classes < 2:
      raise ValueError(f'a classifier needs num_classes >= 2 (config.model.num_classes); '
                       f'got {self.num_classes}.')
    if self.blocks_per_group < 1 or self.channel_multiplier < 1 or self.base_channels < 4:
      raise ValueError(
          f'WideResNet needs blocks_per_group >= 1, channel_multiplier >= 1 and '
          f'base_channels >= 4; got {self.blocks_per_group}, {self.channel_multiplier}, '
          f'{self.base_channels}.')
    if self.embedding_type not in EMBEDDING_TYPES:
      raise ValueError(f'unknown embedding_type {self.embedding_type!r} '
                       f'(config.model.embedding_type); valid: {list(EMBEDDING_TYPES)}.')
    if self.embedding_size < 2:
      raise ValueError(f'embedding_size must be >= 2; got {self.embedding_size}.')
    if self.image_size < 4 or self.image_size % 4:
      raise ValueError(f'the WRN halves the image twice: config.data.image_size must be a '
                       f'multiple of 4; got {self.image_size}.')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'dropout must lie in [0, 1); got {self.dropout}.')
    layers.compute_dtype(self.dtype)
    super().__post_init__()

  @property
  def depth(self) -> int:
    return 6 * self.blocks_per_group + 4

  @classmethod
  def from_config(cls, config):
    """From config.model: num_classes, blocks_per_group (or depth), channel_multiplier,
    base_channels, embedding_type, embedding_size, fourier_scale, standardize,
    dropout, dtype; the input size from config.data."""
    model, data = config.model, config.data
    num_classes = model.get('num_classes', 0) or DATASET_CLASSES.get(str(data.dataset).upper())
    if not num_classes:
      raise ValueError(f'set config.model.num_classes: {data.dataset!r} has no known number '
                       f'of classes (known: {DATASET_CLASSES}).')
    if model.get('depth', 0):
      blocks = depth_to_blocks(int(model.depth))
    else:
      blocks = int(model.get('blocks_per_group', 4))
    return cls(num_classes=int(num_classes), blocks_per_group=blocks,
               channel_multiplier=int(model.get('channel_multiplier', 10)),
               base_channels=int(model.get('base_channels', 16)),
               embedding_type=str(model.get('embedding_type', 'fourier')).lower(),
               embedding_size=int(model.get('embedding_size', 128)),
               fourier_scale=float(model.get('fourier_scale', 16.0)),
               standardize=bool(model.get('standardize', True)),
               dropout=float(model.get('dropout', 0.0)),
               image_size=int(data.image_size), num_channels=int(data.num_channels),
               dtype=str(model.get('dtype', 'float32')))

  def _embedding(self, labels):
    labels = jnp.asarray(labels, jnp.float32)
    if self.embedding_type == 'fourier':
      if not isinstance(labels, jax.core.Tracer) and not np.all(np.asarray(labels) > 0):
        raise ValueError('the Fourier embedding takes log(label): labels must be noise '
                         'levels sigma = s(t) > 0; use embedding_type="positional" for '
                         'time labels (999 t).')
      return layers.GaussianFourierProjection(self.embedding_size, self.fourier_scale)(
          jnp.log(labels))
    return layers.get_timestep_embedding(labels, self.embedding_size)

  @nn.compact
  def __call__(self, x, labels, train: bool = False):
    """x: [B, H, W, C] (model space); labels: [B] noise levels or 999 t. Returns [B, K]."""
    layers.check_input(x, self.image_size, self.num_channels)
    labels = layers.check_labels(labels, x.shape[0])
    dt = layers.compute_dtype(self.dtype)
    x = jnp.asarray(x, jnp.float32)
    if self.standardize:
      dim = int(np.prod(x.shape[1:]))
      mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
      std = jnp.std(x, axis=(1, 2, 3), keepdims=True)
      x = (x - mean) / jnp.maximum(std, 1.0 / math.sqrt(dim))

    temb = self._embedding(labels)
    temb = nn.Dense(4 * self.embedding_size)(temb)
    temb = nn.Dense(4 * self.embedding_size)(nn.swish(temb))

    h = nn.Conv(self.base_channels, (3, 3), padding='SAME', use_bias=False,
                kernel_init=conv_init, dtype=dt, param_dtype=jnp.float32)(x.astype(dt))
    for group, stride in enumerate((1, 2, 2)):
      channels = self.base_channels * (2 ** group) * self.channel_multiplier
      for block in range(self.blocks_per_group):
        h = WideResNetBlock(channels, stride if block == 0 else 1,
                            activate_before_residual=(group == 0 and block == 0),
                            dropout=self.dropout, dtype=self.dtype)(h, temb, train)
    h = _activation(h, dt)
    h = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=output_init)(h)
