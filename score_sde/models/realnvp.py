"""RealNVP (Dinh, Sohl-Dickstein & Bengio 2017): affine couplings in a multi-scale architecture.

Each of the first `num_levels - 1` scales: 3 affine couplings with alternating
checkerboard masks, a squeeze [H, W, C] -> [H/2, W/2, 4C], 3 affine couplings
with alternating channel-wise masks, then half the channels are factored out
(they are latent, standard normal under the model). The last scale: 4
checkerboard couplings. Coupling networks are ResNets (`num_res_blocks` blocks
of `hidden_features` maps at the first scale, doubled at each further scale, as
the authors' code does); log-scales are tanh-bounded with a learned scale per
channel. z [B, D] is the factored-out parts and the last scale's output, in order;
it follows the flow's prior (standard normal, or logistic) under the model.

Not included (say so when comparing with the paper): batch normalisation in the
coupling networks and as a flow layer (its density would depend on the batch
statistics during training), and the logit transform of the data.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from score_sde.models import flow_layers as fl

CHECKERBOARD_PARITIES = (0, 1, 0)
CHANNEL_PARITIES = (0, 1, 0)
FINAL_PARITIES = (0, 1, 0, 1)


class RealNVP(nn.Module):
  image_shape: tuple[int, int, int]
  num_levels: int = 2
  num_res_blocks: int = 8
  hidden_features: int = 64
  dropout: float = 0.0          # coupling networks' hidden units, training only

  def _coupling(self, mask, parity, level):
    return fl.Coupling(mask=mask, parity=parity, network='resnet',
                       features=self.hidden_features * 2 ** level, depth=self.num_res_blocks,
                       transform='affine', log_scale='tanh', dropout=self.dropout)

  def setup(self):
    if self.num_levels < 1:
      raise ValueError(f'realnvp needs num_levels >= 1; got {self.num_levels}.')
    checker, channel = [], []
    for level in range(self.num_levels):
      final = level == self.num_levels - 1
      parities = FINAL_PARITIES if final else CHECKERBOARD_PARITIES
      checker.append([self._coupling('checkerboard', p, level) for p in parities])
      if not final:
        channel.append([self._coupling('channel', p, level) for p in CHANNEL_PARITIES])
    self.checker = checker
    self.channel = channel

  def latent_shapes(self):
    h, w, c = self.image_shape
    shapes = []
    for _ in range(self.num_levels - 1):
      h, w, c = h // 2, w // 2, 4 * c
      shapes.append((h, w, c - c // 2))
      c = c // 2
    return shapes + [(h, w, c)]

  def forward(self, x):
    """x [B, H, W, C] -> (z [B, D], logdet [B])."""
    h, logdet, parts = x, 0.0, []
    for level in range(self.num_levels):
      for layer in self.checker[level]:
        h, ld = layer(h)
        logdet = logdet + ld
      if level < self.num_levels - 1:
        h = fl.squeeze(h)
        for layer in self.channel[level]:
          h, ld = layer(h)
          logdet = logdet + ld
        c = h.shape[-1] // 2
        parts.append(h[..., c:])
        h = h[..., :c]
    return fl.flatten_latents(parts + [h]), logdet

  def inverse(self, z):
    """z [B, D] -> x [B, H, W, C]."""
    parts = fl.unflatten_latents(z, self.latent_shapes())
    h = parts[-1]
    for level in reversed(range(self.num_levels)):
      if level < self.num_levels - 1:
        h = jnp.concatenate([h, parts[level]], axis=-1)
        for layer in reversed(self.channel[level]):
          h, _ = layer(h, reverse=True)
        h = fl.unsqueeze(h)
      for layer in reversed(self.checker[level]):
        h, _ = layer(h, reverse=True)
    return h

  def __call__(self, x):
    return self.forward(x)

  @classmethod
  def from_config(cls, config):
    fl.check_float32(config, 'realnvp')
    model = config.model
    flow = cls(image_shape=fl.image_shape_from_config(config),
               num_levels=int(model.get('num_levels', 2)),
               num_res_blocks=int(model.get('num_res_blocks', 8)),
               hidden_features=int(model.get('hidden_features', 64)),
               dropout=fl.dropout_from_config(config, 'realnvp'))
    fl.check_positive('realnvp', num_levels=flow.num_levels, num_res_blocks=flow.num_res_blocks,
                      hidden_features=flow.hidden_features)
    fl.check_squeezes(flow.image_shape, flow.num_levels - 1, 'realnvp')
    return flow
