"""Writes the NCSN / NCSNv2 fixtures of this folder with yang-song/score_sde_pytorch's own code.

Run with a Python that has torch, numpy and ml_collections, against an extracted copy
of the original repository:

  git -C <mirror of yang-song/score_sde_pytorch> archive HEAD | tar x -C /tmp/sde_torch
  python tests/data/original_torch/make_fixtures.py /tmp/sde_torch

For each fixture it builds the original network from the original config (shrunk by
`overrides`), gives every parameter a random value away from its initialisation, makes
an `models.ema.ExponentialMovingAverage`, moves the parameters on, runs two steps of the
original `losses.get_step_fn` (Adam state, EMA updates), and writes

  <name>/checkpoint_5.pth   with the original `utils.save_checkpoint` (optimizer, model as
                            DataParallel state dict, ema, step = 250000)
  <name>/expected.npz       x [4, 16, 16, 3] NHWC, t [4] in (0, 1], and the original
                            `models.utils.get_score_fn(sde, model, train=False,
                            continuous=...)` at (x, t) with the EMA parameters copied into
                            the model, as the original evaluation does:
                              score                  the original's numerics
                              score_flax_conventions the same network and weights with two
                                                     numerical conventions of yang-song/
                                                     score_sde (Flax) and of this project
                                                     (see CONVENTIONS below)
  <name>/fixture.json       config, overrides, checkpoint, step, format, patches

What had to be changed for the original to run at all (PATCHES). The NCSN / NCSNv2
networks of score_sde_pytorch (commit cb1f359) cannot be built or run unmodified:

  data.channels        the networks read config.data.channels; the configs only set
                       data.num_channels. Set to data.num_channels.
  conv_bias            models.layers.ncsn_conv3x3 scales `conv.bias` even when
                       bias=False (the RefineNet's RCU / CRP convolutions) and raises
                       AttributeError. Replaced by the same function skipping the missing
                       bias (init_scale is 1, so nothing else changes).
  dilated_padding      ncsn_conv3x3 pads dilated convolutions by 1, so a dilated residual
                       block's output and shortcut differ in size and the forward pass
                       raises. Padded by `dilation` (the 'SAME' padding of the Flax
                       original and of ermongroup/ncsnv2's dilated_conv3x3).
  conditional_norm     (NCSN only) ncsnv2.NCSN calls get_normalization(config), which
                       returns the unconditional InstanceNorm2dPlus, while its blocks call
                       the norm with (features, num_classes) and (x, y); with
                       conditional=True the returned partial clashes with the positional
                       num_classes. The blocks get models.normalization.
                       ConditionalInstanceNorm2dPlus itself.
  block_dilation       (NCSN only) layers.ConditionalResidualBlock defaults dilation to None
                       and compares it with 1 (TypeError for the undilated blocks). The
                       default becomes 1.

The numerical CONVENTIONS where the PyTorch port differs from the Flax original (and
from this project), switched for `score_flax_conventions` only:

  unbiased_variance    InstanceNorm2dPlus / ConditionalInstanceNorm2dPlus standardise the
                       channel means with torch.var (unbiased, /(C-1)); the Flax original
                       uses jnp.var (/C).
  align_corners        MSFBlock upsamples with F.interpolate(align_corners=True); the Flax
                       original with jax.image.resize (half-pixel centres).

Besides, the PyTorch port's NCSN / NCSNv2 (32-64 px) give the third RefineBlock nf
output channels where the Flax original gives 2 nf: those checkpoints have other shapes.

Only `tensorflow` is stubbed (imported by the original utils.py for restore_checkpoint,
which is not used here). The EMA decay is 0.999 for every fixture (NCSN's config has
ema_rate 0, with which the EMA would equal the parameters and the test could not tell
them apart).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import sys
import types

import numpy as np
import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
STEP = 250000
SEED = 20240611
EMA_DECAY = 0.999

# name -> (config module of both code bases, overrides applied to both, patches)
FIXTURES = {
    've_ncsnv2_cifar10': ('configs/ve/ncsnv2/cifar10.py',
                          {'model.nf': 6, 'data.image_size': 16}, ()),
    # The original bedroom config misspells training.continuouse; set the intended value.
    've_ncsnv2_bedroom_128': ('configs/ve/ncsnv2/bedroom.py',
                              {'model.nf': 4, 'data.image_size': 16,
                               'training.continuous': False}, ()),
    've_ncsnv2_bedroom_256': ('configs/ve/ncsnv2/bedroom.py',
                              {'model.nf': 4, 'data.image_size': 16,
                               'training.continuous': False, 'model.name': 'ncsnv2_256'}, ()),
    've_ncsn_cifar10': ('configs/ve/ncsn/cifar10.py',
                        {'model.nf': 6, 'data.image_size': 16},
                        ('conditional_norm', 'block_dilation')),
}
COMMON_PATCHES = ('data.channels', 'conv_bias', 'dilated_padding')


def import_original(root: str):
  """The original modules this script uses (`tensorflow` stubbed for utils.py)."""
  sys.path.insert(0, root)
  if 'tensorflow' not in sys.modules:
    # torch._dynamo (imported lazily by torch.optim) looks up the spec of every module it
    # knows, tensorflow included, and fails on a stub without one: import it first.
    import torch._dynamo  # noqa: F401,PLC0415
    sys.modules['tensorflow'] = types.ModuleType('tensorflow')
  names = {'layers': 'models.layers', 'normalization': 'models.normalization',
           'ncsnv2': 'models.ncsnv2', 'mutils': 'models.utils', 'ema': 'models.ema',
           'losses': 'losses', 'sde_lib': 'sde_lib', 'utils': 'utils'}
  return types.SimpleNamespace(**{k: importlib.import_module(v) for k, v in names.items()})


def patch_conv3x3(layers):
  """ncsn_conv3x3 that runs: no bias scaling without a bias, dilated convs padded by dilation."""

  def ncsn_conv3x3(in_planes, out_planes, stride=1, bias=True, dilation=1, init_scale=1.,
                   padding=1):
    if dilation > 1 and padding == 1:
      padding = dilation
    conv = nn.Conv2d(in_planes, out_planes, stride=stride, bias=bias, dilation=dilation,
                     padding=padding, kernel_size=3)
    scale = 1e-10 if init_scale == 0 else init_scale
    conv.weight.data *= scale
    if conv.bias is not None:
      conv.bias.data *= scale
    return conv

  layers.ncsn_conv3x3 = ncsn_conv3x3


class _Delegate:
  """A module stand-in that forwards every name to `base` except the ones given."""

  def __init__(self, base, **overrides):
    self._base = base
    self.__dict__.update(overrides)

  def __getattr__(self, name):
    return getattr(self._base, name)


@contextlib.contextmanager
def flax_conventions(orig):
  """Biased variance of the channel means and half-pixel bilinear resizing."""
  norm_torch, layers_f = orig.normalization.torch, orig.layers.F
  biased_var = functools.partial(torch.var, correction=0)

  def interpolate(x, size=None, mode='nearest', align_corners=None, **kw):
    return torch.nn.functional.interpolate(
        x, size=size, mode=mode, align_corners=False if mode == 'bilinear' else align_corners,
        **kw)

  orig.normalization.torch = _Delegate(torch, var=biased_var)
  orig.layers.F = _Delegate(torch.nn.functional, interpolate=interpolate)
  try:
    yield
  finally:
    orig.normalization.torch, orig.layers.F = norm_torch, layers_f


@contextlib.contextmanager
def ncsn_patches(orig, patches):
  """'conditional_norm' and 'block_dilation' while the network is built."""
  get_normalization = orig.ncsnv2.get_normalization
  block_init = orig.layers.ConditionalResidualBlock.__init__
  defaults = block_init.__defaults__
  if 'conditional_norm' in patches:
    orig.ncsnv2.get_normalization = (
        lambda config: orig.normalization.ConditionalInstanceNorm2dPlus)
  if 'block_dilation' in patches:
    code = block_init.__code__
    assert code.co_varnames[code.co_argcount - 1] == 'dilation' and defaults[-1] is None
    block_init.__defaults__ = defaults[:-1] + (1,)
  try:
    yield
  finally:
    orig.ncsnv2.get_normalization = get_normalization
    block_init.__defaults__ = defaults


def load_config(config_path: str, overrides: dict):
  module = importlib.import_module(config_path[:-3].replace('/', '.'))
  config = module.get_config()
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for name in parents:
      node = node[name]
    node[leaf] = value
  config.data.channels = config.data.num_channels       # patch 'data.channels'
  return config


def randomise(model, generator):
  """Every parameter away from its initialisation; norms around their usual values."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      leaf = name.rsplit('.', 1)[-1]
      if leaf in ('alpha', 'gamma'):
        p.copy_(1 + 0.3 * noise)
      elif leaf == 'beta':
        p.copy_(0.3 * noise)
      elif name.endswith('embed.weight'):       # [num_classes, 3C]: gamma | alpha | beta
        c = p.shape[1] // 3
        p[:, :2 * c] = 1 + 0.3 * noise[:, :2 * c]
        p[:, 2 * c:] = 0.3 * noise[:, 2 * c:]
      else:
        p.add_(0.3 * p.std() * noise)


def make_one(orig, name: str, config_path: str, overrides: dict, patches):
  config = load_config(config_path, overrides)
  generator = torch.Generator().manual_seed(SEED)
  torch.manual_seed(SEED)
  with ncsn_patches(orig, patches):
    model = orig.mutils.get_model(config.model.name)(config)
  randomise(model, generator)
  score_model = torch.nn.DataParallel(model)            # as models.utils.create_model
  ema = orig.ema.ExponentialMovingAverage(score_model.parameters(), decay=EMA_DECAY)
  randomise(model, generator)                           # training moved the parameters on
  optimizer = orig.losses.get_optimizer(config, score_model.parameters())
  state = dict(optimizer=optimizer, model=score_model, ema=ema, step=STEP - 2)
  sde = orig.sde_lib.VESDE(sigma_min=config.model.sigma_min, sigma_max=config.model.sigma_max,
                           N=config.model.num_scales)
  step_fn = orig.losses.get_step_fn(sde, train=True,
                                    optimize_fn=orig.losses.optimization_manager(config),
                                    reduce_mean=config.training.reduce_mean,
                                    continuous=config.training.continuous)
  size, channels = config.data.image_size, config.data.num_channels
  for _ in range(2):
    step_fn(state, torch.rand(2, channels, size, size, generator=generator))
  assert state['step'] == STEP

  folder = os.path.join(HERE, name)
  os.makedirs(folder, exist_ok=True)
  orig.utils.save_checkpoint(os.path.join(folder, 'checkpoint_5.pth'), state)

  # Evaluation as the original does it: EMA weights into the model, eval mode.
  ema.copy_to(score_model.parameters())
  rng = np.random.default_rng(SEED)
  x = rng.uniform(0, 1, (4, size, size, channels)).astype(np.float32)
  t = rng.uniform(0.05, 1.0, 4).astype(np.float32)
  x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  score_fn = orig.mutils.get_score_fn(sde, score_model, train=False,
                                      continuous=config.training.continuous)
  with torch.no_grad():
    score = score_fn(x_torch, torch.from_numpy(t)).numpy().transpose(0, 2, 3, 1)
    with flax_conventions(orig):
      aligned = score_fn(x_torch, torch.from_numpy(t)).numpy().transpose(0, 2, 3, 1)
  np.savez(os.path.join(folder, 'expected.npz'), x=x, t=t,
           score=np.ascontiguousarray(score, np.float32),
           score_flax_conventions=np.ascontiguousarray(aligned, np.float32))
  fixture = {
      'config': config_path,
      'overrides': overrides,
      'checkpoint': 'checkpoint_5.pth',
      'step': STEP,
      'format': 'score_sde_pytorch (torch.save)',
      'model': config.model.name,
      'patches': list(COMMON_PATCHES) + list(patches),
  }
  with open(os.path.join(folder, 'fixture.json'), 'w') as f:
    json.dump(fixture, f, indent=1)
  sizes = {f: os.path.getsize(os.path.join(folder, f)) for f in sorted(os.listdir(folder))}
  print(name, config.model.name, sizes, 'max |score - flax conventions| =',
        float(np.abs(score - aligned).max()), 'max |score| =', float(np.abs(score).max()))


def main(root: str):
  root = os.path.abspath(root)
  os.chdir(root)
  orig = import_original(root)
  patch_conv3x3(orig.layers)
  for name, (config_path, overrides, patches) in FIXTURES.items():
    make_one(orig, name, config_path, overrides, patches)


if __name__ == '__main__':
  if len(sys.argv) != 2:
    raise SystemExit('usage: make_fixtures.py <extracted yang-song/score_sde_pytorch>')
  main(sys.argv[1])
