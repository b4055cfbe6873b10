"""The MLP score network: shapes, embeddings, output scaling, errors, and a short
fit to the exact score of Gaussian mixtures (score_sde.analytic) under the VE SDE."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from score_sde import analytic
from score_sde import sde as sde_lib
from score_sde.models import get_model
from score_sde.models import mlp as mlp_lib
from score_sde.models import utils as mutils


def mlp_config(**model_overrides):
  config = ml_collections.ConfigDict({
      'data': {'dim': 2, 'centered': True},
      'model': {'name': 'mlp', 'nf': 16, 'num_layers': 2, 'embedding_type': 'fourier',
                'fourier_scale': 16.0, 'scale_by_sigma': False, 'init_scale': 0.0,
                'dropout': 0.0, 'sigma_min': 0.01, 'sigma_max': 10.0, 'num_scales': 100,
                'dtype': 'float32'}})
  config.model.update(model_overrides)
  return config


def init(model, dim, batch=3, seed=0):
  x = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, dim))
  labels = jnp.linspace(0.5, 2.0, batch)
  params = model.init(jax.random.PRNGKey(seed), x, labels)['params']
  return params, x, labels


# ----------------------------------------------------------------------------
# Construction, shapes, parameterisation
# ----------------------------------------------------------------------------

def test_from_config_through_the_registry():
  model = get_model(mlp_config(nf=32, num_layers=3))
  assert isinstance(model, mlp_lib.MLP)
  assert (model.dim, model.nf, model.num_layers, model.embedding_type) == (2, 32, 3, 'fourier')


@pytest.mark.parametrize('embedding_type', ['fourier', 'positional'])
def test_forward_shape_dtype_and_parameter_count(embedding_type):
  nf, layers_, dim = 16, 3, 5
  model = mlp_lib.MLP(dim=dim, nf=nf, num_layers=layers_, embedding_type=embedding_type,
                      init_scale=1.0)
  params, x, labels = init(model, dim)
  for train in (False, True):
    y = model.apply({'params': params}, x, labels, train=train)
    assert y.shape == x.shape and y.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(y)))
  emb = 2 * nf if embedding_type == 'fourier' else nf
  dense = lambda i, o: i * o + o  # noqa: E731
  expected = (nf if embedding_type == 'fourier' else 0)       # Fourier W
  expected += dense(emb, 4 * nf) + dense(4 * nf, 4 * nf)       # time embedding MLP
  expected += dense(dim, nf) + dense(4 * nf, nf)               # first hidden layer
  expected += (layers_ - 1) * (dense(nf, nf) + dense(4 * nf, nf))
  expected += dense(nf, dim)                                   # output layer
  assert mutils.param_count(params) == expected


def test_output_layer_starts_near_zero():
  model = mlp_lib.MLP(dim=4, nf=16, num_layers=2)  # init_scale 0 -> 1e-10
  params, x, labels = init(model, 4)
  y = model.apply({'params': params}, x, labels)
  assert float(jnp.max(jnp.abs(y))) < 1e-5
  y1 = model.clone(init_scale=1.0).apply(
      {'params': model.clone(init_scale=1.0).init(jax.random.PRNGKey(0), x, labels)['params']},
      x, labels)
  assert float(jnp.max(jnp.abs(y1))) > 1e-2


def test_labels_condition_the_output():
  model = mlp_lib.MLP(dim=3, nf=16, num_layers=2, init_scale=1.0)
  params, x, _ = init(model, 3)
  same = jnp.stack([x[0], x[0]])
  y = model.apply({'params': params}, same, jnp.array([0.1, 3.0]))
  assert not np.allclose(y[0], y[1], atol=1e-4)
  uncond = model.clone(conditional=False)
  params_u = uncond.init(jax.random.PRNGKey(0), same, jnp.array([0.1, 3.0]))['params']
  y_u = uncond.apply({'params': params_u}, same, jnp.array([0.1, 3.0]))
  np.testing.assert_array_equal(np.asarray(y_u[0]), np.asarray(y_u[1]))


def test_scale_by_sigma_divides_by_the_noise_level():
  base = mlp_lib.MLP(dim=3, nf=16, num_layers=2, init_scale=1.0)
  params, x, _ = init(base, 3)
  sigmas = jnp.array([0.05, 1.0, 7.0])
  unscaled = base.apply({'params': params}, x, sigmas)
  scaled = base.clone(scale_by_sigma=True).apply({'params': params}, x, sigmas)
  np.testing.assert_allclose(np.asarray(scaled), np.asarray(unscaled / sigmas[:, None]),
                             rtol=1e-5)
  # Positional embedding: the label is a discrete index into sigma_max -> sigma_min.
  pos = base.clone(embedding_type='positional', sigma_max=10.0, sigma_min=0.01, num_scales=4)
  params_p, _, _ = init(pos, 3)
  idx = jnp.array([0, 1, 3])
  unscaled = pos.apply({'params': params_p}, x, idx)
  scaled = pos.clone(scale_by_sigma=True).apply({'params': params_p}, x, idx)
  expected_sigmas = 10.0 * (0.01 / 10.0) ** (np.array([0, 1, 3]) / 3)
  np.testing.assert_allclose(np.asarray(scaled),
                             np.asarray(unscaled) / expected_sigmas[:, None], rtol=1e-5)


def test_bfloat16_compute_close_to_float32():
  model = mlp_lib.MLP(dim=8, nf=32, num_layers=2, init_scale=1.0)
  params, x, labels = init(model, 8)
  y32 = model.apply({'params': params}, x, labels)
  y16 = model.clone(dtype='bfloat16').apply({'params': params}, x, labels)
  assert y16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(y16 - y32) / jnp.linalg.norm(y32))
  assert 0 < rel < 0.05


def test_dropout_only_in_training():
  model = mlp_lib.MLP(dim=4, nf=32, num_layers=2, init_scale=1.0, dropout=0.5)
  params, x, labels = init(model, 4)
  evals = [model.apply({'params': params}, x, labels, train=False) for _ in range(2)]
  np.testing.assert_array_equal(np.asarray(evals[0]), np.asarray(evals[1]))
  train = model.apply({'params': params}, x, labels, train=True,
                      rngs={'dropout': jax.random.PRNGKey(3)})
  assert not np.allclose(np.asarray(train), np.asarray(evals[0]))


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------

def test_config_errors():
  config = mlp_config()
  del config.data['dim']
  with pytest.raises(ValueError, match='set config.data.dim'):
    get_model(config)
  config = mlp_config()
  del config.model['num_layers']
  with pytest.raises(ValueError, match='config.model.num_layers is missing'):
    get_model(config)
  with pytest.raises(ValueError, match="unknown embedding_type 'learned'"):
    get_model(mlp_config(embedding_type='learned'))
  with pytest.raises(ValueError, match="unknown config.model.nonlinearity 'gelu'"):
    get_model(mlp_config(nonlinearity='gelu'))
  with pytest.raises(ValueError, match="unknown config.model.dtype 'float64'"):
    get_model(mlp_config(dtype='float64'))


def test_input_errors():
  model = mlp_lib.MLP(dim=3, nf=16, num_layers=2)
  params, x, labels = init(model, 3)
  with pytest.raises(ValueError, match=r'vectors \[B, D\] with D = config.data.dim = 3'):
    model.apply({'params': params}, x[:, :2], labels)
  with pytest.raises(ValueError, match=r'labels must have shape \[B\]'):
    model.apply({'params': params}, x, labels[:2])
  with pytest.raises(ValueError, match='noise levels sigma > 0'):
    model.apply({'params': params}, x, jnp.array([0.0, 1.0, 2.0]))


# ----------------------------------------------------------------------------
# Fitting the exact score of a mixture (continuous VE denoising score matching)
# ----------------------------------------------------------------------------

def fit_mixture_score(mixture, model, num_steps, batch_size=128, lr=2e-3):
  """Adam on E_t E ||sigma s(x_t, sigma) + z||^2; returns losses and relative
  score errors E[sigma^2 |s - s_true|^2] / E[sigma^2 |s_true|^2], before and after."""
  sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=10.0, N=1000)
  dim = mixture.dim

  def noisy_batch(key, n):
    k_x, k_t, k_z = jax.random.split(key, 3)
    x0 = mixture.sample(k_x, n)
    t = jax.random.uniform(k_t, (n,), minval=1e-5, maxval=1.0)
    z = jax.random.normal(k_z, (n, dim))
    sigma = sde.sigma(t)
    return x0 + sigma[:, None] * z, t, sigma, z

  def loss_fn(params, key):
    x_t, _, sigma, z = noisy_batch(key, batch_size)
    score = model.apply({'params': params}, x_t, sigma)
    return jnp.mean(jnp.sum((sigma[:, None] * score + z) ** 2, axis=-1))

  eval_keys = jax.random.split(jax.random.PRNGKey(123), 8)

  @jax.jit
  def evaluate(params):
    loss = jnp.mean(jax.vmap(lambda k: loss_fn(params, k))(eval_keys))
    x_t, t, sigma, _ = noisy_batch(jax.random.PRNGKey(7), 4096)
    err = sigma[:, None] * (model.apply({'params': params}, x_t, sigma)
                            - mixture.score(x_t, t, sde))
    ref = sigma[:, None] * mixture.score(x_t, t, sde)
    return loss, jnp.sum(err ** 2) / jnp.sum(ref ** 2)

  optimizer = optax.adam(lr)

  @jax.jit
  def train(params, key):
    def step(carry, k):
      p, opt_state = carry
      grads = jax.grad(loss_fn)(p, k)
      updates, opt_state = optimizer.update(grads, opt_state, p)
      return (optax.apply_updates(p, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)),
                                  jax.random.split(key, num_steps))
    return params

  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, dim)), jnp.ones((1,)))['params']
  before = evaluate(params)
  after = evaluate(train(params, jax.random.PRNGKey(1)))
  return [tuple(map(float, v)) for v in (before, after)]


def test_mlp_fits_the_exact_score_of_a_2d_mixture():
  mixture = analytic.GaussianMixture.create(
      [0.5, 0.3, 0.2], [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]],
      [[0.1, 0.2], [0.2, 0.1], [0.15, 0.15]])
  model = get_model(mlp_config(nf=64, num_layers=3, scale_by_sigma=True))
  (loss0, err0), (loss1, err1) = fit_mixture_score(mixture, model, num_steps=200)
  assert abs(loss0 - 2.0) < 0.15 and abs(err0 - 1.0) < 1e-3   # score ~ 0 at init
  assert loss1 < 0.8 * loss0    # measured: 1.91 -> 1.36
  assert err1 < 0.35            # measured: 0.25


@pytest.mark.slow
def test_mlp_fits_the_exact_score_of_a_64d_mixture():
  mixture = analytic.random_mixture(jax.random.PRNGKey(0), 64, 4)
  config = mlp_config(nf=128, num_layers=3, scale_by_sigma=True)
  config.data.dim = 64
  (loss0, err0), (loss1, err1) = fit_mixture_score(mixture, get_model(config), num_steps=150)
  assert abs(loss0 - 64.0) < 2.0 and abs(err0 - 1.0) < 1e-3
  assert loss1 < 0.8 * loss0    # measured: 63.7 -> 44.6
  assert err1 < 0.55            # measured: 0.41
