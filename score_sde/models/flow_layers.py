"""Invertible layers of the normalizing flows (NICE, RealNVP, Glow) in Flax linen.

Every layer is called as `layer(x, reverse=False) -> (y, logdet [B])`. Forward
maps the data side x to the latent side y and logdet = log |det dy/dx| per
example; `reverse=True` maps y back to x and returns the log-determinant of
that inverse map (minus the forward one). Channels are the last axis: x is
[B, H, W, C] for images or [B, D] for vectors (D "channels", no positions).

  ActNorm          y = (x + b) exp(s) per channel, data-dependent initialisation
  InvConv1x1       y = W x at each position, W in LU form (Glow)
  Coupling         y_b = x_b exp(s(x_a)) + t(x_a) (affine) or x_b + t(x_a) (additive),
                   x_a / x_b chosen by a checkerboard, channel or alternating mask
  DiagonalScaling  y = x exp(s) (NICE's last layer)
  SplitPrior       factor out half the channels, standardised by a Gaussian whose
                   mean and std a zero-initialised convolution reads from the kept half
  TopPrior         standardise by a learned per-position Gaussian (Glow's learned top)
  squeeze / unsqueeze   space-to-depth 2x2 (volume preserving, logdet 0)

The coupling networks (`MLPNet`, `ResNet`, `GlowNet`) end in a zero-initialised
layer, so every coupling starts as the identity.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

HIGHEST = jax.lax.Precision.HIGHEST
ACTNORM_EPS = 1e-6


def sum_except_batch(v: jax.Array) -> jax.Array:
  """[B, ...] -> [B]."""
  return jnp.sum(v.reshape(v.shape[0], -1), axis=-1)


def _positions(x: jax.Array) -> int:
  """Number of positions sharing one channel's parameters (H W for images, 1 for vectors)."""
  return math.prod(x.shape[1:-1])


def squeeze(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, H/2, W/2, 4C]: each 2x2 block becomes 4 channels."""
  b, h, w, c = x.shape
  if h % 2 or w % 2:
    raise ValueError(f'squeeze needs even height and width; got {h}x{w} (use fewer '
                     f'levels / scales for this image size).')
  x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // 2, w // 2, 4 * c)


def unsqueeze(x: jax.Array) -> jax.Array:
  """The inverse of `squeeze`: [B, H, W, 4C] -> [B, 2H, 2W, C]."""
  b, h, w, c4 = x.shape
  c = c4 // 4
  x = x.reshape(b, h, w, 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, 2 * h, 2 * w, c)


class ActNorm(nn.Module):
  """y = (x + bias) exp(logscale), one bias and log-scale per channel (Glow, sec. 3.1).

  Data-dependent initialisation: the first call during `init` sets bias = -mean
  and logscale = -log(std + 1e-6) of its input over every axis but the channels,
  so the initial outputs on the init batch have zero mean and unit variance per
  channel. logdet = positions * sum(logscale).
  """

  @nn.compact
  def __call__(self, x, reverse: bool = False):
    axes = tuple(range(x.ndim - 1))
    bias = self.param('bias', lambda _: -jnp.mean(x, axis=axes))
    logscale = self.param(
        'logscale', lambda _: -jnp.log(jnp.std(x, axis=axes) + ACTNORM_EPS))
    logdet = jnp.full(x.shape[:1], _positions(x) * jnp.sum(logscale))
    if reverse:
      return x * jnp.exp(-logscale) - bias, -logdet
    return (x + bias) * jnp.exp(logscale), logdet


@functools.lru_cache(maxsize=None)
def _random_lu(seed: int, channels: int):
  """P, L, U of a random rotation (numpy, fixed by `seed`): W = P L U."""
  w = np.linalg.qr(np.random.default_rng(seed).standard_normal((channels, channels)))[0]
  p, lower, upper = scipy.linalg.lu(w)
  return p.astype(np.float32), lower.astype(np.float32), upper.astype(np.float32)


def invconv_weights(params: dict, seed: int):
  """(W [C, C], log_s [C], P, L, U) of an `InvConv1x1`'s parameters: W = P L U with
  L = tril(lower, -1) + I and U = triu(upper, 1) + diag(sign_s exp(log_s))."""
  channels = params['log_s'].shape[0]
  p, _, upper0 = _random_lu(seed, channels)
  sign_s = np.sign(np.diag(upper0))
  l_mat = jnp.tril(params['lower'], -1) + jnp.eye(channels, dtype=jnp.float32)
  u_mat = jnp.triu(params['upper'], 1) + jnp.diag(sign_s * jnp.exp(params['log_s']))
  w = jnp.matmul(jnp.asarray(p), jnp.matmul(l_mat, u_mat, precision=HIGHEST),
                 precision=HIGHEST)
  return w, params['log_s'], p, l_mat, u_mat


class InvConv1x1(nn.Module):
  """Invertible 1x1 convolution y = W x at every position, W = P L (U + diag(sign_s exp(log_s)))
  (Glow, sec. 3.2, LU-decomposed form): logdet = positions * sum(log_s).

  W starts as a random rotation fixed by `seed` (the layer's index): P (a
  permutation) and sign_s are constants of the program, L (unit lower
  triangular), U (strictly upper) and log_s are trained (`invconv_weights`).
  """
  seed: int = 0

  @nn.compact
  def __call__(self, x, reverse: bool = False):
    channels = x.shape[-1]
    _, lower0, upper0 = _random_lu(self.seed, channels)
    params = {
        'lower': self.param('lower', lambda _: jnp.asarray(np.tril(lower0, -1))),
        'upper': self.param('upper', lambda _: jnp.asarray(np.triu(upper0, 1))),
        'log_s': self.param('log_s', lambda _: jnp.asarray(np.log(np.abs(np.diag(upper0))))),
    }
    w, log_s, p, l_mat, u_mat = invconv_weights(params, self.seed)
    logdet = jnp.full(x.shape[:1], _positions(x) * jnp.sum(log_s))
    if not reverse:
      return jnp.einsum('...c,dc->...d', x, w, precision=HIGHEST), logdet
    # W^-1 = U^-1 L^-1 P^T by two triangular solves on the [C, C] matrix, then applied
    # at every position like W (the batch stays sharded: no solve over the batch).
    lower_inv_pt = jax.scipy.linalg.solve_triangular(l_mat, jnp.asarray(p.T), lower=True,
                                                     unit_diagonal=True)
    w_inv = jax.scipy.linalg.solve_triangular(u_mat, lower_inv_pt, lower=False)
    return jnp.einsum('...c,dc->...d', x, w_inv, precision=HIGHEST), -logdet


# ----------------------------------------------------------------------------
# Coupling networks: [B, ..., C_in] -> [B, ..., out_features], last layer zero
# ----------------------------------------------------------------------------

def hidden_dropout(module: nn.Module, rate: float, h):
  """Dropout of hidden units, on only while a 'dropout' rng is given (the training
  loss passes one; likelihood, sampling and initialisation do not). One mask per
  forward pass: the flow stays a bijection with the same exact logdet, so the loss
  is the likelihood under a randomly thinned coupling network (Flow++'s regulariser)."""
  if not rate:
    return h
  return nn.Dropout(rate, deterministic=not module.has_rng('dropout'))(h)


class MLPNet(nn.Module):
  """NICE's coupling function: `depth` ReLU layers of `features` units, linear output."""
  features: int
  depth: int
  out_features: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = hidden_dropout(self, self.dropout, nn.relu(nn.Dense(self.features)(x)))
    return nn.Dense(self.out_features, kernel_init=nn.initializers.zeros)(x)


class ResNet(nn.Module):
  """RealNVP's coupling network: a 3x3 convolution to `features` maps, `num_blocks`
  pre-activation residual blocks (ReLU, 3x3, ReLU, 3x3; the second convolution
  zero-initialised, so each block starts as the identity), ReLU, a 3x3 output.
  Dropout (if any) acts between a block's two convolutions."""
  features: int
  num_blocks: int
  out_features: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(self.features, (3, 3))(x)
    for _ in range(self.num_blocks):
      r = hidden_dropout(self, self.dropout, nn.relu(nn.Conv(self.features, (3, 3))(nn.relu(h))))
      h = h + nn.Conv(self.features, (3, 3), kernel_init=nn.initializers.zeros)(r)
    return nn.Conv(self.out_features, (3, 3), kernel_init=nn.initializers.zeros)(nn.relu(h))


class ZeroConv(nn.Module):
  """Glow's output convolution: a 3x3 convolution initialised to zero whose outputs are
  scaled by exp(3 log_scale), with a learned log_scale per output channel (zero at first)."""
  features: int

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(self.features, (3, 3), kernel_init=nn.initializers.zeros)(x)
    log_scale = self.param('log_scale', nn.initializers.zeros, (self.features,))
    return y * jnp.exp(3.0 * log_scale)


class GlowNet(nn.Module):
  """Glow's coupling network: 3x3 conv, ActNorm, ReLU, 1x1 conv, ActNorm, ReLU, `ZeroConv`
  (the convolutions before an ActNorm have no bias, as in Glow's code); dropout (if
  any) before the output convolution."""
  features: int
  out_features: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(self.features, (3, 3), use_bias=False)(x)
    h = nn.relu(ActNorm()(h)[0])
    h = nn.Conv(self.features, (1, 1), use_bias=False)(h)
    h = hidden_dropout(self, self.dropout, nn.relu(ActNorm()(h)[0]))
    return ZeroConv(self.out_features)(h)


NETWORKS = ('mlp', 'resnet', 'glow')
MASKS = ('alternate', 'checkerboard', 'channel')
TRANSFORMS = ('affine', 'additive')
LOG_SCALES = ('tanh', 'sigmoid')


def _check_even_channels(channels: int) -> int:
  if channels % 2:
    raise ValueError(f'a channel-wise coupling needs an even channel count; got {channels}.')
  return channels


def coupling_mask(kind: str, parity: int, shape: tuple[int, ...]) -> np.ndarray:
  """1 where x is kept (conditioning part x_a), 0 where it is transformed; shape = x.shape[1:].

  alternate     vectors [D]: index d kept when d % 2 == parity (NICE);
  checkerboard  images [H, W, C]: pixel (h, w) kept when (h + w) % 2 == parity;
  channel       images [H, W, C]: the first half of the channels kept (parity 0) or the second.
  """
  if kind == 'alternate':
    return (np.arange(shape[-1]) % 2 == parity).astype(np.float32).reshape(shape)
  if kind == 'checkerboard':
    h, w = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing='ij')
    board = ((h + w) % 2 == parity).astype(np.float32)
    return np.broadcast_to(board[..., None], shape).copy()
  if kind == 'channel':
    c = _check_even_channels(shape[-1])
    first = (np.arange(c) < c // 2).astype(np.float32)
    return np.broadcast_to(first if parity == 0 else 1.0 - first, shape).copy()
  raise ValueError(f'unknown coupling mask {kind!r}; valid: {list(MASKS)}.')


class Coupling(nn.Module):
  """y = b x + (1 - b) (x exp(s) + t), (s, t) = network(b x) (RealNVP, eq. 9).

  b is the mask (`coupling_mask(mask, parity, ...)`); 'additive' has s = 0
  (NICE). The log-scale is s = scale * tanh(raw) with a learned scale per channel
  ('tanh', RealNVP) or s = log sigmoid(raw + 2) ('sigmoid', Glow). logdet = sum (1 - b) s.
  A channel-wise mask splits the channels instead of masking them: the network
  reads the kept half and computes (s, t) for the other half only (Glow's
  coupling). With a checkerboard mask, the network also reads the mask as one
  extra input channel.
  """
  mask: str
  parity: int
  network: str
  features: int
  depth: int = 1
  transform: str = 'affine'
  log_scale: str = 'tanh'
  dropout: float = 0.0      # of the network's hidden units, in training only

  def _network(self, out_features: int) -> nn.Module:
    if self.network == 'mlp':
      return MLPNet(self.features, self.depth, out_features, self.dropout)
    if self.network == 'resnet':
      return ResNet(self.features, self.depth, out_features, self.dropout)
    if self.network == 'glow':
      return GlowNet(self.features, out_features, self.dropout)
    raise ValueError(f'unknown coupling network {self.network!r}; valid: {list(NETWORKS)}.')

  def _log_scale_and_shift(self, inputs, channels: int):
    """(s, t) [..., channels] from the network's reading of the kept part."""
    affine = self.transform == 'affine'
    if self.transform not in TRANSFORMS:
      raise ValueError(f'unknown coupling transform {self.transform!r}; valid: '
                       f'{list(TRANSFORMS)}.')
    if affine and self.log_scale not in LOG_SCALES:
      raise ValueError(f'unknown log_scale {self.log_scale!r}; valid: {list(LOG_SCALES)}.')
    raw = self._network((2 if affine else 1) * channels)(inputs)
    if not affine:
      return None, raw
    raw_s, t = raw[..., :channels], raw[..., channels:]
    if self.log_scale == 'tanh':
      scale = self.param('scale', nn.initializers.ones, (channels,))
      return scale * jnp.tanh(raw_s), t
    return jax.nn.log_sigmoid(raw_s + 2.0), t

  @nn.compact
  def __call__(self, x, reverse: bool = False):
    if self.mask == 'channel':
      _check_even_channels(x.shape[-1])
      half = x.shape[-1] // 2
      first, second = x[..., :half], x[..., half:]
      kept, changed = (first, second) if self.parity == 0 else (second, first)
      s, t = self._log_scale_and_shift(kept, changed.shape[-1])
      logdet = sum_except_batch(s) if s is not None else jnp.zeros(x.shape[:1])
      s = 0.0 if s is None else s
      if reverse:
        changed = (changed - t) * jnp.exp(-s)
      else:
        changed = changed * jnp.exp(s) + t
      parts = (kept, changed) if self.parity == 0 else (changed, kept)
      return jnp.concatenate(parts, axis=-1), (-logdet if reverse else logdet)

    b = jnp.asarray(coupling_mask(self.mask, self.parity, x.shape[1:]))
    kept = b * x                                   # the same on both sides of the map
    inputs = kept
    if x.ndim == 4:
      inputs = jnp.concatenate([kept, jnp.broadcast_to(b[..., :1], x.shape[:-1] + (1,))], -1)
    s, t = self._log_scale_and_shift(inputs, x.shape[-1])
    s = jnp.zeros_like(x) if s is None else (1.0 - b) * s
    t = (1.0 - b) * t
    logdet = sum_except_batch(s)
    if reverse:
      return kept + (1.0 - b) * (x - t) * jnp.exp(-s), -logdet
    return kept + (1.0 - b) * (x * jnp.exp(s) + t), logdet


class DiagonalScaling(nn.Module):
  """y = x exp(s), one s per dimension (NICE's final scaling layer): logdet = sum s.

  With `data_init`, s starts at -log(std + 1e-6) of the init batch per dimension
  (as ActNorm's scale; otherwise 0), so the first outputs have unit variance.
  """
  data_init: bool = False

  @nn.compact
  def __call__(self, x, reverse: bool = False):
    if self.data_init:
      init = lambda _: -jnp.log(jnp.std(x, axis=0) + ACTNORM_EPS)  # noqa: E731
    else:
      init = lambda _: jnp.zeros(x.shape[1:], jnp.float32)  # noqa: E731
    s = self.param('log_scale', init)
    logdet = jnp.full(x.shape[:1], jnp.sum(s))
    if reverse:
      return x * jnp.exp(-s), -logdet
    return x * jnp.exp(s), logdet


class SplitPrior(nn.Module):
  """Factor out half the channels (Glow's split with a learned prior).

  Forward: x [B, H, W, C] -> (h, eps) with h = x[..., :C/2] kept and
  eps = (z - mu(h)) exp(-log_std(h)) for z = x[..., C/2:], where (mu, log_std)
  come from a `ZeroConv` of h (Glow's split2d prior); logdet = -sum log_std.
  eps follows the flow's prior (standard normal, or logistic) under the model, so
  the factored-out part's learned conditional distribution is exactly a flow
  layer. Reverse: (h, eps) -> x.
  """

  @nn.compact
  def __call__(self, x, reverse: bool = False):
    if reverse:
      h, eps = x
    else:
      c = x.shape[-1]
      h, z = x[..., :c // 2], x[..., c // 2:]
    stats = ZeroConv(2 * h.shape[-1])(h)
    mu, log_std = stats[..., :h.shape[-1]], stats[..., h.shape[-1]:]
    logdet = -sum_except_batch(log_std)
    if reverse:
      return jnp.concatenate([h, mu + eps * jnp.exp(log_std)], axis=-1), -logdet
    return (h, (z - mu) * jnp.exp(-log_std)), logdet


class TopPrior(nn.Module):
  """eps = (x - mu) exp(-log_std) with learned mu, log_std per position and channel
  (zero-initialised; Glow's learned top prior): logdet = -sum log_std."""

  @nn.compact
  def __call__(self, x, reverse: bool = False):
    mu = self.param('mean', nn.initializers.zeros, x.shape[1:])
    log_std = self.param('log_std', nn.initializers.zeros, x.shape[1:])
    logdet = jnp.full(x.shape[:1], -jnp.sum(log_std))
    if reverse:
      return mu + x * jnp.exp(log_std), -logdet
    return (x - mu) * jnp.exp(-log_std), logdet


# ----------------------------------------------------------------------------
# Latents: the factored-out parts of a multi-scale flow as one flat vector
# ----------------------------------------------------------------------------

def flatten_latents(parts) -> jax.Array:
  """[[B, ...], ...] -> [B, D]: the parts in order, each flattened."""
  return jnp.concatenate([p.reshape(p.shape[0], -1) for p in parts], axis=-1)


def unflatten_latents(z: jax.Array, shapes) -> list[jax.Array]:
  """The inverse of `flatten_latents` for parts of per-example `shapes`."""
  sizes = [math.prod(s) for s in shapes]
  if z.ndim != 2 or z.shape[-1] != sum(sizes):
    raise ValueError(f'latent z must be [B, {sum(sizes)}]; got shape {tuple(z.shape)}.')
  offsets = np.cumsum([0] + sizes)
  return [z[:, offsets[i]:offsets[i + 1]].reshape((z.shape[0],) + tuple(s))
          for i, s in enumerate(shapes)]


def image_shape_from_config(config) -> tuple[int, int, int]:
  """(H, W, C) of the config's images; flows model quantised images."""
  data = config.data
  if data.get('dim', 0) or not data.image_size:
    raise ValueError('the flows (nice, realnvp, glow) model images: config.data.image_size '
                     'and num_channels must be set (vector data is not supported).')
  return (int(data.image_size), int(data.image_size), int(data.num_channels))


def check_squeezes(image_shape, squeezes: int, name: str) -> None:
  """A one-line error unless `squeezes` 2x2 squeezes fit the image (sizes stay even)."""
  size = image_shape[0]
  if squeezes and size % (2 ** squeezes):
    raise ValueError(f'{name}: {squeezes} squeeze(s) need an image size divisible by '
                     f'{2 ** squeezes}; got {size} (lower config.model.num_levels).')


def check_positive(name: str, **values) -> None:
  for key, value in values.items():
    if int(value) < 1:
      raise ValueError(f'{name} needs config.model.{key} >= 1; got {value}.')


def dropout_from_config(config, name: str) -> float:
  """config.model.dropout (0 if absent) as a rate in [0, 1)."""
  rate = float(config.model.get('dropout', 0.0))
  if not 0.0 <= rate < 1.0:
    raise ValueError(f'{name} needs 0 <= config.model.dropout < 1; got {rate}.')
  return rate


def check_float32(config, name: str) -> None:
  dtype = str(config.model.get('dtype', 'float32'))
  if dtype != 'float32':
    raise ValueError(f'{name} runs in float32 only (its log-determinants and inverse need '
                     f'full precision); got config.model.dtype={dtype!r}.')
