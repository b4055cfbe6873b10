"""VE SDE + a ~1 M-parameter NCSN++ (Fourier features, output / sigma) on the 8x8 digits.

sigma_max = 9.6: the largest pairwise distance of the digits in [-1, 1]
(`launch.py noise_scales` on this config), NCSNv2 technique 1.
"""
from configs import defaults


def get_config():
  config = defaults.digits_ncsnpp(defaults.digits(), ve=True)
  config.training.sde = 'vesde'
  config.training.continuous = True
  config.training.reduce_mean = True
  config.model.sigma_max = 9.6
  sampling = config.sampling
  sampling.method = 'pc'
  sampling.predictor = 'reverse_diffusion'
  sampling.corrector = 'langevin'
  sampling.snr = 0.16
  return config
