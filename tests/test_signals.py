"""Stop signals outside training: recorded, acted on at safe points (`flowdistill.train.stop`).

Through the command line, SIGTERM and SIGINT at a few points of dataset-distillation evaluation
(during the first XLA compilation, where a handler that raised used to crash the interpreter at
exit, and just after a cell is stored) and of SFM distillation (a `fitting.fit` with a state
file): no crash, one message, training's exit status (0 / 130), the stored cells kept byte for
byte, and a rerun that ends with the results of an uninterrupted run.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

from flowdistill import fitting
from flowdistill.train import stop

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT_S = 300
DD_ARGS = ('--config=configs/dd_protocol.py:digits,cpu', '--config.dd.runs=1',
           '--config.dd.epochs=(12,)', '--config.dd.width=8', '--config.dd.epochs_per_call=1',
           '--config.dd.ipcs=(1,)', '--config.dd_eval.baselines=("random",)',
           '--config.dd_eval.whole_data=False')
SFM_ARGS = ('--config=configs/sfm.py:digits,cpu', '--config.dd.ipcs=(1,)',
            '--config.sfm.ssl.steps=3', '--config.sfm.ssl.batch_size=16',
            '--config.sfm.ssl.widths=(8,16)', '--config.sfm.cross_widths=(8,12)',
            '--config.sfm.probe.epochs=2', '--config.sfm.probe.runs=1',
            '--config.sfm.golden_epochs=1', '--config.sfm.steps=1000',
            '--config.sfm.snapshot_every=100', '--config.sfm.sets=("random","sfm")',
            '--config.sfm.probes=("normal",)')


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """The children's environment: one device, and a data cache and an XLA compilation cache of
  this module alone (so that the first run compiles, and the others reuse it)."""
  base = tmp_path_factory.mktemp('signals')
  return dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='', FLOWDISTILL_DISTRIBUTED='0',
              FLOWDISTILL_CACHE=str(base / 'cache'), JAX_COMPILATION_CACHE_DIR=str(base / 'xla'),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')


@pytest.fixture(scope='module')
def synset(tmp_path_factory):
  """A saved set of one digits image per class, for a second cell of the same shapes."""
  digits = load_digits()
  index = [int(np.flatnonzero(digits.target == c)[0]) for c in range(10)]
  path = tmp_path_factory.mktemp('synset') / 'first.npz'
  np.savez(path, x=(digits.images[index] / 8 - 1)[..., None].astype(np.float32),
           label=np.arange(10))
  return path


def _command(args, workdir) -> list[str]:
  return [sys.executable, '-m', 'flowdistill.main', *args, f'--workdir={workdir}']


def _run(args, workdir, env) -> str:
  """Runs the command to its end; returns its stderr."""
  done = subprocess.run(_command(args, workdir), env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=TIMEOUT_S, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stderr


def _stop(args, workdir, env, signum, ready, delay: float = 0.0) -> str:
  """Starts the command, sends `signum` `delay` seconds after `ready()` holds, and returns the
  stderr of the stopped command once it has checked how it ended."""
  log = workdir.parent / f'{workdir.name}.stderr'
  with open(log, 'w') as err:
    proc = subprocess.Popen(_command(args, workdir), env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + TIMEOUT_S
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
      time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signum)
    proc.wait(TIMEOUT_S)
  stderr = log.read_text()
  name = signal.Signals(signum).name
  assert proc.returncode == (130 if signum == signal.SIGINT else 0), stderr[-3000:]
  assert 'Fatal Python error' not in stderr and 'Traceback' not in stderr, stderr[-3000:]
  assert f'{name} outside training: stopped ' in stderr, stderr[-3000:]
  assert 'Rerun the same command to resume.' in stderr
  return stderr


def _cells(workdir) -> dict:
  return {p.name: p.read_bytes() for p in sorted((workdir / 'cells').glob('*.json'))}


def _deterministic(value):
  """`value` (a cell) without its timings and memory figures."""
  if isinstance(value, dict):
    return {k: _deterministic(v) for k, v in value.items()
            if 'seconds' not in k and 'rss' not in k}
  return value


def _same_results(workdir, reference) -> None:
  ours, theirs = _cells(workdir), _cells(reference)
  assert ours.keys() == theirs.keys()
  for name in ours:
    assert _deterministic(json.loads(ours[name])) == _deterministic(json.loads(theirs[name]))


def _logged(workdir, text):
  """For `_stop`: whether the command's stderr holds `text` yet."""
  log = workdir.parent / f'{workdir.name}.stderr'
  return lambda: log.exists() and text in log.read_text(errors='replace')


def _stored(workdir, cell):
  """For `_stop`: whether `cell` (a file name) is stored yet."""
  return (workdir / 'cells' / cell).exists


def test_a_stop_signal_is_recorded_and_raised_at_the_next_check():
  stop.check()  # outside `watch`: nothing to act on
  for signum, code in ((signal.SIGTERM, 0), (signal.SIGHUP, 0), (signal.SIGINT, 130)):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    with pytest.raises(stop.Stopped) as stopped, stop.watch():
      signal.raise_signal(signum)
      assert stop.requested() == signum
      stop.check(where='here')
    assert stopped.value.code == code and stopped.value.where == 'here'
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert stop.requested() is None


def test_fit_stops_after_the_step_the_signal_came_in_and_resumes_bit_exact(tmp_path):
  target, state_path = jnp.arange(4.0), str(tmp_path / 'fit.npz')
  signalled = []

  def loss_fn(params, i):
    if not signalled:  # while the step is traced, before it is compiled
      signalled.append(True)
      signal.raise_signal(signal.SIGTERM)
    return jnp.sum((params - target) ** 2) * (1.0 + i)

  optimizer = optax.adam(0.1)
  update = fitting.make_update(loss_fn, optimizer)
  start = jnp.zeros(4)

  def run(path=None):
    return fitting.fit(update, start, optimizer.init(start), steps=7, progress_every=5,
                       state_path=path)

  with pytest.raises(stop.Stopped) as stopped, stop.watch():
    run(state_path)
  assert stopped.value.code == 0 and stopped.value.where.startswith('at fitting step 1 of 7')
  assert int(np.load(state_path)['step']) == 1
  resumed, history = run(state_path)
  full, full_history = run()
  assert np.asarray(resumed).tobytes() == np.asarray(full).tobytes()
  assert history['loss'].tobytes() == full_history['loss'].tobytes()


def test_a_second_ctrl_c_ends_the_process_at_once_without_a_crash():
  child = ('import signal\nfrom flowdistill.train import stop\nwith stop.watch():\n'
           '  signal.raise_signal(signal.SIGINT)\n  signal.raise_signal(signal.SIGINT)\n'
           '  print("not stopped")\n')
  done = subprocess.run([sys.executable, '-c', child], cwd=ROOT, capture_output=True, text=True,
                        timeout=TIMEOUT_S, check=False)
  assert done.returncode == 130 and 'not stopped' not in done.stdout
  assert 'Second SIGINT' in done.stderr and 'Fatal Python error' not in done.stderr


@pytest.mark.slow
def test_dd_eval_stops_cleanly_keeps_its_cells_and_resumes_to_the_same_results(tmp_path, env,
                                                                             synset):
  args = DD_ARGS + (f'--config.dd_eval.synsets=("{synset}",)',)
  stops = [  # (signal, when, delay); the first run compiles, so its signal comes in XLA work
      (signal.SIGTERM, lambda w: _logged(w, 'Config:'), 3.0),
      (signal.SIGINT, lambda w: _stored(w, 'first_ipc1.json'), 0.0),
      (signal.SIGTERM, lambda w: (w / 'sets' / 'random_ipc1.npz').exists, 0.0),
  ]
  for k, (signum, when, delay) in enumerate(stops):
    workdir = tmp_path / f'stopped{k}'
    _stop(args, workdir, env, signum, when(workdir), delay)
    kept = _cells(workdir)
    _run(args, workdir, env)
    assert {name: _cells(workdir)[name] for name in kept} == kept
  _run(args, tmp_path / 'reference', env)
  for k in range(len(stops)):
    _same_results(tmp_path / f'stopped{k}', tmp_path / 'reference')


@pytest.mark.slow
def test_sfm_distillation_stops_with_its_state_saved_and_resumes_bit_exact(tmp_path, env):
  workdir, reference = tmp_path / 'stopped', tmp_path / 'reference'
  partial = workdir / 'snapshots' / 'sfm_ipc1.partial.npz'
  stderr = _stop(SFM_ARGS, workdir, env, signal.SIGINT, partial.exists)
  if 'at fitting step ' in stderr:  # else it came after the distillation
    step = int(stderr.split('at fitting step ', 1)[1].split()[0])
    assert int(np.load(workdir / 'snapshots' / 'sfm_ipc1.state.npz')['step']) == step
  kept = _cells(workdir)
  assert 'random_ipc1.json' in kept
  _run(SFM_ARGS, workdir, env)
  assert {name: _cells(workdir)[name] for name in kept} == kept
  _run(SFM_ARGS, reference, env)
  _same_results(workdir, reference)
  for name in ('sets/sfm_ipc1.npz', 'snapshots/sfm_ipc1.npz'):
    ours, theirs = np.load(workdir / name), np.load(reference / name)
    for key in ('x', 'images', 'steps'):
      if key in theirs:
        assert ours[key].tobytes() == theirs[key].tobytes(), (name, key)

