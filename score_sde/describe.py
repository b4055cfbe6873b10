"""What a config builds, without training: parameter count and forward shapes.

Uses `jax.eval_shape`, so even the largest paper configs are described in
seconds and without allocating their parameters.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp

from score_sde import models
from score_sde.models import utils as model_utils


def describe(config, batch_size: int = 1) -> dict:
  """{'model', 'params', 'input_shape', 'output_shape', 'output_dtype'} of a config."""
  model = models.get_model(config)
  shape = model_utils.input_shape(config, batch_size)
  params = jax.eval_shape(lambda k: model_utils.init_params(k, model, config, batch_size),
                          jax.random.PRNGKey(0))
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  if models.is_flow(config.model.name):     # a flow's output is its latent z [B, D]
    out, _ = jax.eval_shape(lambda p, xx: model.apply({'params': p}, xx, method='forward'),
                            params, x)
  else:
    labels = jax.ShapeDtypeStruct(shape[:1], jnp.float32)
    out = jax.eval_shape(lambda p, xx, ll: model.apply({'params': p}, xx, ll, train=False),
                         params, x, labels)
  return {
      'model': config.model.name,
      'params': model_utils.param_count(params),
      'input_shape': list(shape),
      'output_shape': list(out.shape),
      'output_dtype': str(out.dtype),
  }


def describe_json(config) -> str:
  return json.dumps(describe(config))
