"""Forward SDEs dx = f(x, t) dt + g(t) dw and their discretisations.

Every SDE here is an immutable pytree (a `flax.struct.dataclass` whose fields
are all static Python numbers), with pure methods:

  sde(x, t)            -> (drift f(x, t), diffusion g(t))
  marginal_prob(x0, t) -> (mean, std) of p_0t(x_t | x_0) = N(m(t) x0, s(t)^2 I)
  prior_sampling(key, shape), prior_logp(z)
  discretize(x, t)     -> (f_i, G_i) of x_{i+1} = x_i + f_i + G_i z

Shapes. `x` has any rank; its leading axes are batch axes. `t` is a scalar or
has the batch shape `x.shape[:t.ndim]` (usually `[B]`). Coefficients that
depend only on t come back with shape `t.shape + (1,) * (x.ndim - t.ndim)`, so
they broadcast against `x`. `prior_logp` treats axis 0 as the batch axis.

Time runs over [0, T] with T = 1 for all SDEs here, as in Song et al. 2021.
`reverse(sde, score_fn)` gives the reverse-time SDE or the probability-flow ODE
with the same interface; samplers, losses and the likelihood use nothing else.
"""
from __future__ import annotations

import math
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]

_static = lambda default: flax.struct.field(pytree_node=False, default=default)  # noqa: E731

SCHEDULES = ('linear', 'cosine')
COSINE_S = 0.008          # improved-DDPM offset s
COSINE_MAX_BETA = 0.999   # improved-DDPM clip of the discrete betas


# ----------------------------------------------------------------------------
# Broadcasting and input checks
# ----------------------------------------------------------------------------

def expand_to(t: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes `t` (scalar or batch shape `[B, ...]`) to broadcast against `x`."""
  t = jnp.asarray(t)
  if t.ndim > x.ndim or x.shape[:t.ndim] != t.shape and t.ndim > 0:
    raise ValueError(
        f'time has shape {t.shape}, which is not a leading part of the data '
        f'shape {x.shape}; pass a scalar t or one t per example (shape '
        f'{x.shape[:1]}).')
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def _is_concrete(value) -> bool:
  return not isinstance(value, jax.core.Tracer)


def check_time(t, T: float) -> None:
  """Raises if a concrete (non-traced) `t` lies outside [0, T].

  Under `jit` the values are unknown and this check is skipped; samplers and
  losses build their times inside [0, T] by construction.
  """
  if not _is_concrete(t):
    return
  t_np = np.asarray(t)
  if t_np.size and (np.any(~np.isfinite(t_np)) or t_np.min() < 0.0 or
                    t_np.max() > T * (1 + 1e-6)):
    raise ValueError(
        f'time must lie in [0, T] = [0, {T}]; got values in '
        f'[{t_np.min()}, {t_np.max()}]. Rescale your times to the SDE\'s horizon.')


def _check_positive(name: str, value: float) -> float:
  value = float(value)
  if not (math.isfinite(value) and value > 0):
    raise ValueError(f'{name} must be a positive finite number; got {value}.')
  return value


def _check_num_steps(N) -> int:
  if int(N) != N or N < 1:
    raise ValueError(f'N (number of discretisation steps) must be a positive '
                     f'integer; got {N}.')
  return int(N)


# ----------------------------------------------------------------------------
# Noise schedules
# ----------------------------------------------------------------------------

def linear_betas(beta_min: float, beta_max: float, N: int) -> jax.Array:
  """DDPM betas [N]: linspace(beta_min / N, beta_max / N) (1e-4..0.02 at N=1000)."""
  return jnp.linspace(beta_min / N, beta_max / N, N)


def cosine_alpha_bar(t, T: float = 1.0, s: float = COSINE_S) -> jax.Array:
  """Improved-DDPM alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T)+s)/(1+s) pi/2)."""
  f = lambda u: jnp.cos((u / T + s) / (1 + s) * jnp.pi / 2) ** 2  # noqa: E731
  return f(jnp.asarray(t, jnp.float32)) / f(0.0)


def cosine_betas(N: int, s: float = COSINE_S,
                 max_beta: float = COSINE_MAX_BETA) -> jax.Array:
  """Improved-DDPM betas [N]: 1 - alpha_bar(i/N) / alpha_bar((i-1)/N), clipped."""
  t = np.arange(N + 1, dtype=np.float64) / N
  f = np.cos((t + s) / (1 + s) * np.pi / 2) ** 2
  alpha_bar = f / f[0]
  betas = np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)
  return jnp.asarray(betas, jnp.float32)


def geometric_sigmas(sigma_max: float, sigma_min: float, num: int) -> jax.Array:
  """NCSN noise levels [num], geometric and descending from sigma_max to sigma_min."""
  return jnp.exp(jnp.linspace(jnp.log(sigma_max), jnp.log(sigma_min), num))


def _cosine_cap_rate(N: int, T: float) -> float:
  """Largest continuous-time beta(t) of the cosine schedule.

  beta(t) = pi tan(u(t)) / ((1+s) T) diverges at t = T. It is capped at the
  rate whose integral over one step T/N of the N-step chain equals the
  discrete clip, -log(1 - 0.999): no step then removes more signal than the
  clipped discrete chain, and all marginals stay in closed form.
  """
  return -math.log(1.0 - COSINE_MAX_BETA) * N / T


def _cosine_beta_and_integral(t, T: float, N: int, s: float = COSINE_S):
  """Capped cosine beta(t) and its integral B(t) = int_0^t beta (closed form)."""
  scale = jnp.pi / (2 * (1 + s) * T)          # du/dt
  u0 = s / (1 + s) * jnp.pi / 2
  cap = _cosine_cap_rate(N, T)
  # Time at which the uncapped rate 2 scale tan(u) reaches the cap.
  u_cap = math.atan(cap / (2 * float(scale)))
  t_cap = (u_cap - float(u0)) / float(scale)
  t = jnp.asarray(t, jnp.float32)
  delta = jnp.minimum(scale * t, u_cap - float(u0))       # u - u0
  beta = jnp.where(t < t_cap, 2 * scale * jnp.tan(u0 + delta), cap)
  # int 2 scale tan(u) dt = -2 log(cos(u) / cos(u0)), and
  # cos(u0 + d) / cos(u0) = 1 - 2 sin^2(d / 2) - tan(u0) sin(d): no cancellation at small t.
  ratio_minus_one = -2 * jnp.sin(delta / 2) ** 2 - math.tan(float(u0)) * jnp.sin(delta)
  integral = -2 * jnp.log1p(ratio_minus_one) + cap * jnp.maximum(t - t_cap, 0.0)
  return beta, integral


def _standard_normal_logp(z: jax.Array, scale: float = 1.0) -> jax.Array:
  """log N(z; 0, scale^2 I) summed over all but the first axis -> [B]."""
  dim = np.prod(z.shape[1:])
  sq = jnp.sum(jnp.square(z).reshape(z.shape[0], -1), axis=-1)
  return -0.5 * dim * jnp.log(2 * jnp.pi * scale ** 2) - sq / (2 * scale ** 2)


def euler_maruyama_discretization(sde, x, t):
  """Default discretisation: f = f(x, t) dt, G = g(t) sqrt(dt), dt = T / N."""
  dt = sde.T / sde.N
  drift, diffusion = sde.sde(x, t)
  return drift * dt, diffusion * jnp.sqrt(dt)


# ----------------------------------------------------------------------------
# The SDEs
# ----------------------------------------------------------------------------

class MissingDiscreteChainError(ValueError):
  """A VP-type SDE with too few steps N for its discrete DDPM chain (beta_max / N > 1)."""


@flax.struct.dataclass
class VESDE:
  """Variance-exploding SDE: dx = sqrt(d sigma^2(t) / dt) dw.

  sigma(t) = sigma_min (sigma_max / sigma_min)^t; its N-step discretisation is
  the SMLD / NCSN chain x_i = x_{i-1} + sqrt(sigma_i^2 - sigma_{i-1}^2) z.
  """
  sigma_min: float = _static(0.01)
  sigma_max: float = _static(50.0)
  N: int = _static(1000)
  # How its networks are conditioned and what they output (score_fn.py).
  continuous_parameterisation = 'sigma_score'
  discrete_parameterisation = 'index_score'

  def __post_init__(self):
    object.__setattr__(self, 'sigma_min', _check_positive('sigma_min', self.sigma_min))
    object.__setattr__(self, 'sigma_max', _check_positive('sigma_max', self.sigma_max))
    object.__setattr__(self, 'N', _check_num_steps(self.N))
    if self.sigma_min >= self.sigma_max:
      raise ValueError(f'VESDE needs sigma_min < sigma_max; got sigma_min='
                       f'{self.sigma_min}, sigma_max={self.sigma_max}.')

  @property
  def T(self) -> float:
    return 1.0

  @property
  def discrete_sigmas(self) -> jax.Array:
    """[N] sigma_i, ascending from sigma_min to sigma_max (geometric)."""
    return jnp.exp(jnp.linspace(math.log(self.sigma_min), math.log(self.sigma_max), self.N))

  def sigma(self, t) -> jax.Array:
    """Noise level sigma(t), same shape as t."""
    return self.sigma_min * (self.sigma_max / self.sigma_min) ** jnp.asarray(t, jnp.float32)

  def sde(self, x, t):
    g = self.sigma(t) * math.sqrt(2 * (math.log(self.sigma_max) - math.log(self.sigma_min)))
    return jnp.zeros_like(x), expand_to(g, x)

  def marginal_prob(self, x, t):
    check_time(t, self.T)
    return x, expand_to(self.sigma(t), x)

  def prior_sampling(self, key, shape):
    return jax.random.normal(key, shape) * self.sigma_max

  def prior_logp(self, z):
    return _standard_normal_logp(z, self.sigma_max)

  def discretize(self, x, t):
    """SMLD chain: f = 0, G = sqrt(sigma_i^2 - sigma_{i-1}^2), i = floor(t (N-1) / T)."""
    timestep = (jnp.asarray(t) * (self.N - 1) / self.T).astype(jnp.int32)
    sigmas = self.discrete_sigmas
    sigma = sigmas[timestep]
    adjacent = jnp.where(timestep == 0, 0.0, sigmas[jnp.maximum(timestep - 1, 0)])
    return jnp.zeros_like(x), expand_to(jnp.sqrt(sigma ** 2 - adjacent ** 2), x)


class _BetaSchedule:
  """beta(t) and B(t) = int_0^t beta for the VP family ('linear' or 'cosine')."""

  def _validate_schedule(self):
    object.__setattr__(self, 'N', _check_num_steps(self.N))
    if self.schedule not in SCHEDULES:
      raise ValueError(f'unknown noise schedule {self.schedule!r}; valid: {SCHEDULES}.')
    if self.schedule == 'linear':
      beta_min = float(self.beta_min)
      beta_max = float(self.beta_max)
      if not (math.isfinite(beta_min) and beta_min >= 0):
        raise ValueError(f'beta_min must be >= 0; got {beta_min}.')
      if not (math.isfinite(beta_max) and beta_max > 0):
        raise ValueError(f'beta_max must be > 0; got {beta_max}.')
      if beta_min > beta_max:
        raise ValueError(f'beta_min must not exceed beta_max; got beta_min='
                         f'{beta_min} > beta_max={beta_max}.')
      object.__setattr__(self, 'beta_min', beta_min)
      object.__setattr__(self, 'beta_max', beta_max)

  @property
  def T(self) -> float:
    return 1.0

  def beta_and_integral(self, t):
    """(beta(t), int_0^t beta(s) ds), each with the shape of t."""
    t = jnp.asarray(t, jnp.float32)
    if self.schedule == 'cosine':
      return _cosine_beta_and_integral(t, self.T, self.N)
    b0, b1 = self.beta_min, self.beta_max
    return b0 + t * (b1 - b0), b0 * t + 0.5 * (b1 - b0) * t ** 2

  @property
  def discrete_betas(self) -> jax.Array:
    """[N] betas of the discrete DDPM chain."""
    if self.schedule == 'cosine':
      return cosine_betas(self.N)
    if self.beta_max / self.N > 1.0:   # static: raised when tracing, never silently NaN
      raise MissingDiscreteChainError(
          f'the discrete (DDPM) chain needs betas beta_i <= 1, but beta_max / N = '
          f'{self.beta_max} / {self.N} = {self.beta_max / self.N:.3g} (sqrt(1 - beta_i) '
          f'would be NaN); use N >= {math.ceil(self.beta_max)} (config.model.num_scales) '
          f'or a smaller beta_max. Continuous-time samplers (euler_maruyama, ode, sde) '
          f'take any N.')
    return linear_betas(self.beta_min, self.beta_max, self.N)

  @property
  def alphas_cumprod(self) -> jax.Array:
    """[N] alpha_bar_i = prod_{j<=i} (1 - beta_j)."""
    return jnp.cumprod(1.0 - self.discrete_betas)

  def prior_sampling(self, key, shape):
    return jax.random.normal(key, shape)

  def prior_logp(self, z):
    return _standard_normal_logp(z)


@flax.struct.dataclass
class VPSDE(_BetaSchedule):
  """Variance-preserving SDE: dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw.

  The continuous limit of DDPM. `schedule='linear'`: beta(t) = beta_min +
  t (beta_max - beta_min); `schedule='cosine'`: the improved-DDPM schedule,
  alpha_bar(t) = f(t) / f(0) (beta_min / beta_max unused). Its N-step
  discretisation is the DDPM chain x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z.
  """
  beta_min: float = _static(0.1)
  beta_max: float = _static(20.0)
  N: int = _static(1000)
  schedule: str = _static('linear')
  continuous_parameterisation = 'time_noise'     # score_fn.py
  discrete_parameterisation = 'chain_noise'      # the DDPM chain's std

  def __post_init__(self):
    self._validate_schedule()

  def sde(self, x, t):
    beta, _ = self.beta_and_integral(t)
    beta = expand_to(beta, x)
    return -0.5 * beta * x, jnp.sqrt(beta)

  def marginal_prob(self, x, t):
    check_time(t, self.T)
    _, integral = self.beta_and_integral(t)
    log_mean_coeff = expand_to(-0.5 * integral, x)
    return jnp.exp(log_mean_coeff) * x, jnp.sqrt(-jnp.expm1(2.0 * log_mean_coeff))

  def discretize(self, x, t):
    """DDPM chain: f = (sqrt(1 - beta_i) - 1) x, G = sqrt(beta_i), i = floor(t (N-1) / T)."""
    timestep = (jnp.asarray(t) * (self.N - 1) / self.T).astype(jnp.int32)
    beta = expand_to(self.discrete_betas[timestep], x)
    return jnp.sqrt(1.0 - beta) * x - x, jnp.sqrt(beta)


@flax.struct.dataclass
class SubVPSDE(_BetaSchedule):
  """Sub-VP SDE: dx = -beta x / 2 dt + sqrt(beta (1 - exp(-2 int_0^t beta))) dw.

  Its marginal variance (1 - alpha_bar)^2 lies below the VP one. Discretised
  by Euler--Maruyama (as in the reference).
  """
  beta_min: float = _static(0.1)
  beta_max: float = _static(20.0)
  N: int = _static(1000)
  schedule: str = _static('linear')
  continuous_parameterisation = 'time_noise'     # score_fn.py
  discrete_parameterisation = 'time_noise'       # no discrete chain of its own

  def __post_init__(self):
    self._validate_schedule()

  def sde(self, x, t):
    beta, integral = self.beta_and_integral(t)
    discount = -jnp.expm1(-2.0 * integral)
    return -0.5 * expand_to(beta, x) * x, expand_to(jnp.sqrt(beta * discount), x)

  def marginal_prob(self, x, t):
    check_time(t, self.T)
    _, integral = self.beta_and_integral(t)
    log_mean_coeff = expand_to(-0.5 * integral, x)
    return jnp.exp(log_mean_coeff) * x, -jnp.expm1(2.0 * log_mean_coeff)

  def discretize(self, x, t):
    return euler_maruyama_discretization(self, x, t)


# ----------------------------------------------------------------------------
# Reverse-time SDE and probability-flow ODE
# ----------------------------------------------------------------------------

@flax.struct.dataclass
class ReverseSDE:
  """Reverse-time SDE dx = [f - g^2 score] dt + g dw_bar (dt < 0), or with
  `probability_flow` the ODE dx = [f - g^2 score / 2] dt.

  Same interface as the forward SDE: `sde(x, t)` and `discretize(x, t)`
  return drifts in the forward-time convention, so a step from t to t - dt is
  x - drift dt + diffusion sqrt(dt) z.
  """
  forward: object = flax.struct.field(pytree_node=False)
  score_fn: ScoreFn = flax.struct.field(pytree_node=False)
  probability_flow: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def T(self) -> float:
    return self.forward.T

  @property
  def N(self) -> int:
    return self.forward.N

  def _weight(self):
    return 0.5 if self.probability_flow else 1.0

  def sde(self, x, t):
    drift, diffusion = self.forward.sde(x, t)
    drift = drift - diffusion ** 2 * self.score_fn(x, t) * self._weight()
    if self.probability_flow:
      diffusion = jnp.zeros_like(diffusion)
    return drift, diffusion

  def discretize(self, x, t):
    f, G = self.forward.discretize(x, t)
    rev_f = f - G ** 2 * self.score_fn(x, t) * self._weight()
    rev_G = jnp.zeros_like(G) if self.probability_flow else G
    return rev_f, rev_G


def reverse(sde, score_fn: ScoreFn, probability_flow: bool = False) -> ReverseSDE:
  """The reverse-time SDE (or probability-flow ODE) of `sde` under `score_fn`."""
  return ReverseSDE(forward=sde, score_fn=score_fn, probability_flow=probability_flow)


# ----------------------------------------------------------------------------
# Helpers every consumer may use with any SDE
# ----------------------------------------------------------------------------

def transition_coeffs(sde, t):
  """(m(t), s(t)) with x_t = m(t) x_0 + s(t) z, each with the shape of t.

  Read off `marginal_prob`, so it holds for every linear SDE of this interface.
  """
  t = jnp.asarray(t, jnp.float32)
  mean, std = sde.marginal_prob(jnp.ones_like(t), t)
  return mean, std


SDES = {'vesde': VESDE, 'vpsde': VPSDE, 'subvpsde': SubVPSDE}


def get_sde(name: str, **kwargs):
  """Builds an SDE by name ('vesde', 'vpsde', 'subvpsde')."""
  try:
    cls = SDES[name.lower()]
  except KeyError:
    raise ValueError(f'unknown SDE {name!r}; valid names: {sorted(SDES)}.') from None
  return cls(**kwargs)


def sde_from_config(config):
  """The SDE named by `config.training.sde` with the `config.model` scales.

  Returns (sde, sampling_eps): eps = 1e-5 for VE and 1e-3 for VP / sub-VP, the
  reference's smallest time for sampling and the continuous loss.
  """
  name = config.training.sde.lower()
  model = config.model
  if name == 'vesde':
    return VESDE(sigma_min=model.sigma_min, sigma_max=model.sigma_max,
                 N=model.num_scales), 1e-5
  if name in ('vpsde', 'subvpsde'):
    schedule = model.get('beta_schedule', 'linear')
    return get_sde(name, beta_min=model.beta_min, beta_max=model.beta_max,
                   N=model.num_scales, schedule=schedule), 1e-3
  return get_sde(name)  # raises with the list of valid names
