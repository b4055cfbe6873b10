"""The config stored by a training run: `--config=configs/workdir.py:<workdir>`.

launch.py uses this when a command gets --workdir but no --config, so that
`--config.sampling.method=ode` style overrides work on a trained run. Reading
a stored config starts no JAX backend.
"""
from score_sde import io


def load_stored_config(workdir: str):
  """The resolved config a training run stored in <workdir>/config.json."""
  return io.read_config_json(workdir)


def get_config(workdir: str):
  return load_stored_config(workdir)
