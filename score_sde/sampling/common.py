"""What every sampler shares: per-example keys and noise, shapes, Tweedie's
denoiser, the score-shape check, registry look-ups and option checks.

Randomness is per example: key i = fold_in(key, i) (`example_keys`), and all
of example i's noise derives from that key by further `fold_in`s, so example i
depends only on (key, i).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import sde as sde_lib

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]
# score_model_fn(params, x, t) -> score, with x: [B, ...] and t: [B].
ScoreModelFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
Info = dict


# jax.default_matmul_precision values: 'default' is the backend's fastest (bfloat16
# passes for float32 on TPU, TF32 on recent GPUs), 'highest' full float32 everywhere.
MATMUL_PRECISIONS = ('default', 'high', 'highest')
# Samplers also take 'inherit': whatever JAX is set to (jax_default_matmul_precision).
INHERIT = 'inherit'


def check_precision(precision, allow_inherit: bool = False) -> str:
  """'default' | 'high' | 'highest' (lower-cased; 'inherit' where allowed), or a
  ValueError naming the choices."""
  name = str(precision).lower()
  valid = MATMUL_PRECISIONS + ((INHERIT,) if allow_inherit else ())
  if name not in valid:
    raise ValueError(f'unknown matmul precision {precision!r}; valid: {list(valid)} '
                     f"('highest': full float32 on every backend).")
  return name


def matmul_precision(name: str):
  """The context that traces dots and convolutions at `name` ('inherit': no change)."""
  import contextlib
  if name == INHERIT:
    return contextlib.nullcontext()
  return jax.default_matmul_precision(name)


def identity(x):
  return x


# ----------------------------------------------------------------------------
# Per-example randomness
# ----------------------------------------------------------------------------

def example_keys(key, batch_size: int):
  """[B] keys, key i = fold_in(key, i): each example's own stream of randomness."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch_size))


def fold_keys(keys, data: int):
  """fold_in(keys[b], data) for every example b."""
  return jax.vmap(lambda k: jax.random.fold_in(k, data))(keys)


def example_normal(keys, example_shape, dtype=jnp.float32) -> jax.Array:
  """[B, *example_shape] standard normal noise, row b drawn from keys[b]."""
  return jax.vmap(lambda k: jax.random.normal(k, example_shape, dtype))(keys)


def prior_sample(sde, keys, shape) -> jax.Array:
  """[B, ...] draws from the SDE's prior, example b from keys[b]."""
  return jax.vmap(lambda k: sde.prior_sampling(k, tuple(shape[1:])))(keys)


# ----------------------------------------------------------------------------
# Small shared maths
# ----------------------------------------------------------------------------

def per_example_norm(x: jax.Array) -> jax.Array:
  """Euclidean norm of each example: [B, ...] -> [B]."""
  return jnp.sqrt(jnp.sum(jnp.square(x).reshape(x.shape[0], -1), axis=-1))


def expected_normal_norm(dim: int) -> float:
  """E|z| for z ~ N(0, I_dim): sqrt(2) Gamma((dim + 1) / 2) / Gamma(dim / 2)."""
  return math.sqrt(2.0) * math.exp(math.lgamma((dim + 1) / 2) - math.lgamma(dim / 2))


def batch_times(t, x: jax.Array) -> jax.Array:
  """A scalar time broadcast to one time per example, [B]."""
  return jnp.full(x.shape[:1], t, jnp.float32)


def with_num_steps(sde, num_steps: int):
  """The same SDE discretised with `num_steps` steps (0: unchanged)."""
  if num_steps in (0, sde.N):
    return sde
  return dataclasses.replace(sde, N=int(num_steps))


def chain_signal_factor(sde, x: jax.Array, t: jax.Array) -> jax.Array:
  """a_i of one discrete step x_i = a_i x_{i-1} + G_i z (shape broadcasting with x).

  Read off `sde.discretize` as 1 + f_i(1): every SDE here has a drift linear
  in x. 1 for SMLD, sqrt(1 - beta_i) for DDPM.
  """
  f_of_ones, _ = sde.discretize(jnp.ones_like(x), t)
  return 1.0 + f_of_ones


def tweedie_denoise(sde, score_fn: ScoreFn, x: jax.Array, t) -> jax.Array:
  """E[x_0 | x_t] = (x + s(t)^2 score(x, t)) / m(t) for x_t = m x_0 + s z."""
  mean_coeff, std = sde_lib.transition_coeffs(sde, t)
  return (x + std ** 2 * score_fn(x, batch_times(t, x))) / mean_coeff


def per_example_score(score_fn: ScoreFn, example_shape) -> Callable:
  """score of one flattened example: ([D], scalar t) -> [D], for vmap-ed solvers."""
  dim = int(np.prod(example_shape))

  def score_flat(y, t):
    x = y.reshape((1,) + tuple(example_shape))
    return score_fn(x, jnp.reshape(t, (1,)).astype(jnp.float32)).reshape(dim)

  return score_flat


# ----------------------------------------------------------------------------
# Checks (eager, before anything is traced) and registry look-ups
# ----------------------------------------------------------------------------

def check_score_shape(score_fn: ScoreFn, x: jax.Array) -> None:
  """Raises (at trace time) unless score_fn(x, t) has the shape of x."""
  t = batch_times(0.5, x)
  try:
    out = jax.eval_shape(score_fn, x, t)
  except Exception as err:  # noqa: BLE001 - re-raised with the likely cause
    raise ValueError(
        f'the score function failed on data of shape {x.shape} (batch, then one '
        f'example); check that `shape` matches the data the score function was '
        f'built for. The error was: {type(err).__name__}: {err}') from err
  if out.shape != x.shape:
    raise ValueError(
        f'the score function returned shape {out.shape} for data of shape '
        f'{x.shape}; the sample shape must be the data shape [B, ...] that the '
        f'score function expects.')


def check_shape(shape) -> tuple[int, ...]:
  """The sample shape [B, ...] as a tuple of ints; raises unless all sizes are >= 1."""
  shape = tuple(shape)
  if len(shape) < 2 or any(isinstance(d, bool) or int(d) != d or d < 1 for d in shape):
    raise ValueError(f'shape must be [B, ...] (a batch size, then the shape of one '
                     f'example) with positive integer sizes; got {shape}.')
  return tuple(int(d) for d in shape)


def check_count(name: str, value, allow_zero: bool = False) -> int:
  """An integer option >= 1 (>= 0 with allow_zero), or a ValueError naming it."""
  if isinstance(value, bool) or int(value) != value or value < (0 if allow_zero else 1):
    bound = '>= 0' if allow_zero else '>= 1'
    raise ValueError(f'{name} must be an integer {bound}; got {value!r}.')
  return int(value)


def lookup(mapping: dict, name: str, what: str):
  """mapping[name.lower()], or a ValueError listing the valid names."""
  try:
    return mapping[str(name).lower()]
  except KeyError:
    raise ValueError(f'unknown {what} {name!r}; valid: {sorted(mapping)}.') from None
