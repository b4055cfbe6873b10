"""DDPM on CelebA-HQ 256x256: discrete chain, ancestral sampling.

Hyper-parameters as in the reference code base (Song et al. 2021),
configs/vp/ddpm/celebahq.py.
"""
from configs import defaults


def get_config():
  config = defaults.lsun()

  # training
  training = config.training
  training.sde = 'vpsde'
  training.continuous = False
  training.reduce_mean = True

  # sampling
  sampling = config.sampling
  sampling.method = 'pc'
  sampling.predictor = 'ancestral_sampling'
  sampling.corrector = 'none'

  # data
  data = config.data
  data.dataset = 'CelebAHQ'
  data.centered = True
  data.image_size = 256

  # model
  model = config.model
  model.name = 'ddpm'
  model.scale_by_sigma = False
  model.ema_rate = 0.9999
  model.normalization = 'GroupNorm'
  model.nonlinearity = 'swish'
  model.nf = 128
  model.ch_mult = (1, 1, 2, 2, 4, 4)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.resamp_with_conv = True
  model.conditional = True
  model.num_scales = 1000

  # optim
  optim = config.optim
  optim.lr = 2e-5

  return config
