"""score_sde/xla_cpu.py: the XLA:CPU flags reach XLA, the user's own flags win, opt-out works."""
import os
import subprocess
import sys

from score_sde import xla_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_are_appended_and_the_users_values_win():
  flags = xla_cpu.with_default_flags('--xla_backend_optimization_level=3 --foo=1')
  assert flags.split()[:2] == ['--xla_backend_optimization_level=3', '--foo=1']
  assert '--xla_backend_optimization_level=1' not in flags
  assert '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution' in flags
  assert xla_cpu.with_default_flags(flags) == flags            # idempotent


def test_opt_out_and_accelerators_leave_xla_flags_alone(monkeypatch):
  monkeypatch.setattr(xla_cpu, '_backend_started', lambda: False)
  environ = {'SCORE_SDE_XLA_DEFAULTS': '0', 'XLA_FLAGS': '--a=1'}
  assert not xla_cpu.apply_default_flags(environ) and environ['XLA_FLAGS'] == '--a=1'
  for platforms in ('cuda,cpu', 'cpu,cuda', 'tpu'):
    environ = {'JAX_PLATFORMS': platforms}
    assert not xla_cpu.apply_default_flags(environ) and 'XLA_FLAGS' not in environ
  environ = {'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '/path/to/flagfile'}   # XLA reads the file
  assert not xla_cpu.apply_default_flags(environ) and environ['XLA_FLAGS'] == '/path/to/flagfile'
  environ = {'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--a=1'}
  assert xla_cpu.apply_default_flags(environ)
  assert environ['XLA_FLAGS'] == xla_cpu.with_default_flags('--a=1')


def test_only_checked_jaxlib_versions_get_the_flags(monkeypatch, caplog):
  # An unknown flag makes XLA abort the process, so an unchecked jaxlib gets none.
  monkeypatch.setattr(xla_cpu, '_backend_started', lambda: False)
  monkeypatch.setattr(xla_cpu, 'jaxlib_version', lambda: '0.0.1')
  environ = {'JAX_PLATFORMS': 'cpu'}
  assert not xla_cpu.apply_default_flags(environ) and 'XLA_FLAGS' not in environ
  assert 'jaxlib 0.0.1 is not one they were checked with' in caplog.text


def test_the_pinned_jaxlib_is_a_checked_version():
  with open(os.path.join(ROOT, 'requirements.txt')) as requirements:
    pinned = [line.split('==')[1].strip() for line in requirements if line.startswith('jaxlib==')]
  assert pinned and pinned[0] in xla_cpu.CHECKED_JAXLIB_VERSIONS
  import jaxlib
  assert xla_cpu.jaxlib_version() == jaxlib.__version__


def test_flags_are_not_set_after_the_backend_started():
  import jax
  jax.numpy.zeros(()).block_until_ready()                      # backend up in this process
  environ = {'JAX_PLATFORMS': 'cpu'}
  assert not xla_cpu.apply_default_flags(environ) and 'XLA_FLAGS' not in environ


_PROBE = """
import score_sde, jax, jax.numpy as jnp
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
text = jax.jit(conv).lower(jnp.ones((4, 16, 16, 32)), jnp.ones((3, 3, 32, 32))).compile().as_text()
root = [line for line in text.splitlines() if 'ROOT' in line][-1]
print('YNN' if 'ynn_fusion' in root else 'EIGEN')
"""


def _convolution_backend(extra_env):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'SCORE_SDE_XLA_DEFAULTS')}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=ROOT, **extra_env)
  out = subprocess.run([sys.executable, '-c', _PROBE], env=env, capture_output=True,
                       text=True, check=True, cwd=ROOT)
  return out.stdout.strip().splitlines()[-1]


def test_importing_score_sde_routes_convolutions_to_the_multithreaded_kernels():
  # Without the flags XLA:CPU hands the convolution to a YNNPACK fusion
  # (single-threaded at this size; XLA keeps much smaller ones for itself);
  # `import score_sde` before JAX starts moves it.
  assert _convolution_backend({'SCORE_SDE_XLA_DEFAULTS': '0'}) == 'YNN'
  assert _convolution_backend({}) == 'EIGEN'
