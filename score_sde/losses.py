"""Training objectives: pure functions `loss_fn(params, key, batch) -> loss`.

Continuous time (Song et al. 2021, eq. 7), t ~ U(eps, T), x_t = m(t) x_0 + s(t) z:

  L = E_t E_{x_0, z} [ lambda(t) || score(x_t, t) + z / s(t) ||^2 ],

with lambda(t) = s(t)^2 (default, "sigma^2 weighting") or g(t)^2 (likelihood
weighting, which makes L an upper bound on the negative log-likelihood; Song,
Durkan, Murray & Ermon 2021), optionally with t drawn from a density
proportional to g(t)^2 / s(t)^2 (importance sampling, which leaves L unbiased).

Discrete objectives over the N noise levels of a chain, label i ~ U{0..N-1}:
  SMLD / NCSN   sum_i sigma_i^2 E || s(x + sigma_i z, i) + z / sigma_i ||^2,
  DDPM          E || eps_theta(sqrt(ab_i) x + sqrt(1 - ab_i) eps, i) - eps ||^2 (L_simple),
  hybrid        L_simple + lambda N L_vlb(i) (improved DDPM, learned variance).

"Reduce" is over the data dimensions of one example: the mean (`reduce_mean`)
or half the sum (the reference convention); the batch is then averaged.

A loss receives a `model_fn(params, x, labels, train, key)` and the SDE and
knows nothing of the network behind it. For the continuous loss the model_fn
must return scores (see `score_sde.score_fn.get_score_model_fn`); for the
discrete losses it returns the network output in that loss's parameterisation
(a score for SMLD, eps for DDPM, [eps, v] on the last axis for hybrid).
Noise-conditional classifiers are trained by cross-entropy on perturbed data
(`get_classifier_loss_fn`); normalizing flows by maximum likelihood ('nll',
`get_flow_nll_loss_fn`: the mean bits/dim of the dequantised batch).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import likelihood
from score_sde import score_fn as score_fn_lib
from score_sde import sde as sde_lib

LogitsFn = score_fn_lib.LogitsFn

LossFn = Callable[[object, jax.Array, jax.Array], jax.Array]


def _reduce_fn(reduce_mean: bool):
  """Per-example reduction over all but the first axis: mean or 0.5 * sum."""
  if reduce_mean:
    return lambda v: jnp.mean(v.reshape(v.shape[0], -1), axis=-1)
  return lambda v: 0.5 * jnp.sum(v.reshape(v.shape[0], -1), axis=-1)


# ----------------------------------------------------------------------------
# Importance sampling of t for likelihood weighting
# ----------------------------------------------------------------------------

def _importance_sampler(sde, eps: float, num_bins: int = 1000):
  """Sampler of t in [eps, T] with a density q(t) close to g(t)^2 / s(t)^2.

  q is piecewise constant on geometrically spaced bins (the target is ~1/t near
  0 for VP). Because the loss is weighted by 1 / q(t) of this very q, the
  estimate is unbiased whatever the bin count; the bins only set the variance.
  Returns (sample(key, n) -> t [n], density(t) -> q(t)).
  """
  edges = jnp.geomspace(eps, sde.T, num_bins + 1)
  mids = 0.5 * (edges[1:] + edges[:-1])
  g = sde.sde(jnp.zeros_like(mids), mids)[1]
  s = sde_lib.transition_coeffs(sde, mids)[1]
  widths = edges[1:] - edges[:-1]
  masses = (g / s) ** 2 * widths
  probs = masses / jnp.sum(masses)
  heights = probs / widths

  def sample(key, n):
    k_bin, k_u = jax.random.split(key)
    bins = jax.random.categorical(k_bin, jnp.log(probs), shape=(n,))
    u = jax.random.uniform(k_u, (n,))
    return edges[bins] + u * widths[bins]

  def density(t):
    bins = jnp.clip(jnp.searchsorted(edges, t, side='right') - 1, 0, num_bins - 1)
    return heights[bins]

  return sample, density


# ----------------------------------------------------------------------------
# Continuous-time denoising score matching
# ----------------------------------------------------------------------------

def get_dsm_loss_fn(sde, score_model_fn, *, train: bool = True, reduce_mean: bool = False,
                    likelihood_weighting: bool = False,
                    importance_sampling: bool = False, eps: float = 1e-5) -> LossFn:
  """Continuous denoising score matching.

  Args:
    sde: a forward SDE (`score_sde.sde`).
    score_model_fn: `(params, x, t, train, key) -> score`, same shape as x.
    train: passed to the model (dropout on / off).
    reduce_mean: mean over data dimensions instead of half the sum.
    likelihood_weighting: lambda(t) = g(t)^2 instead of s(t)^2.
    importance_sampling: draw t from q(t) ~ g^2 / s^2 and weight by
      1 / ((T - eps) q(t)); requires likelihood_weighting.
    eps: smallest time, avoiding the singularity at t = 0.

  Returns:
    loss_fn(params, key, batch [B, ...]) -> scalar loss.
  """
  if importance_sampling and not likelihood_weighting:
    raise ValueError('importance_sampling=True needs likelihood_weighting=True '
                     '(it samples t in proportion to the likelihood weight).')
  if not 0 < eps < sde.T:
    raise ValueError(f'eps must lie in (0, T={sde.T}); got {eps}.')
  reduce = _reduce_fn(reduce_mean)
  if importance_sampling:
    sample_t, density_t = _importance_sampler(sde, eps)

  def loss_fn(params, key, batch):
    k_t, k_z, k_model = jax.random.split(key, 3)
    n = batch.shape[0]
    if importance_sampling:
      t = sample_t(k_t, n)
    else:
      t = jax.random.uniform(k_t, (n,), minval=eps, maxval=sde.T)
    z = jax.random.normal(k_z, batch.shape)
    mean, std = sde.marginal_prob(batch, t)
    score = score_model_fn(params, mean + std * z, t, train, k_model)
    if likelihood_weighting:
      g2 = sde.sde(jnp.zeros_like(t), t)[1] ** 2                       # [B]
      losses = reduce(jnp.square(score + z / std)) * g2
      if importance_sampling:
        losses = losses / ((sde.T - eps) * density_t(t))
    else:
      losses = reduce(jnp.square(score * std + z))
    return jnp.mean(losses)

  return loss_fn


# ----------------------------------------------------------------------------
# Discrete objectives
# ----------------------------------------------------------------------------

def _require(sde, attribute: str, loss_name: str, sde_names: str):
  if not hasattr(sde, attribute):
    raise ValueError(f'the {loss_name} loss needs a {sde_names} (its discrete chain); '
                     f'got {type(sde).__name__}. Set config.training.continuous=True '
                     f'for a continuous-time loss instead.')


def get_smld_loss_fn(sde, model_fn, *, train: bool = True,
                     reduce_mean: bool = False) -> LossFn:
  """NCSN loss over the VE SDE's geometric sigma ladder.

  Labels follow the NCSN ordering: i = 0 is sigma_max. `model_fn(params, x,
  labels, train, key)` returns the score.
  """
  _require(sde, 'discrete_sigmas', 'SMLD', 'VESDE')
  sigmas_descending = sde.discrete_sigmas[::-1]
  reduce = _reduce_fn(reduce_mean)

  def loss_fn(params, key, batch):
    k_label, k_z, k_model = jax.random.split(key, 3)
    labels = jax.random.randint(k_label, batch.shape[:1], 0, sde.N)
    sigmas = sde_lib.expand_to(sigmas_descending[labels], batch)
    noise = jax.random.normal(k_z, batch.shape) * sigmas
    score = model_fn(params, batch + noise, labels, train, k_model)
    target = -noise / sigmas ** 2
    losses = reduce(jnp.square(score - target)) * sigmas_descending[labels] ** 2
    return jnp.mean(losses)

  return loss_fn


def _ddpm_perturb(sde, key, batch):
  """(labels [B], x_i, eps) with x_i = sqrt(ab_i) x + sqrt(1 - ab_i) eps."""
  k_label, k_z = jax.random.split(key)
  labels = jax.random.randint(k_label, batch.shape[:1], 0, sde.N)
  alphas_cumprod = sde.alphas_cumprod[labels]
  noise = jax.random.normal(k_z, batch.shape)
  perturbed = (sde_lib.expand_to(jnp.sqrt(alphas_cumprod), batch) * batch
               + sde_lib.expand_to(jnp.sqrt(1.0 - alphas_cumprod), batch) * noise)
  return labels, perturbed, noise


def get_ddpm_loss_fn(sde, model_fn, *, train: bool = True,
                     reduce_mean: bool = True) -> LossFn:
  """DDPM L_simple: || eps_theta(x_i, i) - eps ||^2, i ~ U{0..N-1} (VP chain)."""
  _require(sde, 'alphas_cumprod', 'DDPM', 'VPSDE')
  reduce = _reduce_fn(reduce_mean)

  def loss_fn(params, key, batch):
    k_perturb, k_model = jax.random.split(key)
    labels, perturbed, noise = _ddpm_perturb(sde, k_perturb, batch)
    eps_pred = model_fn(params, perturbed, labels, train, k_model)
    return jnp.mean(reduce(jnp.square(eps_pred - noise)))

  return loss_fn


def gaussian_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale, num_levels: int = 256):
  """log P(x) of data on `num_levels` evenly spaced levels in [-1, 1] (nats, elementwise).

  Bins have half-width 1 / (num_levels - 1); the end bins extend to -inf / +inf.
  """
  half_width = 1.0 / (num_levels - 1)
  inv_std = jnp.exp(-log_scale)
  upper = inv_std * (x - mean + half_width)
  lower = inv_std * (x - mean - half_width)
  # log(Phi(upper) - Phi(lower)) on the side of 0 where the bin lies, using
  # Phi(u) - Phi(l) = Phi(-l) - Phi(-u): never a difference of two numbers near 1.
  flip = upper + lower > 0
  a = jnp.where(flip, -upper, lower)
  b = jnp.where(flip, -lower, upper)
  log_a, log_b = jax.scipy.stats.norm.logcdf(a), jax.scipy.stats.norm.logcdf(b)
  mid = log_b + jnp.log(-jnp.expm1(jnp.minimum(log_a - log_b, -1e-10)))
  log_cdf_upper = jax.scipy.stats.norm.logcdf(upper)
  log_sf_lower = jax.scipy.stats.norm.logcdf(-lower)
  return jnp.where(x < -1.0 + half_width, log_cdf_upper,
                   jnp.where(x > 1.0 - half_width, log_sf_lower, mid))


def hybrid_terms(sde, batch, labels, noise, eps_pred, v, *, reduce_mean: bool = True,
                 num_levels: int = 256):
  """Per-example (L_simple, L_vlb in bits) of the improved-DDPM hybrid objective.

  batch: x_0 [B, ...] in [-1, 1]; labels [B] in {0..N-1}; noise: the eps that
  made x_i; eps_pred, v: the model's outputs at x_i. The reverse variance is
  Sigma_i = exp(v log beta_i + (1 - v) log beta~_i), beta~ the posterior
  variance (clipped at i = 0 as in Nichol & Dhariwal). L_vlb(i) is the KL of
  q(x_{i-1} | x_i, x_0) from p(x_{i-1} | x_i) for i > 0 and the discretised-
  Gaussian decoder NLL for i = 0; its mean uses stop_gradient(eps_pred).
  """
  reduce = _reduce_fn(reduce_mean)
  betas = sde.discrete_betas
  alphas_cumprod = sde.alphas_cumprod
  alphas_cumprod_prev = jnp.concatenate([jnp.ones(1), alphas_cumprod[:-1]])
  posterior_var = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
  posterior_logvar = jnp.log(jnp.concatenate([posterior_var[1:2], posterior_var[1:]]))
  coef_x0 = betas * jnp.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
  coef_xt = (1.0 - alphas_cumprod_prev) * jnp.sqrt(1.0 - betas) / (1.0 - alphas_cumprod)
  e = lambda a: sde_lib.expand_to(a[labels], batch)  # noqa: E731

  perturbed = e(jnp.sqrt(alphas_cumprod)) * batch + e(jnp.sqrt(1.0 - alphas_cumprod)) * noise
  loss_simple = reduce(jnp.square(eps_pred - noise))
  true_mean = e(coef_x0) * batch + e(coef_xt) * perturbed
  x0_pred = ((perturbed - e(jnp.sqrt(1.0 - alphas_cumprod)) * jax.lax.stop_gradient(eps_pred))
             / e(jnp.sqrt(alphas_cumprod)))
  model_mean = e(coef_x0) * x0_pred + e(coef_xt) * perturbed
  model_logvar = v * e(jnp.log(betas)) + (1.0 - v) * e(posterior_logvar)
  kl = gaussian_kl(true_mean, e(posterior_logvar), model_mean, model_logvar)
  decoder_nll = -discretized_gaussian_log_likelihood(
      batch, model_mean, 0.5 * model_logvar, num_levels)
  first = sde_lib.expand_to(labels == 0, batch)
  vlb_bits = reduce(jnp.where(first, decoder_nll, kl)) / math.log(2.0)
  return loss_simple, vlb_bits


def get_hybrid_loss_fn(sde, model_fn, *, train: bool = True, reduce_mean: bool = True,
                       hybrid_lambda: float = 1e-3, num_levels: int = 256) -> LossFn:
  """Improved-DDPM hybrid objective L_simple + lambda N L_vlb(i), learned variance.

  The model outputs [eps, v] concatenated on the last axis (see
  `hybrid_terms`). N L_vlb(i) with i ~ U{0..N-1} is an unbiased estimate of
  the whole VLB; lambda = 1e-3 as in the paper, so L_vlb trains only v and
  L_simple trains eps. Data must be centred in [-1, 1] on `num_levels` levels.
  """
  _require(sde, 'alphas_cumprod', 'hybrid', 'VPSDE')
  if hybrid_lambda < 0:
    raise ValueError(f'hybrid_lambda must be >= 0; got {hybrid_lambda}.')

  def loss_fn(params, key, batch):
    k_perturb, k_model = jax.random.split(key)
    labels, perturbed, noise = _ddpm_perturb(sde, k_perturb, batch)
    out = model_fn(params, perturbed, labels, train, k_model)
    if out.shape[-1] != 2 * batch.shape[-1]:
      raise ValueError(f'the hybrid loss needs a learned-variance model output with '
                       f'2 x {batch.shape[-1]} channels; got shape {out.shape}. Set '
                       f'config.model.learned_variance=True.')
    eps_pred, v = jnp.split(out, 2, axis=-1)
    loss_simple, vlb_bits = hybrid_terms(sde, batch, labels, noise, eps_pred, v,
                                         reduce_mean=reduce_mean, num_levels=num_levels)
    return jnp.mean(loss_simple + hybrid_lambda * sde.N * vlb_bits)

  return loss_fn


# ----------------------------------------------------------------------------
# Choice by config
# ----------------------------------------------------------------------------

LOSSES = ('dsm', 'smld', 'ddpm', 'hybrid', 'nll')


def loss_name_from_config(config, *, flow: bool = False) -> str:
  """'auto' resolves to nll (a normalizing flow: `flow`, see experiment.is_flow), dsm
  (continuous), smld (discrete VE), hybrid (learned variance) or ddpm (discrete VP)."""
  name = config.training.get('loss', 'auto')
  if name != 'auto':
    if name not in LOSSES:
      raise ValueError(f'unknown loss {name!r} (config.training.loss); valid: '
                       f'{("auto",) + LOSSES}.')
    if flow != (name == 'nll'):
      raise ValueError(f'config.training.loss {name!r} does not fit model '
                       f"{config.model.name!r}: flows train with 'nll', score networks with a "
                       f"score loss; set it to 'auto'.")
    return name
  if flow:
    return 'nll'
  if config.training.continuous:
    return 'dsm'
  sde_name = config.training.sde.lower()
  if sde_name == 'vesde':
    return 'smld'
  if sde_name == 'vpsde':
    return 'hybrid' if config.model.get('learned_variance', False) else 'ddpm'
  raise ValueError(f'no discrete loss for config.training.sde={sde_name!r}; set '
                   f'config.training.continuous=True.')


def get_loss_fn(config, sde, model_fn, *, train: bool = True, eps: float = 1e-5,
                num_levels: int = 256) -> LossFn:
  """The loss a config asks for; `model_fn` is the raw network (see module doc). A
  flow's loss is `get_flow_nll_loss_fn` (score_sde.train.loss_fns builds either)."""
  name = loss_name_from_config(config)     # a score network's: never 'nll' here
  reduce_mean = config.training.reduce_mean
  if name == 'dsm':
    score_model_fn = score_fn_lib.get_score_model_fn(sde, model_fn, continuous=True)
    return get_dsm_loss_fn(
        sde, score_model_fn, train=train, reduce_mean=reduce_mean,
        likelihood_weighting=config.training.likelihood_weighting,
        importance_sampling=config.training.get('importance_sampling', False), eps=eps)
  if name == 'smld':
    return get_smld_loss_fn(sde, model_fn, train=train, reduce_mean=reduce_mean)
  if name == 'ddpm':
    return get_ddpm_loss_fn(sde, model_fn, train=train, reduce_mean=reduce_mean)
  assert name == 'hybrid', name
  return get_hybrid_loss_fn(sde, model_fn, train=train, reduce_mean=reduce_mean,
                            hybrid_lambda=config.training.get('hybrid_lambda', 1e-3),
                            num_levels=num_levels)


# ----------------------------------------------------------------------------
# Normalizing flows: maximum likelihood
# ----------------------------------------------------------------------------

def get_flow_nll_loss_fn(log_prob_fn, *, dim: int, inverse_scaler: Callable,
                         num_levels: int, train: bool = True) -> LossFn:
  """loss(params, key, batch [B, ...]) = mean bits/dim of the batch under the flow.

  log_prob_fn(params, x) -> (log p(x) [B] nats, z) is the flow's exact density
  (`score_sde.flows.get_log_prob_fn`); the batch is uniformly dequantised data in
  model space, so the loss is the training split's bits/dim, the number the bpd
  job reports on the test split. With `train` the key draws the coupling networks'
  dropout masks (config.model.dropout); without (the eval loss) it is unused and the
  loss is the exact bits/dim of the batch.
  """

  # bits/dim = -logp / (D ln 2) + offset (the levels and the scaler's slope), fixed here.
  offset = float(likelihood.bits_per_dim(np.zeros(1, np.float32), dim, inverse_scaler,
                                         num_levels)[0])

  def loss_fn(params, key, batch):
    logp, _ = log_prob_fn(params, batch, key if train else None)
    return jnp.mean(-logp) / (dim * math.log(2.0)) + offset

  return loss_fn


# ----------------------------------------------------------------------------
# Noise-conditional classifiers: cross-entropy on perturbed data
# ----------------------------------------------------------------------------

def check_class_labels(labels, batch_size: int, num_classes: int) -> np.ndarray:
  """Integer class labels [B] in [0, num_classes); a scalar is repeated."""
  labels = np.asarray(labels)
  if labels.ndim == 0:
    labels = np.full((batch_size,), labels)
  if labels.shape != (batch_size,):
    raise ValueError(f'class labels must have shape [B] = [{batch_size}] (one per sample) '
                     f'or be one integer; got shape {list(labels.shape)}.')
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    if not np.all(np.equal(np.mod(labels, 1), 0)):
      raise ValueError(f'class labels must be integers; got {labels[:5].tolist()}.')
  labels = labels.astype(np.int64)
  bad = labels[(labels < 0) | (labels >= num_classes)]
  if bad.size:
    raise ValueError(f'class index {int(bad[0])} is out of range: the classifier has '
                     f'{num_classes} classes, so labels must lie in [0, {num_classes - 1}].')
  return labels.astype(np.int32)


def _check_batch_structure(batch) -> None:
  if not isinstance(batch, dict) or 'image' not in batch or 'label' not in batch:
    found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
    raise ValueError(f"a classifier batch is a dict {{'image': [B, H, W, C], 'label': [B]}}; "
                     f'got {found}.')
  if np.shape(batch['label']) != np.shape(batch['image'])[:1]:
    raise ValueError(f"batch['label'] must have shape [B] = {list(np.shape(batch['image'])[:1])}; "
                     f"got {list(np.shape(batch['label']))}.")


def check_classifier_batch(batch, num_classes: int) -> None:
  """Host-side check of a (concrete) labelled batch: structure and label range."""
  _check_batch_structure(batch)
  check_class_labels(np.asarray(batch['label']), len(batch['label']), num_classes)


def get_classifier_loss_fn(sde, logits_model_fn, *, train: bool = True,
                           eps: float = 1e-5) -> Callable:
  """Cross-entropy of a noise-conditional classifier on perturbed data.

    L = E_{t ~ U(eps, T)} E_{(x_0, y)} E_z [ -log p_phi(y | m(t) x_0 + s(t) z, t) ]

  Args:
    sde: the forward SDE (the one the score model was trained with).
    logits_model_fn: (params, x, t, train, key) -> [B, K] (`get_logits_model_fn`).
    train: dropout on / off.
    eps: smallest time.

  Returns:
    loss_fn(params, key, batch) -> scalar, batch = {'image': [B, H, W, C]
    (model space), 'label': [B] int}. The signature of
    `score_sde.train.make_train_step`. Labels outside [0, K) give a NaN loss
    (check data with `check_classifier_batch`).
  """
  if not 0 < eps < sde.T:
    raise ValueError(f'eps must lie in (0, T={sde.T}); got {eps}.')

  def loss_fn(params, key, batch):
    _check_batch_structure(batch)
    images = jnp.asarray(batch['image'], jnp.float32)
    labels = jnp.asarray(batch['label'], jnp.int32)
    k_t, k_z, k_model = jax.random.split(key, 3)
    t = jax.random.uniform(k_t, images.shape[:1], minval=eps, maxval=sde.T)
    z = jax.random.normal(k_z, images.shape)
    mean, std = sde.marginal_prob(images, t)
    logits = logits_model_fn(params, mean + std * z, t, train, k_model)
    log_probs = jax.nn.log_softmax(logits, axis=-1)                  # [B, K]
    num_classes = log_probs.shape[-1]
    in_range = (labels >= 0) & (labels < num_classes)
    picked = jnp.take_along_axis(log_probs, jnp.clip(labels, 0, num_classes - 1)[:, None],
                                 axis=-1)[:, 0]
    return -jnp.mean(jnp.where(in_range, picked, jnp.nan))

  return loss_fn


def classifier_correct(logits_fn: LogitsFn, sde, key, images, labels, t) -> jax.Array:
  """[B] bool: whether the classifier recovers `labels` from x_t ~ p_0t(. | images) at time t."""
  images = jnp.asarray(images, jnp.float32)
  vec_t = jnp.full(images.shape[:1], t, jnp.float32)
  mean, std = sde.marginal_prob(images, vec_t)
  x_t = mean + std * jax.random.normal(key, images.shape)
  return jnp.argmax(logits_fn(x_t, vec_t), axis=-1) == jnp.asarray(labels)


def classifier_accuracy(logits_fn: LogitsFn, sde, key, batch, t: float) -> jax.Array:
  """Accuracy at a fixed time t on batch {'image', 'label'} perturbed by p_0t."""
  _check_batch_structure(batch)
  return jnp.mean(classifier_correct(logits_fn, sde, key, batch['image'], batch['label'],
                                     t).astype(jnp.float32))
