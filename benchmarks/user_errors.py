"""User errors through the command line as a user meets them: for each case, the seconds to the
refusal, the exit status, the lines on stderr, the message, and whether the workdir was created.

Every case is a real run of `python -m flowdistill.main` (nothing patched): bad config keys and
values, a missing config file, missing data, a malformed or channels-first synthetic set, an
unwritable workdir and cache, a damaged lease, a workdir in use, and a `gs://` bucket that
cannot be reached (no network or no credentials on this machine).

python benchmarks/user_errors.py [--out benchmarks/out/user_errors.json]
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

from flowdistill.train import lease

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICK = '--config=configs/quickstart.py:moons'
DD = '--config=configs/dd_protocol.py:digits,cpu'


def _cases(tmp: pathlib.Path) -> list[tuple[str, list[str], dict]]:
  """(name, arguments after --workdir, environment) of each case; makes the files they need."""
  garbage = tmp / 'garbage.npz'
  garbage.write_bytes(b'not an npz')
  first = tmp / 'channels_first.npz'
  np.savez(first, x=np.zeros((10, 1, 8, 8), np.float32) - 1, label=np.arange(10))
  unit = tmp / 'unit_range.npz'
  np.savez(unit, x=np.random.default_rng(0).uniform(0, 1, (10, 8, 8, 1)).astype(np.float32),
           label=np.arange(10))
  (tmp / 'a_file').write_text('')
  return [
      ('negative steps', [QUICK, '--config.train.steps=-5'], {}),
      ('misspelt section', [QUICK, '--config.trian.steps=5'], {}),
      ('unknown preset field', ['--config=configs/quickstart.py:bogus=1'], {}),
      ('missing config file', ['--config=configs/no_such.py'], {}),
      ('unknown coupling', [QUICK, '--config.fm.coupling=exactt'], {}),
      ('missing MNIST folder', ['--config=configs/mnist.py', '--config.data.path=/nonexistent'],
       {}),
      ('synthetic set not an npz', [DD, f'--config.dd_eval.synsets=("{garbage}",)'], {}),
      ('channels-first set', [DD, f'--config.dd_eval.synsets=("{first}",)'], {}),
      ('set in [0, 1]', [DD, f'--config.dd_eval.synsets=("{unit}",)'], {}),
      ('cache under a file', [DD], {'FLOWDISTILL_CACHE': str(tmp / 'a_file' / 'cache')}),
      ('workdir under a file', [QUICK], {'WORKDIR': str(tmp / 'a_file' / 'run')}),
      ('workdir in use', [QUICK], {'HOLD': '1'}),
      ('unreachable bucket', [QUICK], {'WORKDIR': 'gs://flowdistill-no-such-bucket-4c1/run'}),
  ]


def _run(tmp: pathlib.Path, name: str, args: list[str], env: dict) -> dict:
  workdir = env.pop('WORKDIR', str(tmp / name.replace(' ', '_')))
  hold = env.pop('HOLD', None)
  full = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'FLOWDISTILL_CACHE': str(tmp / 'cache'), **env}
  full.pop('FLOWDISTILL_TRACEBACK', None)
  command = [sys.executable, '-m', 'flowdistill.main', f'--workdir={workdir}', *args]
  holder = lease.WorkdirLease(workdir) if hold else None
  if holder:
    holder.__enter__()
  start = time.perf_counter()
  try:
    done = subprocess.run(command, cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=300)
  finally:
    if holder:
      holder.__exit__(None, None, None)
  seconds = time.perf_counter() - start
  lines = done.stderr.strip().splitlines()
  return {'case': name, 'seconds': round(seconds, 1), 'status': done.returncode,
          'stderr_lines': len(lines), 'traceback': 'Traceback' in done.stderr,
          'workdir_created': not workdir.startswith('gs://') and os.path.exists(workdir)
                             and not hold,
          'message': lines[-1] if lines else ''}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'out' / 'user_errors.json'))
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as folder:
    tmp = pathlib.Path(folder)
    rows = [_run(tmp, *case) for case in _cases(tmp)]
  for row in rows:
    print(f"| {row['case']} | {row['seconds']} | {row['status']} | {row['stderr_lines']} | "
          f"{row['workdir_created']} | {row['message'][:160]} |")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
