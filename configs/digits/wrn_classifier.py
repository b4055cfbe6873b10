"""A noise-conditional Wide-ResNet classifier p(y | x_t) for the main job's SDE.

Trained with `launch.py train_classifier`; guides the digits score models in
`launch.py cond_sample` (class-conditional sampling). The SDE must be the score
model's (VP, beta 0.1 -> 20, continuous), as the classifier reads x_t of that
SDE. WRN-10-2 (one block per group, widths 32 / 64 / 128; 449,114 parameters):
the 8x8 digits need little depth.
"""
from configs import defaults


def get_config():
  config = defaults.wrn_classifier(defaults.digits(), sde='vpsde', blocks_per_group=1,
                                   channel_multiplier=2, embedding_size=64)
  config.training.n_iters = 1500
  return config
