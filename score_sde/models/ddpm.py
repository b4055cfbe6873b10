"""The DDPM U-Net (Ho et al. 2020), Flax linen, NHWC, as in the reference code base.

  temb = Dense(act(Dense(sinusoidal(label, nf))))           (when `conditional`)
  x -> (2x - 1 unless `centered`) -> Conv
  down: for each level, num_res_blocks x (ResBlock [+ Attn]), then Downsample
        (stride-2 conv or average pool) except at the last level
  mid:  ResBlock, Attn, ResBlock
  up:   for each level, (num_res_blocks + 1) x ResBlock on [h, skip] [+ Attn],
        then Upsample (nearest + conv) except at the top level
  out:  act(GroupNorm) -> Conv (zero-initialised) [/ sigma_label when `scale_by_sigma`]

GroupNorm uses 32 groups everywhere, as in DDPM, so every channel count
(nf * ch_mult) must be a multiple of 32.

As in the reference code base (JAX and PyTorch), the up path attends once per
level, after its num_res_blocks + 1 blocks; Ho et al.'s TensorFlow U-Net attends
after every one of them. Hence 35,218,947 parameters for the CIFAR-10 config
here and in the reference, against the DDPM paper's 35.7 M (35,746,307 with the
two extra attention blocks); 111.6 M against 114 M at 256px.

`learned_variance` (improved DDPM, Nichol & Dhariwal 2021) doubles the output
channels: out[..., :C] is the noise prediction eps, out[..., C:] the vector v
that interpolates the log-variance between log beta_t and log beta~_t.

Labels: the (possibly fractional) DDPM timestep, or for VE training the integer
noise index i, which `scale_by_sigma` maps to sigma_i (geometric from
sigma_max at i = 0 to sigma_min).
"""
from __future__ import annotations

import functools
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from score_sde.models import layers

GROUPS = 32


class DDPM(nn.Module):
  """DDPM U-Net. `__call__(x [B,H,W,C], labels [B], train) -> [B,H,W,C]` (or 2C) float32."""
  # data
  image_size: int = 32
  num_channels: int = 3
  centered: bool = True
  # architecture
  nf: int = 128
  ch_mult: Tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Tuple[int, ...] = (16,)
  dropout: float = 0.1
  resamp_with_conv: bool = True
  conditional: bool = True
  conv_size: int = 3
  nonlinearity: str = 'swish'
  normalization: str = 'GroupNorm'
  learned_variance: bool = False
  # output parameterisation
  scale_by_sigma: bool = False
  sigma_min: float = 0.01
  sigma_max: float = 50.0
  num_scales: int = 1000
  # compute dtype (parameters are float32)
  dtype: str = 'float32'

  @classmethod
  def from_config(cls, config) -> 'DDPM':
    """The network of `config.model` / `config.data` (reference key names)."""
    m, d = config.model, config.data
    module = cls(
        image_size=int(d.image_size),
        num_channels=int(d.num_channels),
        centered=bool(d.centered),
        nf=int(m.nf),
        ch_mult=tuple(int(c) for c in m.ch_mult),
        num_res_blocks=int(m.num_res_blocks),
        attn_resolutions=tuple(int(r) for r in m.attn_resolutions),
        dropout=float(m.dropout),
        resamp_with_conv=bool(m.resamp_with_conv),
        conditional=bool(m.conditional),
        conv_size=int(m.get('conv_size', 3)),
        nonlinearity=str(m.nonlinearity),
        normalization=str(m.get('normalization', 'GroupNorm')),
        learned_variance=bool(m.get('learned_variance', False)),
        scale_by_sigma=bool(m.scale_by_sigma),
        sigma_min=float(m.sigma_min),
        sigma_max=float(m.sigma_max),
        num_scales=int(m.num_scales),
        dtype=str(m.get('dtype', 'float32')),
    )
    module.check()
    return module

  def check(self) -> None:
    """Validates the hyper-parameters (errors name the config key and the fix)."""
    layers.choice(self.normalization, layers.NORMALIZATIONS, 'normalization')
    layers.get_act(self.nonlinearity)
    layers.compute_dtype(self.dtype)
    if self.conv_size < 1 or self.conv_size % 2 != 1:
      raise ValueError(f'config.model.conv_size must be an odd positive integer; got {self.conv_size}.')
    if self.num_res_blocks < 1 or not self.ch_mult:
      raise ValueError('config.model.num_res_blocks must be >= 1 and config.model.ch_mult non-empty.')
    bad = sorted({self.nf * c for c in self.ch_mult if (self.nf * c) % GROUPS})
    if bad:
      raise ValueError(f'the DDPM U-Net normalises with GroupNorm({GROUPS}), but config.model.nf * '
                       f'ch_mult gives channel counts {bad} that are not multiples of {GROUPS}; '
                       f'use config.model.nf as a multiple of {GROUPS}.')
    if self.learned_variance and self.scale_by_sigma:
      raise ValueError('config.model.learned_variance predicts (eps, v) for the DDPM chain and '
                       'cannot be combined with config.model.scale_by_sigma = True; set one of '
                       'them to False.')
    layers.check_unet_geometry(self.image_size, self.ch_mult, self.attn_resolutions)

  @nn.compact
  def __call__(self, x: jax.Array, labels: jax.Array, train: bool = False) -> jax.Array:
    self.check()
    layers.check_input(x, self.image_size, self.num_channels)
    labels = layers.check_labels(labels, x.shape[0])
    cdt = layers.compute_dtype(self.dtype)
    act = layers.get_act(self.nonlinearity)
    nf = self.nf
    num_resolutions = len(self.ch_mult)
    conv3x3 = functools.partial(layers.conv3x3, dtype=cdt, kernel_size=self.conv_size)
    AttnBlock = functools.partial(layers.AttnBlock, dtype=cdt)
    ResnetBlock = functools.partial(layers.ResnetBlockDDPM, act=act, dropout=self.dropout,
                                    conv_size=self.conv_size, dtype=cdt)
    Downsample = functools.partial(layers.Downsample, with_conv=self.resamp_with_conv,
                                   conv_size=self.conv_size, dtype=cdt)
    Upsample = functools.partial(layers.Upsample, with_conv=self.resamp_with_conv,
                                 conv_size=self.conv_size, dtype=cdt)

    if self.conditional:
      temb = layers.get_timestep_embedding(labels.astype(jnp.float32), nf)
      temb = layers.dense(temb, nf * 4, cdt)
      temb = layers.dense(act(temb), nf * 4, cdt)
    else:
      temb = None

    h = x.astype(jnp.float32)
    if not self.centered:
      h = 2 * h - 1.0  # data in [0, 1] -> [-1, 1]
    h = h.astype(cdt)

    # Downsampling path.
    hs = [conv3x3(h, nf)]
    for i_level in range(num_resolutions):
      for _ in range(self.num_res_blocks):
        h = ResnetBlock(out_ch=nf * self.ch_mult[i_level])(hs[-1], temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = AttnBlock()(h)
        hs.append(h)
      if i_level != num_resolutions - 1:
        hs.append(Downsample()(hs[-1]))

    # Middle.
    h = hs[-1]
    h = ResnetBlock()(h, temb, train)
    h = AttnBlock()(h)
    h = ResnetBlock()(h, temb, train)

    # Upsampling path.
    for i_level in reversed(range(num_resolutions)):
      for _ in range(self.num_res_blocks + 1):
        h = ResnetBlock(out_ch=nf * self.ch_mult[i_level])(
            jnp.concatenate([h, hs.pop()], axis=-1), temb, train)
      if h.shape[1] in self.attn_resolutions:
        h = AttnBlock()(h)
      if i_level != 0:
        h = Upsample()(h)

    assert not hs

    out_channels = self.num_channels * (2 if self.learned_variance else 1)
    h = act(layers.group_norm(h, GROUPS, cdt))
    h = conv3x3(h, out_channels, init_scale=0.0)
    h = h.astype(jnp.float32)

    if self.scale_by_sigma:
      # The NCSN loss needs s = output / sigma; the DDPM loss scales in the loss instead.
      sigmas = jnp.asarray(layers.geometric_sigmas(self.sigma_max, self.sigma_min, self.num_scales))
      used_sigmas = sigmas[labels.astype(jnp.int32)]
      h = h / used_sigmas.reshape((-1,) + (1,) * (h.ndim - 1))
    return h
