"""The main job: VP SDE + a ~1 M-parameter DDPM++ on the embedded 8x8 digits (CPU, minutes)."""
from configs import defaults


def get_config():
  config = defaults.digits_ncsnpp(defaults.digits())
  config.training.sde = 'vpsde'
  config.training.continuous = True
  config.training.reduce_mean = True
  sampling = config.sampling
  sampling.method = 'pc'
  sampling.predictor = 'euler_maruyama'
  sampling.corrector = 'none'
  return config
