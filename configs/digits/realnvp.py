"""RealNVP on the embedded 8x8 digits: 2 scales (3 checkerboard couplings, squeeze, 3 channel-wise
couplings, factor out half; then 4 checkerboard couplings), ResNet coupling networks of 2 blocks
x 16 maps (32 at the second scale), tanh-bounded log-scales. About 2 minutes on 2 cores."""
from configs import defaults


def get_config():
  config = defaults.digits_flow(defaults.digits(), 'realnvp')
  model = config.model
  model.num_levels = 2
  model.num_res_blocks = 2
  model.hidden_features = 16
  return config
