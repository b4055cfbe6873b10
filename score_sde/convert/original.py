"""A checkpoint of an original code base, read into plain arrays, and its match to our tree.

`OriginalCheckpoint` holds what both formats share: the step, the training
and EMA parameters and Adam's moments, each a flat dict from the *original*
names to numpy arrays. The format modules (`flax_msgpack.py`,
`torch_state.py`) read a file into one and map its names onto our parameter
paths ('ResnetBlockBigGANpp_0/Conv_0/kernel', ...); `check_against` then
compares the mapped arrays with the tree a config builds and names the first
arrays that differ and the config keys that would explain them.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

FLAX = 'score_sde (Flax msgpack)'
TORCH = 'score_sde_pytorch (torch.save)'

ZIP_MAGIC = b'PK\x03\x04'


class CheckpointMismatchError(ValueError):
  """The file does not hold the network the config builds."""


@dataclasses.dataclass(frozen=True)
class OriginalCheckpoint:
  """A checkpoint of yang-song/score_sde or score_sde_pytorch, as numpy arrays.

  params / ema_params / adam_mu / adam_nu: flat {original name: array}; the
  Adam moments may be None (no optimiser state in the file). adam_count: the
  optimiser's own step count (bias correction); step: the training step.
  """
  path: str
  format: str
  step: int
  params: dict
  ema_params: dict
  adam_mu: dict | None
  adam_nu: dict | None
  adam_count: int
  ema_rate: float | None
  learning_rate: float | None
  buffers: dict          # arrays that are not parameters (torch's `sigmas`)

  @property
  def parameter_count(self) -> int:
    return int(sum(np.size(a) for a in self.params.values()))


def detect_format(path: str) -> str:
  """FLAX or TORCH from the file's first bytes (never from its name)."""
  try:
    with open(path, 'rb') as f:
      head = f.read(4)
  except IsADirectoryError:
    raise ValueError(f'{path} is a directory; pass the checkpoint file itself (score_sde: '
                     f'checkpoint_<k>, score_sde_pytorch: checkpoint_<k>.pth).') from None
  except FileNotFoundError:
    raise ValueError(f'{path} does not exist; pass an original checkpoint file with '
                     f'--original.') from None
  if head.startswith(ZIP_MAGIC):
    return TORCH
  # msgpack map: fixmap (0x80-0x8f), map16 (0xde) or map32 (0xdf).
  if head and (0x80 <= head[0] <= 0x8f or head[0] in (0xde, 0xdf)):
    return FLAX
  raise ValueError(f'{path} is neither a score_sde (Flax msgpack) checkpoint nor a '
                   f'score_sde_pytorch (torch.save zip) checkpoint; pass the checkpoint file '
                   f'the original code wrote (checkpoint_<k> or checkpoint_<k>.pth).')


# ----------------------------------------------------------------------------
# Comparing mapped arrays with the tree a config builds
# ----------------------------------------------------------------------------

Target = Sequence[tuple[str, tuple]]    # (our path 'A/B/kernel', shape), creation order

# What a kind of difference suggests about the config.
_HINTS = {
    'family': ('model.name',),
    'count': ('model.num_res_blocks', 'model.ch_mult', 'model.attn_resolutions',
              'model.progressive', 'model.progressive_input', 'model.resblock_type',
              'model.embedding_type', 'model.conditional', 'model.fir',
              'model.resamp_with_conv', 'data.image_size'),
    'shape': ('model.nf', 'model.ch_mult', 'model.num_scales', 'model.fourier_scale',
              'data.num_channels', 'data.image_size'),
}


def family_of(names) -> str:
  """A short description of the network a set of original names belongs to."""
  text = ' '.join(names)
  for marker, family in (('RefineBlock', 'NCSN / NCSNv2 (RefineNet)'),
                         ('refine', 'NCSN / NCSNv2 (RefineNet)'),
                         ('ResnetBlockBigGANpp', 'NCSN++ / DDPM++ (BigGAN blocks)'),
                         ('ResnetBlockDDPMpp', 'NCSN++ / DDPM++ (DDPM blocks)'),
                         ('ResnetBlockDDPM', 'DDPM U-Net'),
                         ('ResNet_', 'wide ResNet classifier'),
                         ('all_modules', 'NCSN++ / DDPM++ / DDPM U-Net (all_modules list)')):
    if marker in text:
      return family
  return 'unknown network'


def mismatch_message(source: str, config_name: str, missing: list, extra: list,
                     shapes: list, *, first: int = 5) -> str:
  """One paragraph naming the first arrays that differ and the keys that would explain it."""
  parts, kinds = [], set()
  if shapes:
    kinds.add('shape')
    parts.append('shapes differ: ' + ', '.join(
        f'{name} file {tuple(a)} vs config {tuple(b)}' for name, a, b in shapes[:first]))
  if missing:
    kinds.add('count')
    parts.append(f'{len(missing)} array(s) the config needs are not in the file: '
                 + ', '.join(missing[:first]))
  if extra:
    kinds.add('count')
    parts.append(f'{len(extra)} array(s) in the file have no place in the config\'s '
                 'network: ' + ', '.join(extra[:first]))
  keys = [key for kind in ('family', 'count', 'shape') if kind in kinds or kind == 'family'
          for key in _HINTS[kind]]
  keys = list(dict.fromkeys(keys))
  return (f'{source} does not hold the network of {config_name}: ' + '; '.join(parts)
          + '. Config keys that would explain it: ' + ', '.join(keys)
          + ' (pass the config the checkpoint was trained with, and the same '
          '--config.key=value overrides). Nothing was written.')


def check_against(mapped: dict, target: Target, *, source: str, config_name: str) -> None:
  """Raises CheckpointMismatchError unless `mapped` has exactly the target's paths and shapes."""
  wanted = dict(target)
  missing = [p for p in wanted if p not in mapped]
  extra = [p for p in mapped if p not in wanted]
  shapes = [(p, np.shape(mapped[p]), wanted[p]) for p in wanted
            if p in mapped and tuple(np.shape(mapped[p])) != tuple(wanted[p])]
  if missing or extra or shapes:
    raise CheckpointMismatchError(mismatch_message(source, config_name, missing, extra, shapes))


def unflatten(flat: dict) -> dict:
  """{'A/B/c': x} -> {'A': {'B': {'c': x}}} (insertion order kept)."""
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split('/')
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def flatten(tree, prefix: str = '') -> dict:
  """{'A': {'B': {'c': x}}} -> {'A/B/c': x} (insertion order kept)."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f'{prefix}{key}/'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat
