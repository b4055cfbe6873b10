"""Test-session set-up: 4 simulated CPU devices, float32 as users run it."""
import os
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# Compiled programs shared by the test processes (the launcher's subprocesses
# included) instead of the user's ~/.cache/score_sde/xla.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    tempfile.gettempdir(), f'score_sde_tests_xla_cache_{os.getuid()}'))

# The XLA:CPU flags users run with (score_sde/cpu/xla_flags.py), applied as the
# launcher applies them: explicitly, before JAX starts, only on the CPU backend.
from score_sde.cpu import xla_flags  # noqa: E402

xla_flags.apply_default_flags()

# Must happen before JAX initialises its backend. Tests that need a given
# number of devices pick a sub-mesh of these.
# An XLA_FLAGS of the user's own keeps its flags and gains the device count,
# unless it sets one itself (tests needing 4 devices then skip and say why).
os.environ['XLA_FLAGS'] = xla_flags.with_default_flags(
    os.environ.get('XLA_FLAGS', ''), {'xla_force_host_platform_device_count': '4'})

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def key():
  return jax.random.PRNGKey(0)


@pytest.fixture
def four_devices():
  """The first 4 devices; skips (saying why) where fewer exist."""
  if len(jax.devices()) < 4:
    pytest.skip('needs 4 devices; tests/conftest.py simulates 4 CPU devices unless XLA_FLAGS '
                'already sets --xla_force_host_platform_device_count')
  return jax.devices()[:4]
