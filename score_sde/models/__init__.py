"""Score networks (Flax linen), chosen by `config.model.name`.

`get_model(config)` builds the network; `utils.py` turns its outputs into
scores with the reference parameterisations (see `get_score_fn`).
Every network is called as `model.apply({'params': p}, x, labels, train=...)`
with `x: [B, H, W, C]` (or `[B, D]` for the MLP) and one label per example
(a continuous time / noise level or an integer noise index).

The normalizing flows ('nice', 'realnvp', 'glow'; `is_flow`) are invertible
networks instead: `model.apply({'params': p}, x, method='forward')` gives
(z [B, D], log |det dz/dx| [B]) and `method='inverse'` maps z back to x.
"""
import importlib

# name -> (module, class); modules are imported on first use.
MODELS = {
    'ncsnpp': ('score_sde.models.ncsnpp', 'NCSNpp'),
    'ddpm': ('score_sde.models.ddpm', 'DDPM'),
    'ncsn': ('score_sde.models.ncsnv2', 'NCSN'),
    'ncsnv2': ('score_sde.models.ncsnv2', 'NCSNv2'),
    'ncsnv2_64': ('score_sde.models.ncsnv2', 'NCSNv2'),   # the reference's name
    'ncsnv2_128': ('score_sde.models.ncsnv2', 'NCSNv2_128'),
    'ncsnv2_256': ('score_sde.models.ncsnv2', 'NCSNv2_256'),
    'mlp': ('score_sde.models.mlp', 'MLP'),
    'wideresnet': ('score_sde.models.wideresnet', 'WideResNet'),   # classifier p(y | x_t)
    'nice': ('score_sde.models.nice', 'NICE'),                      # normalizing flows
    'realnvp': ('score_sde.models.realnvp', 'RealNVP'),
    'glow': ('score_sde.models.glow', 'Glow'),
}
FLOW_MODELS = ('nice', 'realnvp', 'glow')


def is_flow(name: str) -> bool:
  """Whether `name` (config.model.name) is a normalizing flow."""
  return str(name).lower() in FLOW_MODELS


def get_model_class(name: str):
  """The network class registered under `name`."""
  try:
    module_name, class_name = MODELS[name.lower()]
  except KeyError:
    raise ValueError(f'unknown model name {name!r} (config.model.name); valid '
                     f'names: {sorted(MODELS)}.') from None
  return getattr(importlib.import_module(module_name), class_name)


def get_model(config):
  """The network described by `config.model` (and `config.data`)."""
  return get_model_class(config.model.name).from_config(config)
