"""flat_params: a tree as one vector, cut out at runtime offsets, with a concatenating VJP;
flat_state: the train state on such vectors (the CPU step's form) and back."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from score_sde import experiment as experiment_lib
from score_sde import train
from score_sde.cpu import flat_params
from score_sde.cpu import flat_state


def _tree(key=jax.random.PRNGKey(0)):
  k = jax.random.split(key, 5)
  return {'conv': {'kernel': jax.random.normal(k[0], (3, 3, 2, 4)),
                   'bias': jax.random.normal(k[1], (4,))},
          'dense': [jax.random.normal(k[2], (4, 5)), jax.random.normal(k[3], (5,))],
          'scale': jax.random.normal(k[4], ())}


def test_ravel_then_unravel_is_an_exact_round_trip():
  tree = _tree()
  layout = flat_params.FlatLayout.of(tree)
  assert layout.size == sum(x.size for x in jax.tree.leaves(tree)) == 72 + 4 + 20 + 5 + 1
  flat = layout.ravel(tree)
  assert flat.shape == (layout.size,)
  for back in (layout.unravel(flat, layout.offsets()),
               jax.jit(layout.unravel)(flat, layout.offsets())):
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
      assert a.shape == b.shape
      np.testing.assert_array_equal(a, b)


def test_gradient_through_unravel_is_the_raveled_tree_gradient():
  tree = _tree()
  layout = flat_params.FlatLayout.of(tree)
  offsets = layout.offsets()

  def loss(params):
    return (jnp.sum(jnp.sin(params['conv']['kernel'])) + jnp.sum(params['conv']['bias'] ** 3)
            + jnp.sum(params['dense'][0] @ params['dense'][1]) * params['scale'])

  flat_grad = jax.jit(jax.grad(lambda f: loss(layout.unravel(f, offsets))))(layout.ravel(tree))
  np.testing.assert_allclose(flat_grad, layout.ravel(jax.grad(loss)(tree)), rtol=1e-6, atol=1e-6)


def test_backward_is_one_concatenation_not_a_sum_of_full_size_updates():
  """The generic transpose of a dynamic slice pads each leaf's gradient to P and adds them."""
  tree = _tree()
  layout = flat_params.FlatLayout.of(tree)
  offsets = layout.offsets()
  jaxpr = jax.make_jaxpr(jax.grad(lambda f: sum(
      jnp.sum(x ** 2) for x in jax.tree.leaves(layout.unravel(f, offsets)))))(layout.ravel(tree))
  text = str(jaxpr)
  assert 'concatenate' in text
  assert 'dynamic_update_slice' not in text and ' pad' not in text


def test_mixed_dtypes_and_mismatched_trees_are_clear_errors():
  with pytest.raises(ValueError, match=r"one floating dtype .*\['float32', 'int32'\].*"
                                       r"\(config.training.param_layout = 'tree'\)"):
    flat_params.FlatLayout.of({'w': jnp.ones(3), 'n': jnp.ones(2, jnp.int32)})
  layout = flat_params.FlatLayout.of({'w': jnp.ones(3)})
  with pytest.raises(ValueError, match='does not match the layout'):
    layout.ravel({'v': jnp.ones(3)})
  with pytest.raises(ValueError, match=r"float32\[4\] does not match the layout's float32\[3\]"):
    layout.ravel({'w': jnp.ones(4)})
  with pytest.raises(ValueError, match=r"bfloat16\[3\] does not match"):
    layout.ravel({'w': jnp.ones(3, jnp.bfloat16)})


# ----------------------------------------------------------------------------
# The flat train state
# ----------------------------------------------------------------------------

def _optimizer():
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))


def _tree_state(tree):
  optimizer = _optimizer()
  moments = iter(jax.random.split(jax.random.PRNGKey(1), 100))
  opt_state = jax.tree.map(                   # distinct, non-zero moments: a real round trip
      lambda x: jax.random.uniform(next(moments), x.shape, x.dtype) if x.ndim else x,
      optimizer.init(tree))
  return experiment_lib.TrainState(step=jnp.asarray(3, jnp.int32), params=tree,
                                   opt_state=opt_state,
                                   ema_params=jax.tree.map(lambda x: 0.5 * x, tree),
                                   key=jax.random.PRNGKey(2))


def test_flat_state_holds_vectors_and_converts_back_exactly():
  state = _tree_state(_tree())
  flat = jax.jit(lambda s: flat_state.flatten_state(s, _optimizer()))(state)
  size = flat.layout.size
  assert flat.params.shape == flat.ema_params.shape == (size,)
  adam = flat.opt_state[1][0]                 # chain(clip, adam): ScaleByAdamState
  assert adam.mu.shape == adam.nu.shape == (size,) and adam.count.shape == ()
  np.testing.assert_array_equal(flat.ema_params, 0.5 * flat.params)
  back = jax.jit(lambda s: flat_state.unflatten_state(s, _optimizer()))(flat)
  assert type(back) is experiment_lib.TrainState     # the class it was made from
  assert jax.tree.structure(back) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


def test_mixed_parameter_dtypes_train_in_the_tree_form_only():
  """One reason for the tree form: a bfloat16 leaf beside float32 ones."""
  tree = _tree()
  tree['conv']['kernel'] = tree['conv']['kernel'].astype(jnp.bfloat16)
  state = _tree_state(tree)
  with pytest.raises(ValueError, match=r"\['bfloat16', 'float32'\].*param_layout = 'tree'"):
    flat_state.flatten_state(state, _optimizer())

  def loss_fn(params, key, batch):
    x = jax.lax.conv_general_dilated(batch, params['conv']['kernel'].astype(jnp.float32),
                                     (1, 1), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    y = jnp.mean(x + params['conv']['bias'], axis=(1, 2)) @ params['dense'][0]
    return jnp.mean((y + params['dense'][1]) ** 2) * params['scale'] ** 2

  step = jax.jit(train.make_train_step(loss_fn, _optimizer(), lambda count: 1e-3,
                                       ema_rate=0.9))
  batch = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 5, 2))
  new, metrics = step(state, batch)
  assert int(new.step) == 4 and np.isfinite(float(metrics['loss']))
  assert new.params['conv']['kernel'].dtype == jnp.bfloat16
  assert not np.array_equal(new.params['dense'][0], state.params['dense'][0])
