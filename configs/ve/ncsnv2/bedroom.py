"""NCSNv2 on LSUN bedroom 128x128: 1086 levels from 190 to 0.01, EMA 0.9999.

The reference file misspells `training.continuouse`; the intended
`training.continuous = False` (discrete NCSN objective) is set here.

Hyper-parameters of the reference configs/ve/ncsnv2/bedroom.py (Song et al. 2021).
"""
from configs import defaults


def get_config():
  config = defaults.lsun()
  # training
  training = config.training
  training.batch_size = 128
  training.sde = 'vesde'
  training.continuous = False
  # sampling
  sampling = config.sampling
  sampling.method = 'pc'
  sampling.predictor = 'none'
  sampling.corrector = 'ald'
  sampling.n_steps_each = 3
  sampling.snr = 0.095
  # data
  data = config.data
  data.category = 'bedroom'
  data.image_size = 128
  # model
  model = config.model
  model.name = 'ncsnv2_128'
  model.scale_by_sigma = True
  model.sigma_max = 190.
  model.num_scales = 1086
  model.ema_rate = 0.9999
  model.sigma_min = 0.01
  model.normalization = 'InstanceNorm++'
  model.nonlinearity = 'elu'
  model.nf = 128
  model.interpolation = 'bilinear'
  # optimisation: no warm-up, no gradient clipping
  optim = config.optim
  optim.weight_decay = 0.
  optim.optimizer = 'Adam'
  optim.lr = 1e-4
  optim.beta1 = 0.9
  optim.amsgrad = False
  optim.eps = 1e-8
  optim.warmup = 0
  optim.grad_clip = -1.

  return config
