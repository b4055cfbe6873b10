"""A parameter tree as one flat vector, and back: the layout the CPU train step updates.

Why the train step works on flat vectors on XLA:CPU: XLA:CPU compiles one kernel
per distinct fused computation. Updating a tree leaf by leaf (clipping, Adam,
EMA) costs ~6 kernels per parameter shape, and every program then carries
four arrays per parameter array (paper NCSN++: 571 of them). On one flat vector
[P] the whole update is a handful of kernels: the train step compiles in about
two thirds of the time, at the same step time (the figures: README, 'Speed on
this machine'; benchmarks/train.py measures them).

The network still needs the tree. `FlatLayout.unravel` cuts it out of the
vector with *dynamic* slices whose offsets are program inputs
(`FlatLayout.offsets`, kept in the train state): a fused kernel that reads a
parameter is then the same computation for every layer of that shape, and
XLA compiles it once. With static offsets each such kernel carries its own
constant offset and is compiled again (paper NCSN++: 1496 kernels). The
gradient of `unravel` is one concatenation of the leaves' gradients (a custom
VJP; the generic transpose of a dynamic slice would add P-sized zero vectors,
one per parameter).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class FlatLayout:
  """Where each leaf of a parameter tree lives in one flat vector [size] (static)."""
  treedef: Any
  shapes: tuple[tuple[int, ...], ...]
  dtype: Any

  @classmethod
  def of(cls, tree) -> 'FlatLayout':
    """The layout of `tree` (arrays or ShapeDtypeStructs of one floating dtype)."""
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
      raise ValueError('cannot lay out an empty parameter tree as a flat vector.')
    dtypes = sorted({str(np.dtype(leaf.dtype)) for leaf in leaves})
    if len(dtypes) != 1 or not jnp.issubdtype(leaves[0].dtype, jnp.floating):
      raise ValueError(f'the flat train step keeps parameters as one flat vector, which needs '
                       f'one floating dtype for all of them; this model has {dtypes}. Cast the '
                       f'parameters to one dtype in the model, or train on the parameter tree '
                       f"(config.training.param_layout = 'tree').")
    return cls(treedef=treedef, shapes=tuple(tuple(leaf.shape) for leaf in leaves),
               dtype=np.dtype(leaves[0].dtype))

  @property
  def sizes(self) -> tuple[int, ...]:
    return tuple(int(np.prod(shape, dtype=np.int64)) for shape in self.shapes)

  @property
  def starts(self) -> tuple[int, ...]:
    """Offset of each leaf in the flat vector (in elements)."""
    return tuple(int(s) for s in np.cumsum((0,) + self.sizes[:-1]))

  @property
  def size(self) -> int:
    return sum(self.sizes)

  def offsets(self) -> tuple[jax.Array, ...]:
    """The leaves' offsets as int32 scalars, to pass into a program as inputs."""
    if self.size >= 2 ** 31:
      raise ValueError(f'{self.size} parameters do not fit int32 offsets.')
    return tuple(jnp.asarray(start, jnp.int32) for start in self.starts)

  def ravel(self, tree) -> jax.Array:
    """tree -> flat vector [size] (leaves in tree-flatten order; an exact copy)."""
    leaves, treedef = jax.tree.flatten(tree)
    if treedef != self.treedef:
      raise ValueError(f'parameter tree {treedef} does not match the layout {self.treedef}.')
    for leaf, shape in zip(leaves, self.shapes):
      if tuple(leaf.shape) != shape or np.dtype(leaf.dtype) != self.dtype:
        raise ValueError(f'a leaf of {leaf.dtype}{list(leaf.shape)} does not match the '
                         f'layout\'s {self.dtype}{list(shape)}.')
    return jnp.concatenate([jnp.ravel(leaf) for leaf in leaves])

  def unravel(self, flat: jax.Array, offsets) -> Any:
    """flat vector [size] -> tree; `offsets` must be `self.offsets()` (as program inputs).

    Reverse-mode differentiable (a custom VJP: the gradient is the leaves'
    gradients concatenated in layout order); forward mode (jax.jvp) is not
    supported. Other offsets would read the wrong leaves.
    """
    return jax.tree.unflatten(self.treedef, _unravel_fn(self)(flat, tuple(offsets)))


@functools.lru_cache(maxsize=32)
def _unravel_fn(layout: FlatLayout):
  """The leaves of `layout` cut from a flat vector at runtime offsets, with a concatenating VJP."""
  sizes, shapes = layout.sizes, layout.shapes

  @jax.custom_vjp
  def unravel(flat, offsets):
    return [jax.lax.dynamic_slice(flat, (start,), (size,)).reshape(shape)
            for start, size, shape in zip(offsets, sizes, shapes)]

  def forward(flat, offsets):
    return unravel(flat, offsets), len(offsets)

  def backward(num_offsets, leaf_cotangents):   # the leaves tile [0, size) in layout order
    flat_cotangent = jnp.concatenate([jnp.ravel(c) for c in leaf_cotangents])
    return flat_cotangent, (None,) * num_offsets

  unravel.defvjp(forward, backward)
  return unravel
