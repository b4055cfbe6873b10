"""Samplers for score-based models: predictor-corrector, probability-flow ODE,
reverse SDE (diffrax) and DDIM.

The forward SDE dx = f(x, t) dt + g(t) dw has the reverse-time SDE and the
probability-flow ODE (Song et al. 2021, eqs. 6 and 13)

  dx = [f(x, t) - g(t)^2 s(x, t)] dt + g(t) dw_bar,   t: T -> 0,
  dx = [f(x, t) - g(t)^2 s(x, t) / 2] dt,

with the score s(x, t) = grad_x log p_t(x). Every sampler here needs only a
`score_fn(x, t)` and an SDE of the `score_sde.sde` interface; none branches on
the SDE's class. Each starts from the prior at T and stops at a small eps.

  method   module     sampler
  'pc'     pc.py      predictor-corrector loop (with a projection hook)
  'ode'    diffeq.py  probability-flow ODE, adaptive or fixed steps (diffrax)
  'sde'    diffeq.py  reverse SDE, one Brownian tree per example (diffrax)
  'ddim'   ddim.py    DDIM, deterministic (eta = 0) to ancestral (eta = 1)
  'heun'   edm.py     EDM's Heun sampler on the probability-flow ODE (Karras et al. 2022)
  'edm'    edm.py     the same with EDM's stochastic churn
  'dpmpp_2m', 'dpmpp_3m', 'dpmpp_2m_sde'
           multistep.py  DPM-Solver++ multistep, data prediction in log-SNR (Lu et al. 2022b)
  'unipc'  multistep.py  UniPC predictor-corrector, B(h) = h (Zhao et al. 2023)
  common.py: keys, shapes, Tweedie's denoiser and the checks they share;
  schedules.py: the time grids of the few-step methods (Karras, log-SNR, time).

num_steps is the number of time steps from T to eps for every method (0: the
SDE's N). Score evaluations (`info['nfe']`, exact): pc num_steps x (1 +
n_steps_each) with a corrector, num_steps without, whether or not noise_removal
(it returns the last predictor step's mean: no evaluation); ddim, dpmpp_*, unipc
and Euler ode num_steps; heun and edm 2 num_steps (one less where the first step
is an Euler step); adaptive ode as counted by the solver, rejected steps included;
each of these + 1 with noise_removal (one Tweedie step at eps).

A new sampler is a module here with a pure function
`sampler(key, score_fn, sde, shape, *, <options>, constrain) -> (x [B, ...],
info {'nfe'})` (`constrain` puts the batch on the mesh: apply it to the prior
draw) and a `check(sde, opts) -> opts` of its own options, registered as one
METHODS entry with the options' defaults; `sample`, `build_sampler`, the
API and the config's `sampling.method` then offer it (config keys for new
options go in configs/defaults.py, which the launcher validates against).

Randomness. Every example has its own key, fold_in(key, index); all its noise
(prior draw, predictor and corrector noise, Brownian path) comes from that key,
and the ODE / SDE solvers are `vmap`-ed per example, adaptive step sizes
included. So example i depends only on (key, i): not on the batch size, the
other examples, or the number of devices.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax

from score_sde import parallel
from score_sde.sampling import common
from score_sde.sampling import ddim
from score_sde.sampling import diffeq
from score_sde.sampling import edm
from score_sde.sampling import multistep
from score_sde.sampling import pc
from score_sde.sampling import schedules
from score_sde.sampling.common import (MATMUL_PRECISIONS, Info, ScoreFn, ScoreModelFn,
                                       batch_times, chain_signal_factor, check_count,
                                       check_precision, check_score_shape, matmul_precision,
                                       check_shape, example_keys, example_normal,
                                       expected_normal_norm, fold_keys, identity, lookup,
                                       per_example_norm, per_example_score, prior_sample,
                                       tweedie_denoise, with_num_steps)
from score_sde.sampling.ddim import ddim_sampler
from score_sde.sampling.diffeq import (ODE_SOLVERS, SDE_SOLVERS, OdeSolver, SdeSolver,
                                       check_ode_options, ode_sampler,
                                       probability_flow_solve, sde_sampler, solve_ode)
from score_sde.sampling.pc import (CORRECTORS, PREDICTORS, SNR_NORMS, Corrector, Predictor,
                                   Projection, ald_corrector, ancestral_sampling_predictor,
                                   euler_maruyama_predictor, langevin_corrector,
                                   none_predictor, pc_sampler, reverse_diffusion_predictor)

__all__ = [
    # entry points and the registry
    'METHODS', 'Method', 'build_sampler', 'config_options', 'get_sampling_fn', 'jit_sampler',
    'resolve_options', 'sample',
    # samplers
    'ddim_sampler', 'ode_sampler', 'pc_sampler', 'sde_sampler',
    # the PC loop's parts
    'CORRECTORS', 'PREDICTORS', 'SNR_NORMS', 'Corrector', 'Predictor', 'Projection',
    'ald_corrector', 'ancestral_sampling_predictor', 'euler_maruyama_predictor',
    'langevin_corrector', 'none_predictor', 'reverse_diffusion_predictor',
    # diffrax
    'ODE_SOLVERS', 'SDE_SOLVERS', 'OdeSolver', 'SdeSolver', 'check_ode_options',
    'probability_flow_solve', 'solve_ode',
    # shared helpers
    'COMMON_OPTIONS', 'MATMUL_PRECISIONS', 'check_precision', 'matmul_precision', 'Info',
    'ScoreFn', 'ScoreModelFn', 'batch_times', 'chain_signal_factor', 'check_count',
    'check_score_shape', 'check_shape', 'example_keys', 'example_normal',
    'expected_normal_norm', 'fold_keys', 'identity', 'lookup', 'per_example_norm',
    'per_example_score', 'prior_sample', 'tweedie_denoise', 'with_num_steps',
    # modules
    'common', 'ddim', 'diffeq', 'edm', 'multistep', 'pc', 'schedules',
]


class Method(NamedTuple):
  sampler: Callable
  defaults: dict             # the options this method takes, with defaults
  check: Callable            # check(sde, opts) -> opts: validates the method's own options


# The few-step samplers' time-grid options (time_schedule, rho, grid_sigma_min /
# grid_sigma_max) with their defaults; validated into one `schedules.Grid`.
GRID_OPTIONS = schedules.Grid()._asdict()

METHODS = {
    'pc': Method(pc.pc_sampler, dict(
        predictor='reverse_diffusion', corrector='langevin', snr=0.16, n_steps_each=1,
        snr_norm='example', noise_removal=True, probability_flow=False, num_steps=0, eps=1e-3),
        pc.check_options),
    'ode': Method(diffeq.ode_sampler, dict(
        ode_solver='tsit5', rtol=1e-5, atol=1e-5, num_steps=0, noise_removal=True,
        eps=1e-3, max_steps=4096), diffeq.check_ode_sampler_options),
    'sde': Method(diffeq.sde_sampler, dict(
        sde_solver='euler', num_steps=0, noise_removal=True, eps=1e-3),
        diffeq.check_sde_sampler_options),
    'ddim': Method(ddim.ddim_sampler, dict(
        ddim_eta=0.0, num_steps=0, noise_removal=True, eps=1e-3), ddim.check_options),
    'heun': Method(edm.heun_sampler, dict(
        num_steps=0, **GRID_OPTIONS, noise_removal=True, eps=1e-3),
        edm.check_heun_options),
    'edm': Method(edm.edm_sampler, dict(
        num_steps=0, **GRID_OPTIONS, s_churn=40.0, s_tmin=0.05,
        s_tmax=50.0, s_noise=1.003, noise_removal=True, eps=1e-3), edm.check_edm_options),
    'dpmpp_2m': Method(multistep.dpmpp_2m_sampler, dict(
        num_steps=0, **GRID_OPTIONS, lower_order_final=True,
        noise_removal=True, eps=1e-3), multistep.check_options),
    'dpmpp_3m': Method(multistep.dpmpp_3m_sampler, dict(
        num_steps=0, **GRID_OPTIONS, lower_order_final=True,
        noise_removal=True, eps=1e-3), multistep.check_options),
    'dpmpp_2m_sde': Method(multistep.dpmpp_2m_sde_sampler, dict(
        num_steps=0, **GRID_OPTIONS, lower_order_final=True,
        noise_removal=True, eps=1e-3), multistep.check_options),
    'unipc': Method(multistep.unipc_sampler, dict(
        num_steps=0, solver_order=3, **GRID_OPTIONS,
        lower_order_final=True, noise_removal=True, eps=1e-3), multistep.check_options),
}


# Options every method takes. matmul_precision: that of every dot and convolution
# the sampler traces ('inherit': JAX's current setting, by default the backend's
# fastest; 'default' that explicitly; 'highest': full float32 on TPU and GPU too).
COMMON_OPTIONS = dict(matmul_precision='inherit')


def resolve_options(sde, method: str, options: dict) -> tuple[Method, dict]:
  """Validated options of `method` (defaults filled in); raises on bad input.

  Eager, before anything is traced. Equal resolved options build the same sampler.
  """
  spec = lookup(METHODS, method, 'sampling method')
  valid = {**COMMON_OPTIONS, **spec.defaults}
  unknown = sorted(set(options) - set(valid))
  if unknown:
    raise ValueError(f'unknown option(s) {unknown} for sampling method {method!r}; '
                     f'valid: {sorted(valid)}.')
  opts = {**valid, **options}
  opts['matmul_precision'] = check_precision(opts['matmul_precision'], allow_inherit=True)
  if str(opts.get('time_schedule', '')).lower() == 'auto':
    opts['time_schedule'] = spec.defaults['time_schedule']   # the method's own
  eps = float(opts['eps'])
  if not 0.0 < eps < sde.T:
    raise ValueError(f'eps must lie in (0, T) = (0, {sde.T}); got {eps}.')
  opts['eps'] = eps
  opts['num_steps'] = check_count('num_steps', opts['num_steps'], allow_zero=True)
  opts = spec.check(sde, opts)
  opts['noise_removal'] = bool(opts['noise_removal'])
  return spec, opts


# ----------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------

def build_sampler(sde, score_model_fn: ScoreModelFn, shape, method: str = 'pc',
                  mesh=None, **options) -> Callable:
  """Pure sampler(key, params) -> (x [B, ...], info) for `jax.jit` (not yet jitted).

  score_model_fn(params, x, t) gives the score; options as in `sample`.
  With a mesh the batch is sharded over its 'data' axis.
  """
  shape = check_shape(shape)
  spec, opts = resolve_options(sde, method, options)
  constrain = identity
  if mesh is not None:
    parallel.check_batch_divisible(shape[0], mesh, 'number of samples')
    sharding = parallel.batch_sharding(mesh)
    constrain = lambda x: jax.lax.with_sharding_constraint(x, sharding)  # noqa: E731

  precision = opts.pop('matmul_precision')

  def sampler(key, params):
    score_fn = lambda x, t: score_model_fn(params, x, t)  # noqa: E731
    with matmul_precision(precision):
      return spec.sampler(key, score_fn, sde, shape, constrain=constrain, **opts)

  return sampler


def jit_sampler(sampler: Callable, mesh=None) -> Callable:
  """jax.jit of sampler(key, params): key and params replicated, samples sharded."""
  if mesh is None:
    return jax.jit(sampler)
  return jax.jit(sampler,
                 in_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
                 out_shardings=(parallel.batch_sharding(mesh), parallel.replicated(mesh)))


def config_options(config) -> tuple[str, dict]:
  """(method, options) read from `config.sampling` (keys of configs/defaults.py)."""
  sampling = config.sampling
  method = str(sampling.method).lower()
  spec = lookup(METHODS, method, 'sampling method (config.sampling.method)')
  options = {name: sampling.get(name, default)
             for name, default in {**COMMON_OPTIONS, **spec.defaults}.items()
             if name not in ('eps', 'max_steps')}
  return method, options


def get_sampling_fn(config, sde, score_model_fn: ScoreModelFn, shape, eps: float,
                    mesh=None) -> Callable:
  """Jitted sampling_fn(key, params) -> (x [B, ...] in model space, info) from the config.

  `config.sampling.method` picks pc | ode | sde | ddim; the other
  `config.sampling` keys set its options (num_steps 0 = the SDE's N, or adaptive
  steps for an adaptive ODE solver; `snr_norm`, if absent, is 'example').
  Parameters enter as an argument, so one compiled program serves every
  checkpoint. Apply the inverse scaler yourself.
  """
  method, options = config_options(config)
  sampler = build_sampler(sde, score_model_fn, shape, method, mesh=mesh, eps=eps,
                          **options)
  return jit_sampler(sampler, mesh)


@functools.lru_cache(maxsize=64)
def _cached_sampler(score_fn, sde, shape, method, option_items, mesh):
  sampler = build_sampler(sde, lambda _, x, t: score_fn(x, t), shape, method, mesh=mesh,
                          **dict(option_items))
  return jit_sampler(sampler, mesh)


def sample(key, score_fn: ScoreFn, sde, shape, method: str = 'pc', *, mesh=None,
           **options) -> tuple[jax.Array, Info]:
  """Draws shape[0] samples with `method` in 'pc' | 'ode' | 'sde' | 'ddim'.

  Args:
    key: PRNG key; example i depends only on (key, i).
    score_fn: score_fn(x [B, ...], t [B]) -> [B, ...].
    sde: the forward SDE (score_sde.sde interface).
    shape: [B, ...], the batch of samples to draw.
    method: 'pc' (options predictor, corrector, snr, n_steps_each, snr_norm,
      probability_flow, noise_removal, num_steps), 'ode' (ode_solver, rtol,
      atol, num_steps: 0 = adaptive, max_steps, noise_removal), 'sde'
      (sde_solver, num_steps, noise_removal), 'ddim' (ddim_eta, num_steps,
      noise_removal), 'heun' (num_steps, time_schedule, rho, grid_sigma_min,
      grid_sigma_max, noise_removal),
      'edm' (those of heun, s_churn, s_tmin, s_tmax, s_noise), 'dpmpp_2m',
      'dpmpp_3m', 'dpmpp_2m_sde' (num_steps, time_schedule, rho, grid_sigma_min,
      grid_sigma_max, lower_order_final, noise_removal), 'unipc' (those and
      solver_order).
      All take eps (default 1e-3) and matmul_precision ('inherit' |
      'default' | 'high' | 'highest', of every dot / convolution). num_steps 0 means sde.N; time_schedule is
      'karras' | 'logsnr' | 'time' (default 'logsnr'; 'auto': the default).
    mesh: optional device mesh; samples are sharded over its 'data' axis.

  Returns:
    (x [B, ...], info) with info['nfe'] the number of (batched) score evaluations.

  The compiled sampler is cached per (score_fn, sde, shape, method, options,
  mesh): keep one score_fn object to reuse it.
  """
  shape = check_shape(shape)
  fn = _cached_sampler(score_fn, sde, shape, str(method).lower(),
                       tuple(sorted(options.items())), mesh)
  return fn(key, None)
