"""The config stored by a training run: `--config=configs/workdir.py:<workdir>`.

launch.py uses this when a command gets --workdir but no --config, so that
`--config.sampling.method=ode` style overrides work on a trained run. Reading
a stored config starts no JAX backend.
"""
from score_sde import io


def load_stored_config(workdir: str):
  """The resolved config a training run stored in <workdir>/config.json.

  Sampler and evaluation keys added to configs/defaults.py after the run was
  trained (e.g. the few-step samplers' `sampling.time_schedule`,
  `eval.matmul_precision`) are filled in with their defaults, so they can be
  overridden on the command line; they do not change the model.
  """
  from configs import defaults
  config = io.read_config_json(workdir)
  base = defaults.base()
  for section in ('sampling', 'eval'):
    missing = [key for key in base[section] if key not in config[section]]
    if missing:
      with config.unlocked():
        for key in missing:
          config[section][key] = base[section][key]
  return config


def get_config(workdir: str):
  return load_stored_config(workdir)
