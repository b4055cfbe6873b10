"""Exact log-likelihoods, bits/dim and latent codes via the probability-flow ODE.

The probability-flow ODE dx/dt = h(x, t) = f(x, t) - g(t)^2 s(x, t) / 2 carries
p_eps to p_T, and along a solution (instantaneous change of variables)

  d log p_t(x(t)) / dt = -div_x h(x(t), t),

so with z = x(T)

  log p_eps(x) = log p_T(z) + int_eps^T div_x h(x(t), t) dt.

We solve the augmented ODE for (x, delta_logp) from eps to T with diffrax
(one jitted program, no host round trips) and return prior_logp(z) +
delta_logp: log p_T is replaced by the SDE's prior, which is what a trained
model can evaluate (Song et al. 2021, eq. 39). With an exact score the result
differs from log p_eps(x) by exactly log prior(z) - log p_T(z).

The divergence is
  'exact':                 trace of the Jacobian from D forward-mode JVPs
                           (D = data dimension <= EXACT_DIVERGENCE_MAX_DIM);
  'hutchinson_rademacher': v^T (dh/dx) v with v uniform on {-1, 1}^D,
  'hutchinson_gaussian':   the same with v ~ N(0, I) (Hutchinson-Skilling),
averaged over `num_probes` probes that stay fixed during a solve (as in the
reference), one JVP per probe. E_v[v^T J v] = tr J and x(t) does not depend on
v, so the Hutchinson log-likelihood is unbiased (up to solver error).

Each example is solved separately (`vmap`, adaptive steps per example) with
probes from its own key fold_in(key, i), so its result depends neither on the
rest of the batch nor on the device count.

Bits per dimension of data quantised to L levels (k / (L - 1) in [0, 1]),
uniformly dequantised to u = (k + U) / L and mapped to model space by an affine
scaler y = scaler(u) with inverse u = inverse_scaler(y):

  bpd = -logp / (D ln 2) + log2(L) + log2(inverse_scaler(1) - inverse_scaler(0)),

an upper bound on the discrete model's -log2 P(k) / D (variational
dequantisation bound). For L = 256 the offset is 8 for data in [0, 1] and 7
for data in [-1, 1], the reference's convention.

Matmul precision: TPUs run float32 matmuls and convolutions as bfloat16 passes
by default and recent GPUs as TF32, which moves the divergence integral by far
more than the solver tolerance. The likelihood programs are traced under
`jax.default_matmul_precision(precision)`, 'highest' unless asked otherwise
(full float32 on every backend; XLA:CPU's float32 dots are full precision
anyway), so every dot and convolution carries that precision in its HLO;
`encode` / `decode` always use 'highest'.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import parallel
from score_sde import sampling
from score_sde import sde as sde_lib

ScoreFn = sampling.ScoreFn
ScoreModelFn = sampling.ScoreModelFn

# Above this data dimension 'exact' (D JVPs per evaluation) is refused.
EXACT_DIVERGENCE_MAX_DIM = 1024
check_precision = sampling.check_precision


# ----------------------------------------------------------------------------
# Divergence estimators: (linear jvp_fn, probes [P, D]) -> div (scalar)
# ----------------------------------------------------------------------------

def _rademacher_probes(key, num_probes: int, dim: int) -> jax.Array:
  return jax.random.rademacher(key, (num_probes, dim), jnp.float32)


def _gaussian_probes(key, num_probes: int, dim: int) -> jax.Array:
  return jax.random.normal(key, (num_probes, dim), jnp.float32)


def _no_probes(key, num_probes: int, dim: int) -> jax.Array:
  del key, num_probes
  return jnp.zeros((0, dim), jnp.float32)


def hutchinson_divergence(jvp_fn, probes: jax.Array) -> jax.Array:
  """mean_p v_p^T J v_p, one JVP per probe v_p (probes: [P, D])."""
  return jnp.mean(jnp.sum(jax.vmap(jvp_fn)(probes) * probes, axis=-1))


def exact_divergence(jvp_fn, probes: jax.Array) -> jax.Array:
  """tr J = sum_i e_i^T J e_i from D JVPs along the unit vectors."""
  dim = probes.shape[-1]
  return jnp.trace(jax.vmap(jvp_fn)(jnp.eye(dim, dtype=jnp.float32)))


# name -> (probe sampler (key, P, D) -> [P, D], estimator (jvp_fn, probes) -> div)
DIVERGENCES = {
    'hutchinson_rademacher': (_rademacher_probes, hutchinson_divergence),
    'hutchinson_gaussian': (_gaussian_probes, hutchinson_divergence),
    'exact': (_no_probes, exact_divergence),
}


# ----------------------------------------------------------------------------
# The augmented probability-flow ODE
# ----------------------------------------------------------------------------

def _check_options(x_shape, *, rtol, atol, solver, divergence, num_probes, eps,
                   num_steps, max_steps, T, precision='highest') -> None:
  """Raises a ValueError naming the bad option and the fix."""
  check_precision(precision)
  if len(x_shape) < 2:
    raise ValueError(f'x must be a batch [B, ...] of examples; got shape {x_shape}.')
  sampling.lookup(DIVERGENCES, divergence, 'divergence')
  sampling.check_ode_options(solver, num_steps, rtol, atol, max_steps)
  if isinstance(num_probes, bool) or int(num_probes) != num_probes or num_probes < 1:
    raise ValueError(f'num_probes must be an integer >= 1; got {num_probes!r}.')
  if not 0.0 < float(eps) < T:
    raise ValueError(f'eps must lie in (0, T) = (0, {T}); got {eps}.')
  dim = int(np.prod(x_shape[1:]))
  if divergence == 'exact' and dim > EXACT_DIVERGENCE_MAX_DIM:
    raise ValueError(
        f"divergence='exact' needs one JVP per data dimension and is limited to "
        f"D <= {EXACT_DIVERGENCE_MAX_DIM}; the data have D = {dim}. Use "
        f"divergence='hutchinson_rademacher' (or 'hutchinson_gaussian').")


def likelihood_from_score(key, score_fn: ScoreFn, sde, x: jax.Array, *, rtol=1e-5,
                          atol=1e-5, solver='tsit5', divergence='hutchinson_rademacher',
                          num_probes=1, eps=1e-5, num_steps=0, max_steps=4096,
                          precision='highest'):
  """The pure computation behind `log_likelihood` (trace it under jit); every
  dot and convolution it traces gets matmul `precision` (module doc)."""
  with jax.default_matmul_precision(check_precision(precision)):
    return _likelihood_from_score(key, score_fn, sde, x, rtol=rtol, atol=atol, solver=solver,
                                  divergence=divergence, num_probes=num_probes, eps=eps,
                                  num_steps=num_steps, max_steps=max_steps)


def _likelihood_from_score(key, score_fn, sde, x, *, rtol, atol, solver, divergence,
                           num_probes, eps, num_steps, max_steps):
  batch, example_shape = x.shape[0], x.shape[1:]
  dim = int(np.prod(example_shape))
  sampling.check_score_shape(score_fn, x)
  sample_probes, divergence_fn = DIVERGENCES[divergence]
  keys = sampling.example_keys(key, batch)
  probes = jax.vmap(lambda k: sample_probes(k, num_probes, dim))(keys)  # [B, P, D]
  score_flat = sampling.per_example_score(score_fn, example_shape)
  flow = sde_lib.reverse(sde, score_flat, probability_flow=True)

  def vector_field(t, state, example_probes):
    y, _ = state
    t = jnp.asarray(t, jnp.float32)
    drift, jvp_fn = jax.linearize(lambda y_: flow.sde(y_, t)[0], y)
    return drift, divergence_fn(jvp_fn, example_probes)

  def solve_one(y0, example_probes):
    state0 = (y0, jnp.zeros((), jnp.float32))
    return sampling.solve_ode(vector_field, state0, eps, sde.T, solver=solver, rtol=rtol,
                              atol=atol, num_steps=num_steps, max_steps=max_steps,
                              args=example_probes)

  (z, delta_logp), nfe = jax.vmap(solve_one)(x.reshape(batch, dim), probes)
  z = z.reshape(x.shape)
  logp = sde.prior_logp(z) + delta_logp
  return logp, z, {'nfe': jnp.max(nfe), 'nfe_per_example': nfe,
                   'delta_logp': delta_logp}


def get_likelihood_fn(sde, score_model_fn: ScoreModelFn, *, rtol=1e-5, atol=1e-5,
                      solver='tsit5', divergence='hutchinson_rademacher', num_probes=1,
                      eps=1e-5, num_steps=0, max_steps=4096, precision='highest',
                      mesh=None) -> Callable:
  """Jitted likelihood_fn(key, params, x) -> (logp [B] nats, z, info) for the launcher.

  score_model_fn(params, x, t) gives the score. With a mesh, x and z are
  sharded over its 'data' axis and key / params replicated. `precision`: the
  matmul precision of every dot and convolution (module doc).
  """
  options = dict(rtol=rtol, atol=atol, solver=str(solver).lower(),
                 divergence=str(divergence).lower(), num_probes=num_probes, eps=eps,
                 num_steps=num_steps, max_steps=max_steps,
                 precision=check_precision(precision))
  sampling.lookup(DIVERGENCES, options['divergence'], 'divergence')
  sampling.check_ode_options(options['solver'], num_steps, rtol, atol, max_steps)

  def likelihood_fn(key, params, x):
    _check_options(x.shape, T=sde.T, **options)
    if mesh is not None:
      parallel.check_batch_divisible(x.shape[0], mesh)
    score_fn = lambda y, t: score_model_fn(params, y, t)  # noqa: E731
    return likelihood_from_score(key, score_fn, sde, x, **options)

  if mesh is None:
    return jax.jit(likelihood_fn)
  rep, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(likelihood_fn, in_shardings=(rep, rep, batch),
                 out_shardings=(batch, batch, rep))


@functools.lru_cache(maxsize=64)
def _cached_likelihood_fn(score_fn, sde, option_items, mesh):
  return get_likelihood_fn(sde, lambda _, x, t: score_fn(x, t), mesh=mesh,
                           **dict(option_items))


def log_likelihood(key, score_fn: ScoreFn, sde, x: jax.Array, *, rtol=1e-5, atol=1e-5,
                   solver='tsit5', divergence='hutchinson_rademacher', num_probes=1,
                   eps=1e-5, num_steps=0, max_steps=4096, precision='highest', mesh=None):
  """log p(x) in nats per example through the probability-flow ODE.

  Args:
    key: PRNG key for the Hutchinson probes (unused by 'exact').
    score_fn: score_fn(x [B, ...], t [B]) -> [B, ...].
    sde: the forward SDE.
    x: [B, ...] data in model space (dequantised).
    rtol, atol: tolerances of the adaptive solver ('tsit5', 'dopri5', 'heun');
      num_steps > 0 takes that many fixed steps instead.
    divergence: 'hutchinson_rademacher' | 'hutchinson_gaussian' | 'exact'.
    num_probes: Hutchinson probes per example, fixed during the solve.
    eps: the ODE runs from eps to T.
    precision: matmul precision of every dot / convolution ('highest': full
      float32 on TPU and GPU too; see the module doc).

  Returns:
    (logp [B] = prior_logp(z) + int div, z = x(T) [B, ...], info) with
    info['nfe'] the number of (batched) vector-field evaluations.
  """
  x = jnp.asarray(x)
  options = dict(rtol=rtol, atol=atol, solver=str(solver).lower(),
                 divergence=str(divergence).lower(), num_probes=num_probes, eps=eps,
                 num_steps=num_steps, max_steps=max_steps,
                 precision=check_precision(precision))
  _check_options(x.shape, T=sde.T, **options)
  fn = _cached_likelihood_fn(score_fn, sde, tuple(sorted(options.items())), mesh)
  return fn(key, None, x)


# ----------------------------------------------------------------------------
# Latent codes: the probability-flow ODE as an invertible map
# ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _cached_flow(score_fn, sde, t0, t1, option_items):
  options = dict(option_items)

  def flow(x):
    sampling.check_score_shape(score_fn, x)
    with jax.default_matmul_precision('highest'):     # an exact map on every backend
      y, _ = sampling.probability_flow_solve(score_fn, sde, x, t0, t1, **options)
    return y

  return jax.jit(flow)


def _flow(score_fn, sde, x, t0, t1, solver, rtol, atol, num_steps, max_steps):
  x = jnp.asarray(x)
  if x.ndim < 2:
    raise ValueError(f'expected a batch [B, ...] of examples; got shape {x.shape}.')
  sampling.check_ode_options(str(solver).lower(), num_steps, rtol, atol, max_steps)
  options = dict(solver=str(solver).lower(), rtol=rtol, atol=atol, num_steps=num_steps,
                 max_steps=max_steps)
  return _cached_flow(score_fn, sde, float(t0), float(t1),
                      tuple(sorted(options.items())))(x)


def encode(score_fn: ScoreFn, sde, x: jax.Array, *, eps=1e-5, solver='tsit5', rtol=1e-5,
           atol=1e-5, num_steps=0, max_steps=4096) -> jax.Array:
  """Latent z = x(T) [B, ...] of data x = x(eps) along the probability-flow ODE.

  Deterministic (no key): the encoding is uniquely identifiable, a function of
  the data and the score only.
  """
  _check_eps(eps, sde)
  return _flow(score_fn, sde, x, eps, sde.T, solver, rtol, atol, num_steps, max_steps)


def decode(score_fn: ScoreFn, sde, z: jax.Array, *, eps=1e-5, solver='tsit5', rtol=1e-5,
           atol=1e-5, num_steps=0, max_steps=4096) -> jax.Array:
  """Data x(eps) [B, ...] of a latent z = x(T): the inverse of `encode`."""
  _check_eps(eps, sde)
  return _flow(score_fn, sde, z, sde.T, eps, solver, rtol, atol, num_steps, max_steps)


def _check_eps(eps, sde) -> None:
  if not 0.0 < float(eps) < sde.T:
    raise ValueError(f'eps must lie in (0, T) = (0, {sde.T}); got {eps}.')


# ----------------------------------------------------------------------------
# Dequantisation and bits per dimension
# ----------------------------------------------------------------------------

def _check_levels(num_levels) -> int:
  if isinstance(num_levels, bool) or int(num_levels) != num_levels or num_levels < 2:
    raise ValueError(f'num_levels must be an integer >= 2; got {num_levels!r}.')
  return int(num_levels)


def uniform_dequantize(key, x: jax.Array, num_levels: int = 256) -> jax.Array:
  """(x (L - 1) + U) / L with U ~ Uniform[0, 1)^D, x: [B, ...] values k / (L - 1).

  Maps the L levels onto the L cells [k / L, (k + 1) / L) of [0, 1]; for
  L = 256 this is the reference's (255 x + U) / 256 (x (L - 1) is rounded to
  its integer level first). Noise of example i comes from fold_in(key, i).
  """
  levels = _check_levels(num_levels)
  x = jnp.asarray(x, jnp.float32)
  if _is_concrete(x) and x.size:
    lo, hi = float(jnp.min(x)), float(jnp.max(x))
    if lo < -1e-6 or hi > 1 + 1e-6:
      raise ValueError(f'uniform_dequantize expects data in [0, 1] (levels k / '
                       f'{levels - 1}); got values in [{lo}, {hi}]. Apply it before '
                       f'the scaler to [-1, 1].')
  return _dequantize(key, x, levels)


@functools.partial(jax.jit, static_argnums=2)
def _dequantize(key, x, levels: int):
  keys = sampling.example_keys(key, x.shape[0])
  noise = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], jnp.float32))(keys)
  return (jnp.round(x * (levels - 1)) + noise) / levels


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def bits_per_dim(logp: jax.Array, dim: int, inverse_scaler: Callable,
                 num_levels: int = 256) -> jax.Array:
  """-logp / (dim ln 2) + log2(num_levels) + log2(slope of inverse_scaler).

  logp: [B] log-density (nats) of the dequantised data in model space.
  inverse_scaler maps model space back to [0, 1] and must be affine and
  increasing (slope = inverse_scaler(1) - inverse_scaler(0)).
  """
  levels = _check_levels(num_levels)
  if isinstance(dim, bool) or int(dim) != dim or dim < 1:
    raise ValueError(f'dim must be a positive integer (numbers per example); got {dim!r}.')
  at = [float(np.asarray(inverse_scaler(jnp.float32(v)))) for v in (0.0, 0.5, 1.0)]
  slope = at[2] - at[0]
  if not (math.isfinite(slope) and slope > 0):
    raise ValueError(f'inverse_scaler must be increasing; inverse_scaler(1) - '
                     f'inverse_scaler(0) = {slope}.')
  if abs(at[1] - 0.5 * (at[0] + at[2])) > 1e-6 * max(1.0, abs(slope)):
    raise ValueError('inverse_scaler must be affine (a + b x) for the bits/dim '
                     'offset; got a non-linear map.')
  offset = math.log2(levels) + math.log2(slope)
  return -jnp.asarray(logp) / (dim * math.log(2.0)) + offset
