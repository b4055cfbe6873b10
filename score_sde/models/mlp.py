"""A multilayer-perceptron score network for low-dimensional data x: [B, D].

  e      = Fourier(log sigma)  [B, 2 nf]   (embedding_type='fourier': label = sigma)
         | sinusoid(label)     [B, nf]     (embedding_type='positional': label =
                                            999 t, a DDPM timestep or a noise index)
  temb   = Dense_4nf(act(Dense_4nf(e)))                   (as NCSN++ / DDPM++)
  h_0    = x
  h_l    = dropout(act(Dense_nf(h_{l-1}) + Dense_nf(act(temb)))),  l = 1..L
  s(x)   = Dense_D(h_L)                                   (near-zero init)
         [ / sigma  when scale_by_sigma (VE): sigma = label for Fourier embeddings,
           sigma_i of the discrete NCSN levels for positional ones ]

with width nf = config.model.nf, depth L = config.model.num_layers and
act = swish (config.model.nonlinearity). The output layer starts at
(near) zero (`init_scale`, 0 -> 1e-10 as in NCSN++), so training starts from
the score 0. Meant for 2-D toy data and the analytic Gaussian mixtures of
`score_sde.analytic` in tens of dimensions; no data rescaling (2x - 1) is
applied, as vector data are not images in [0, 1].

Config keys: data.dim, model.nf, model.num_layers (required); model.
embedding_type ('fourier'), fourier_scale (16), nonlinearity ('swish'),
conditional (True; False drops the label embedding), scale_by_sigma (False),
init_scale (0.), dropout, sigma_min / sigma_max / num_scales, dtype.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from score_sde.models import layers
from score_sde.models import ncsnv2

EMBEDDING_TYPES = ('fourier', 'positional')


def _required(section, key: str, where: str):
  if key not in section:
    raise ValueError(f'{where}.{key} is missing from the config; set it in the '
                     f'experiment file.')
  return section[key]


class MLP(nn.Module):
  """Score MLP for vectors; `__call__(x [B, D], labels [B], train) -> [B, D]` float32."""
  dim: int
  nf: int = 128
  num_layers: int = 3
  embedding_type: str = 'fourier'
  fourier_scale: float = 16.0
  nonlinearity: str = 'swish'
  conditional: bool = True
  scale_by_sigma: bool = False
  init_scale: float = 0.0
  dropout: float = 0.0
  sigma_min: float = 0.01
  sigma_max: float = 50.0
  num_scales: int = 1000
  dtype: str = 'float32'

  def __post_init__(self):
    if self.dim < 1:
      raise ValueError(f'MLP needs the data dimension config.data.dim >= 1; got {self.dim}.')
    if self.nf < 4 or self.num_layers < 1:
      raise ValueError(f'MLP needs nf >= 4 and num_layers >= 1; got nf={self.nf}, '
                       f'num_layers={self.num_layers}.')
    if self.embedding_type not in EMBEDDING_TYPES:
      raise ValueError(f'unknown embedding_type {self.embedding_type!r} '
                       f'(config.model.embedding_type); valid: {list(EMBEDDING_TYPES)}.')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'dropout must lie in [0, 1); got {self.dropout}.')
    layers.get_act(self.nonlinearity)
    layers.compute_dtype(self.dtype)
    super().__post_init__()

  @classmethod
  def from_config(cls, config):
    model, data = config.model, config.data
    dim = int(data.get('dim', 0))
    if dim < 1:
      raise ValueError('the MLP score network takes vector data: set config.data.dim '
                       f'(the data dimension D); got {dim}.')
    return cls(
        dim=dim,
        nf=int(_required(model, 'nf', 'config.model')),
        num_layers=int(_required(model, 'num_layers', 'config.model')),
        embedding_type=str(model.get('embedding_type', 'fourier')).lower(),
        fourier_scale=float(model.get('fourier_scale', 16.0)),
        nonlinearity=str(model.get('nonlinearity', 'swish')),
        conditional=bool(model.get('conditional', True)),
        scale_by_sigma=bool(model.get('scale_by_sigma', False)),
        init_scale=float(model.get('init_scale', 0.0)),
        dropout=float(model.get('dropout', 0.0)),
        sigma_min=float(model.sigma_min),
        sigma_max=float(model.sigma_max),
        num_scales=int(model.num_scales),
        dtype=str(model.get('dtype', 'float32')))

  def _labels(self, labels, batch_size: int):
    labels = jnp.asarray(labels, jnp.float32)
    if labels.ndim == 0:
      labels = jnp.broadcast_to(labels, (batch_size,))
    if labels.shape != (batch_size,):
      raise ValueError(f'labels must have shape [B] = ({batch_size},); got {labels.shape}.')
    if (self.embedding_type == 'fourier' and not isinstance(labels, jax.core.Tracer)
        and not np.all(np.asarray(labels) > 0)):
      raise ValueError('Fourier embeddings take log(label): labels must be noise levels '
                       'sigma > 0 (VE, continuous). Use embedding_type="positional" for '
                       'time or timestep labels.')
    return labels

  @nn.compact
  def __call__(self, x, labels, train: bool = False):
    """x: [B, D]; labels: [B] (sigma, 999 t, or an index). Returns [B, D] float32."""
    if x.ndim != 2 or x.shape[-1] != self.dim:
      raise ValueError(f'MLP takes vectors [B, D] with D = config.data.dim = {self.dim}; '
                       f'got shape {x.shape}.')
    act = layers.get_act(self.nonlinearity)
    dt = layers.compute_dtype(self.dtype)
    labels = self._labels(labels, x.shape[0])

    temb = None
    if self.conditional:
      if self.embedding_type == 'fourier':
        emb = layers.GaussianFourierProjection(self.nf, self.fourier_scale)(jnp.log(labels))
      else:
        emb = layers.get_timestep_embedding(labels, self.nf)
      temb = layers.dense(emb, 4 * self.nf, dt)
      temb = layers.dense(act(temb), 4 * self.nf, dt)

    h = x.astype(dt)
    for _ in range(self.num_layers):
      h = layers.dense(h, self.nf, dt)
      if temb is not None:
        h = h + layers.dense(act(temb), self.nf, dt)
      h = nn.Dropout(self.dropout)(act(h), deterministic=not train)
    out = nn.Dense(self.dim, kernel_init=layers.default_init(self.init_scale),
                   bias_init=nn.initializers.zeros, dtype=dt)(h).astype(jnp.float32)

    if self.scale_by_sigma:
      if self.embedding_type == 'fourier':
        sigma = labels
      else:
        idx = ncsnv2.noise_indices(labels, x.shape[0], self.num_scales)
        sigmas = jnp.asarray(ncsnv2.discrete_sigmas(self.sigma_max, self.sigma_min,
                                                    self.num_scales), jnp.float32)
        sigma = sigmas[idx]
      out = out / sigma[:, None]
    return out
