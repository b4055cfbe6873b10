"""Gaussian-mixture data with exact scores and log-densities under linear SDEs.

For an SDE whose transition is x_t = m(t) x_0 + s(t) z (VE, VP, sub-VP, cosine
VP), a mixture sum_k w_k N(mu_k, Sigma_k) stays a mixture at every time:

  p_t(x) = sum_k w_k N(x; m(t) mu_k, m(t)^2 Sigma_k + s(t)^2 I),

so log p_t, the score grad_x log p_t and the component posterior p(k | x_t)
are all in closed form. Check a sampler or a likelihood against the truth
before spending a pod on it; our tests use nothing else.

Shapes: data are vectors, x: [..., D]; t is a scalar or has shape x.shape[:-1].
Image-shaped data: reshape to [B, D] and back.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from score_sde import sde as sde_lib


@flax.struct.dataclass
class GaussianMixture:
  """sum_k weights[k] N(means[k], covs[k]).

  weights: [K], positive, summing to 1.
  means:   [K, D].
  covs:    [K, D] (diagonal variances) or [K, D, D] (full covariances).
  """
  weights: jax.Array
  means: jax.Array
  covs: jax.Array

  @classmethod
  def create(cls, weights, means, covs) -> 'GaussianMixture':
    """Validates shapes and values, normalises the weights."""
    weights = np.asarray(weights, np.float64)
    means = np.asarray(means, np.float64)
    covs = np.asarray(covs, np.float64)
    if means.ndim != 2:
      raise ValueError(f'means must have shape [K, D]; got {means.shape}.')
    k, d = means.shape
    if weights.shape != (k,):
      raise ValueError(f'weights must have shape [K] = [{k}]; got {weights.shape}.')
    if np.any(weights <= 0) or not np.all(np.isfinite(weights)):
      raise ValueError(f'mixture weights must be positive and finite; got {weights}.')
    if covs.shape == (k, d):
      if np.any(covs <= 0):
        raise ValueError('diagonal covariances (variances) must be positive.')
    elif covs.shape == (k, d, d):
      if not np.allclose(covs, np.swapaxes(covs, -1, -2)):
        raise ValueError('full covariances must be symmetric.')
      if np.any(np.linalg.eigvalsh(covs) <= 0):
        raise ValueError('full covariances must be positive definite.')
    else:
      raise ValueError(f'covs must have shape [K, D] = [{k}, {d}] (diagonal) or '
                       f'[K, D, D] (full); got {covs.shape}.')
    return cls(weights=jnp.asarray(weights / weights.sum(), jnp.float32),
               means=jnp.asarray(means, jnp.float32),
               covs=jnp.asarray(covs, jnp.float32))

  @property
  def dim(self) -> int:
    return self.means.shape[-1]

  @property
  def num_components(self) -> int:
    return self.means.shape[0]

  @property
  def is_diagonal(self) -> bool:
    return self.covs.ndim == 2

  # ------------------------------------------------------------------ data
  def sample(self, key, n: int, return_labels: bool = False):
    """n samples [n, D] (and their component labels [n] if asked)."""
    key_k, key_z = jax.random.split(key)
    labels = jax.random.categorical(key_k, jnp.log(self.weights), shape=(n,))
    z = jax.random.normal(key_z, (n, self.dim))
    if self.is_diagonal:
      x = self.means[labels] + jnp.sqrt(self.covs[labels]) * z
    else:
      chol = jnp.linalg.cholesky(self.covs)
      x = self.means[labels] + jnp.einsum('nij,nj->ni', chol[labels], z)
    return (x, labels) if return_labels else x

  def log_prob(self, x) -> jax.Array:
    """log p_0(x): [..., D] -> [...]."""
    return jax.nn.logsumexp(self._component_log_probs(x, 1.0, 0.0), axis=-1)

  # ------------------------------------------------------ marginals under an SDE
  def component_log_probs_t(self, x, t, sde) -> jax.Array:
    """log w_k + log N(x; m mu_k, m^2 Sigma_k + s^2 I): [..., D] -> [..., K]."""
    m, s = self._coeffs(sde, t, x)
    return self._component_log_probs(x, m, s)

  def log_prob_t(self, x, t, sde) -> jax.Array:
    """Exact log p_t(x): [..., D] -> [...]."""
    return jax.nn.logsumexp(self.component_log_probs_t(x, t, sde), axis=-1)

  def log_posterior_t(self, x, t, sde) -> jax.Array:
    """Exact classifier log p(k | x_t): [..., D] -> [..., K]."""
    return jax.nn.log_softmax(self.component_log_probs_t(x, t, sde), axis=-1)

  def score(self, x, t, sde) -> jax.Array:
    """Exact score grad_x log p_t(x): [..., D] -> [..., D]."""
    m, s = self._coeffs(sde, t, x)
    resp = jax.nn.softmax(self._component_log_probs(x, m, s), axis=-1)  # [..., K]
    diff = x[..., None, :] - m[..., None, None] * self.means            # [..., K, D]
    if self.is_diagonal:
      var = m[..., None, None] ** 2 * self.covs + s[..., None, None] ** 2
      component_scores = -diff / var
    else:
      basis, var = self._eigen(m, s)                                    # [K, D, D], [..., K, D]
      coords = jnp.einsum('kdj,...kd->...kj', basis, diff, precision='highest')
      component_scores = -jnp.einsum('kdj,...kj->...kd', basis, coords / var,
                                     precision='highest')
    return jnp.sum(resp[..., None] * component_scores, axis=-2)

  def score_fn(self, sde):
    """score_fn(x, t) for samplers, losses and the likelihood."""
    return lambda x, t: self.score(x, t, sde)

  def marginal_t(self, sde, t: float) -> 'GaussianMixture':
    """The mixture p_t itself at one (scalar) time t."""
    m, s = sde_lib.transition_coeffs(sde, t)
    if self.is_diagonal:
      covs = m ** 2 * self.covs + s ** 2
    else:
      covs = m ** 2 * self.covs + s ** 2 * jnp.eye(self.dim)
    return GaussianMixture(weights=self.weights, means=m * self.means, covs=covs)

  # -------------------------------------------------------------- internals
  def _coeffs(self, sde, t, x):
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:-1])
    return sde_lib.transition_coeffs(sde, t)

  def _eigen(self, m, s):
    """(U [K, D, D], variances [..., K, D]) with m^2 Sigma_k + s^2 I = U_k diag(var_k) U_k^T.

    One eigendecomposition of the K data covariances per call, shared by every
    example and time: no factorisation per example (a per-example Cholesky inside
    a vmapped adaptive ODE solve stalls XLA:CPU for batches of ~100 or more).
    """
    eigenvalues, basis = jnp.linalg.eigh(self.covs)
    var = m[..., None, None] ** 2 * eigenvalues + s[..., None, None] ** 2
    return basis, var

  def _component_log_probs(self, x, m, s):
    m = jnp.asarray(m, jnp.float32)
    s = jnp.asarray(s, jnp.float32)
    diff = x[..., None, :] - m[..., None, None] * self.means              # [..., K, D]
    d = self.dim
    if self.is_diagonal:
      var = m[..., None, None] ** 2 * self.covs + s[..., None, None] ** 2
      log_norm = -0.5 * jnp.sum(jnp.log(2 * jnp.pi * var) + diff ** 2 / var, axis=-1)
    else:
      basis, var = self._eigen(m, s)
      coords = jnp.einsum('kdj,...kd->...kj', basis, diff, precision='highest')
      log_norm = -0.5 * (d * jnp.log(2 * jnp.pi) + jnp.sum(jnp.log(var), axis=-1)
                         + jnp.sum(coords ** 2 / var, axis=-1))
    return jnp.log(self.weights) + log_norm


def gaussian(mean, var) -> GaussianMixture:
  """A single Gaussian N(mean, var) (var: [D] diagonal or [D, D] full)."""
  mean = np.asarray(mean, np.float64)
  var = np.asarray(var, np.float64)
  return GaussianMixture.create(np.ones(1), mean[None], var[None])


def random_mixture(key, dim: int, num_components: int, *, full: bool = False,
                   spread: float = 2.0, scale: float = 0.3) -> GaussianMixture:
  """A reproducible random mixture in `dim` dimensions (tests, demos)."""
  k_w, k_mu, k_cov = jax.random.split(key, 3)
  weights = np.asarray(jax.random.uniform(k_w, (num_components,), minval=0.5, maxval=1.5))
  means = spread * np.asarray(jax.random.normal(k_mu, (num_components, dim)))
  if full:
    a = np.asarray(jax.random.normal(k_cov, (num_components, dim, dim))) / np.sqrt(dim)
    covs = scale ** 2 * (np.einsum('kij,klj->kil', a, a) + 0.5 * np.eye(dim))
  else:
    covs = scale ** 2 * np.asarray(jax.random.uniform(k_cov, (num_components, dim),
                                                      minval=0.5, maxval=1.5))
  return GaussianMixture.create(weights, means, covs)


# ----------------------------------------------------------------------------
# Few-step samplers on Gaussian data, in closed form
# ----------------------------------------------------------------------------

def gaussian_step_map(method: str, sigmas, y_prior, mean, var, *,
                      euler_first: bool = False,
                      lower_order_final_below: int = 15) -> np.ndarray:
  """What `heun` or `dpmpp_2m` returns on Gaussian data N(mean, diag(var)), computed
  in float64 from the step formulas alone (no sampler code): an independent check of
  the samplers and the closed form of their discretisation error.

  Works in EDM's scaled y = x / m(t) and sigma = s(t) / m(t), where the data
  prediction is D(y, sigma) = mean + (y - mean) var / (var + sigma^2):
    heun      Heun's trapezoid in sigma (an Euler step first if `euler_first` and
              K > 1: the sampler's rule where sigma(T) > grid_sigma_max)
    dpmpp_2m  y' = (s' / s) y + (1 - s' / s) D~, D~ = (1 + 1/2r) D_i - D_{i-1} / 2r,
              r = h_{i-1} / h_i, h = log(s / s'); first order at the first step and,
              with K < `lower_order_final_below` steps (the sampler's
              LOWER_ORDER_FINAL_BELOW), the last
  then noise removal (D at the last sigma).

  sigmas: [K + 1] noise levels from the top down (the sampler's grid).
  y_prior: [..., D] prior draws divided by m(T); mean, var: [D].
  Returns [..., D] samples (data scale).
  """
  if method not in ('heun', 'dpmpp_2m'):
    raise ValueError(f"gaussian_step_map covers 'heun' and 'dpmpp_2m'; got {method!r}.")
  if euler_first and method != 'heun':
    raise ValueError(f'euler_first applies to heun only (its first step where sigma(T) > '
                     f'grid_sigma_max); got method={method!r} with euler_first=True.')
  sigmas = np.asarray(sigmas, np.float64)
  mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
  denoise = lambda y, s: mean + (y - mean) * var / (var + s * s)
  y, previous = np.asarray(y_prior, np.float64), None
  num_steps = len(sigmas) - 1
  for i, (a, b) in enumerate(zip(sigmas[:-1], sigmas[1:])):
    if method == 'heun':
      slope = (y - denoise(y, a)) / a
      y_euler = y + (b - a) * slope
      y = y_euler if (euler_first and i == 0 and num_steps > 1) else (
          y + (b - a) * 0.5 * (slope + (y_euler - denoise(y_euler, b)) / b))
      continue
    h = np.log(a / b)
    d_now = denoise(y, a)
    if previous is None or (num_steps < lower_order_final_below and i == num_steps - 1):
      d_tilde = d_now
    else:
      r = previous[1] / h
      d_tilde = (1 + 0.5 / r) * d_now - 0.5 / r * previous[0]
    y = (b / a) * y + (1 - b / a) * d_tilde
    previous = (d_now, h)
  return denoise(y, sigmas[-1])
