"""The train state with flat parameter vectors: the form the train step takes on XLA:CPU.

`flatten_state` turns a train state of parameter trees (experiment.TrainState)
into a `FlatTrainState` whose params, EMA and parameter-shaped optimiser
fields (Adam's moments) are flat vectors [P] (flat_params.py says why that
compiles faster on XLA:CPU); `unflatten_state` gives the tree state back.
Both are exact copies. Checkpoints, snapshots, jobs and the public API only
ever see the tree state.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax

from score_sde.cpu import flat_params


@flax.struct.dataclass
class FlatTrainState:
  """A train state with params, EMA and the optimiser's parameter-shaped fields
  (Adam's moments) as flat vectors [P] in `layout`.

  `offsets` are the layout's leaf offsets as int32 scalars: program inputs,
  so that XLA compiles the kernels that read a parameter once per shape
  (flat_params.FlatLayout.unravel). `tree_type` is the class of the tree
  state it was made from (static), which `unflatten_state` builds again.
  """
  step: jax.Array
  params: jax.Array
  opt_state: Any
  ema_params: jax.Array
  key: jax.Array
  offsets: tuple
  layout: flat_params.FlatLayout = flax.struct.field(pytree_node=False)
  tree_type: type = flax.struct.field(pytree_node=False)

  def unravel(self, flat: jax.Array):
    """A flat vector of this state (params, EMA, a moment) as a parameter tree."""
    return self.layout.unravel(flat, self.offsets)


def _flat_fields(optimizer, layout: flat_params.FlatLayout):
  """The optimiser state's structure with True at parameter-shaped fields (e.g. Adam's moments).

  A field is parameter-shaped when its shape follows the number of
  parameters: [P] for P parameters and [P + 1] for P + 1.
  """
  def init_shapes(size):
    return jax.eval_shape(optimizer.init, jax.ShapeDtypeStruct((size,), layout.dtype))
  return jax.tree.map(lambda a, b: a.shape == (layout.size,) and b.shape == (layout.size + 1,),
                      init_shapes(layout.size), init_shapes(layout.size + 1))


def flatten_state(state, optimizer) -> FlatTrainState:
  """Tree train state (step, params, opt_state, ema_params, key) -> FlatTrainState.

  An exact copy; jit it with the state's shardings.
  """
  layout = flat_params.FlatLayout.of(state.params)
  opt_state = jax.tree.map(lambda flat, sub: layout.ravel(sub) if flat else sub,
                           _flat_fields(optimizer, layout), state.opt_state)
  return FlatTrainState(step=state.step, params=layout.ravel(state.params),
                        opt_state=opt_state, ema_params=layout.ravel(state.ema_params),
                        key=state.key, offsets=layout.offsets(), layout=layout,
                        tree_type=type(state))


def unflatten_state(state: FlatTrainState, optimizer):
  """FlatTrainState -> the tree train state it was made from (an exact copy)."""
  opt_state = jax.tree.map(lambda flat, x: state.unravel(x) if flat else x,
                           _flat_fields(optimizer, state.layout), state.opt_state)
  return state.tree_type(step=state.step, params=state.unravel(state.params),
                         opt_state=opt_state, ema_params=state.unravel(state.ema_params),
                         key=state.key)
