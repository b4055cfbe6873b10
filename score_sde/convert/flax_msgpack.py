"""yang-song/score_sde checkpoints: `flax.training.checkpoints` msgpack files.

The file is `msgpack_serialize` of the state dict of the original
`models.utils.State`: {step, optimizer: {target: params, state: {step,
param_states: {<path>: {grad_ema, grad_sq_ema}}}}, lr, model_state,
ema_rate, params_ema, rng} (flax.optim's layout). msgpack holds data only, so
reading it runs no code; flax.optim is not needed.

Names: the NCSN++, DDPM++ and DDPM trees are ours already. The original
NCSNv2 names its InstanceNorm++ layers `InstanceNorm2dPlus_k` with
parameters of shape (1, 1, 1, C) and keeps a down-sampling block's
convolutions under `ConvMeanPool_0/Conv_0` (main path) and
`ConvMeanPool_1/Conv_0` (shortcut), which are our `Conv_1` and `Conv_2`.
"""
from __future__ import annotations

import re

import numpy as np
from flax import serialization

from score_sde.convert import original as original_lib


def _arrays(tree) -> dict:
  return {path: np.asarray(value) for path, value in original_lib.flatten(tree).items()}


def read(path: str) -> original_lib.OriginalCheckpoint:
  """The checkpoint at `path` (a score_sde `checkpoint_<k>` file)."""
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    state = serialization.msgpack_restore(raw)
  except Exception as error:   # msgpack raises several types on bad bytes
    raise ValueError(f'{path} could not be read as a score_sde (Flax msgpack) checkpoint '
                     f'({type(error).__name__}: {error}); the file is truncated or not a '
                     f'checkpoint.') from None
  needed = ('step', 'optimizer', 'params_ema')
  if not isinstance(state, dict) or any(key not in state for key in needed):
    found = sorted(state) if isinstance(state, dict) else type(state).__name__
    raise ValueError(f'{path} is a msgpack file but not a score_sde checkpoint: it holds '
                     f'{found}, not {{step, optimizer, params_ema, ...}}.')
  if state.get('model_state'):
    raise ValueError(f'{path} has mutable model state ({sorted(state["model_state"])}); the '
                     f'networks here keep none (no batch norm), so it cannot be imported.')
  optimizer = state['optimizer']
  params = _arrays(optimizer['target'])
  moments = (optimizer.get('state') or {}).get('param_states') or {}
  mu = nu = None
  if moments:
    flat = original_lib.flatten(moments)
    mu = {p[:-len('/grad_ema')]: np.asarray(v) for p, v in flat.items()
          if p.endswith('/grad_ema')}
    nu = {p[:-len('/grad_sq_ema')]: np.asarray(v) for p, v in flat.items()
          if p.endswith('/grad_sq_ema')}
  return original_lib.OriginalCheckpoint(
      path=path, format=original_lib.FLAX, step=int(np.asarray(state['step'])),
      params=params, ema_params=_arrays(state['params_ema']), adam_mu=mu, adam_nu=nu,
      adam_count=int(np.asarray((optimizer.get('state') or {}).get('step', 0))),
      ema_rate=_float_or_none(state.get('ema_rate')),
      learning_rate=_float_or_none(state.get('lr')), buffers={})


def _float_or_none(value):
  return None if value is None else float(np.asarray(value))


# ----------------------------------------------------------------------------
# Original names -> ours
# ----------------------------------------------------------------------------

_NORM = re.compile(r'(^|/)InstanceNorm2dPlus_(\d+)/')
_COND_NORM = re.compile(r'(^|/)ConditionalInstanceNorm2dPlus_(\d+)/')
_MEAN_POOL = {'ConvMeanPool_0/Conv_0/': 'Conv_1/', 'ConvMeanPool_1/Conv_0/': 'Conv_2/'}


def our_name(name: str) -> str:
  """Our parameter path for an original Flax path."""
  name = _NORM.sub(r'\1InstanceNormPlus_\2/', name)
  name = _COND_NORM.sub(r'\1ConditionalInstanceNormPlus_\2/', name)
  for old, new in _MEAN_POOL.items():
    name = name.replace(old, new)
  return name


def to_ours(flat: dict, target: original_lib.Target) -> dict:
  """{our path: array} for a flat {original path: array}, shapes made ours where the
  original differs only by leading singleton axes ((1, 1, 1, C) -> (C,))."""
  wanted = dict(target)
  mapped = {}
  for name, value in flat.items():
    ours = our_name(name)
    shape = wanted.get(ours)
    if shape is not None and tuple(value.shape) != tuple(shape) and value.size == np.prod(
        shape, dtype=int) and _squeezes_to(value.shape, shape):
      value = value.reshape(shape)
    mapped[ours] = value
  return mapped


def _squeezes_to(shape, target) -> bool:
  """Whether `shape` is `target` with leading axes of size 1 added."""
  shape, target = tuple(shape), tuple(target)
  extra = len(shape) - len(target)
  return extra > 0 and shape[extra:] == target and all(d == 1 for d in shape[:extra])
