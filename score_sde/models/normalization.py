"""Normalisations of the NCSN / NCSNv2 networks (images, NHWC).

For x: [B, H, W, C], per example and channel c let

  mu_c = mean_{h,w} x[..., c],   s_c^2 = var_{h,w} x[..., c],

and across channels m = mean_c mu_c, v = var_c mu_c. Then

  InstanceNorm     y = gamma_c (x - mu_c) / sqrt(s_c^2 + eps) + beta_c
  VarianceNorm     y = gamma_c x / sqrt(s_c^2 + eps)                (no centring)
  InstanceNorm++   y = gamma_c [(x - mu_c) / sqrt(s_c^2 + eps)
                                + alpha_c (mu_c - m) / sqrt(v + eps)] + beta_c
  GroupNorm        flax GroupNorm, gcd(32, C) groups

InstanceNorm++ (Song & Ermon 2019) puts back the per-channel means that
instance normalisation removes, which matters for colour. The conditional
variants (NCSN) keep one set of (gamma, alpha, beta) per noise level: the
parameters have shape [num_classes, C] and row `labels[b]` is used for example b.

`unbiased_variance` (config.model.norm_unbiased_variance) divides v in
InstanceNorm++ and s_c^2 in VarianceNorm by (n - 1) instead of n: the
numerics of score_sde_pytorch, whose layers call torch.var there (the Flax
original and our default divide by n; instance normalisation's own s_c^2 is
biased in both code bases).

Every layer is called as `norm(x, labels)`; unconditional layers ignore
`labels`. Statistics are computed in float32 whatever the compute dtype; the
output has the dtype of x. Initialisation as in the reference: gamma and alpha
~ 1 + N(0, 0.02^2), beta = 0 (InstanceNorm: gamma = 1).
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

EPS = 1e-5


def _near_one(key, shape, dtype=jnp.float32):
  """1 + N(0, 0.02^2): the reference initialisation of scales."""
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def _check_image(x, layer: str):
  if x.ndim != 4:
    raise ValueError(f'{layer} normalises images [B, H, W, C]; got an input of '
                     f'shape {x.shape}.')


def _ddof(unbiased: bool) -> int:
  return 1 if unbiased else 0


def _channel_stats(x32, unbiased: bool = False):
  """Per-example, per-channel mean and variance over H, W: each [B, 1, 1, C]
  (the variance divides by H W, or by H W - 1 if `unbiased`)."""
  mean = jnp.mean(x32, axis=(1, 2), keepdims=True)
  var = jnp.var(x32, axis=(1, 2), keepdims=True, ddof=_ddof(unbiased))
  return mean, var


def _standardised_means(mean, unbiased: bool = False):
  """(mu_c - m) / sqrt(v + eps) with m, v the mean / variance over channels
  (v divides by C, or by C - 1 if `unbiased`)."""
  m = jnp.mean(mean, axis=-1, keepdims=True)
  v = jnp.var(mean, axis=-1, keepdims=True, ddof=_ddof(unbiased))
  return (mean - m) / jnp.sqrt(v + EPS)


def lookup_per_label(table, labels):
  """Rows of `table` [N, C] for integer `labels` [B] -> [B, 1, 1, C].

  Labels outside [0, N) give NaN rows (JAX cannot raise under `jit`); the
  networks check concrete labels and raise before this point.
  """
  num = table.shape[0]
  safe = jnp.where((labels < 0) | (labels >= num), num, labels)
  rows = jnp.take(table, safe, axis=0, mode='fill', fill_value=jnp.nan)
  return rows[:, None, None, :]


def _check_labels(labels, x, layer: str):
  if labels is None:
    raise ValueError(f'{layer} is conditional: call it with integer labels [B].')
  if labels.shape != x.shape[:1]:
    raise ValueError(f'{layer}: labels must have shape [B] = {x.shape[:1]}; '
                     f'got {labels.shape}.')


# ----------------------------------------------------------------------------
# Unconditional
# ----------------------------------------------------------------------------

class InstanceNorm(nn.Module):
  """Instance normalisation with per-channel scale and (optional) bias."""
  bias: bool = True

  @nn.compact
  def __call__(self, x, labels=None):
    _check_image(x, 'InstanceNorm')
    c = x.shape[-1]
    x32 = x.astype(jnp.float32)
    mean, var = _channel_stats(x32)
    h = (x32 - mean) / jnp.sqrt(var + EPS)
    h = h * self.param('scale', nn.initializers.ones, (c,))
    if self.bias:
      h = h + self.param('bias', nn.initializers.zeros, (c,))
    return h.astype(x.dtype)


class VarianceNorm(nn.Module):
  """Divides each channel by its spatial standard deviation (no centring)."""
  bias: bool = False
  unbiased_variance: bool = False

  @nn.compact
  def __call__(self, x, labels=None):
    _check_image(x, 'VarianceNorm')
    c = x.shape[-1]
    x32 = x.astype(jnp.float32)
    _, var = _channel_stats(x32, self.unbiased_variance)
    h = x32 / jnp.sqrt(var + EPS) * self.param('scale', _near_one, (c,))
    if self.bias:
      h = h + self.param('bias', nn.initializers.zeros, (c,))
    return h.astype(x.dtype)


class InstanceNormPlus(nn.Module):
  """InstanceNorm++ (Song & Ermon 2019): 3C parameters alpha, gamma, beta."""
  bias: bool = True
  unbiased_variance: bool = False

  @nn.compact
  def __call__(self, x, labels=None):
    _check_image(x, 'InstanceNorm++')
    c = x.shape[-1]
    x32 = x.astype(jnp.float32)
    mean, var = _channel_stats(x32)
    h = (x32 - mean) / jnp.sqrt(var + EPS)
    h = h + (_standardised_means(mean, self.unbiased_variance)
             * self.param('alpha', _near_one, (c,)))
    h = h * self.param('gamma', _near_one, (c,))
    if self.bias:
      h = h + self.param('beta', nn.initializers.zeros, (c,))
    return h.astype(x.dtype)


class GroupNorm(nn.Module):
  """flax GroupNorm with gcd(32, C) groups (32 as in DDPM when C allows)."""
  bias: bool = True

  @nn.compact
  def __call__(self, x, labels=None):
    _check_image(x, 'GroupNorm')
    groups = math.gcd(32, x.shape[-1])
    return nn.GroupNorm(num_groups=groups, epsilon=EPS, use_bias=self.bias,
                        dtype=x.dtype)(x)


# ----------------------------------------------------------------------------
# Conditional on an integer label (the noise level of NCSN)
# ----------------------------------------------------------------------------

class ConditionalInstanceNorm(nn.Module):
  """Instance norm with a (gamma, beta) pair per label: 2 num_classes C params."""
  num_classes: int
  bias: bool = True

  @nn.compact
  def __call__(self, x, labels=None):
    _check_image(x, 'ConditionalInstanceNorm')
    _check_labels(labels, x, 'ConditionalInstanceNorm')
    shape = (self.num_classes, x.shape[-1])
    x32 = x.astype(jnp.float32)
    mean, var = _channel_stats(x32)
    h = (x32 - mean) / jnp.sqrt(var + EPS)
    h = h * lookup_per_label(self.param('gamma', _near_one, shape), labels)
    if self.bias:
      h = h + lookup_per_label(self.param('beta', nn.initializers.zeros, shape), labels)
    return h.astype(x.dtype)


class ConditionalVarianceNorm(nn.Module):
  """Variance norm with a scale per label: num_classes C params."""
  num_classes: int
  bias: bool = False
  unbiased_variance: bool = False

  @nn.compact
  def __call__(self, x, labels=None):
    _check_image(x, 'ConditionalVarianceNorm')
    _check_labels(labels, x, 'ConditionalVarianceNorm')
    shape = (self.num_classes, x.shape[-1])
    x32 = x.astype(jnp.float32)
    _, var = _channel_stats(x32, self.unbiased_variance)
    h = x32 / jnp.sqrt(var + EPS)
    h = h * lookup_per_label(self.param('gamma', _near_one, shape), labels)
    if self.bias:
      h = h + lookup_per_label(self.param('beta', nn.initializers.zeros, shape), labels)
    return h.astype(x.dtype)


class ConditionalInstanceNormPlus(nn.Module):
  """Conditional InstanceNorm++ (NCSN): (gamma, alpha, beta) per label, each
  [num_classes, C], so 3 num_classes C parameters (2 without bias)."""
  num_classes: int
  bias: bool = True
  unbiased_variance: bool = False

  @nn.compact
  def __call__(self, x, labels=None):
    _check_image(x, 'ConditionalInstanceNorm++')
    _check_labels(labels, x, 'ConditionalInstanceNorm++')
    shape = (self.num_classes, x.shape[-1])
    x32 = x.astype(jnp.float32)
    mean, var = _channel_stats(x32)
    gamma = lookup_per_label(self.param('gamma', _near_one, shape), labels)
    alpha = lookup_per_label(self.param('alpha', _near_one, shape), labels)
    h = ((x32 - mean) / jnp.sqrt(var + EPS)
         + _standardised_means(mean, self.unbiased_variance) * alpha)
    h = gamma * h
    if self.bias:
      h = h + lookup_per_label(self.param('beta', nn.initializers.zeros, shape), labels)
    return h.astype(x.dtype)


# ----------------------------------------------------------------------------
# Names (config.model.normalization) -> layers
# ----------------------------------------------------------------------------

NORMALIZATIONS = {
    'InstanceNorm': InstanceNorm,
    'InstanceNorm++': InstanceNormPlus,
    'VarianceNorm': VarianceNorm,
    'GroupNorm': GroupNorm,
}

CONDITIONAL_NORMALIZATIONS = {
    'InstanceNorm': ConditionalInstanceNorm,
    'InstanceNorm++': ConditionalInstanceNormPlus,
    'VarianceNorm': ConditionalVarianceNorm,
}


def check_normalization(name: str, conditional: bool) -> None:
  """Raises ValueError naming the valid choices if `name` is unknown."""
  table = CONDITIONAL_NORMALIZATIONS if conditional else NORMALIZATIONS
  if name not in table:
    kind = 'conditional ' if conditional else ''
    raise ValueError(f'unknown {kind}normalization {name!r} '
                     f'(config.model.normalization); valid: {sorted(table)}.')


def get_normalization(name: str, conditional: bool = False, num_classes: int = 0,
                      unbiased_variance: bool = False):
  """A constructor `() -> norm` with `norm(x, labels) -> [B, H, W, C]`.

  Conditional layers get one parameter set per class (`num_classes` rows).
  `unbiased_variance` reaches the layers that have the option (InstanceNorm++,
  VarianceNorm); the others compute the biased variance in both code bases.
  """
  check_normalization(name, conditional)
  layer = (CONDITIONAL_NORMALIZATIONS if conditional else NORMALIZATIONS)[name]
  options = {}
  if 'unbiased_variance' in layer.__dataclass_fields__:
    options['unbiased_variance'] = unbiased_variance
  if conditional:
    if num_classes < 1:
      raise ValueError(f'a conditional normalization needs num_classes >= 1; '
                       f'got {num_classes}.')
    options['num_classes'] = num_classes
  return functools.partial(layer, **options) if options else layer
