"""The score parameterisations of score_fn.py, with a network whose output is known."""
import jax.numpy as jnp
import numpy as np
import pytest

import configs
from score_sde import describe
from score_sde import sde as sde_lib
from score_sde.models import utils as model_utils
from score_sde import score_fn

X = jnp.arange(2 * 2 * 2 * 1, dtype=jnp.float32).reshape(2, 2, 2, 1) / 10 + 0.1
OUT = jnp.full_like(X, 3.0)


def _recording_model():
  """model_fn returning OUT and remembering the labels it was given."""
  seen = {}

  def model_fn(params, x, labels, train=False, key=None):
    seen['labels'] = np.asarray(labels)
    seen['train'] = train
    return OUT if params is None else jnp.concatenate([OUT, -OUT], axis=-1)

  return model_fn, seen


def test_ve_continuous_conditions_on_sigma_and_returns_output():
  sde = sde_lib.VESDE()
  model_fn, seen = _recording_model()
  score = score_fn.get_score_model_fn(sde, model_fn, continuous=True)(None, X, 0.3, True)
  np.testing.assert_array_equal(score, OUT)
  np.testing.assert_allclose(seen['labels'], [0.01 * 5000 ** 0.3] * 2, rtol=1e-5)
  assert seen['train'] is True


def test_ve_discrete_uses_the_ncsn_index():
  sde = sde_lib.VESDE(N=11)
  model_fn, seen = _recording_model()
  fn = score_fn.get_score_model_fn(sde, model_fn, continuous=False)
  np.testing.assert_array_equal(fn(None, X, jnp.array([1.0, 0.0])), OUT)
  np.testing.assert_array_equal(seen['labels'], [0, 10])   # 0 = sigma_max at t = T
  assert seen['labels'].dtype == np.int32


def test_ve_discrete_index_rounds_to_the_nearest_noise_level():
  """The PC sampler's grid t_i = linspace(T, eps, N) is slightly inside the index grid
  (1 - t_i) (N - 1) = i (1 - eps): each step must still get noise level i (the
  reference rounds; truncating would give i - 1 on every step but the first), and a
  time 0.6 of a level past level 0 goes to level 1."""
  n, eps = 1000, 1e-5
  sde = sde_lib.VESDE(N=n)
  model_fn, seen = _recording_model()
  fn = score_fn.get_score_model_fn(sde, model_fn, continuous=False)
  times = jnp.linspace(sde.T, eps, n)
  fn(None, jnp.zeros((n, 1, 1, 1)), times)
  np.testing.assert_array_equal(seen['labels'], np.arange(n))
  fn(None, X, jnp.array([1.0 - 0.6 / (n - 1), 1.0 - 0.4 / (n - 1)]))
  np.testing.assert_array_equal(seen['labels'], [1, 0])


@pytest.mark.parametrize('sde', [sde_lib.VPSDE(), sde_lib.SubVPSDE()], ids=['vp', 'subvp'])
def test_vp_family_continuous_divides_noise_by_minus_std(sde):
  model_fn, seen = _recording_model()
  t = jnp.array([0.2, 0.7])
  score = score_fn.get_score_model_fn(sde, model_fn, continuous=True)(None, X, t)
  std = np.asarray(sde_lib.transition_coeffs(sde, t)[1])
  np.testing.assert_allclose(score, -3.0 / std[:, None, None, None] * np.ones(X.shape),
                             rtol=1e-6)
  np.testing.assert_allclose(seen['labels'], [0.2 * 999, 0.7 * 999], rtol=1e-6)


def test_vp_discrete_uses_ddpm_timesteps_and_chain_std():
  sde = sde_lib.VPSDE(N=50)
  model_fn, seen = _recording_model()
  t = jnp.array([10 / 49, 1.0])
  score = score_fn.get_score_model_fn(sde, model_fn, continuous=False)(None, X, t)
  np.testing.assert_allclose(seen['labels'], [10.0, 49.0], rtol=1e-6)
  std = np.sqrt(1 - np.asarray(sde.alphas_cumprod))[[10, 49]]
  np.testing.assert_allclose(score[:, 0, 0, 0], -3.0 / std, rtol=1e-5)


@pytest.mark.parametrize('sde', [sde_lib.VPSDE(N=100), sde_lib.SubVPSDE(N=20)], ids=['vp', 'subvp'])
def test_vp_family_continuous_labels_are_999_t_whatever_n(sde):
  """The reference conditions continuous VP / sub-VP networks on 999 t, not t (N - 1)."""
  model_fn, seen = _recording_model()
  score_fn.get_score_model_fn(sde, model_fn, continuous=True)(None, X, jnp.array([0.25, 1.0]))
  np.testing.assert_allclose(seen['labels'], [0.25 * 999, 999.0], rtol=1e-6)


def test_vp_discrete_chain_std_truncates_fractional_timesteps():
  """Between DDPM timesteps the network sees the fractional label t (N - 1) and the std
  is that of timestep floor(t (N - 1)) (the reference's astype(int32)), not the nearest."""
  sde = sde_lib.VPSDE(N=50)
  model_fn, seen = _recording_model()
  t = jnp.array([10.8 / 49, 48.6 / 49])
  score = score_fn.get_score_model_fn(sde, model_fn, continuous=False)(None, X, t)
  np.testing.assert_allclose(seen['labels'], [10.8, 48.6], rtol=1e-6)
  betas = np.linspace(0.1 / 50, 20 / 50, 50)
  std = np.sqrt(1 - np.cumprod(1 - betas))[[10, 48]]
  np.testing.assert_allclose(score[:, 0, 0, 0], -3.0 / std, rtol=1e-5)


def test_learned_variance_uses_the_eps_half():
  sde = sde_lib.VPSDE()
  model_fn, _ = _recording_model()
  fn = score_fn.get_score_model_fn(sde, model_fn, learned_variance=True)
  score = fn('two-halves', X, 0.5)
  std = float(sde_lib.transition_coeffs(sde, 0.5)[1])
  assert score.shape == X.shape
  np.testing.assert_allclose(score, -3.0 / std, rtol=1e-6)


def test_an_sde_without_a_declared_parameterisation_is_a_clear_error():
  with pytest.raises(ValueError, match='declares no known score parameterisation'):
    score_fn.get_score_model_fn(object(), None)
  with pytest.raises(ValueError, match='unknown score parameterisation .eps.'):
    score_fn.get_score_model_fn(sde_lib.VPSDE(), None, parameterisation='eps')


def test_the_parameterisation_is_the_declared_one_not_the_sde_class():
  # An SDE of a new class (not VE / VP / sub-VP) works through its declaration alone,
  # and gives exactly what the VP SDE gives under the same declared parameterisation.
  class NewVP(sde_lib.VPSDE):
    continuous_parameterisation = 'time_noise'
  model_fn, seen = _recording_model()
  expected = score_fn.get_score_model_fn(sde_lib.VPSDE(), model_fn)(None, X, 0.3)
  labels_vp = seen['labels']
  got = score_fn.get_score_model_fn(NewVP(), model_fn)(None, X, 0.3)
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(seen['labels'], labels_vp)
  # Declaring another parameterisation changes the conversion (the output is now the score).
  class ScoreVP(sde_lib.VPSDE):
    continuous_parameterisation = 'sigma_score'
  got = score_fn.get_score_model_fn(ScoreVP(), model_fn)(None, X, 0.3)
  np.testing.assert_array_equal(got, OUT)
  np.testing.assert_allclose(seen['labels'], sde_lib.transition_coeffs(sde_lib.VPSDE(), 0.3)[1])


@pytest.mark.parametrize('path', [p for p in configs.all_config_paths()
                                  if '/digits/' in p or '/toy/' in p])
def test_small_configs_describe(path):
  config = configs.load(path)
  configs.validate(config)
  info = describe.describe(config)
  expected = list(model_utils.input_shape(config, 1))
  assert info['input_shape'] == expected
  if config.model.name == 'wideresnet':               # a classifier: logits [B, K]
    assert info['output_shape'] == [1, config.model.num_classes]
    return
  if config.model.name in ('nice', 'realnvp', 'glow'):  # a flow: latent z [B, D]
    assert info['output_shape'] == [1, int(np.prod(expected[1:]))]
    assert 1e4 < info['params'] < 2e6
    return
  out_channels = expected[-1] * (2 if config.model.get('learned_variance', False) else 1)
  assert info['output_shape'] == expected[:-1] + [out_channels]
  assert 1e4 < info['params'] < 2e6
