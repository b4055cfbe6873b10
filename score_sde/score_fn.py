"""From a network's output to a score or to class logits, by declared parameterisation.

A score network is called as model_fn(params, x, labels, train, key); what it
is conditioned on (`labels`) and what it outputs depends on how it was
trained. Each SDE declares the parameterisation its networks use in
continuous and in discrete time (`sde.continuous_parameterisation`,
`sde.discrete_parameterisation`); `PARAMETERISATIONS` maps that name to the
conversion, so nothing here branches on the SDE's class and `models/` knows
nothing of SDEs:

  'sigma_score'   labels sigma(t) = std of p_0t; the output is the score
                  (VE, continuous; NCSN++ divides by sigma itself when
                  `scale_by_sigma`).
  'index_score'   labels the noise index i = round((T - t)(N - 1)), 0 =
                  sigma_max (the NCSN ordering); the output is the score
                  (VE, discrete).
  'time_noise'    labels 999 t; the output is the noise eps and the score
                  -eps / std(t) (VP and sub-VP, continuous; sub-VP discrete).
  'chain_noise'   labels the DDPM timestep t (N - 1); the score is -eps over
                  the std of the discrete DDPM chain (VP, discrete).

Classifiers (`get_logits_model_fn`) see the noise level s(t) or 999 t.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from score_sde import sde as sde_lib

# model_fn(params, x, labels, train, key) -> network output
ModelFn = Callable[..., jax.Array]
LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]     # (x [B, ...], t [B]) -> [B, K]


def get_model_fn(model) -> ModelFn:
  """model_fn(params, x, labels, train=False, key=None) -> raw network output."""

  def model_fn(params, x, labels, train: bool = False, key=None):
    rngs = {'dropout': key} if (train and key is not None) else {}
    return model.apply({'params': params}, x, labels, train=train, rngs=rngs)

  return model_fn


def _labels_shape(t, x):
  t = jnp.asarray(t, jnp.float32)
  return jnp.broadcast_to(t, x.shape[:1]) if t.ndim == 0 else t


# ----------------------------------------------------------------------------
# Score parameterisations: (sde, t [B], x) -> (labels [B], output -> score)
# ----------------------------------------------------------------------------

def _sigma_score(sde, t, x):
  del x
  return sde_lib.transition_coeffs(sde, t)[1], lambda out: out


def _index_score(sde, t, x):
  del x
  return jnp.round((sde.T - t) * (sde.N - 1)).astype(jnp.int32), lambda out: out


def _time_noise(sde, t, x):
  std = sde_lib.transition_coeffs(sde, t)[1]
  return t * 999, lambda eps: -eps / sde_lib.expand_to(std, eps)


def _chain_noise(sde, t, x):
  labels = t * (sde.N - 1)
  std = jnp.sqrt(1.0 - sde.alphas_cumprod)[labels.astype(jnp.int32)]
  return labels, lambda eps: -eps / sde_lib.expand_to(std, eps)


PARAMETERISATIONS = {
    'sigma_score': _sigma_score,
    'index_score': _index_score,
    'time_noise': _time_noise,
    'chain_noise': _chain_noise,
}
# Parameterisations whose network output is the noise (a learned variance
# rides along on the last axis and is dropped for the score).
NOISE_PARAMETERISATIONS = ('time_noise', 'chain_noise')


def parameterisation_of(sde, continuous: bool) -> str:
  """The parameterisation that `sde` declares for continuous or discrete training."""
  attribute = 'continuous_parameterisation' if continuous else 'discrete_parameterisation'
  name = getattr(sde, attribute, None)
  if name not in PARAMETERISATIONS:
    raise ValueError(f'{type(sde).__name__} declares no known score parameterisation '
                     f'({attribute} = {name!r}); known: {sorted(PARAMETERISATIONS)}.')
  return name


def get_score_model_fn(sde, model_fn: ModelFn, continuous: bool = True,
                       learned_variance: bool = False,
                       parameterisation: str | None = None) -> ModelFn:
  """score_model_fn(params, x, t, train=False, key=None) -> score [same shape as x].

  `t` is a continuous time in [0, T], scalar or one per example. The
  parameterisation is the SDE's declared one unless given. With
  `learned_variance` the network returns [eps, v] on the last axis and the
  score uses eps.
  """
  name = parameterisation or parameterisation_of(sde, continuous)
  if name not in PARAMETERISATIONS:
    raise ValueError(f'unknown score parameterisation {name!r}; valid: '
                     f'{sorted(PARAMETERISATIONS)}.')
  to_labels = PARAMETERISATIONS[name]
  drop_variance = learned_variance and name in NOISE_PARAMETERISATIONS

  def score_model_fn(params, x, t, train=False, key=None):
    labels, to_score = to_labels(sde, _labels_shape(t, x), x)
    out = model_fn(params, x, labels, train, key)
    if drop_variance:
      out = out[..., :x.shape[-1]]
    return to_score(out)

  return score_model_fn


def get_score_fn(sde, model, params, train: bool = False, continuous: bool = True,
                 key=None, learned_variance: bool = False):
  """score_fn(x, t) of a network with fixed parameters (samplers, likelihood)."""
  score_model_fn = get_score_model_fn(sde, get_model_fn(model), continuous, learned_variance)
  return lambda x, t: score_model_fn(params, x, t, train, key)


# ----------------------------------------------------------------------------
# Noise-conditional classifiers: logits
# ----------------------------------------------------------------------------

def classifier_labels(sde, model, t) -> jax.Array:
  """The network's conditioning label for time t [B]: s(t) ('fourier') or 999 t."""
  t = jnp.asarray(t, jnp.float32)
  if getattr(model, 'embedding_type', 'fourier') == 'fourier':
    return sde_lib.transition_coeffs(sde, t)[1]
  return 999.0 * t


def get_logits_model_fn(sde, model) -> Callable:
  """logits_model_fn(params, x, t, train=False, key=None) -> logits [B, K] (float32).

  `t` is a continuous time (scalar or [B]); the classifier sees the noise level
  s(t) (Fourier embedding of log s, as the reference) or 999 t.
  """

  def logits_model_fn(params, x, t, train: bool = False, key=None):
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
    rngs = {'dropout': key} if (train and key is not None) else {}
    logits = model.apply({'params': params}, x, classifier_labels(sde, model, t),
                         train=train, rngs=rngs)
    return logits.astype(jnp.float32)

  return logits_model_fn


def get_logits_fn(sde, model, params) -> LogitsFn:
  """logits_fn(x, t) of a trained classifier (eval mode), for `conditional_sample`."""
  logits_model_fn = get_logits_model_fn(sde, model)
  return lambda x, t: logits_model_fn(params, x, t)

