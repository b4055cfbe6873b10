"""Glow (Kingma & Dhariwal 2018): actnorm, invertible 1x1 convolution and coupling, multi-scale.

Each of `num_levels` levels: a squeeze [H, W, C] -> [H/2, W/2, 4C], then
`num_steps` steps of flow (ActNorm with data-dependent initialisation, an
invertible 1x1 convolution in LU form, a channel-wise affine coupling with
log-scale log sigmoid(raw + 2), or an additive one), then, except at the last
level, a split: half the channels are factored out and standardised by a
Gaussian conditioned on the other half (`flow_layers.SplitPrior`). With
`learn_top` the last level's output is standardised by a learned Gaussian.
z [B, D] holds the standardised factored-out parts and the top, in order: it
follows the flow's prior (standard normal, or logistic) under the model, so the
learned priors are part of logdet.

Not included: class conditioning, the 'reverse' / 'shuffle' permutations (the 1x1
convolution is Glow's best variant), and the extra edge-padding input channel of
Glow's convolutions (its learned top is a mean and log-std per position and
channel here, where Glow's is a zero-initialised convolution of zeros).
"""
from __future__ import annotations

import flax.linen as nn

from score_sde.models import flow_layers as fl

COUPLINGS = ('affine', 'additive')


def check_coupling(coupling: str) -> None:
  if coupling not in COUPLINGS:
    raise ValueError(f'unknown glow coupling {coupling!r} (config.model.coupling); '
                     f'valid: {list(COUPLINGS)}.')


class Glow(nn.Module):
  image_shape: tuple[int, int, int]
  num_levels: int = 3
  num_steps: int = 32
  hidden_features: int = 512
  coupling: str = 'affine'
  learn_top: bool = True
  dropout: float = 0.0          # coupling networks' hidden units, training only

  def setup(self):
    check_coupling(self.coupling)
    n = self.num_levels * self.num_steps
    self.actnorms = [fl.ActNorm() for _ in range(n)]
    self.convs = [fl.InvConv1x1(seed=i) for i in range(n)]
    self.couplings = [fl.Coupling(mask='channel', parity=0, network='glow',
                                  features=self.hidden_features, transform=self.coupling,
                                  log_scale='sigmoid', dropout=self.dropout)
                      for _ in range(n)]
    self.splits = [fl.SplitPrior() for _ in range(self.num_levels - 1)]
    if self.learn_top:
      self.top = fl.TopPrior()

  def latent_shapes(self):
    h, w, c = self.image_shape
    shapes = []
    for level in range(self.num_levels):
      h, w, c = h // 2, w // 2, 4 * c
      if level < self.num_levels - 1:
        shapes.append((h, w, c - c // 2))
        c = c // 2
    return shapes + [(h, w, c)]

  def _steps(self, level: int):
    first = level * self.num_steps
    return [(self.actnorms[i], self.convs[i], self.couplings[i])
            for i in range(first, first + self.num_steps)]

  def forward(self, x):
    """x [B, H, W, C] -> (z [B, D], logdet [B])."""
    h, logdet, parts = x, 0.0, []
    for level in range(self.num_levels):
      h = fl.squeeze(h)
      for step in self._steps(level):
        for layer in step:
          h, ld = layer(h)
          logdet = logdet + ld
      if level < self.num_levels - 1:
        (h, eps), ld = self.splits[level](h)
        logdet = logdet + ld
        parts.append(eps)
    if self.learn_top:
      h, ld = self.top(h)
      logdet = logdet + ld
    return fl.flatten_latents(parts + [h]), logdet

  def inverse(self, z):
    """z [B, D] -> x [B, H, W, C]."""
    parts = fl.unflatten_latents(z, self.latent_shapes())
    h = parts[-1]
    if self.learn_top:
      h, _ = self.top(h, reverse=True)
    for level in reversed(range(self.num_levels)):
      if level < self.num_levels - 1:
        h, _ = self.splits[level]((h, parts[level]), reverse=True)
      for step in reversed(self._steps(level)):
        for layer in reversed(step):
          h, _ = layer(h, reverse=True)
      h = fl.unsqueeze(h)
    return h

  def __call__(self, x):
    return self.forward(x)

  @classmethod
  def from_config(cls, config):
    fl.check_float32(config, 'glow')
    model = config.model
    flow = cls(image_shape=fl.image_shape_from_config(config),
               num_levels=int(model.get('num_levels', 3)),
               num_steps=int(model.get('num_steps', 32)),
               hidden_features=int(model.get('hidden_features', 512)),
               coupling=str(model.get('coupling', 'affine')).lower(),
               learn_top=bool(model.get('learn_top', True)),
               dropout=fl.dropout_from_config(config, 'glow'))
    fl.check_positive('glow', num_levels=flow.num_levels, num_steps=flow.num_steps,
                      hidden_features=flow.hidden_features)
    fl.check_squeezes(flow.image_shape, flow.num_levels, 'glow')
    check_coupling(flow.coupling)
    return flow
