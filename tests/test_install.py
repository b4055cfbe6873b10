"""The project installs as a package (pyproject.toml; requirements.txt installs it editable):
`import score_sde` works from any folder, not only from the repository root."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_score_sde_imports_outside_the_repository(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  out = subprocess.run([sys.executable, '-c', 'import score_sde, score_sde.api; '
                        'print(score_sde.__file__)'], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
  assert out.returncode == 0, ('score_sde is not installed in this environment: run '
                               f'`pip install -r requirements.txt` (or `pip install -e .`).\n'
                               f'{out.stderr[-500:]}')
  assert os.path.dirname(out.stdout.strip().splitlines()[-1]) == os.path.join(ROOT, 'score_sde')
