"""NICE (Dinh, Krueger & Bengio 2015): additive couplings on the flattened image.

forward: x [B, H, W, C] -> flat h [B, D], `num_couplings` additive couplings
alternating the even / odd dimensions (each an MLP of `hidden_layers` ReLU layers
of `hidden_features` units), then a diagonal scaling y = h exp(s): z [B, D] and
logdet = sum s (the couplings are volume preserving). The scaling starts from the
data, s = -log std per dimension of the init batch (ActNorm's data-dependent
initialisation; the paper does not say how it initialised s): without it, a
pixel that is nearly constant takes thousands of Adam steps to be scaled up.
"""
from __future__ import annotations

import flax.linen as nn

from score_sde.models import flow_layers as fl


class NICE(nn.Module):
  image_shape: tuple[int, int, int]
  num_couplings: int = 4
  hidden_layers: int = 5
  hidden_features: int = 1000
  dropout: float = 0.0          # coupling networks' hidden units, training only

  def setup(self):
    self.couplings = [fl.Coupling(mask='alternate', parity=i % 2, network='mlp',
                                  features=self.hidden_features, depth=self.hidden_layers,
                                  transform='additive', dropout=self.dropout)
                      for i in range(self.num_couplings)]
    self.scaling = fl.DiagonalScaling(data_init=True)

  def latent_shapes(self):
    h, w, c = self.image_shape
    return [(h * w * c,)]

  def forward(self, x):
    """x [B, H, W, C] -> (z [B, D], logdet [B])."""
    h = x.reshape(x.shape[0], -1)
    logdet = 0.0
    for layer in self.couplings:
      h, ld = layer(h)
      logdet = logdet + ld
    z, ld = self.scaling(h)
    return z, logdet + ld

  def inverse(self, z):
    """z [B, D] -> x [B, H, W, C]."""
    (h,) = fl.unflatten_latents(z, self.latent_shapes())
    h, _ = self.scaling(h, reverse=True)
    for layer in reversed(self.couplings):
      h, _ = layer(h, reverse=True)
    return h.reshape((z.shape[0],) + tuple(self.image_shape))

  def __call__(self, x):
    return self.forward(x)

  @classmethod
  def from_config(cls, config):
    fl.check_float32(config, 'nice')
    model = config.model
    flow = cls(image_shape=fl.image_shape_from_config(config),
               num_couplings=int(model.get('num_couplings', 4)),
               hidden_layers=int(model.get('hidden_layers', 5)),
               hidden_features=int(model.get('hidden_features', 1000)),
               dropout=fl.dropout_from_config(config, 'nice'))
    fl.check_positive('nice', num_couplings=flow.num_couplings,
                      hidden_features=flow.hidden_features)
    return flow
