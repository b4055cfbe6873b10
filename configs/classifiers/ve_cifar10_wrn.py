"""The noise-conditional WRN-28-10 classifier on CIFAR-10 for the VE SDE.

Guides configs/ve/cifar10_ncsnpp_continuous.py in class-conditional sampling
(Song et al. 2021, appendix I.1): the reference's Wide-ResNet with the noise
level fed through a Gaussian Fourier embedding of log sigma. Training
schedule (batch 128, 100k steps, lr 2e-4 with warm-up, EMA 0.999) is ours; the
paper does not list one.
"""
from configs import defaults


def get_config():
  config = defaults.cifar10()
  training = config.training
  training.sde = 'vesde'
  training.continuous = True
  training.snapshot_sampling = False
  training.n_iters = 100_000
  config.eval.enable_bpd = False
  model = config.model
  model.name = 'wideresnet'
  model.num_classes = 10
  model.depth = 28
  model.channel_multiplier = 10
  model.base_channels = 16
  model.embedding_type = 'fourier'
  model.embedding_size = 128
  model.fourier_scale = 16.
  model.standardize = True
  model.dropout = 0.
  model.ema_rate = 0.999
  return config
