"""The NCSN++ / DDPM++ / DDPM paper configs: the reference tree, hyper-parameters,
parameter counts (eval_shape vs. an independent layer-by-layer count), and a
forward pass of every config at reduced width."""
import copy
import importlib
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from score_sde.models import get_model
from score_sde.models.utils import input_shape, param_count

CONFIG_ROOT = pathlib.Path(__file__).resolve().parents[1] / 'configs'

# The reference tree (yang-song/score_sde == score_sde_pytorch configs/ve|vp|subvp),
# without configs/ve/ncsn and configs/ve/ncsnv2.
REFERENCE_CONFIGS = [
    'subvp/cifar10_ddpm_continuous', 'subvp/cifar10_ddpmpp_continuous',
    'subvp/cifar10_ddpmpp_deep_continuous', 'subvp/cifar10_ncsnpp_continuous',
    'subvp/cifar10_ncsnpp_deep_continuous',
    've/bedroom_ncsnpp_continuous', 've/celeba_ncsnpp', 've/celebahq_256_ncsnpp_continuous',
    've/celebahq_ncsnpp_continuous', 've/church_ncsnpp_continuous', 've/cifar10_ddpm',
    've/cifar10_ncsnpp', 've/cifar10_ncsnpp_continuous', 've/cifar10_ncsnpp_deep_continuous',
    've/ffhq_256_ncsnpp_continuous', 've/ffhq_ncsnpp_continuous',
    'vp/cifar10_ddpmpp', 'vp/cifar10_ddpmpp_continuous', 'vp/cifar10_ddpmpp_deep_continuous',
    'vp/cifar10_ncsnpp', 'vp/cifar10_ncsnpp_continuous', 'vp/cifar10_ncsnpp_deep_continuous',
    'vp/ddpm/bedroom', 'vp/ddpm/celebahq', 'vp/ddpm/church', 'vp/ddpm/cifar10',
    'vp/ddpm/cifar10_continuous', 'vp/ddpm/cifar10_unconditional',
]

# Parameter counts of the full-size networks (derived here, equal to the reference code's).
# Anchors: ve/cifar10_ncsnpp_continuous = 62.76 M measured with the reference code; the deep
# variants ~108 M (paper). The reference DDPM U-Net has one attention block per up-path level
# where Ho et al.'s has one per residual block; with those blocks added the counts become the
# DDPM paper's 35.7 M (CIFAR-10) and 114 M (256px), see test_ddpm_counts_match_ho_et_al.
EXPECTED_PARAMS = {
    'subvp/cifar10_ddpm_continuous': 35_218_947,
    'subvp/cifar10_ddpmpp_continuous': 61_804_419,
    'subvp/cifar10_ddpmpp_deep_continuous': 106_632_579,
    'subvp/cifar10_ncsnpp_continuous': 62_693_251,
    'subvp/cifar10_ncsnpp_deep_continuous': 107_521_411,
    've/bedroom_ncsnpp_continuous': 65_574_549,
    've/celeba_ncsnpp': 62_693_251,
    've/celebahq_256_ncsnpp_continuous': 65_574_549,
    've/celebahq_ncsnpp_continuous': 105_785_896,
    've/church_ncsnpp_continuous': 65_574_549,
    've/cifar10_ddpm': 35_218_947,
    've/cifar10_ncsnpp': 62_693_251,
    've/cifar10_ncsnpp_continuous': 62_758_915,
    've/cifar10_ncsnpp_deep_continuous': 107_587_075,
    've/ffhq_256_ncsnpp_continuous': 65_574_549,
    've/ffhq_ncsnpp_continuous': 105_785_896,
    'vp/cifar10_ddpmpp': 61_804_419,
    'vp/cifar10_ddpmpp_continuous': 61_804_419,
    'vp/cifar10_ddpmpp_deep_continuous': 106_632_579,
    'vp/cifar10_ncsnpp': 62_693_251,
    'vp/cifar10_ncsnpp_continuous': 62_693_251,
    'vp/cifar10_ncsnpp_deep_continuous': 107_521_411,
    'vp/ddpm/bedroom': 111_569_923,
    'vp/ddpm/celebahq': 111_569_923,
    'vp/ddpm/church': 111_569_923,
    'vp/ddpm/cifar10': 35_218_947,
    'vp/ddpm/cifar10_continuous': 35_218_947,
    'vp/ddpm/cifar10_unconditional': 32_329_347,
}

# Distinctive settings of each reference config:
# (sde, continuous, predictor, corrector, centered, image_size, name, nf, ch_mult,
#  num_res_blocks, embedding, progressive, progressive_input, fir, scale_by_sigma, ema_rate)
C4 = (1, 2, 2, 2)
L7 = (1, 1, 2, 2, 2, 2, 2)
L6 = (1, 1, 2, 2, 4, 4)
H8 = (1, 2, 4, 8, 16, 32, 32, 32)
REFERENCE = {
    'subvp/cifar10_ddpm_continuous': ('subvpsde', True, 'euler_maruyama', 'none', True, 32, 'ddpm', 128, C4, 2, None, None, None, None, False, 0.9999),
    'subvp/cifar10_ddpmpp_continuous': ('subvpsde', True, 'euler_maruyama', 'none', True, 32, 'ncsnpp', 128, C4, 4, 'positional', 'none', 'none', False, False, 0.9999),
    'subvp/cifar10_ddpmpp_deep_continuous': ('subvpsde', True, 'euler_maruyama', 'none', True, 32, 'ncsnpp', 128, C4, 8, 'positional', 'none', 'none', False, False, 0.9999),
    'subvp/cifar10_ncsnpp_continuous': ('subvpsde', True, 'euler_maruyama', 'none', True, 32, 'ncsnpp', 128, C4, 4, 'positional', 'none', 'residual', True, False, 0.9999),
    'subvp/cifar10_ncsnpp_deep_continuous': ('subvpsde', True, 'euler_maruyama', 'none', True, 32, 'ncsnpp', 128, C4, 8, 'positional', 'none', 'residual', True, False, 0.9999),
    've/bedroom_ncsnpp_continuous': ('vesde', True, 'reverse_diffusion', 'langevin', False, 256, 'ncsnpp', 128, L7, 2, 'fourier', 'output_skip', 'input_skip', True, True, 0.999),
    've/celeba_ncsnpp': ('vesde', False, 'reverse_diffusion', 'langevin', False, 64, 'ncsnpp', 128, C4, 4, 'positional', 'none', 'residual', True, True, 0.999),
    've/celebahq_256_ncsnpp_continuous': ('vesde', True, 'reverse_diffusion', 'langevin', False, 256, 'ncsnpp', 128, L7, 2, 'fourier', 'output_skip', 'input_skip', True, True, 0.999),
    've/celebahq_ncsnpp_continuous': ('vesde', True, 'reverse_diffusion', 'langevin', False, 1024, 'ncsnpp', 16, H8, 1, 'fourier', 'output_skip', 'input_skip', True, True, 0.9999),
    've/church_ncsnpp_continuous': ('vesde', True, 'reverse_diffusion', 'langevin', False, 256, 'ncsnpp', 128, L7, 2, 'fourier', 'output_skip', 'input_skip', True, True, 0.999),
    've/cifar10_ddpm': ('vesde', False, 'reverse_diffusion', 'langevin', False, 32, 'ddpm', 128, C4, 2, None, None, None, None, True, 0.999),
    've/cifar10_ncsnpp': ('vesde', False, 'reverse_diffusion', 'langevin', False, 32, 'ncsnpp', 128, C4, 4, 'positional', 'none', 'residual', True, True, 0.999),
    've/cifar10_ncsnpp_continuous': ('vesde', True, 'reverse_diffusion', 'langevin', False, 32, 'ncsnpp', 128, C4, 4, 'fourier', 'none', 'residual', True, True, 0.999),
    've/cifar10_ncsnpp_deep_continuous': ('vesde', True, 'reverse_diffusion', 'langevin', False, 32, 'ncsnpp', 128, C4, 8, 'fourier', 'none', 'residual', True, True, 0.999),
    've/ffhq_256_ncsnpp_continuous': ('vesde', True, 'reverse_diffusion', 'langevin', False, 256, 'ncsnpp', 128, L7, 2, 'fourier', 'output_skip', 'input_skip', True, True, 0.999),
    've/ffhq_ncsnpp_continuous': ('vesde', True, 'reverse_diffusion', 'langevin', False, 1024, 'ncsnpp', 16, H8, 1, 'fourier', 'output_skip', 'input_skip', True, True, 0.9999),
    'vp/cifar10_ddpmpp': ('vpsde', False, 'ancestral_sampling', 'none', True, 32, 'ncsnpp', 128, C4, 4, 'positional', 'none', 'none', False, False, 0.9999),
    'vp/cifar10_ddpmpp_continuous': ('vpsde', True, 'euler_maruyama', 'none', True, 32, 'ncsnpp', 128, C4, 4, 'positional', 'none', 'none', False, False, 0.9999),
    'vp/cifar10_ddpmpp_deep_continuous': ('vpsde', True, 'euler_maruyama', 'none', True, 32, 'ncsnpp', 128, C4, 8, 'positional', 'none', 'none', False, False, 0.9999),
    'vp/cifar10_ncsnpp': ('vpsde', False, 'reverse_diffusion', 'none', True, 32, 'ncsnpp', 128, C4, 4, 'positional', 'none', 'residual', True, False, 0.9999),
    'vp/cifar10_ncsnpp_continuous': ('vpsde', True, 'euler_maruyama', 'none', True, 32, 'ncsnpp', 128, C4, 4, 'positional', 'none', 'residual', True, False, 0.9999),
    'vp/cifar10_ncsnpp_deep_continuous': ('vpsde', True, 'euler_maruyama', 'none', True, 32, 'ncsnpp', 128, C4, 8, 'positional', 'none', 'residual', True, False, 0.9999),
    'vp/ddpm/bedroom': ('vpsde', False, 'ancestral_sampling', 'none', True, 256, 'ddpm', 128, L6, 2, None, None, None, None, False, 0.9999),
    'vp/ddpm/celebahq': ('vpsde', False, 'ancestral_sampling', 'none', True, 256, 'ddpm', 128, L6, 2, None, None, None, None, False, 0.9999),
    'vp/ddpm/church': ('vpsde', False, 'ancestral_sampling', 'none', True, 256, 'ddpm', 128, L6, 2, None, None, None, None, False, 0.9999),
    'vp/ddpm/cifar10': ('vpsde', False, 'ancestral_sampling', 'none', True, 32, 'ddpm', 128, C4, 2, None, None, None, None, False, 0.9999),
    'vp/ddpm/cifar10_continuous': ('vpsde', True, 'euler_maruyama', 'none', True, 32, 'ddpm', 128, C4, 2, None, None, None, None, False, 0.9999),
    'vp/ddpm/cifar10_unconditional': ('vpsde', False, 'ancestral_sampling', 'none', True, 32, 'ddpm', 128, C4, 2, None, None, None, None, False, 0.9999),
}


# An 'rbg' key: much cheaper to compile than threefry for the many parameter shapes.
INIT_KEY = jax.random.key(0, impl='rbg')


def load(name: str) -> ml_collections.ConfigDict:
  return importlib.import_module('configs.' + name.replace('/', '.')).get_config()


def init_shapes(model, config, batch=1):
  x = jnp.zeros(input_shape(config, batch))
  return jax.eval_shape(lambda: model.init({'params': jax.random.PRNGKey(0)}, x,
                                           jnp.ones((batch,)), train=False))['params']


# ----------------------------------------------------------------------------
# An independent parameter count, layer by layer from the reference code
# (written like the PyTorch port's constructor: explicit channel bookkeeping).
# ----------------------------------------------------------------------------

def _conv(k, cin, cout, bias=True):
  return k * k * cin * cout + (cout if bias else 0)


def _gn(c):          # GroupNorm scale + bias
  return 2 * c


def _dense(a, b):    # Dense / NIN: kernel + bias
  return a * b + b


def _attn(c):        # GroupNorm, q, k, v, proj_out
  return _gn(c) + 4 * _dense(c, c)


def ncsnpp_count(m, d) -> int:
  nf, ch_in, k, mult, nrb = m.nf, d.num_channels, m.conv_size, m.ch_mult, m.num_res_blocks
  levels = len(mult)
  res = [d.image_size // 2 ** i for i in range(levels)]
  ddpm_blocks = m.resblock_type == 'ddpm'
  temb = 4 * nf if m.conditional else 0
  total = 0
  if m.embedding_type == 'fourier':
    total += nf                       # Gaussian Fourier W (not trained, but a parameter)
    embed = 2 * nf
  else:
    embed = nf
  if m.conditional:
    total += _dense(embed, 4 * nf) + _dense(4 * nf, 4 * nf)

  def resblock(cin, cout=None, resample=False):
    cout = cout or cin
    n = _gn(cin) + _conv(k, cin, cout) + _gn(cout) + _conv(k, cout, cout)
    n += _dense(temb, cout) if temb else 0
    if ddpm_blocks:
      n += _dense(cin, cout) if cin != cout else 0          # NIN shortcut
    elif cin != cout or resample:
      n += _conv(1, cin, cout)                               # Conv1x1 shortcut
    return n

  def resample_conv(cin, cout):                              # (FIR) Up/Downsample with a conv
    return _conv(k, cin, cout)

  total += _conv(k, ch_in, nf)
  hs, ch, pyramid_ch = [nf], nf, ch_in
  for i in range(levels):
    for _ in range(nrb):
      total += resblock(ch, nf * mult[i])
      ch = nf * mult[i]
      total += _attn(ch) if res[i] in m.attn_resolutions else 0
      hs.append(ch)
    if i != levels - 1:
      if ddpm_blocks:
        total += resample_conv(ch, ch) if m.resamp_with_conv else 0
      else:
        total += resblock(ch, resample=True)
      if m.progressive_input == 'input_skip':
        total += _conv(1, pyramid_ch, ch)                    # Combine
        ch *= 2 if m.progressive_combine == 'cat' else 1
      elif m.progressive_input == 'residual':
        total += resample_conv(pyramid_ch, ch)
        pyramid_ch = ch
      hs.append(ch)
  total += 2 * resblock(ch) + _attn(ch)
  pyramid_ch = 0
  for i in reversed(range(levels)):
    for _ in range(nrb + 1):
      total += resblock(ch + hs.pop(), nf * mult[i])
      ch = nf * mult[i]
    total += _attn(ch) if res[i] in m.attn_resolutions else 0
    if m.progressive == 'output_skip':
      total += _gn(ch) + _conv(k, ch, ch_in)
    elif m.progressive == 'residual':
      if i == levels - 1:
        total += _gn(ch) + _conv(k, ch, ch)
      else:
        total += resample_conv(pyramid_ch, ch)
      pyramid_ch = ch
    if i != 0:
      if ddpm_blocks:
        total += resample_conv(ch, ch) if m.resamp_with_conv else 0
      else:
        total += resblock(ch, resample=True)
  assert not hs
  if m.progressive != 'output_skip':
    total += _gn(ch) + _conv(k, ch, ch_in)
  return total


def ddpm_count(m, d, attn_every_up_block=False) -> int:
  nf, ch_in, k, mult, nrb = m.nf, d.num_channels, m.get('conv_size', 3), m.ch_mult, m.num_res_blocks
  levels = len(mult)
  res = [d.image_size // 2 ** i for i in range(levels)]
  temb = 4 * nf if m.conditional else 0
  total = _dense(nf, 4 * nf) + _dense(4 * nf, 4 * nf) if m.conditional else 0

  def resblock(cin, cout=None):
    cout = cout or cin
    n = _gn(cin) + _conv(k, cin, cout) + _gn(cout) + _conv(k, cout, cout)
    n += _dense(temb, cout) if temb else 0
    return n + (_dense(cin, cout) if cin != cout else 0)

  total += _conv(k, ch_in, nf)
  hs, ch = [nf], nf
  for i in range(levels):
    for _ in range(nrb):
      total += resblock(ch, nf * mult[i])
      ch = nf * mult[i]
      total += _attn(ch) if res[i] in m.attn_resolutions else 0
      hs.append(ch)
    if i != levels - 1:
      total += _conv(k, ch, ch) if m.resamp_with_conv else 0
      hs.append(ch)
  total += 2 * resblock(ch) + _attn(ch)
  for i in reversed(range(levels)):
    for _ in range(nrb + 1):
      total += resblock(ch + hs.pop(), nf * mult[i])
      ch = nf * mult[i]
      if attn_every_up_block and res[i] in m.attn_resolutions:
        total += _attn(ch)
    if not attn_every_up_block and res[i] in m.attn_resolutions:
      total += _attn(ch)
    if i != 0:
      total += _conv(k, ch, ch) if m.resamp_with_conv else 0
  out_ch = ch_in * (2 if m.get('learned_variance', False) else 1)
  return total + _gn(ch) + _conv(k, ch, out_ch)


def formula_count(config) -> int:
  counter = {'ncsnpp': ncsnpp_count, 'ddpm': ddpm_count}[config.model.name]
  return counter(config.model, config.data)


# ----------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------

def test_config_tree_is_the_reference_tree():
  found = sorted(str(p.relative_to(CONFIG_ROOT).with_suffix('')) for sub in ('ve', 'vp', 'subvp')
                 for p in (CONFIG_ROOT / sub).rglob('*.py')
                 if p.name != '__init__.py' and p.parent.name not in ('ncsn', 'ncsnv2'))
  assert found == sorted(REFERENCE_CONFIGS)
  for sub in ('ve', 'vp', 'vp/ddpm', 'subvp'):
    assert (CONFIG_ROOT / sub / '__init__.py').exists()


@pytest.mark.parametrize('name', REFERENCE_CONFIGS)
def test_config_hyper_parameters(name):
  c = load(name)
  assert isinstance(c, ml_collections.ConfigDict)
  m = c.model
  (sde, continuous, predictor, corrector, centered, image_size, model_name, nf, ch_mult, nrb,
   embedding, progressive, progressive_input, fir, scale_by_sigma, ema_rate) = REFERENCE[name]
  assert (c.training.sde, c.training.continuous) == (sde, continuous)
  assert (c.sampling.method, c.sampling.predictor, c.sampling.corrector) == ('pc', predictor,
                                                                             corrector)
  assert (c.data.centered, c.data.image_size, c.data.num_channels) == (centered, image_size, 3)
  assert (m.name, m.nf, tuple(m.ch_mult), m.num_res_blocks) == (model_name, nf, ch_mult, nrb)
  assert (m.scale_by_sigma, m.ema_rate, tuple(m.attn_resolutions)) == (scale_by_sigma, ema_rate,
                                                                       (16,))
  assert (m.normalization, m.nonlinearity, m.resamp_with_conv) == ('GroupNorm', 'swish', True)
  if model_name == 'ncsnpp':
    assert (m.embedding_type, m.progressive, m.progressive_input, m.fir) == (
        embedding, progressive, progressive_input, fir)
    assert (m.resblock_type, m.skip_rescale, m.progressive_combine, m.init_scale) == (
        'biggan', True, 'sum', 0.0)
    assert tuple(m.fir_kernel) == (1, 3, 3, 1) and m.conv_size == 3
    assert m.get('fourier_scale', 16) == 16 and m.attention_type == 'ddpm'
  else:
    assert m.conditional == (name != 'vp/ddpm/cifar10_unconditional')
  # Continuous VP-family models with the DDPM loss use reduce_mean, as in the reference.
  assert c.training.reduce_mean == (sde != 'vesde' or name == 've/ffhq_ncsnpp_continuous')
  assert c.training.n_iters == (950001 if 'deep' in name else
                                2400001 if image_size >= 256 else 1300001)


def test_dataset_specific_settings():
  assert load('ve/church_ncsnpp_continuous').model.sigma_max == 380
  assert load('ve/bedroom_ncsnpp_continuous').model.sigma_max == 378
  assert load('ve/celebahq_256_ncsnpp_continuous').model.sigma_max == 348
  assert load('ve/ffhq_256_ncsnpp_continuous').data.dataset == 'FFHQ'
  for name in ('ve/celebahq_ncsnpp_continuous', 've/ffhq_ncsnpp_continuous'):
    c = load(name)
    assert (c.model.sigma_max, c.model.num_scales, c.model.dropout) == (1348, 2000, 0.0)
    assert (c.training.batch_size, c.sampling.snr, c.eval.end_ckpt) == (8, 0.15, 96)
  assert load('ve/celebahq_ncsnpp_continuous').training.n_jitted_steps == 1
  assert load('ve/ffhq_ncsnpp_continuous').training.n_jitted_steps == 2
  for name in ('vp/ddpm/bedroom', 'vp/ddpm/church', 'vp/ddpm/celebahq'):
    c = load(name)
    assert (c.optim.lr, c.model.num_scales, c.model.dropout) == (2e-5, 1000, 0.0)
  assert load('vp/ddpm/bedroom').data.category == 'bedroom'
  assert load('vp/ddpm/church').data.category == 'church_outdoor'
  assert load('ve/church_ncsnpp_continuous').data.category == 'church_outdoor'
  assert load('ve/celeba_ncsnpp').model.sigma_max == 90


@pytest.mark.parametrize('name', REFERENCE_CONFIGS)
def test_parameter_count_of_full_size_config(name):
  config = load(name)
  model = get_model(config)
  hash(model)  # immutable, hashable module
  count = param_count(init_shapes(model, config))
  assert count == formula_count(config)
  assert count == EXPECTED_PARAMS[name]


def test_parameter_counts_agree_with_published_numbers():
  assert abs(EXPECTED_PARAMS['ve/cifar10_ncsnpp_continuous'] - 62.76e6) < 0.005e6
  for name in ('ve/cifar10_ncsnpp_deep_continuous', 'vp/cifar10_ddpmpp_deep_continuous',
               'subvp/cifar10_ncsnpp_deep_continuous'):
    assert abs(EXPECTED_PARAMS[name] - 108e6) < 1.5e6


def test_ddpm_counts_match_ho_et_al():
  """Ho et al. attend after every up-path block; with that the counts are the DDPM paper's."""
  cifar, lsun = load('vp/ddpm/cifar10'), load('vp/ddpm/church')
  assert ddpm_count(cifar.model, cifar.data, attn_every_up_block=True) == 35_746_307  # 35.7 M
  assert round(ddpm_count(lsun.model, lsun.data, attn_every_up_block=True) / 1e6) == 114


def test_formula_covers_the_other_options():
  """The independent count also agrees for options the paper configs do not use."""
  base = load('ve/cifar10_ncsnpp_continuous')
  variants = [
      dict(resblock_type='ddpm', conditional=False),
      dict(progressive='residual', progressive_input='input_skip', progressive_combine='cat'),
      dict(progressive='output_skip', resamp_with_conv=False, resblock_type='ddpm'),
      dict(fir=False, embedding_type='positional', conv_size=5),
  ]
  for changes in variants:
    config = copy.deepcopy(base)
    config.model.update(changes)
    config.data.image_size = 16
    config.model.nf, config.model.ch_mult, config.model.num_res_blocks = 16, (1, 2, 2), 1
    config.model.attn_resolutions = (8,)
    model = get_model(config)
    assert param_count(init_shapes(model, config)) == formula_count(config), changes
  ddpm = load('vp/ddpm/cifar10')
  ddpm.model.learned_variance = True
  assert param_count(init_shapes(get_model(ddpm), ddpm)) == formula_count(ddpm)


def reduced(config, nf):
  config = copy.deepcopy(config)
  config.data.image_size = 16
  config.model.nf = nf
  config.model.ch_mult = tuple(config.model.ch_mult)[:3]
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  return config


def example_labels(config, batch):
  m = config.model
  if m.name == 'ncsnpp' and m.embedding_type == 'fourier':
    return jnp.linspace(0.02, 40.0, batch)                          # sigma
  if m.scale_by_sigma:
    return jnp.arange(batch, dtype=jnp.int32) * (m.num_scales // batch)  # noise index
  return jnp.linspace(1.0, 999.0, batch)                            # (fractional) timestep


@pytest.mark.parametrize('name', REFERENCE_CONFIGS)
def test_every_config_runs_at_reduced_width(name):
  config = reduced(load(name), nf=32 if load(name).model.name == 'ddpm' else 8)
  model = get_model(config)
  key = jax.random.PRNGKey(0)
  x = jax.random.uniform(key, (2, 16, 16, 3))
  labels = example_labels(config, 2)
  params = model.init({'params': INIT_KEY}, x, labels, train=False)['params']
  out = model.apply({'params': params}, x, labels, train=False)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()
  out_train = model.apply({'params': params}, x, labels, train=True,
                          rngs={'dropout': jax.random.PRNGKey(1)})
  assert out_train.shape == x.shape and out_train.dtype == jnp.float32
  assert np.isfinite(np.asarray(out_train)).all()


@pytest.mark.parametrize('name', ['ve/cifar10_ncsnpp_continuous', 'vp/cifar10_ddpmpp_continuous',
                                  've/celebahq_ncsnpp_continuous', 'vp/ddpm/cifar10'])
def test_bfloat16_option(name):
  config = reduced(load(name), nf=32 if load(name).model.name == 'ddpm' else 8)
  config.model.init_scale = 1.0  # non-trivial outputs to compare
  config16 = copy.deepcopy(config)
  config16.model.dtype = 'bfloat16'
  model, model16 = get_model(config), get_model(config16)
  key = jax.random.PRNGKey(0)
  x = jax.random.uniform(key, (2, 16, 16, 3))
  labels = example_labels(config, 2)
  params = model.init({'params': INIT_KEY}, x, labels, train=False)['params']
  params16 = model16.init({'params': INIT_KEY}, x, labels, train=False)['params']
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params16))
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(params16)
  out = model.apply({'params': params}, x, labels, train=False)
  out16 = model16.apply({'params': params}, x, labels, train=False)
  assert out16.dtype == jnp.float32 and out16.shape == x.shape
  rel = float(jnp.linalg.norm(out16 - out) / jnp.linalg.norm(out))
  assert rel < 0.05, rel
