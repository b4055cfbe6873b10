"""yang-song/score_sde_pytorch checkpoints: `torch.save` files (`.pth`).

The file is {'optimizer': Adam state_dict, 'model': DataParallel state dict
(keys 'module.…', convolutions OIHW, dense layers (out, in)), 'ema': {'decay',
'num_updates', 'shadow_params': [the trainable parameters in
model.parameters() order]}, 'step'}. It is read by `torch_pickle.load`,
which runs no code from the file.

Names. NCSN++, DDPM++ and the DDPM U-Net keep their layers in one
`all_modules` list, in the order the forward pass uses them; our Flax
modules are created in that same order, so the k-th listed module that has
parameters is our k-th top-level module with parameters. Inside a block the
PyTorch port kept the Flax names (`GroupNorm_0`, `Conv_0`, `NIN_0`, ...):
`weight` is our `kernel` (convolutions OIHW -> HWIO, dense layers
transposed) or `scale` (GroupNorm). The RefineNet models (NCSN, NCSNv2) name
their modules and are mapped in `torch_refinenet.py`. Buffers (`sigmas`) are
not parameters; the Fourier projection's `W` is a parameter that does not
train (requires_grad=False), so the EMA list leaves it out.
"""
from __future__ import annotations

import re

import numpy as np

from score_sde.convert import original as original_lib
from score_sde.convert import torch_pickle
from score_sde.convert import torch_refinenet

PREFIX = 'module.'
BUFFERS = ('sigmas',)
REFINENET_MODELS = ('ncsn', 'ncsnv2', 'ncsnv2_64', 'ncsnv2_128', 'ncsnv2_256')


def read(path: str) -> original_lib.OriginalCheckpoint:
  """The checkpoint at `path` (a score_sde_pytorch `checkpoint_<k>.pth`)."""
  state = torch_pickle.load(path)
  needed = ('model', 'ema', 'step')
  if not isinstance(state, dict) or any(key not in state for key in needed):
    found = sorted(state) if isinstance(state, dict) else type(state).__name__
    raise ValueError(f'{path} is a torch file but not a score_sde_pytorch checkpoint: it '
                     f'holds {found}, not {{model, ema, optimizer, step}}.')
  model = {_strip(k): np.asarray(v) for k, v in state['model'].items()}
  buffers = {k: v for k, v in model.items() if k.split('.')[-1] in BUFFERS}
  params = {k: v for k, v in model.items() if k not in buffers}
  trainable = [k for k in params if k not in _frozen(params)]
  shadow = list(state['ema'].get('shadow_params') or [])
  if len(shadow) != len(trainable):
    raise ValueError(f'{path}: the EMA holds {len(shadow)} arrays but the model has '
                     f'{len(trainable)} trainable parameters; the file is inconsistent.')
  ema = dict(params)                     # frozen parameters never move: EMA = value
  for name, value in zip(trainable, shadow):
    value = np.asarray(value)
    if value.shape != params[name].shape:
      raise ValueError(f'{path}: EMA array for {name} has shape {value.shape}, the model '
                       f'{params[name].shape}; the file is inconsistent.')
    ema[name] = value
  mu, nu, count = _adam_moments(state.get('optimizer'), list(params))
  learning_rate = None
  groups = (state.get('optimizer') or {}).get('param_groups') or []
  if groups and 'lr' in groups[0]:
    learning_rate = float(groups[0]['lr'])
  decay = state['ema'].get('decay')
  return original_lib.OriginalCheckpoint(
      path=path, format=original_lib.TORCH, step=int(state['step']), params=params,
      ema_params=ema, adam_mu=mu, adam_nu=nu, adam_count=count,
      ema_rate=None if decay is None else float(decay), learning_rate=learning_rate,
      buffers=buffers)


def _strip(key: str) -> str:
  return key[len(PREFIX):] if key.startswith(PREFIX) else key


def _frozen(params: dict) -> set:
  """Parameters that do not train: a module whose only parameter is `W` (the Gaussian
  Fourier projection; NIN layers have `W` and `b`)."""
  modules: dict = {}
  for name in params:
    parent, _, leaf = name.rpartition('.')
    modules.setdefault(parent, []).append(leaf)
  return {f'{parent}.W' if parent else 'W' for parent, leaves in modules.items()
          if leaves == ['W']}


def _adam_moments(optimizer, names: list):
  """(mu, nu, count) by parameter name from an Adam state_dict, or (None, None, 0)."""
  if not optimizer or not optimizer.get('state'):
    return None, None, 0
  groups = optimizer.get('param_groups') or []
  indices = [i for group in groups for i in group.get('params', [])]
  if len(indices) != len(names):
    return None, None, 0               # not the model's parameter list: start Adam afresh
  mu, nu, counts = {}, {}, []
  for index, name in zip(indices, names):
    entry = optimizer['state'].get(index)
    if entry is None:
      continue                          # a frozen parameter (no gradient, no state)
    mu[name] = np.asarray(entry['exp_avg'])
    nu[name] = np.asarray(entry['exp_avg_sq'])
    counts.append(int(np.asarray(entry.get('step', 0))))
  return mu, nu, max(counts, default=0)


# ----------------------------------------------------------------------------
# Original names -> ours (all_modules networks)
# ----------------------------------------------------------------------------

_LIST = re.compile(r'^all_modules\.(\d+)\.(.+)$')


def _convert(ours_leaf: str, value: np.ndarray) -> np.ndarray:
  """A PyTorch array in our layout: OIHW -> HWIO, (out, in) -> (in, out)."""
  if ours_leaf in ('kernel', 'weight') and value.ndim == 4:
    return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
  if ours_leaf == 'kernel' and value.ndim == 2:
    return np.ascontiguousarray(value.T)
  return value


def _torch_leaf(ours_leaf: str) -> str:
  return {'kernel': 'weight', 'scale': 'weight'}.get(ours_leaf, ours_leaf)


def _modules_in_order(target: original_lib.Target) -> list[tuple[str, list]]:
  """[(top-level module, [(path inside it, shape), ...]), ...] in creation order."""
  modules: dict = {}
  for path, shape in target:
    top, _, rest = path.partition('/')
    modules.setdefault(top, []).append((rest, shape))
  return list(modules.items())


def list_modules_to_ours(flat: dict, target: original_lib.Target) -> dict:
  """{our path: array} for an `all_modules` state dict (without 'module.')."""
  by_index: dict = {}
  other = []
  for name, value in flat.items():
    match = _LIST.match(name)
    if match:
      by_index.setdefault(int(match.group(1)), {})[match.group(2)] = value
    else:
      other.append(name)
  mapped = {f'(unplaced) {name}': flat[name] for name in other}
  ours = _modules_in_order(target)
  for position, index in enumerate(sorted(by_index)):
    arrays = by_index[index]
    if position >= len(ours):
      mapped.update({f'(unplaced) all_modules.{index}.{k}': v for k, v in arrays.items()})
      continue
    module, leaves = ours[position]
    used = set()
    for inner, _ in leaves:
      parts = inner.split('/')
      torch_name = '.'.join(parts[:-1] + [_torch_leaf(parts[-1])])
      if torch_name not in arrays:
        continue                        # reported as missing by check_against
      used.add(torch_name)
      mapped[f'{module}/{inner}'] = _convert(parts[-1], arrays[torch_name])
    for name in arrays:
      if name not in used:
        mapped[f'(unplaced) all_modules.{index}.{name} (next to {module})'] = arrays[name]
  return mapped


def to_ours(flat: dict, target: original_lib.Target, model_name: str) -> dict:
  """{our path: array} for a flat PyTorch state dict (parameters, without 'module.')."""
  if model_name.lower() in REFINENET_MODELS:
    return torch_refinenet.to_ours(flat, target, model_name)
  return list_modules_to_ours(flat, target)
