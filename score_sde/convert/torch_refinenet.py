"""score_sde_pytorch's RefineNet state dicts (NCSN, NCSNv2) onto our parameter paths.

The PyTorch port names its modules; ours are numbered in creation order. With the
stages and RefineBlocks of each network listed in forward order (`ARCHITECTURES`):

  begin_conv                         Conv_0
  <k-th res stage>.<j>               ResidualBlock_<2k + j>
      normalize1, conv1              <norm>_0, Conv_0
      normalize2, conv2[.conv]       <norm>_1, Conv_1       (.conv: ConvMeanPool)
      shortcut[.conv]                Conv_2
  <k-th refine block>                RefineBlock_<k>
      adapt_convs.<i>                RCUBlock_<i>
      output_convs                   RCUBlock_<number of adapt_convs>
      msf.convs.<i>, msf.norms.<i>   MSFBlock_0/Conv_<i>, MSFBlock_0/<norm>_<i>
      crp.convs.<i>, crp.norms.<i>   CRPBlock_0/Conv_<i>, CRPBlock_0/<norm>_<i>
      (RCU) <a>_<b>_conv, _norm      Conv_<(a-1) S + b-1>, <norm>_<same>   (S stages)
  normalizer                         <norm>_0
  end_conv                           Conv_1

NCSNv2_256 creates refine31 after refine3 but runs it before: the forward order is
the one that counts, since ours are numbered as the forward pass creates them.
`<norm>` is our name of the k-th normalisation child of that module in the target
(InstanceNormPlus, ConditionalInstanceNormPlus, ...). Convolutions: OIHW -> HWIO.
Normalisations: InstanceNorm2dPlus's alpha, gamma, beta (C,) keep their names;
VarianceNorm2d's alpha is our scale. The conditional norms of NCSN keep every noise
level in one nn.Embedding whose weight [num_classes, k C] is the concatenation
gamma | alpha | beta (ConditionalInstanceNorm2dPlus: `chunk(3)` in that order; without
alpha or beta the remaining ones in the same order): it is cut into our
[num_classes, C] arrays.
"""
from __future__ import annotations

import re

import numpy as np

from score_sde.convert import original as original_lib

_FOUR = (('res1', 'res2', 'res3', 'res4'), ('refine1', 'refine2', 'refine3', 'refine4'))
_FIVE = (('res1', 'res2', 'res3', 'res4', 'res5'),
         ('refine1', 'refine2', 'refine3', 'refine4', 'refine5'))
_SIX = (('res1', 'res2', 'res3', 'res31', 'res4', 'res5'),
        ('refine1', 'refine2', 'refine31', 'refine3', 'refine4', 'refine5'))

# config.model.name -> (residual stages, RefineBlocks), each in forward order.
ARCHITECTURES = {
    'ncsn': _FOUR,
    'ncsnv2': _FOUR,
    'ncsnv2_64': _FOUR,
    'ncsnv2_128': _FIVE,
    'ncsnv2_256': _SIX,
}

# The port's networks as options of ours (models/ncsnv2.py): its RefineBlock widths
# (x nf, deepest first; the 32-64 px NCSN / NCSNv2 give the third block nf where the
# Flax original gives 2 nf), torch.var's unbiased variance in InstanceNorm++ and
# VarianceNorm, and align_corners=True in the fusion blocks' bilinear upsampling.
PORT_REFINE_MULTS = {
    'ncsn': (2, 2, 1, 1),
    'ncsnv2': (2, 2, 1, 1),
    'ncsnv2_64': (2, 2, 1, 1),
    'ncsnv2_128': (4, 2, 2, 1, 1),
    'ncsnv2_256': (4, 2, 2, 2, 1, 1),
}


def port_model_options(model_name: str) -> dict:
  """config.model keys that make our `model_name` network compute score_sde_pytorch's."""
  return {'refine_mults': PORT_REFINE_MULTS[model_name.lower()],
          'norm_unbiased_variance': True, 'resize_align_corners': True}


BLOCKS_PER_STAGE = 2
# Children of our modules that are not normalisation layers.
_STRUCTURAL = ('Conv_', 'ResidualBlock_', 'RefineBlock_', 'RCUBlock_', 'MSFBlock_',
               'CRPBlock_')
# Order of the per-level parameters inside an nn.Embedding row of a conditional norm.
EMBED_ORDER = ('gamma', 'alpha', 'beta')
# PyTorch leaf of an unconditional norm -> ours, where our layer names it differently.
_NORM_ALIASES = {'alpha': 'scale', 'weight': 'scale'}

_RESIDUAL = {'conv1': 'Conv_0', 'conv2': 'Conv_1', 'conv2.conv': 'Conv_1',
             'shortcut': 'Conv_2', 'shortcut.conv': 'Conv_2'}
_RESIDUAL_NORMS = {'normalize1': 0, 'normalize2': 1}
_RCU = re.compile(r'^(\d+)_(\d+)_(conv|norm)\.(.+)$')
_CONV_LEAVES = {'weight': 'kernel', 'bias': 'bias'}


def to_ours(flat: dict, target: original_lib.Target, model_name: str) -> dict:
  """{our path: array in our layout} for a RefineNet state dict (no 'module.', no sigmas).

  Arrays that have no place in `model_name`'s network are returned under
  '(unplaced) <name>' keys, so that `original.check_against` names them.
  """
  name = model_name.lower()
  if name not in ARCHITECTURES:
    raise ValueError(f'{model_name!r} is not a RefineNet model (config.model.name); '
                     f'valid: {sorted(ARCHITECTURES)}.')
  stages, refines = ARCHITECTURES[name]
  children, leaves = _target_structure(target)
  rcu_stages = _rcu_stage_counts(flat)
  adapt_counts = _adapt_counts(flat)
  mapped: dict = {}
  for torch_name, value in flat.items():
    place = _place(torch_name, stages, refines, rcu_stages, adapt_counts)
    if place is None:
      mapped[f'(unplaced) {torch_name}'] = value
      continue
    module, kind, leaf = place
    if kind == 'conv':
      _put_conv(mapped, torch_name, f'{module}/{_CONV_LEAVES[leaf]}', value)
    else:
      parent, index = module
      norm = _norm_child(children, parent, index, conditional=leaf == 'embed.weight')
      path = f'{parent}/{norm}' if parent else norm
      _put_norm(mapped, torch_name, path, leaf, value, leaves.get(path, ()))
  return mapped


# ----------------------------------------------------------------------------
# PyTorch name -> (our module, 'conv' | 'norm', PyTorch leaf)
# ----------------------------------------------------------------------------

def _place(name: str, stages, refines, rcu_stages: dict, adapt_counts: dict):
  """(module, kind, leaf) or None. For norms `module` is (parent path, k-th norm)."""
  head, _, rest = name.partition('.')
  if head in ('begin_conv', 'end_conv') and rest in _CONV_LEAVES:
    return ('Conv_0' if head == 'begin_conv' else 'Conv_1'), 'conv', rest
  if head == 'normalizer':
    return ('', 0), 'norm', rest
  if head in stages:
    block, _, inner = rest.partition('.')
    if not block.isdigit() or int(block) >= BLOCKS_PER_STAGE:
      return None
    module = f'ResidualBlock_{BLOCKS_PER_STAGE * stages.index(head) + int(block)}'
    return _place_residual(module, inner)
  if head in refines:
    module = f'RefineBlock_{refines.index(head)}'
    return _place_refine(module, head, rest, rcu_stages, adapt_counts.get(head, 0))
  return None


def _place_residual(module: str, inner: str):
  sub, _, leaf = inner.rpartition('.')
  if sub in _RESIDUAL and leaf in _CONV_LEAVES:
    return f'{module}/{_RESIDUAL[sub]}', 'conv', leaf
  sub, _, leaf = inner.partition('.')
  if sub in _RESIDUAL_NORMS:
    return (module, _RESIDUAL_NORMS[sub]), 'norm', leaf
  return None


def _place_refine(module: str, head: str, rest: str, rcu_stages: dict, n_adapt: int):
  part, _, tail = rest.partition('.')
  if part == 'adapt_convs':
    index, _, inner = tail.partition('.')
    if not index.isdigit():
      return None
    rcu = f'{head}.adapt_convs.{index}'
    return _place_rcu(f'{module}/RCUBlock_{int(index)}', inner, rcu_stages.get(rcu, 0))
  if part == 'output_convs':
    return _place_rcu(f'{module}/RCUBlock_{n_adapt}', tail,
                      rcu_stages.get(f'{head}.output_convs', 0))
  if part in ('msf', 'crp'):
    sub = f'{module}/{"MSFBlock_0" if part == "msf" else "CRPBlock_0"}'
    group, _, inner = tail.partition('.')
    index, _, leaf = inner.partition('.')
    if not index.isdigit():
      return None
    if group == 'convs' and leaf in _CONV_LEAVES:
      return f'{sub}/Conv_{int(index)}', 'conv', leaf
    if group == 'norms':
      return (sub, int(index)), 'norm', leaf
  return None


def _place_rcu(module: str, inner: str, n_stages: int):
  match = _RCU.match(inner)
  if not match or n_stages < 1:
    return None
  block, stage, kind, leaf = int(match[1]), int(match[2]), match[3], match[4]
  index = (block - 1) * n_stages + (stage - 1)
  if kind == 'conv':
    return (f'{module}/Conv_{index}', 'conv', leaf) if leaf in _CONV_LEAVES else None
  return (module, index), 'norm', leaf


def _rcu_stage_counts(flat: dict) -> dict:
  """{'refine1.adapt_convs.0': stages per residual unit, ...} read off the names."""
  counts: dict = {}
  pattern = re.compile(r'^(refine\d+\.(?:adapt_convs\.\d+|output_convs))\.\d+_(\d+)_')
  for name in flat:
    match = pattern.match(name)
    if match:
      counts[match[1]] = max(counts.get(match[1], 0), int(match[2]))
  return counts


def _adapt_counts(flat: dict) -> dict:
  """{'refine1': number of inputs (adapt_convs), ...}."""
  counts: dict = {}
  for name in flat:
    match = re.match(r'^(refine\d+)\.adapt_convs\.(\d+)\.', name)
    if match:
      counts[match[1]] = max(counts.get(match[1], 0), int(match[2]) + 1)
  return counts


# ----------------------------------------------------------------------------
# Our side: module names from the target, arrays in our layout
# ----------------------------------------------------------------------------

def _target_structure(target):
  """({parent path: [child module names in order]}, {module path: [leaf names]})."""
  children: dict = {}
  leaves: dict = {}
  for path, _ in target:
    *modules, leaf = path.split('/')
    leaves.setdefault('/'.join(modules), []).append(leaf)
    for depth in range(len(modules)):
      parent = '/'.join(modules[:depth])
      siblings = children.setdefault(parent, [])
      if modules[depth] not in siblings:
        siblings.append(modules[depth])
  return children, leaves


def _norm_child(children: dict, parent: str, index: int, conditional: bool) -> str:
  """Our name of the index-th normalisation layer under `parent`."""
  norms = [c for c in children.get(parent, []) if not c.startswith(_STRUCTURAL)]
  if index < len(norms):
    return norms[index]
  return f'{"ConditionalInstanceNormPlus" if conditional else "InstanceNormPlus"}_{index}'


def _put_conv(mapped: dict, torch_name: str, path: str, value) -> None:
  value = np.asarray(value)
  if value.ndim == 4:
    value = np.ascontiguousarray(value.transpose(2, 3, 1, 0))   # OIHW -> HWIO
  _put(mapped, torch_name, path, value)


def _put_norm(mapped: dict, torch_name: str, path: str, leaf: str, value, ours) -> None:
  value = np.asarray(value)
  if leaf == 'embed.weight':
    parts = [name for name in EMBED_ORDER if name in ours] or list(EMBED_ORDER)
    if value.ndim != 2 or value.shape[1] % len(parts):
      mapped[f'(unplaced) {torch_name}'] = value
      return
    for name, piece in zip(parts, np.split(value, len(parts), axis=1)):
      _put(mapped, torch_name, f'{path}/{name}', np.ascontiguousarray(piece))
    return
  if '.' in leaf:
    mapped[f'(unplaced) {torch_name}'] = value
    return
  if leaf not in ours and _NORM_ALIASES.get(leaf) in ours:
    leaf = _NORM_ALIASES[leaf]
  _put(mapped, torch_name, f'{path}/{leaf}', value)


def _put(mapped: dict, torch_name: str, path: str, value) -> None:
  if path in mapped:                    # two file arrays for one of ours: keep both visible
    mapped[f'(unplaced) {torch_name}'] = value
  else:
    mapped[path] = value
