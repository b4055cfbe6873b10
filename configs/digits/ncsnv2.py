"""NCSNv2 (Song & Ermon 2020) on the 8x8 digits, with the scales of its techniques
(`launch.py noise_scales --config configs/digits/ncsnv2.py`): sigma_max 9.6, 24
geometric levels to 0.01, 5 ALD steps per level with step 2.4e-5 (snr 0.346)."""
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
  sampling.n_steps_each = 5
  sampling.snr = 0.346
  model = config.model
  model.name = 'ncsnv2'
  model.scale_by_sigma = True
  model.sigma_max = 9.6
  model.sigma_min = 0.01
  model.num_scales = 24
  model.ema_rate = 0.999
  model.normalization = 'InstanceNorm++'
  model.nonlinearity = 'elu'
  model.nf = 16
  model.interpolation = 'bilinear'
  config.optim.lr = 1e-3
  config.optim.grad_clip = -1.
  return config
