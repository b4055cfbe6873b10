"""A noise-conditional Wide-ResNet classifier p(y | x_t) for the main job's SDE.

Trained with `launch.py train_classifier`; guides the digits score models in
`launch.py cond_sample` (class-conditional sampling). The SDE must be the score
model's (VP, beta 0.1 -> 20, continuous), as the classifier reads x_t of that
SDE. WRN-10-2 (one block per group, widths 32 / 64 / 128; 449,114 parameters):
the 8x8 digits need little depth.
"""
from configs import defaults


def get_config():
  config = defaults.digits()
  training = config.training
  training.sde = 'vpsde'
  training.continuous = True
  training.snapshot_sampling = False
  training.n_iters = 1500
  config.eval.enable_bpd = False
  model = config.model
  model.name = 'wideresnet'
  model.num_classes = 10
  model.blocks_per_group = 1
  model.channel_multiplier = 2
  model.base_channels = 16
  model.embedding_type = 'fourier'
  model.embedding_size = 64
  model.fourier_scale = 16.
  model.standardize = True
  model.ema_rate = 0.999
  return config
