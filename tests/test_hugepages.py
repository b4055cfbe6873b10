"""Huge pages for XLA:CPU buffers: the environment it sets, the restart (skipped when JAX would
not run on the CPU), and its effect."""
import os
import subprocess
import sys

import pytest

from score_sde.cpu import hugepages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDS_MADVISE_THP = pytest.mark.skipif(
    not hugepages.tunable_would_help(),
    reason='needs Linux, glibc >= 2.35 and the kernel THP mode "madvise" (this machine: '
           f'{hugepages.thp_mode()!r})')


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  path = tmp_path / 'enabled'
  path.write_text('always [madvise] never\n')
  assert hugepages.thp_mode(str(path)) == 'madvise'
  path.write_text('[always] madvise never\n')
  assert hugepages.thp_mode(str(path)) == 'always'
  assert hugepages.thp_mode(str(tmp_path / 'missing')) is None


@pytest.mark.parametrize('running, expected', [('glibc 2.36', True), ('glibc 2.35', True),
                                               ('glibc 2.34', False), ('', False), (None, False)])
def test_tunable_needs_a_running_glibc_of_2_35_or_later(monkeypatch, running, expected):
  def confstr(name):
    if running is None:
      raise ValueError(f'unrecognized configuration name {name}')
    return running
  monkeypatch.setattr(hugepages.os, 'confstr', confstr)
  assert hugepages._glibc_has_tunable() is expected


@pytest.mark.parametrize('environ, expected', [
    ({}, 'glibc.malloc.hugetlb=1'),
    ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'},
     'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'),
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, 'glibc.malloc.hugetlb=0'),  # the user's
    ({'SCORE_SDE_HUGEPAGES': '0'}, None),
])
def test_environment_asks_for_huge_pages_unless_set_or_opted_out(environ, expected):
  before = dict(environ)
  result = hugepages.environ_with_huge_pages(environ, would_help=True)
  assert result.get('GLIBC_TUNABLES') == expected
  assert environ == before                    # a copy, not the caller's mapping
  assert hugepages.environ_with_huge_pages(environ, would_help=False) == environ


_PROBE = """
import os, sys
sys.path.insert(0, {root!r})
print('started', os.getpid(), os.environ.get('GLIBC_TUNABLES'))   # buffered: the pipe
from score_sde.cpu import hugepages
hugepages.reexec_with_huge_pages(would_help=True)
print('running', os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.flags.utf8_mode)
"""


def _probe_lines(**extra_env):
  """The probe's lines, split; JAX_PLATFORMS is cpu unless `extra_env` sets it (None: unset)."""
  env = {k: v for k, v in os.environ.items()        # (buffered stdout: no PYTHONUNBUFFERED)
         if k not in ('GLIBC_TUNABLES', hugepages.OPT_OUT, hugepages.RESTARTED,
                      'PYTHONUNBUFFERED')}
  env['JAX_PLATFORMS'] = 'cpu'
  env.update(extra_env)
  env = {k: v for k, v in env.items() if v is not None}
  out = subprocess.run([sys.executable, '-X', 'utf8', '-c', _PROBE.format(root=ROOT)],
                       env=env, capture_output=True, text=True, check=True).stdout
  return [line.split() for line in out.splitlines()]


def test_reexec_restarts_once_with_the_tunable_same_process_and_options():
  lines = _probe_lines()
  # The first 'started' survives the exec only because the restart flushes stdout.
  assert [line[0] for line in lines] == ['started', 'started', 'running']
  assert lines[0][1] == lines[1][1] == lines[2][1]            # same PID: execve
  assert lines[0][2] == 'None' and lines[2][2] == 'glibc.malloc.hugetlb=1'
  assert lines[2][3] == '1'                                   # -X utf8 kept


@pytest.mark.parametrize('extra_env', [{'SCORE_SDE_HUGEPAGES': 'off'},
                                       {'SCORE_SDE_HUGEPAGES_RESTARTED': '1'}])
def test_no_restart_when_opted_out_or_already_restarted(extra_env):
  assert [line[0] for line in _probe_lines(**extra_env)] == ['started', 'running']


def _fake_accelerator_plugin(tmp_path) -> str:
  """A folder for PYTHONPATH holding a `jax_plugins` module, as a GPU plugin installs one."""
  plugin = tmp_path / 'site' / 'jax_plugins' / 'xla_cuda_fake'
  plugin.mkdir(parents=True)
  (plugin / '__init__.py').write_text('raise ImportError("a stand-in, never imported")\n')
  return str(tmp_path / 'site')


@pytest.mark.parametrize('platforms', ['cuda', 'tpu', 'cpu,cuda'])
def test_no_restart_when_jax_would_not_run_on_the_cpu(platforms):
  """The tunable is for XLA:CPU's buffers: pointless, so skipped, on GPU / TPU."""
  lines = _probe_lines(JAX_PLATFORMS=platforms)
  assert [line[0] for line in lines] == ['started', 'running']
  assert lines[1][2] == 'None'


def test_no_restart_with_an_accelerator_plugin_unless_jax_platforms_is_cpu(tmp_path):
  site = _fake_accelerator_plugin(tmp_path)
  lines = _probe_lines(PYTHONPATH=site, JAX_PLATFORMS=None)
  assert [line[0] for line in lines] == ['started', 'running']
  # JAX_PLATFORMS=cpu keeps JAX on the CPU despite the plugin: the restart happens.
  lines = _probe_lines(PYTHONPATH=site, JAX_PLATFORMS='cpu')
  assert [line[0] for line in lines] == ['started', 'started', 'running']
  assert lines[2][2] == 'glibc.malloc.hugetlb=1'


_FAULTS = """
import resource, jax, jax.numpy as jnp
x = jnp.ones((64, 512, 512), jnp.float32)    # 64 MB; the program's temporaries ~200 MB
f = jax.jit(lambda x: jnp.sum(jnp.cumsum(jnp.sin(x), axis=0) * jnp.cos(x))).lower(x).compile()
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  f(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""


def _page_faults_per_call(env):
  out = subprocess.run([sys.executable, '-c', _FAULTS], env=env, capture_output=True,
                       text=True, check=True).stdout
  return float(out.split()[-1])


@NEEDS_MADVISE_THP
def test_tunable_cuts_the_page_faults_of_each_call():
  plain = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  without = _page_faults_per_call(plain)
  with_tunable = _page_faults_per_call(hugepages.environ_with_huge_pages(plain, True))
  # ~200 MB of temporaries in 4 KiB pages are ~50 k faults; in 2 MiB pages, ~100.
  assert without > 20_000
  assert with_tunable < without / 10
