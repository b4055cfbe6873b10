"""flat_params: a tree as one vector, cut out at runtime offsets, with a concatenating VJP."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde.cpu import flat_params


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
  with pytest.raises(ValueError, match=r"one floating dtype .*\['float32', 'int32'\]"):
    flat_params.FlatLayout.of({'w': jnp.ones(3), 'n': jnp.ones(2, jnp.int32)})
  layout = flat_params.FlatLayout.of({'w': jnp.ones(3)})
  with pytest.raises(ValueError, match='does not match the layout'):
    layout.ravel({'v': jnp.ones(3)})
  with pytest.raises(ValueError, match=r"float32\[4\] does not match the layout's float32\[3\]"):
    layout.ravel({'w': jnp.ones(4)})
  with pytest.raises(ValueError, match=r"bfloat16\[3\] does not match"):
    layout.ravel({'w': jnp.ones(3, jnp.bfloat16)})
