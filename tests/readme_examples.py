"""The README's Python examples as text, so tests run them as written (with a test's
workdir for the README's path and fewer samples)."""
import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')


def python_blocks(section: str) -> list[str]:
  """The ```python blocks under the README heading '## <section>' (up to the next '## ')."""
  with open(README) as f:
    text = f.read()
  match = re.search(rf'^## {re.escape(section)}\n(.*?)(?=^## |\Z)', text, re.M | re.S)
  assert match, f'README has no section "## {section}"'
  return re.findall(r'^```python\n(.*?)^```', match.group(1), re.M | re.S)


def run_example(code: str, replacements: dict[str, str], namespace: dict | None = None) -> dict:
  """Executes `code` with each replacement made (each must occur); returns its namespace."""
  for old, new in replacements.items():
    assert old in code, f'the README example no longer contains {old!r}:\n{code}'
    code = code.replace(old, new)
  namespace = {} if namespace is None else namespace
  exec(compile(code, README, 'exec'), namespace)  # noqa: S102 -- our own README's example
  return namespace
