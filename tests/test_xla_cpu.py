"""score_sde/cpu/xla_flags.py: the XLA:CPU flags reach XLA when the launcher applies them (never
on import), the user's own flags win, opt-out works."""
import os
import subprocess
import sys

from score_sde.cpu import xla_flags as xla_cpu

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
import sys
import score_sde
if sys.argv[1] == 'prepare':                 # what launch.py does first
  from score_sde.cpu import process
  process.prepare(restart_for_huge_pages=False)
import jax, jax.numpy as jnp
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
text = jax.jit(conv).lower(jnp.ones((4, 16, 16, 32)), jnp.ones((3, 3, 32, 32))).compile().as_text()
root = [line for line in text.splitlines() if 'ROOT' in line][-1]
print('YNN' if 'ynn_fusion' in root else 'EIGEN')
"""


def _convolution_backend(extra_env, mode='prepare'):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'SCORE_SDE_XLA_DEFAULTS')}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=ROOT, **extra_env)
  out = subprocess.run([sys.executable, '-c', _PROBE, mode], env=env, capture_output=True,
                       text=True, check=True, cwd=ROOT)
  return out.stdout.strip().splitlines()[-1]


def test_the_launchers_set_up_routes_convolutions_to_the_multithreaded_kernels():
  # Without the flags XLA:CPU hands the convolution to a YNNPACK fusion
  # (single-threaded at this size; XLA keeps much smaller ones for itself);
  # the launcher's process.prepare() before JAX starts moves it. Importing
  # score_sde alone changes nothing.
  assert _convolution_backend({}, mode='import') == 'YNN'
  assert _convolution_backend({'SCORE_SDE_XLA_DEFAULTS': '0'}) == 'YNN'
  assert _convolution_backend({}) == 'EIGEN'


def test_importing_the_library_leaves_the_environment_alone():
  code = ('import os, json; before = dict(os.environ); import score_sde, score_sde.api, '
          'score_sde.train, score_sde.jobs, score_sde.cpu.process; '
          'print(json.dumps(sorted(k for k in set(before) | set(os.environ) '
          'if before.get(k) != os.environ.get(k))))')
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'SCORE_SDE_XLA_FLAGS_ADDED')}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       check=True, cwd=ROOT)
  assert out.stdout.strip().splitlines()[-1] == '[]'


# ----------------------------------------------------------------------------
# Per-program options of the train and eval steps
# ----------------------------------------------------------------------------

def test_step_options_follow_the_process_wide_conditions(monkeypatch):
  monkeypatch.setattr(xla_cpu, '_backend_started', lambda: False)
  on_cpu = {'JAX_PLATFORMS': 'cpu'}
  assert xla_cpu.step_compiler_options(on_cpu) == xla_cpu.STEP_COMPILER_OPTIONS
  environ = dict(on_cpu, XLA_FLAGS='--a=1')
  assert xla_cpu.apply_default_flags(environ)                  # as the launcher does
  assert xla_cpu.step_compiler_options(environ) == xla_cpu.STEP_COMPILER_OPTIONS
  # The user's own library-fusion flag wins, even when it equals this module's default.
  for value in ('+individual_convolution', xla_cpu.DEFAULT_FLAGS[xla_cpu.LIBRARY_FUSION_OPTION]):
    environ = dict(on_cpu, XLA_FLAGS=f'--{xla_cpu.LIBRARY_FUSION_OPTION}={value}')
    assert xla_cpu.apply_default_flags(environ)               # adds the other defaults
    assert xla_cpu.LIBRARY_FUSION_OPTION not in environ[xla_cpu.ADDED_FLAGS_VARIABLE]
    assert xla_cpu.step_compiler_options(environ) == {}, value
  for environ in (dict(on_cpu, SCORE_SDE_XLA_DEFAULTS='0'), {'JAX_PLATFORMS': 'cuda'},
                  dict(on_cpu, XLA_FLAGS='/path/to/flagfile')):
    assert xla_cpu.step_compiler_options(environ) == {}, environ
  monkeypatch.setattr(xla_cpu, 'jaxlib_version', lambda: '0.0.1')
  assert xla_cpu.step_compiler_options(on_cpu) == {}


_HLO_WITH_LIBRARY_FUSIONS = """
%fused_computation.1 (param_0: f32[4,3,3], param_1: f32[4,3,3]) -> f32[4,3,3] {
  %param_0 = f32[4,3,3]{2,1,0} parameter(0)
  %param_1 = f32[4,3,3]{LAYOUT} parameter(1)
  ROOT %add.1 = f32[4,3,3]{2,1,0} add(%param_0, %param_1), metadata={op_name="x{1,0}"}
}

%fused_computation.2 (param_0.2: f32[4,3]) -> f32[3,4] {
  %param_0.2 = f32[4,3]{1,0} parameter(0)
  ROOT %transpose.2 = f32[3,4]{0,1} transpose(%param_0.2), dimensions={1,0}
}

ENTRY %main.3 (Arg_0.1: f32[4,3,3], Arg_1.2: f32[4,3]) -> (f32[4,3,3], f32[3,4]) {
  %Arg_0.1 = f32[4,3,3]{2,1,0} parameter(0)
  %ynn_fusion = f32[4,3,3]{2,1,0} fusion(%Arg_0.1, %Arg_0.1), kind=kCustom, calls=%fused_computation.1, backend_config={"outer_dimension_partitions":[],"fusion_config":{"kind":"__ynn_fusion"}}
  %Arg_1.2 = f32[4,3]{1,0} parameter(1)
  %loop_fusion = f32[3,4]{0,1} fusion(%Arg_1.2), kind=kLoop, calls=%fused_computation.2
  ROOT %tuple.3 = (f32[4,3,3]{2,1,0}, f32[3,4]{0,1}) tuple(%ynn_fusion, %loop_fusion)
}
"""


def test_library_fusion_layout_check_reads_only_library_fusions():
  ok = _HLO_WITH_LIBRARY_FUSIONS.replace('LAYOUT', '2,1,0')
  # A column-major array outside a library fusion (the kLoop transpose) is fine.
  assert xla_cpu.unsupported_library_fusion_layouts(ok) == []
  bad = xla_cpu.unsupported_library_fusion_layouts(
      _HLO_WITH_LIBRARY_FUSIONS.replace('LAYOUT', '1,2,0'))
  assert bad == ['%param_1 = f32[4,3,3]{1,2,0} parameter(1)']


def _batched_cholesky(a, b):
  """Cholesky factors [N, 1, 3, 3] of (a a^T + b b^T) / 2 + 3 I: an elementwise
  fusion feeding LAPACK, which wants its operand column-major."""
  import jax.numpy as jnp
  gram = (a @ jnp.swapaxes(a, -1, -2) + b @ jnp.swapaxes(b, -1, -2)) * 0.5
  return jnp.linalg.cholesky(gram + 3.0 * jnp.eye(3))


def test_compile_step_falls_back_where_the_options_would_fail_at_run_time():
  import jax
  import numpy as np
  import pytest
  a, b = jax.random.normal(jax.random.PRNGKey(0), (2, 4000, 1, 3, 3))
  jitted = jax.jit(_batched_cholesky)
  with_options = jitted.lower(a, b).compile(xla_cpu.STEP_COMPILER_OPTIONS)
  assert xla_cpu.unsupported_library_fusion_layouts(with_options.as_text())
  # Why the check exists (jaxlib 0.10.2): this program fails when it runs.
  with pytest.raises(Exception, match='unsupported layout in YNN fusion'):
    np.asarray(with_options(a, b))

  compiled, used = xla_cpu.compile_step(jitted, a, b, options=xla_cpu.STEP_COMPILER_OPTIONS)
  assert used == {}
  assert xla_cpu.unsupported_library_fusion_layouts(compiled.as_text()) == []
  np.testing.assert_array_equal(np.asarray(compiled(a, b)), np.asarray(jitted(a, b)))


def test_compile_step_falls_back_for_arrays_of_a_rank_ynnpack_lacks():
  import jax
  import jax.numpy as jnp
  import numpy as np
  x = jnp.linspace(-1.0, 1.0, 2 ** 14).reshape((2,) * 8 + (64,))   # rank 9 > YNNPACK's 8
  jitted = jax.jit(lambda x: jnp.tanh(x) * 2.0 + 1.0)
  with_options = jitted.lower(x).compile(xla_cpu.STEP_COMPILER_OPTIONS)
  assert '"__ynn_fusion"' in with_options.as_text()
  assert xla_cpu.unsupported_library_fusion_layouts(with_options.as_text())
  compiled, used = xla_cpu.compile_step(jitted, x, options=xla_cpu.STEP_COMPILER_OPTIONS)
  assert used == {}
  np.testing.assert_array_equal(np.asarray(compiled(x)), np.asarray(jitted(x)))


def test_jit_step_compiles_once_per_signature(monkeypatch):
  import jax.numpy as jnp
  import numpy as np
  calls = []
  real = xla_cpu.compile_step

  def counting(jitted, *args, **kwargs):
    calls.append([np.shape(x) for x in args])
    return real(jitted, *args, **kwargs)

  monkeypatch.setattr(xla_cpu, 'compile_step', counting)
  step = xla_cpu.jit_step(lambda x, y: jnp.tanh(x) * y + 1.0)
  for _ in range(3):
    np.testing.assert_allclose(step(jnp.ones(5), 2.0), np.tanh(1.0) * 2 + 1, rtol=1e-6)
  assert len(calls) == 1
  np.testing.assert_allclose(step(jnp.zeros((2, 3)), 2.0), np.ones((2, 3)))
  assert len(calls) == 2


def test_jit_step_keys_weak_types_and_refuses_static_arguments():
  import jax.numpy as jnp
  import pytest
  step = xla_cpu.jit_step(lambda x, y: x * y)
  x = jnp.ones(3, jnp.bfloat16)
  for y in (jnp.asarray(2.0), jnp.float32(2.0), jnp.asarray(2.0)):   # weak, strong, weak
    assert step(x, y).dtype == (x * y).dtype
  with pytest.raises(ValueError, match='static_argnums'):
    xla_cpu.jit_step(lambda x, n: x * n, static_argnums=1)
