"""NCSN on CIFAR-10 with technique 5 only (EMA of the weights).

Hyper-parameters of the reference configs/ve/ncsn/cifar10_5.py (Song et al. 2021).
"""
from configs import defaults


def get_config():
  config = defaults.cifar10()
  # training
  training = config.training
  training.sde = 'vesde'
  training.continuous = False
  # sampling
  sampling = config.sampling
  sampling.method = 'pc'
  sampling.predictor = 'none'
  sampling.corrector = 'ald'
  sampling.n_steps_each = 100
  sampling.snr = 0.316
  # model
  model = config.model
  model.name = 'ncsn'
  model.scale_by_sigma = False
  model.sigma_max = 1.
  model.num_scales = 10
  model.ema_rate = 0.999
  model.normalization = 'InstanceNorm++'
  model.nonlinearity = 'elu'
  model.nf = 128
  model.interpolation = 'bilinear'
  # optimisation: no warm-up, no gradient clipping
  optim = config.optim
  optim.weight_decay = 0.
  optim.optimizer = 'Adam'
  optim.lr = 1e-3
  optim.beta1 = 0.9
  optim.amsgrad = False
  optim.eps = 1e-8
  optim.warmup = 0
  optim.grad_clip = -1.

  return config
