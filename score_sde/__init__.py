"""score_sde: score-based generative modelling with SDEs in JAX/Flax.

`score_sde.load(workdir)` opens a trained workdir for scripts (see api.py);
the modules (sde, analytic, losses, sampling, likelihood, ...) are imported
on demand. Importing the package adds this project's XLA:CPU flags to
XLA_FLAGS if JAX has not started yet (see xla_cpu.py; SCORE_SDE_XLA_DEFAULTS=0
turns that off).
"""
from score_sde import xla_cpu as _xla_cpu

_xla_cpu.apply_default_flags()


def load(workdir: str, checkpoint: int | None = None):
  """A trained workdir's model: sample, log_likelihood, bits_per_dim, encode, decode."""
  from score_sde import api
  return api.load(workdir, checkpoint)
