"""A trained workdir as a Python object for scripts: `score_sde.load(workdir)`.

    import jax, score_sde
    model = score_sde.load('runs/digits')
    x, info = model.sample(jax.random.PRNGKey(0), 16)                      # config's sampler
    y, _ = model.sample(jax.random.PRNGKey(0), 16, method='ode', rtol=1e-3)
    logp, z, info = model.log_likelihood(jax.random.PRNGKey(1), x)

A normalizing-flow workdir (nice, realnvp, glow) loads as a `TrainedFlow` with the
same `sample` / `log_likelihood` / `bits_per_dim` (exact; `temperature=` when
sampling) and `encode` / `decode` through the flow itself.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import jax
import numpy as np

from score_sde import data as data_lib
from score_sde import experiment as experiment_lib
from score_sde import flows
from score_sde import likelihood
from score_sde import parallel
from score_sde import sampling
from score_sde.models import utils as model_utils


def check_levels(images_uint, levels: int) -> np.ndarray:
  """`images_uint` as an array of whole levels in [0, levels - 1]; ValueError otherwise
  (0..255 images given to a 17-level digits model would otherwise give wrong bits/dim)."""
  images = np.asarray(images_uint)
  if images.size and not np.issubdtype(images.dtype, np.integer):
    if not np.all(np.isfinite(images)) or np.any(images != np.round(images)):
      raise ValueError(f'bits_per_dim takes integer levels 0..{levels - 1}; got non-integer '
                       f'values (dtype {images.dtype}); for images in [0, 1] pass '
                       f'np.round(x * {levels - 1}).')
  if images.size and (images.min() < 0 or images.max() > levels - 1):
    raise ValueError(f'bits_per_dim takes integer levels 0..{levels - 1} (this model\'s data '
                     f'has {levels} levels); got values in [{images.min()}, {images.max()}].')
  return images


class _ImageModelMethods:
  """What a trained score model and a trained flow share: bits/dim from `log_likelihood`,
  and the map between model space and [0, 1]."""

  def bits_per_dim(self, key, images_uint, **likelihood_options) -> np.ndarray:
    """Bits/dim [B] of integer-level images [B, H, W, C] (levels 0 .. num_levels - 1,
    e.g. `data.load_split_uint`; uniformly dequantised with `key`); options as for
    `log_likelihood`."""
    levels = self.experiment.num_levels
    images = check_levels(images_uint, levels)
    k_deq, k_probe = jax.random.split(key)
    x = images.astype(np.float32) / (levels - 1)
    x = data_lib.get_data_scaler(self.config)(likelihood.uniform_dequantize(k_deq, x, levels))
    logp, _, _ = self.log_likelihood(k_probe, x, **likelihood_options)
    dim = int(np.prod(x.shape[1:]))
    return np.asarray(likelihood.bits_per_dim(
        logp, dim, data_lib.get_data_inverse_scaler(self.config), levels))

  def to_unit(self, x):
    """Model space -> [0, 1]."""
    return data_lib.get_data_inverse_scaler(self.config)(x)

  def from_unit(self, x):
    """[0, 1] -> model space."""
    return data_lib.get_data_scaler(self.config)(x)


@dataclasses.dataclass(frozen=True, eq=False)   # identity hash: methods key jit caches
class TrainedModel(_ImageModelMethods):
  """The config, SDE and EMA parameters of one checkpoint, with its score function.

  Samples and likelihood inputs are in model space (see `to_unit` / `from_unit`).
  `sample` and `log_likelihood` (so `bits_per_dim`) compile once per normalised
  options (and sample count) and keep the program in `compiled`: a second call
  with the same options neither traces nor compiles. Parameters are an argument
  of the programs, not constants in them.
  """
  config: Any
  sde: Any
  ema_params: Any
  step: int
  experiment: Any
  mesh: Any
  # (what, normalised options) -> jitted function; filled on first use.
  compiled: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

  @property
  def score_model_fn(self):
    """(params, x, t) -> score."""
    return self.experiment.score_model_fn

  def score_fn(self, x, t):
    """The model's score at (x [B, ...], t scalar or [B])."""
    return self.experiment.score_model_fn(self.ema_params, x, t)

  @property
  def sampling_eps(self) -> float:
    return self.experiment.sampling_eps

  def sample(self, key, n: int, **sampler_options):
    """n samples [n, ...] in model space and info (NFE).

    With no options, the config's sampler (`config.sampling`). Options pick
    another: method='pc' | 'ode' | 'sde' | 'ddim' plus that method's options
    (see `score_sde.sampling.sample`).
    """
    method, options = sampling.config_options(self.config)
    if 'method' in sampler_options:
      method = str(sampler_options.pop('method')).lower()
      options = {}
    options.setdefault('eps', self.sampling_eps)
    options.update(sampler_options)
    shape = model_utils.input_shape(self.config, n)
    mesh = self.mesh if n % self.mesh.devices.size == 0 else None
    _, resolved = sampling.resolve_options(self.sde, method, options)
    cache_key = ('sample', method, shape, mesh is not None, tuple(sorted(resolved.items())))
    if cache_key not in self.compiled:
      self.compiled[cache_key] = sampling.jit_sampler(sampling.build_sampler(
          self.sde, self.score_model_fn, shape, method, mesh=mesh, **options))
    return self.compiled[cache_key](key, self.ema_params)

  def log_likelihood(self, key, x, **solver_options):
    """(log p(x) [B] nats, latent z, info) through the probability-flow ODE.

    Options: those of `score_sde.likelihood.get_likelihood_fn` (rtol, atol,
    solver, divergence, num_probes, eps, num_steps, max_steps).
    """
    options = _likelihood_options(solver_options)
    cache_key = ('log_likelihood', tuple(sorted(options.items())))
    if cache_key not in self.compiled:
      self.compiled[cache_key] = likelihood.get_likelihood_fn(
          self.sde, self.score_model_fn, **options)
    return self.compiled[cache_key](key, self.ema_params, x)

  def encode(self, x, **solver_options):
    """Latent z = x(T) of the probability-flow ODE.

    Compiled once per options (`score_sde.likelihood`'s cache, keyed on this
    model's `score_fn`); the parameters are constants of that program.
    """
    return likelihood.encode(self.score_fn, self.sde, x, **solver_options)

  def decode(self, z, **solver_options):
    """x(eps) from the latent z by the probability-flow ODE."""
    return likelihood.decode(self.score_fn, self.sde, z, **solver_options)


def _likelihood_options(options: dict) -> dict:
  """The options of `likelihood.get_likelihood_fn`, defaults filled in (a cache key)."""
  defaults = {name: p.default for name, p in
              inspect.signature(likelihood.get_likelihood_fn).parameters.items()
              if p.kind is p.KEYWORD_ONLY and name != 'mesh'}
  unknown = sorted(set(options) - set(defaults))
  if unknown:
    raise ValueError(f'unknown option(s) {unknown} for log_likelihood; valid: '
                     f'{sorted(defaults)}.')
  return {**defaults, **options}


@dataclasses.dataclass(frozen=True, eq=False)
class TrainedFlow(_ImageModelMethods):
  """The config and EMA parameters of one checkpoint of a normalizing flow.

  `sample`, `log_likelihood` and `bits_per_dim` as for a score model (the density
  is exact: no solver options), `encode` / `decode` through the flow. Programs
  compile once per options and sample count (`compiled`).
  """
  config: Any
  ema_params: Any
  step: int
  experiment: Any
  mesh: Any
  compiled: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

  @property
  def model(self):
    return self.experiment.model

  def sample(self, key, n: int, temperature: float | None = None):
    """n samples [n, H, W, C] in model space and info (nfe 1: one inverse pass); the
    latent std is `temperature` (default config.sampling.temperature, else 1)."""
    if temperature is None:
      temperature = self.config.sampling.get('temperature', 1.0)
    mesh = self.mesh if n % self.mesh.devices.size == 0 else None
    cache_key = ('sample', n, float(temperature), mesh is not None)
    if cache_key not in self.compiled:
      flow = model_utils.flow_functions(self.model)
      self.compiled[cache_key] = flows.get_sampler(
          flow.inverse, flow.latent_dim, n, prior=self.config.model.get('prior', 'gaussian'),
          temperature=temperature, mesh=mesh)
    return self.compiled[cache_key](key, self.ema_params)

  def log_likelihood(self, key, x, **options):
    """(log p(x) [B] nats, latent z [B, D], info): exact, by the change of variables
    (`key` is unused; kept for the score models' signature). The one option is
    precision ('highest' by default): a flow has no solver options."""
    unknown = sorted(set(options) - {'precision'})
    if unknown:
      raise ValueError(f'unknown option(s) {unknown} for a flow\'s log_likelihood: its density '
                       f"is exact (no solver); valid: ['precision'].")
    precision = options.get('precision', 'highest')
    cache_key = ('log_likelihood', str(precision))
    if cache_key not in self.compiled:
      self.compiled[cache_key] = flows.get_likelihood_fn(self.experiment.model_fn,
                                                         precision=precision)
    return self.compiled[cache_key](key, self.ema_params, x)

  def encode(self, x):
    """Latent z [B, D] = f(x)."""
    return self.log_likelihood(jax.random.PRNGKey(0), x)[1]

  def decode(self, z):
    """x = f^-1(z) [B, H, W, C]."""
    if 'decode' not in self.compiled:
      self.compiled['decode'] = flows.get_inverse_fn(
          model_utils.flow_functions(self.model).inverse)
    return self.compiled['decode'](self.ema_params, z)



def load(workdir: str, checkpoint: int | None = None) -> TrainedModel | TrainedFlow:
  """The newest (or the given) checkpoint of a training workdir (a `TrainedFlow` for a
  normalizing flow)."""
  config = experiment_lib.load_config(workdir)
  if experiment_lib.is_classifier(config):
    raise ValueError(f'{workdir} holds a noise-conditional classifier ({config.model.name!r}, '
                     f'launch.py train_classifier), not a score model or a flow; load the '
                     f'score model\'s workdir (the classifier guides it through launch.py '
                     f'cond_sample).')
  mesh = parallel.make_mesh()
  experiment, state, step = experiment_lib.restore_state(workdir, config, mesh, checkpoint)
  if experiment.is_flow:
    return TrainedFlow(config=config, ema_params=state.ema_params, step=int(step),
                       experiment=experiment, mesh=mesh)
  return TrainedModel(config=config, sde=experiment.sde, ema_params=state.ema_params,
                      step=int(step), experiment=experiment, mesh=mesh)
