"""score_sde: score-based generative modelling with SDEs in JAX/Flax.

`score_sde.load(workdir)` opens a trained workdir for scripts (see api.py);
the modules (sde, analytic, losses, sampling, likelihood, ...) are imported
on demand. Importing the package changes nothing in the environment: the
XLA:CPU settings of `score_sde/cpu/` are applied by the launcher (or by a
script that calls `score_sde.cpu.xla_flags.apply_default_flags()` before JAX
starts), and only when JAX runs on the CPU.
"""


def load(workdir: str, checkpoint: int | None = None):
  """A trained workdir's model: sample, log_likelihood, bits_per_dim, encode, decode."""
  from score_sde import api
  return api.load(workdir, checkpoint)
