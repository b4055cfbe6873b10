"""NCSN (Song & Ermon 2019) on the 8x8 digits: RefineNet with CondInstanceNorm++,
the SMLD loss over 10 geometric noise levels, annealed Langevin dynamics."""
from configs import defaults


def get_config():
  config = defaults.digits()
  training = config.training
  training.sde = 'vesde'
  training.continuous = False
  training.reduce_mean = True
  sampling = config.sampling
  sampling.method = 'pc'
  sampling.predictor = 'none'
  sampling.corrector = 'ald'
  sampling.n_steps_each = 20
  sampling.snr = 0.316             # ALD step eps = 2 (snr sigma_min)^2 = 2e-5, as NCSN
  sampling.noise_removal = False
  model = config.model
  model.name = 'ncsn'
  model.scale_by_sigma = False
  model.sigma_max = 9.6
  model.sigma_min = 0.01
  model.num_scales = 10
  model.ema_rate = 0.999
  model.normalization = 'InstanceNorm++'
  model.nonlinearity = 'elu'
  model.nf = 16
  model.interpolation = 'bilinear'
  config.optim.lr = 1e-3
  config.optim.grad_clip = -1.
  return config
