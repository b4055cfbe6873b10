"""score_sde.load(...)'s TrainedModel: compiled samplers and likelihood are cached per options.

The model here is the toy VP + MLP config with random parameters (no training):
what is tested is that a second call with the same (normalised) options neither
traces nor compiles, counted twice over: a Python counter in the score
function (it runs only while JAX traces) and JAX's own trace / lowering events.
"""
import contextlib
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
from score_sde import api
from score_sde import experiment as experiment_lib
from score_sde import parallel
from score_sde.models import utils as model_utils

TRACE_EVENTS = ('/jax/core/compile/jaxpr_trace_duration',
                '/jax/core/compile/jaxpr_to_mlir_module_duration')
KEY = jax.random.PRNGKey(0)
TRACES = []   # one entry per trace of the model's score function


def _toy_config():
  config = configs.load(os.path.join(configs.CONFIG_DIR, 'toy', 'vp_mlp_continuous.py'))
  config.model.nf = 16
  config.model.num_layers = 2
  config.sampling.method = 'pc'
  config.sampling.num_steps = 20    # the DDPM chain (reverse_diffusion) needs N >= 20
  return config


@pytest.fixture(scope='module')
def model():
  """A TrainedModel with random parameters and a counter of score-function traces."""
  config = _toy_config()
  experiment = experiment_lib.build_experiment(config)
  params = model_utils.init_params(jax.random.PRNGKey(1), experiment.model, config)
  score_model_fn = experiment.score_model_fn

  def counting_score_model_fn(params, x, t):
    TRACES.append(1)              # a Python side effect: runs while tracing, never compiled in
    return score_model_fn(params, x, t)

  # Toy data have no levels; 17 lets bits_per_dim run on integer inputs here.
  experiment = dataclasses.replace(experiment, score_model_fn=counting_score_model_fn,
                                   num_levels=17)
  return api.TrainedModel(config=config, sde=experiment.sde, ema_params=params, step=0,
                          experiment=experiment, mesh=parallel.make_mesh())


@contextlib.contextmanager
def jax_compile_events():
  """Yields a list that collects JAX's trace and lowering (compile) events meanwhile."""
  events = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event in TRACE_EVENTS:
      events.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def _assert_cached(call):
  """call() once (compiles), then again: no trace, no lowering, the same result."""
  first = jax.block_until_ready(call())
  traces = len(TRACES)
  with jax_compile_events() as events:
    second = jax.block_until_ready(call())
  assert events == [], f'the second call traced or compiled again: {events}'
  assert len(TRACES) == traces
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  return first


def test_event_counter_sees_a_fresh_compilation(model):
  """The counters can fail: a program not compiled before shows up in both."""
  traces = len(TRACES)
  with jax_compile_events() as events:
    model.sample(KEY, 3, num_steps=21)
  assert '/jax/core/compile/jaxpr_to_mlir_module_duration' in events
  assert len(TRACES) > traces


def test_sample_compiles_once_per_options(model):
  x, info = _assert_cached(lambda: model.sample(KEY, 4))
  assert x.shape == (4, 2) and int(info['nfe']) == 2 * 20  # predictor + 1 corrector step
  # The same options spelled out (defaults, the config's values, other case): no new program.
  traces, programs = len(TRACES), len(model.compiled)
  with jax_compile_events() as events:
    y, _ = model.sample(KEY, 4, num_steps=20, predictor='Reverse_Diffusion',
                        snr_norm=model.config.sampling.snr_norm)
  assert events == [] and len(TRACES) == traces and len(model.compiled) == programs
  np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Another method or sample count is another program, cached in turn.
  _assert_cached(lambda: model.sample(KEY, 4, method='ddim', num_steps=4))
  _assert_cached(lambda: model.sample(KEY, 2))
  assert len(model.compiled) == programs + 2


def test_log_likelihood_and_bits_per_dim_compile_once(model):
  x = jax.random.normal(jax.random.PRNGKey(2), (4, 2))
  logp, z, _ = _assert_cached(lambda: model.log_likelihood(KEY, x, rtol=1e-3, atol=1e-3))
  assert logp.shape == (4,) and z.shape == x.shape and np.all(np.isfinite(logp))
  # Default options filled in: the explicit default is the same program.
  traces = len(TRACES)
  model.log_likelihood(KEY, x, rtol=1e-3, atol=1e-3, solver='tsit5', num_probes=1)
  assert len(TRACES) == traces
  images = np.random.default_rng(0).integers(0, 17, (4, 2))
  bpd = _assert_cached(lambda: model.bits_per_dim(KEY, images, rtol=1e-3, atol=1e-3))
  assert bpd.shape == (4,) and np.all(np.isfinite(bpd))


def test_encode_and_decode_compile_once(model):
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 2))
  z = _assert_cached(lambda: model.encode(x, rtol=1e-3, atol=1e-3))
  back = _assert_cached(lambda: model.decode(z, rtol=1e-3, atol=1e-3))
  assert back.shape == x.shape


def test_bad_options_raise_clear_errors(model):
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['tol'\] for log_likelihood; "
                                       r"valid: \['atol', 'divergence'"):
    model.log_likelihood(KEY, jnp.zeros((2, 2)), tol=1e-3)
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['rtol'\] for sampling method "
                                       r"'pc'"):
    model.sample(KEY, 2, rtol=1e-3)
  # bits/dim of 8-bit images on a 17-level model, or of floats, would be wrong numbers
  with pytest.raises(ValueError, match=r'integer levels 0..16 \(this model.s data has 17 '
                                       r'levels\); got values in \[0, 255\]'):
    model.bits_per_dim(KEY, np.array([[0, 255]], np.uint8))
  with pytest.raises(ValueError, match=r'got non-integer values .* np.round\(x \* 16\)'):
    model.bits_per_dim(KEY, np.array([[0.5, 0.25]]))
  with pytest.raises(ValueError, match=r'got values in \[-1, 3\]'):
    model.bits_per_dim(KEY, np.array([[-1, 3]]))


def test_load_refuses_a_classifier_workdir(tmp_path):
  config = configs.load(os.path.join(configs.CONFIG_DIR, 'digits', 'wrn_classifier.py'))
  (tmp_path / 'config.json').write_text(config.to_json())
  with pytest.raises(ValueError, match=r"holds a noise-conditional classifier \('wideresnet'.*"
                                       r"load the score model's workdir"):
    api.load(str(tmp_path))
