"""The README's library example runs as written, and its two commands stay the documented ones."""

import pathlib
import re

README = (pathlib.Path(__file__).parent.parent / 'README.md').read_text()


def test_library_example_runs():
  code = re.search(r'```python\n(.*?)```', README, re.S).group(1)
  namespace = {}
  exec(compile(code, 'README.md', 'exec'), namespace)  # noqa: S102
  assert namespace['x'].shape == (1000, 2) and namespace['logp'].shape == (1000,)
  assert namespace['info']['nfe'] > 0


def test_readme_opens_with_the_install_and_test_commands():
  first_block = re.search(r'```bash\n(.*?)```', README, re.S).group(1)
  assert 'pip install -r requirements.txt -e .' in first_block
  assert 'python -m flowdistill.main --config=configs/quickstart.py' in first_block
  ci = (pathlib.Path(__file__).parent.parent / '.ci' / 'run').read_text()
  test_command = 'python -m pytest -q tests'
  assert test_command in first_block and ci.strip().endswith(test_command)
