"""VP SDE + MLP score network on 2-D toy data (8 Gaussians on a circle by default)."""
from configs import defaults


def get_config():
  config = defaults.toy()
  config.training.sde = 'vpsde'
  config.training.continuous = True
  config.training.reduce_mean = True
  config.sampling.method = 'ode'
  model = config.model
  model.name = 'mlp'
  model.nf = 128
  model.num_layers = 3
  model.embedding_type = 'positional'
  model.nonlinearity = 'swish'
  model.scale_by_sigma = False
  model.init_scale = 0.
  model.ema_rate = 0.999
  return config
