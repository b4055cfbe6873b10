"""score_sde/compile_cache.py: where the launcher keeps compiled programs, and that a
second process reuses them."""
import os
import subprocess
import sys

from score_sde import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cache_dir_precedence():
  assert compile_cache.cache_dir('/a/b', {'JAX_COMPILATION_CACHE_DIR': '/c'}) == '/a/b'
  assert compile_cache.cache_dir(None, {'JAX_COMPILATION_CACHE_DIR': '/c'}) == '/c'
  assert compile_cache.cache_dir(None, {}) == os.path.expanduser('~/.cache/score_sde/xla')
  assert compile_cache.cache_dir('none', {'JAX_COMPILATION_CACHE_DIR': '/c'}) is None


_PROBE = """
import sys, jax, jax.numpy as jnp
from score_sde import compile_cache
compile_cache.MIN_COMPILE_SECONDS = 0.0
compile_cache.enable(sys.argv[1])
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event.endswith('cache_hits') else None)
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
print(float(f(jnp.ones((64, 64)))), len(hits))
"""


def test_a_second_process_loads_the_compiled_program(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  runs = [subprocess.run([sys.executable, '-c', _PROBE, str(tmp_path)], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
          for _ in range(2)]
  assert runs[0][0] == runs[1][0]                      # same value
  assert runs[0][1] == '0' and int(runs[1][1]) >= 1    # compiled, then loaded
  assert any(os.scandir(tmp_path))
