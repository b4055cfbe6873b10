"""Writes checkpoints in yang-song/score_sde's Flax layout from our own networks (for
benchmarks and round trips; the tests of the import itself use files the original
code wrote, in shared/data/original_checkpoints/).

Only for networks whose original Flax tree has our names and shapes (NCSN++,
DDPM++, the DDPM U-Net); NCSNv2's original names differ (see
score_sde/convert/flax_msgpack.py).
"""
from __future__ import annotations

import jax
import numpy as np
from flax import serialization

from score_sde import models
from score_sde.models import utils as model_utils


def write_flax(config, path: str, *, step: int, seed: int = 0) -> int:
  """msgpack of the original State {step, optimizer: {target, state: {step, param_states}},
  lr, model_state, ema_rate, params_ema, rng} with random parameters; returns the
  parameter count."""
  model = models.get_model(config)
  params = jax.tree.map(np.asarray, model_utils.init_params(jax.random.PRNGKey(seed), model,
                                                            config))
  rng = np.random.default_rng(seed)
  ema = jax.tree.map(lambda p: p + 0.01 * rng.standard_normal(p.shape).astype(p.dtype), params)
  moments = jax.tree.map(lambda p: {'grad_ema': np.zeros_like(p),
                                    'grad_sq_ema': np.zeros_like(p)}, params)
  state = {'step': step,
           'optimizer': {'target': params, 'state': {'step': step, 'param_states': moments}},
           'lr': float(config.optim.lr), 'model_state': {},
           'ema_rate': float(config.model.ema_rate), 'params_ema': ema,
           'rng': np.asarray(jax.random.PRNGKey(seed))}
  with open(path, 'wb') as f:
    f.write(serialization.msgpack_serialize(state))
  return model_utils.param_count(params)
