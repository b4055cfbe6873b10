"""NCSN++ and DDPM++ (Song et al. 2021), Flax linen, NHWC.

One U-Net family; the paper's NCSN++ and DDPM++ are configurations of it:

  NCSN++  resblock 'biggan', FIR resampling, progressive_input 'residual',
          skip_rescale, (VE: Gaussian Fourier embedding of log sigma,
          scale_by_sigma); the 1024px models add progressive 'output_skip' /
          'input_skip'.
  DDPM++  resblock 'biggan' without FIR, no progressive paths, skip_rescale,
          positional embedding of the DDPM timestep.

Layout (L = len(ch_mult) resolutions, R = num_res_blocks):

  embed(label) -> [Dense -> act -> Dense] = temb            (when `conditional`)
  x -> (2x - 1 unless `centered`) -> Conv
  down:  for each level: R x (ResBlock [+ Attn at attn_resolutions]),
         then (except at the last level) a downsampling ResBlock (biggan) or
         Downsample (ddpm), plus the input pyramid ('input_skip' / 'residual')
  mid:   ResBlock, Attn, ResBlock
  up:    for each level: (R + 1) x ResBlock on [h, skip] [+ Attn], the output
         pyramid ('output_skip' / 'residual'), then (except at the top level)
         an upsampling ResBlock / Upsample
  out:   act(GroupNorm) -> Conv (init_scale; zero by default) (or the output pyramid)
         [/ sigma when `scale_by_sigma`]

Labels (one per example, float or int, shape [B]):
  embedding_type 'fourier':    the noise level sigma; the network embeds log(sigma),
                               and `scale_by_sigma` divides the output by it.
  embedding_type 'positional': a (possibly fractional) timestep or an integer noise
                               index i; `scale_by_sigma` divides by sigma_i, with
                               sigma_i geometric from sigma_max (i = 0) down to
                               sigma_min (i = num_scales - 1).

The module is a frozen dataclass of plain values: build it with
`NCSNpp.from_config(config)` (reads config.model.* and config.data.*) or
directly with keyword arguments.
"""
from __future__ import annotations

import functools
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from score_sde.models import layers
from score_sde.models import upfirdn2d as fir_lib

RESBLOCK_TYPES = ('ddpm', 'biggan')
PROGRESSIVE = ('none', 'output_skip', 'residual')
PROGRESSIVE_INPUT = ('none', 'input_skip', 'residual')
PROGRESSIVE_COMBINE = ('sum', 'cat')
EMBEDDING_TYPES = ('fourier', 'positional')
ATTENTION_TYPES = ('ddpm',)


class NCSNpp(nn.Module):
  """NCSN++ / DDPM++ score network. `__call__(x [B,H,W,C], labels [B], train) -> [B,H,W,C]` float32."""
  # data
  image_size: int = 32
  num_channels: int = 3
  centered: bool = False
  # architecture
  nf: int = 128
  ch_mult: Tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 4
  attn_resolutions: Tuple[int, ...] = (16,)
  dropout: float = 0.1
  resamp_with_conv: bool = True
  conditional: bool = True
  fir: bool = True
  fir_kernel: Tuple[int, ...] = fir_lib.DEFAULT_KERNEL
  skip_rescale: bool = True
  resblock_type: str = 'biggan'
  progressive: str = 'none'
  progressive_input: str = 'residual'
  progressive_combine: str = 'sum'
  attention_type: str = 'ddpm'
  init_scale: float = 0.0
  embedding_type: str = 'fourier'
  fourier_scale: float = 16.0
  conv_size: int = 3
  nonlinearity: str = 'swish'
  normalization: str = 'GroupNorm'
  # output parameterisation
  scale_by_sigma: bool = True
  sigma_min: float = 0.01
  sigma_max: float = 50.0
  num_scales: int = 1000
  # compute dtype (parameters are float32)
  dtype: str = 'float32'

  @classmethod
  def from_config(cls, config) -> 'NCSNpp':
    """The network of `config.model` / `config.data` (reference key names)."""
    m, d = config.model, config.data
    embedding_type = str(m.get('embedding_type', 'fourier')).lower()
    if embedding_type == 'fourier' and not config.training.get('continuous', True):
      raise ValueError('config.model.embedding_type = "fourier" embeds a continuous noise level '
                       'and needs config.training.continuous = True; use embedding_type '
                       '"positional" for discrete (noise-index) training.')
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
        fir=bool(m.fir),
        fir_kernel=tuple(m.fir_kernel),
        skip_rescale=bool(m.skip_rescale),
        resblock_type=str(m.resblock_type),
        progressive=str(m.progressive),
        progressive_input=str(m.progressive_input),
        progressive_combine=str(m.progressive_combine),
        attention_type=str(m.get('attention_type', 'ddpm')),
        init_scale=float(m.init_scale),
        embedding_type=embedding_type,
        fourier_scale=float(m.get('fourier_scale', 16.0)),
        conv_size=int(m.get('conv_size', 3)),
        nonlinearity=str(m.nonlinearity),
        normalization=str(m.get('normalization', 'GroupNorm')),
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
    layers.choice(self.resblock_type, RESBLOCK_TYPES, 'resblock_type')
    layers.choice(self.progressive, PROGRESSIVE, 'progressive')
    layers.choice(self.progressive_input, PROGRESSIVE_INPUT, 'progressive_input')
    layers.choice(self.progressive_combine, PROGRESSIVE_COMBINE, 'progressive_combine')
    layers.choice(self.embedding_type, EMBEDDING_TYPES, 'embedding_type')
    layers.choice(self.attention_type, ATTENTION_TYPES, 'attention_type')
    layers.choice(self.normalization, layers.NORMALIZATIONS, 'normalization')
    layers.get_act(self.nonlinearity)
    layers.compute_dtype(self.dtype)
    if self.conv_size < 1 or self.conv_size % 2 != 1:
      raise ValueError(f'config.model.conv_size must be an odd positive integer; got {self.conv_size}.')
    if self.nf < 4:
      raise ValueError(f'config.model.nf must be >= 4 (GroupNorm uses nf // 4 groups); got {self.nf}.')
    if self.num_res_blocks < 1 or not self.ch_mult:
      raise ValueError('config.model.num_res_blocks must be >= 1 and config.model.ch_mult non-empty.')
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
    resblock_type = self.resblock_type.lower()
    progressive = self.progressive.lower()
    progressive_input = self.progressive_input.lower()
    combine_method = self.progressive_combine.lower()
    embedding_type = self.embedding_type.lower()
    fir_kernel = tuple(self.fir_kernel)

    # Time / noise-level embedding (float32), then the conditioning MLP.
    if embedding_type == 'fourier':
      used_sigmas = labels.astype(jnp.float32)
      temb = layers.GaussianFourierProjection(
          embedding_size=nf, scale=self.fourier_scale)(jnp.log(used_sigmas))
    else:
      sigmas = jnp.asarray(layers.geometric_sigmas(self.sigma_max, self.sigma_min, self.num_scales))
      used_sigmas = sigmas[labels.astype(jnp.int32)]
      temb = layers.get_timestep_embedding(labels.astype(jnp.float32), nf)

    if self.conditional:
      temb = layers.dense(temb, nf * 4, cdt)
      temb = layers.dense(act(temb), nf * 4, cdt)
    else:
      temb = None

    conv3x3 = functools.partial(layers.conv3x3, dtype=cdt, kernel_size=self.conv_size)
    AttnBlock = functools.partial(layers.AttnBlockpp, init_scale=self.init_scale,
                                  skip_rescale=self.skip_rescale, dtype=cdt)
    resample_kw = dict(fir=self.fir, fir_kernel=fir_kernel, conv_size=self.conv_size, dtype=cdt)
    Upsample = functools.partial(layers.Upsample, with_conv=self.resamp_with_conv, **resample_kw)
    Downsample = functools.partial(layers.Downsample, with_conv=self.resamp_with_conv,
                                   **resample_kw)
    # Pyramids: plain FIR / nearest resampling ('*_skip') or with a conv ('residual').
    pyramid_upsample = functools.partial(layers.Upsample, with_conv=progressive == 'residual',
                                         **resample_kw)
    pyramid_downsample = functools.partial(layers.Downsample,
                                           with_conv=progressive_input == 'residual',
                                           **resample_kw)
    combiner = functools.partial(layers.Combine, method=combine_method, dtype=cdt)
    if resblock_type == 'ddpm':
      ResnetBlock = functools.partial(layers.ResnetBlockDDPMpp, act=act, dropout=self.dropout,
                                      init_scale=self.init_scale, skip_rescale=self.skip_rescale,
                                      conv_size=self.conv_size, dtype=cdt)
    else:
      ResnetBlock = functools.partial(layers.ResnetBlockBigGANpp, act=act, dropout=self.dropout,
                                      fir=self.fir, fir_kernel=fir_kernel,
                                      init_scale=self.init_scale, skip_rescale=self.skip_rescale,
                                      conv_size=self.conv_size, dtype=cdt)

    x = x.astype(jnp.float32)
    if not self.centered:
      x = 2 * x - 1.0  # data in [0, 1] -> [-1, 1]
    x = x.astype(cdt)

    # Downsampling path.
    input_pyramid = x if progressive_input != 'none' else None
    hs = [conv3x3(x, nf)]
    for i_level in range(num_resolutions):
      for _ in range(self.num_res_blocks):
        h = ResnetBlock(out_ch=nf * self.ch_mult[i_level])(hs[-1], temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = AttnBlock()(h)
        hs.append(h)

      if i_level != num_resolutions - 1:
        if resblock_type == 'ddpm':
          h = Downsample()(hs[-1])
        else:
          h = ResnetBlock(down=True)(hs[-1], temb, train)

        if progressive_input == 'input_skip':
          input_pyramid = pyramid_downsample()(input_pyramid)
          h = combiner()(input_pyramid, h)
        elif progressive_input == 'residual':
          input_pyramid = pyramid_downsample(out_ch=h.shape[-1])(input_pyramid)
          input_pyramid = layers.skip_sum(input_pyramid, h, self.skip_rescale)
          h = input_pyramid
        hs.append(h)

    # Middle.
    h = hs[-1]
    h = ResnetBlock()(h, temb, train)
    h = AttnBlock()(h)
    h = ResnetBlock()(h, temb, train)

    # Upsampling path.
    pyramid = None
    for i_level in reversed(range(num_resolutions)):
      for _ in range(self.num_res_blocks + 1):
        h = ResnetBlock(out_ch=nf * self.ch_mult[i_level])(
            jnp.concatenate([h, hs.pop()], axis=-1), temb, train)
      if h.shape[1] in self.attn_resolutions:
        h = AttnBlock()(h)

      if progressive != 'none':
        if i_level == num_resolutions - 1:
          if progressive == 'output_skip':
            pyramid = conv3x3(act(layers.group_norm(h, dtype=cdt)), self.num_channels,
                              bias=True, init_scale=self.init_scale)
          else:  # residual
            pyramid = conv3x3(act(layers.group_norm(h, dtype=cdt)), h.shape[-1], bias=True)
        else:
          if progressive == 'output_skip':
            pyramid = pyramid_upsample()(pyramid)
            pyramid = pyramid + conv3x3(act(layers.group_norm(h, dtype=cdt)), self.num_channels,
                                        bias=True, init_scale=self.init_scale)
          else:  # residual
            pyramid = pyramid_upsample(out_ch=h.shape[-1])(pyramid)
            pyramid = layers.skip_sum(pyramid, h, self.skip_rescale)
            h = pyramid

      if i_level != 0:
        if resblock_type == 'ddpm':
          h = Upsample()(h)
        else:
          h = ResnetBlock(up=True)(h, temb, train)

    assert not hs

    if progressive == 'output_skip':
      h = pyramid
    else:
      h = act(layers.group_norm(h, dtype=cdt))
      h = conv3x3(h, self.num_channels, init_scale=self.init_scale)

    h = h.astype(jnp.float32)
    if self.scale_by_sigma:
      h = h / used_sigmas.reshape((-1,) + (1,) * (h.ndim - 1))
    return h
