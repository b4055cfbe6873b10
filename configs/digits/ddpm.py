"""DDPM (Ho et al. 2020) on the 8x8 digits: the U-Net, discrete VP chain (linear betas,
N = 1000), L_simple, ancestral sampling."""
from configs import defaults


def get_config():
  config = defaults.digits()
  training = config.training
  training.sde = 'vpsde'
  training.continuous = False
  training.reduce_mean = True
  sampling = config.sampling
  sampling.method = 'pc'
  sampling.predictor = 'ancestral_sampling'
  sampling.corrector = 'none'
  model = config.model
  model.name = 'ddpm'
  model.scale_by_sigma = False
  model.ema_rate = 0.999
  model.normalization = 'GroupNorm'
  model.nonlinearity = 'swish'
  model.nf = 32
  model.ch_mult = (1, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (4,)
  model.resamp_with_conv = True
  model.conditional = True
  return config
