"""Glow on the embedded 8x8 digits: 2 levels x 8 steps (actnorm, LU 1x1 convolution, affine
coupling with a 3x3-1x1-3x3 network of 32 channels), split prior, learned top. About 2 minutes
on 2 cores."""
from configs import defaults


def get_config():
  config = defaults.digits_flow(defaults.digits(), 'glow')
  model = config.model
  model.num_levels = 2
  model.num_steps = 8
  model.hidden_features = 32
  model.coupling = 'affine'
  model.learn_top = True
  return config
