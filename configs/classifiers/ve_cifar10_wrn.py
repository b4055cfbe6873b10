"""The noise-conditional WRN-28-10 classifier on CIFAR-10 for the VE SDE.

Guides configs/ve/cifar10_ncsnpp_continuous.py in class-conditional sampling
(Song et al. 2021, appendix I.1): the reference's Wide-ResNet with the noise
level fed through a Gaussian Fourier embedding of log sigma. Training
schedule (batch 128, 100k steps, lr 2e-4 with warm-up, EMA 0.999) is ours; the
paper does not list one.
"""
from configs import defaults


def get_config():
  config = defaults.wrn_classifier(defaults.cifar10(), sde='vesde', blocks_per_group=4,
                                   channel_multiplier=10, embedding_size=128)   # WRN-28-10
  config.training.n_iters = 100_000
  return config
