"""One run per workdir: the lease refuses a live holder, takes over a dead one's (a damaged
lease file or a restarted container's too), and the CLI refuses a second run within seconds
while the first finishes as if alone."""

import json
import logging
import os
import pathlib
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from flowdistill import errors
from flowdistill.train import lease
from flowdistill.train.teacher import load_trained

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_a_live_holder_is_refused_by_name_and_the_lease_goes_with_it(tmp_path):
  with lease.hold(str(tmp_path)) as held:
    before = (tmp_path / '.lease').read_bytes()
    with pytest.raises(lease.WorkdirInUseError,
                       match=rf'in use by another run: pid {os.getpid()} on .*Use another '
                             r'--workdir, or wait'):
      lease.WorkdirLease(str(tmp_path)).acquire()
    assert (tmp_path / '.lease').read_bytes() == before and held.path.endswith('.lease')
  assert not (tmp_path / '.lease').exists()
  with lease.hold(str(tmp_path)):  # free again
    pass


def test_an_unwritable_workdir_is_refused_with_the_fix(tmp_path):
  (tmp_path / 'file').write_text('not a folder')
  with pytest.raises(PermissionError, match=r"lease '.*file/run/\.lease'.*choose a writable "
                                            '--workdir'):
    with lease.hold(str(tmp_path / 'file' / 'run')):
      pass
  assert (tmp_path / 'file').read_text() == 'not a folder'


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path):
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  holder = lease.WorkdirLease(str(tmp_path)).holder
  (tmp_path / '.lease').write_text(json.dumps(dict(holder, pid=int(dead.stdout))))
  with lease.hold(str(tmp_path)):
    assert json.loads((tmp_path / '.lease').read_text())['pid'] == os.getpid()


def test_another_hosts_lease_is_live_until_its_heartbeat_is_old(tmp_path):
  (tmp_path / '.lease').write_text(json.dumps({'host': 'worker-7', 'pid': 1,
                                               'started': 'then'}))
  with pytest.raises(lease.WorkdirInUseError, match='pid 1 on worker-7, started then'):
    lease.WorkdirLease(str(tmp_path), stale_after_s=60).acquire()
  old = time.time() - 120
  os.utime(tmp_path / '.lease', (old, old))
  taker = lease.WorkdirLease(str(tmp_path), stale_after_s=60)
  taker.acquire()
  assert json.loads((tmp_path / '.lease').read_text())['host'] == taker.holder['host']
  taker.release()


DAMAGED = {'empty': b'', 'garbage': b'\x00\xffnot json', 'no fields': b'{}',
           'partial': b'{"host": "worker-7", "pi', 'not an object': b'[1, 2]',
           'pid 0': b'{"host": "worker-7", "pid": 0}'}


def _age(path, seconds):
  then = time.time() - seconds
  os.utime(path, (then, then))


@pytest.mark.parametrize('content', DAMAGED.values(), ids=DAMAGED.keys())
def test_an_old_damaged_lease_is_taken_over_with_a_warning(tmp_path, caplog, content):
  (tmp_path / '.lease').write_bytes(content)
  _age(tmp_path / '.lease', 120)
  with caplog.at_level(logging.WARNING, logger=lease.__name__):
    with lease.hold(str(tmp_path), stale_after_s=60):
      assert json.loads((tmp_path / '.lease').read_text())['pid'] == os.getpid()
  assert f'Taking over the workdir lease {tmp_path / ".lease"}: it names no run' in caplog.text


@pytest.mark.parametrize('content', DAMAGED.values(), ids=DAMAGED.keys())
def test_a_fresh_damaged_lease_is_refused_until_it_is_old(tmp_path, monkeypatch, content):
  monkeypatch.setattr(lease, 'WRITE_GRACE_S', 0.05)
  (tmp_path / '.lease').write_bytes(content)
  with pytest.raises(lease.WorkdirInUseError,
                     match=rf'its lease {tmp_path / ".lease"} names no run .* once unchanged '
                           r'for 60 s\. Use another --workdir, wait, or delete the file'):
    lease.WorkdirLease(str(tmp_path), stale_after_s=60).acquire()
  assert (tmp_path / '.lease').read_bytes() == content
  _age(tmp_path / '.lease', 61)
  with lease.hold(str(tmp_path), stale_after_s=60):
    assert json.loads((tmp_path / '.lease').read_text())['pid'] == os.getpid()


def test_a_lease_being_written_is_read_once_complete(tmp_path):
  (tmp_path / '.lease').write_bytes(b'')  # created, not yet written
  writer = threading.Timer(0.2, (tmp_path / '.lease').write_text,
                           [json.dumps({'host': 'worker-7', 'pid': 5, 'started': 'now'})])
  writer.start()
  with pytest.raises(lease.WorkdirInUseError, match='in use by another run: pid 5 on worker-7'):
    lease.WorkdirLease(str(tmp_path)).acquire()
  writer.join()


@pytest.mark.parametrize('recorded', [{'pid_start': 'another-boot/123'}, {}],
                         ids=['another start', 'an earlier version'])
def test_a_restarted_container_takes_over_the_lease_of_its_own_pid(tmp_path, caplog, recorded):
  holder = lease.WorkdirLease(str(tmp_path)).holder
  left = {k: v for k, v in holder.items() if k != 'pid_start'}
  (tmp_path / '.lease').write_text(json.dumps(dict(left, **recorded)))
  with caplog.at_level(logging.WARNING, logger=lease.__name__):
    with lease.hold(str(tmp_path)):
      taken = json.loads((tmp_path / '.lease').read_text())
      assert [taken[k] for k in ('pid', 'pid_start')] == [holder['pid'], holder['pid_start']]
  assert f'{tmp_path / ".lease"} of pid {os.getpid()}' in caplog.text


def test_this_process_does_not_take_its_own_lease_twice(tmp_path):
  held = lease.WorkdirLease(str(tmp_path))
  (tmp_path / '.lease').write_text(json.dumps(held.holder))
  with pytest.raises(lease.WorkdirInUseError, match=rf'pid {os.getpid()} on') as refused:
    lease.WorkdirLease(str(tmp_path)).acquire()
  assert isinstance(refused.value, errors.UserError)
  assert json.loads((tmp_path / '.lease').read_text()) == held.holder


@pytest.mark.skipif(lease._process_start(os.getpid()) is None, reason='no /proc')
def test_a_live_pid_is_its_holder_only_if_it_started_then(tmp_path):
  parent = os.getppid()  # alive for the whole test
  live = {'host': lease.WorkdirLease(str(tmp_path)).holder['host'], 'pid': parent,
          'pid_start': lease._process_start(parent), 'started': 'then'}
  (tmp_path / '.lease').write_text(json.dumps(live))
  with pytest.raises(lease.WorkdirInUseError, match=f'pid {parent} on'):
    lease.WorkdirLease(str(tmp_path)).acquire()
  (tmp_path / '.lease').write_text(json.dumps(dict(live, pid_start='another-boot/1')))
  with lease.hold(str(tmp_path)):  # the pid was reused
    assert json.loads((tmp_path / '.lease').read_text())['pid'] == os.getpid()


def test_the_holder_keeps_its_lease_fresh(tmp_path):
  held = lease.WorkdirLease(str(tmp_path), heartbeat_s=0.05)
  held.acquire()
  old = time.time() - 1000
  os.utime(held.path, (old, old))
  time.sleep(0.3)
  assert time.time() - os.path.getmtime(held.path) < 5
  held.release()


def _cli(workdir, *extra):
  return [sys.executable, '-m', 'flowdistill.main', '--config=configs/quickstart.py',
          f'--workdir={workdir}', '--config.train.steps=60', '--config.train.ckpt_every=30',
          '--config.eval.num_samples=200', '--config.eval.euler_steps=(1,)',
          '--config.eval.nll_samples=50', '--config.eval.plot=False', *extra]


def _params_bytes(workdir):
  trained = load_trained(str(workdir))
  return [np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(trained.params)]


def test_a_second_run_on_the_workdir_is_refused_fast_and_the_first_is_untouched(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  first = subprocess.Popen(_cli(tmp_path / 'shared'), cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 120
  while not (tmp_path / 'shared' / '.lease').exists():
    assert time.time() < deadline and first.poll() is None, first.communicate()[0][-3000:]
    time.sleep(0.05)
  second = subprocess.run(_cli(tmp_path / 'shared', '--config.optim.lr=0.01'), cwd=ROOT,
                          env=env, capture_output=True, text=True)
  assert second.returncode != 0 and 'is in use by another run: pid' in second.stderr
  # (how fast the refusal comes is measured in benchmarks/fault_injection.py, not here)
  assert first.wait(timeout=600) == 0, first.communicate()[0][-3000:]
  alone = subprocess.run(_cli(tmp_path / 'alone'), cwd=ROOT, env=env, capture_output=True,
                         text=True)
  assert alone.returncode == 0, alone.stderr[-3000:]
  assert _params_bytes(tmp_path / 'shared') == _params_bytes(tmp_path / 'alone')
  assert not (tmp_path / 'shared' / '.lease').exists()
