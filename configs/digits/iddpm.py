"""Improved DDPM (Nichol & Dhariwal 2021) on the 8x8 digits: cosine schedule, learned
variance (the U-Net outputs eps and v), hybrid loss L_simple + 0.001 L_vlb."""
from configs import defaults


def get_config():
  config = defaults.digits()
  training = config.training
  training.sde = 'vpsde'
  training.continuous = False
  training.reduce_mean = True
  training.loss = 'hybrid'
  sampling = config.sampling
  sampling.method = 'pc'
  sampling.predictor = 'ancestral_sampling'
  sampling.corrector = 'none'
  model = config.model
  model.name = 'ddpm'
  model.beta_schedule = 'cosine'
  model.learned_variance = True
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
