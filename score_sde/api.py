"""A trained workdir as a Python object for scripts: `score_sde.load(workdir)`.

    import jax, score_sde
    model = score_sde.load('runs/digits')
    x, info = model.sample(jax.random.PRNGKey(0), 16)                      # config's sampler
    y, _ = model.sample(jax.random.PRNGKey(0), 16, method='ode', rtol=1e-3)
    logp, z, info = model.log_likelihood(jax.random.PRNGKey(1), x)
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from score_sde import data as data_lib
from score_sde import experiment as experiment_lib
from score_sde import likelihood
from score_sde import parallel
from score_sde import sampling
from score_sde.models import utils as model_utils


@dataclasses.dataclass(frozen=True, eq=False)   # identity hash: methods key jit caches
class TrainedModel:
  """The config, SDE and EMA parameters of one checkpoint, with its score function.

  Samples and likelihood inputs are in model space (see `to_unit` / `from_unit`).
  """
  config: Any
  sde: Any
  ema_params: Any
  step: int
  experiment: Any
  mesh: Any

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
      method = sampler_options.pop('method')
      options = {}
    options.setdefault('eps', self.sampling_eps)
    options.update(sampler_options)
    shape = model_utils.input_shape(self.config, n)
    fn = sampling.jit_sampler(sampling.build_sampler(
        self.sde, self.score_model_fn, shape, method,
        mesh=self.mesh if n % self.mesh.devices.size == 0 else None, **options))
    return fn(key, self.ema_params)

  def log_likelihood(self, key, x, **solver_options):
    """(log p(x) [B] nats, latent z, info) through the probability-flow ODE."""
    fn = likelihood.get_likelihood_fn(self.sde, self.score_model_fn, **solver_options)
    return fn(key, self.ema_params, x)

  def bits_per_dim(self, key, images_uint, **solver_options) -> np.ndarray:
    """Bits/dim [B] of integer-level images (uniformly dequantised with `key`)."""
    levels = self.experiment.num_levels
    k_deq, k_probe = jax.random.split(key)
    x = np.asarray(images_uint, np.float32) / (levels - 1)
    x = data_lib.get_data_scaler(self.config)(likelihood.uniform_dequantize(k_deq, x, levels))
    logp, _, _ = self.log_likelihood(k_probe, x, **solver_options)
    dim = int(np.prod(x.shape[1:]))
    return np.asarray(likelihood.bits_per_dim(
        logp, dim, data_lib.get_data_inverse_scaler(self.config), levels))

  def encode(self, x, **solver_options):
    """Latent z = x(T) of the probability-flow ODE."""
    return likelihood.encode(self.score_fn, self.sde, x, **solver_options)

  def decode(self, z, **solver_options):
    """x(eps) from the latent z by the probability-flow ODE."""
    return likelihood.decode(self.score_fn, self.sde, z, **solver_options)

  def to_unit(self, x):
    """Model space -> [0, 1]."""
    return data_lib.get_data_inverse_scaler(self.config)(x)

  def from_unit(self, x):
    """[0, 1] -> model space."""
    return data_lib.get_data_scaler(self.config)(x)


def load(workdir: str, checkpoint: int | None = None) -> TrainedModel:
  """The newest (or the given) checkpoint of a training workdir."""
  config = experiment_lib.load_config(workdir)
  mesh = parallel.make_mesh()
  experiment, state, step = experiment_lib.restore_state(workdir, config, mesh, checkpoint)
  return TrainedModel(config=config, sde=experiment.sde, ema_params=state.ema_params,
                      step=int(step), experiment=experiment, mesh=mesh)
