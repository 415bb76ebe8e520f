"""The command line's user errors: one line on stderr, status 2, no traceback (unless asked with
`--traceback` or FLOWDISTILL_TRACEBACK=1), found before the workdir is made or any training;
an internal error keeps its traceback. Every run here stops before training."""

import os
import subprocess
import sys
import threading

import pytest

from flowdistill import files
from flowdistill.train import lease

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = '--config=configs/quickstart.py:moons'
DIGITS = '--config=configs/digits.py'


def _cli(tmp_path, *args, env=None, workdir=None, code=None):
  """Runs `python -m flowdistill.main --workdir=... *args` (or `code`, a script that starts the
  same main) with its cache in `tmp_path`; returns the finished process."""
  full = dict(os.environ, JAX_PLATFORMS='cpu', FLOWDISTILL_CACHE=str(tmp_path / 'cache'))
  full.pop('FLOWDISTILL_TRACEBACK', None)
  full.update(env or {})
  argv = [f'--workdir={workdir or tmp_path / "run"}', *args]
  command = [sys.executable, '-c', code, *argv] if code else [
      sys.executable, '-m', 'flowdistill.main', *argv]
  return subprocess.run(command, cwd=ROOT, env=full, capture_output=True, text=True, timeout=300)


def _one_line(result, *words):
  """Asserts status 2 and a stderr of one line holding `words`, without a traceback."""
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('Error: '), result.stderr[-3000:]
  for word in words:
    assert word in lines[0]


@pytest.mark.parametrize('args, words', [
    (['--config.train.steps=-5'], ['config.train.steps=-5 must be >= 1']),
    (['--config.trian.steps=5'], ['--config.trian.steps=5', 'Did you mean "train"']),
    (['--config.train.stepz=5'], ['--config.train.stepz=5', 'Did you mean "steps"']),
    (['--config=configs/quickstart.py:bogus=1'], ["unknown field 'bogus'"]),
    (['--config=configs/no_such_config.py'], ['no_such_config.py']),
    (['--config.data.source=mnist'], ['config.model.name must be "unet" or "dit"']),
])
def test_a_bad_config_is_one_line_and_creates_no_workdir(tmp_path, args, words):
  _one_line(_cli(tmp_path, QUICK, *args), *words)
  assert not (tmp_path / 'run').exists()


def test_a_malformed_flag_keeps_absls_short_message(tmp_path):
  result = _cli(tmp_path, QUICK, '--config.train.steps=abc')
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert len(result.stderr.strip().splitlines()) <= 2 and 'steps=abc' in result.stderr


@pytest.mark.parametrize('ask', [['--traceback'], []])
def test_the_traceback_of_a_user_error_is_shown_when_asked(tmp_path, ask):
  env = {} if ask else {'FLOWDISTILL_TRACEBACK': '1'}
  result = _cli(tmp_path, QUICK, '--config.train.steps=-5', *ask, env=env)
  assert result.returncode == 2
  assert 'Traceback' in result.stderr and 'config.train.steps=-5 must be >= 1' in result.stderr


def test_an_internal_error_keeps_its_traceback(tmp_path):
  code = ('import sys\n'
          'from absl import app\n'
          'from flowdistill import experiments, main\n'
          'def defect(*args, **kwargs):\n'
          '  raise RuntimeError("an internal defect")\n'
          'experiments.check_paths = defect\n'
          'app.run(main.main, argv=["main", *sys.argv[1:]], flags_parser=main._parse_flags)\n')
  result = _cli(tmp_path, QUICK, code=code)
  assert result.returncode == 1
  assert 'Traceback' in result.stderr and 'RuntimeError: an internal defect' in result.stderr


def _unwritable_by_mode(tmp_path):
  folder = tmp_path / 'locked'
  folder.mkdir()
  folder.chmod(0o500)
  if os.access(folder, os.W_OK):  # root: the mode does not bind
    folder.chmod(0o700)
    pytest.skip('running as root: a read-only folder stays writable')
  return folder / 'cache'


@pytest.mark.parametrize('make', [lambda t: t / 'a_file' / 'cache', _unwritable_by_mode],
                         ids=['under-a-file', 'read-only'])
def test_an_unwritable_cache_is_refused_before_any_work(tmp_path, make):
  (tmp_path / 'a_file').write_text('not a folder')
  cache = make(tmp_path)
  try:
    result = _cli(tmp_path, DIGITS, env={'FLOWDISTILL_CACHE': str(cache)})
  finally:
    if (tmp_path / 'locked').exists():
      (tmp_path / 'locked').chmod(0o700)
  _one_line(result, 'FLOWDISTILL_CACHE', str(cache), 'set FLOWDISTILL_CACHE to a writable')
  assert not (tmp_path / 'run').exists()


def test_an_unwritable_workdir_is_refused(tmp_path):
  (tmp_path / 'a_file').write_text('not a folder')
  result = _cli(tmp_path, QUICK, workdir=tmp_path / 'a_file' / 'run')
  _one_line(result, '--workdir', 'a_file/run', 'Not a directory')


def test_missing_data_is_one_line_before_the_workdir_exists(tmp_path):
  result = _cli(tmp_path, DIGITS, '--config.data.source=mnist',
                f'--config.data.path={tmp_path / "no_such_folder"}')
  _one_line(result, 'no_such_folder does not exist')
  assert not (tmp_path / 'run').exists()


def test_a_workdir_in_use_is_one_line(tmp_path):
  with lease.WorkdirLease(str(tmp_path / 'run')):
    result = _cli(tmp_path, QUICK)
  _one_line(result, 'is in use by another run')


def test_a_silent_bucket_is_refused_in_bounded_time_naming_network_and_credentials(tmp_path):
  code = ('import sys, time\n'
          'from absl import app\n'
          'from flowdistill import files, main\n'
          'files.PROBE_TIMEOUT_S = 1.0\n'
          'files._write_probe = lambda folder: time.sleep(600)\n'
          'app.run(main.main, argv=["main", *sys.argv[1:]], flags_parser=main._parse_flags)\n')
  result = _cli(tmp_path, QUICK, code=code, workdir='gs://flowdistill-unreachable/run')
  _one_line(result, 'gs://flowdistill-unreachable/run', 'did not answer within 1 s', 'network',
            'credentials')


def test_check_writable_times_out_on_a_hung_store_and_names_a_failing_bucket(monkeypatch):
  release = threading.Event()
  monkeypatch.setattr(files, '_write_probe', lambda folder: release.wait(60))
  with pytest.raises(files.Unreachable, match=r"'gs://b/run' did not answer within 0.2 s: .*"
                     'network.*credentials'):
    files.check_writable('gs://b/run', what='--workdir', fix='choose another', timeout_s=0.2)
  release.set()

  def refused(folder):
    raise OSError('403 Forbidden: the caller does not have storage.objects.create access')

  monkeypatch.setattr(files, '_write_probe', refused)
  with pytest.raises(files.NotWritable, match=r'\(403 Forbidden: .*\): check the network, the '
                     'credentials .* or choose another'):
    files.check_writable('gs://b/run', what='--workdir', fix='choose another')


def test_check_writable_creates_and_probes_a_local_folder(tmp_path):
  files.check_writable(tmp_path / 'new' / 'folder', what='--workdir', fix='choose another')
  assert (tmp_path / 'new' / 'folder').is_dir()
  assert not list((tmp_path / 'new' / 'folder').iterdir())
