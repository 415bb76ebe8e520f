"""One run per workdir: an exclusive lease file `WORKDIR/.lease`, held for the run's lifetime.

The lease is created with `O_CREAT | O_EXCL` (atomic on local disks and NFS), holds
`{host, pid, pid_start, started, touched}` and is touched every `heartbeat_s` by a daemon
thread; `pid_start` is when the holder's process started as its kernel counts it (boot id and
clock ticks, from `/proc`; None where there is no `/proc`). In an object store (a gs:// workdir)
there is no exclusive create: a run writes the lease when it is absent, waits
`OBJECT_STORE_SETTLE_S` and reads it back; of two runs that both wrote, only the last writer
finds itself there (the other is refused), and the heartbeat rewrites `touched`.

A lease left by a killed run is stale and is taken over, with a warning naming the file:
- on the same host, when its pid is gone or is now another process (a different start: a
  restarted container runs as pid 1 again, and pids are reused);
- on another host (a shared filesystem or a bucket), when its heartbeat is older than
  `stale_after_s`;
- a lease that cannot be read (empty, garbage, partial JSON, fields missing) names no holder and
  is judged by the age of the file alone: one that has just changed gets `WRITE_GRACE_S` for its
  writer to finish; one unchanged for `stale_after_s` is stale; in between it is refused, with
  its age and that window, since a live run's heartbeat keeps its file fresh.
A live lease is refused with its holder and the fix. With several processes only process 0
takes the lease; the others learn the outcome from it (`hold`).
"""

import contextlib
import json
import logging
import os
import socket
import threading
import time

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from flowdistill import errors, files

LEASE_FILE = '.lease'
OBJECT_STORE_SETTLE_S = 2.0  # longer than a check-then-write takes, so the last writer is seen
WRITE_GRACE_S = 1.0  # longer than a run takes to write its lease after creating the file

_log = logging.getLogger(__name__)


class WorkdirInUseError(errors.UserError, RuntimeError):
  """Another live run holds the workdir's lease."""


class WorkdirNotWritable(errors.UserError, PermissionError):
  """The workdir's lease cannot be created there."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # a live process of another user
    return True
  return True


def _process_start(pid: int) -> str | None:
  """When process `pid` started, as `'<boot id>/<clock ticks since boot>'`; None where /proc
  cannot tell (no such process, not Linux)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      stat = f.read()
    with open('/proc/sys/kernel/random/boot_id') as f:
      boot = f.read().strip()
  except OSError:
    return None
  return f'{boot}/{stat.rsplit(")", 1)[1].split()[19]}'  # field 22; the name may hold ')'


def _parse(lease, mtime: float | None) -> dict:
  """The holder named by a lease's JSON, with `age_s` since its heartbeat (`mtime`, or the
  `touched` field where there is no mtime); raises on anything that is not such a lease."""
  pid = int(lease['pid'])
  if not 0 < pid < 2**31:  # os.kill would reach a process group, or overflow
    raise ValueError(pid)
  touched = lease['touched'] if mtime is None else mtime
  return {'host': lease['host'], 'pid': pid,
          'pid_start': lease.get('pid_start'),  # absent in leases of earlier versions
          'started': lease.get('started', 'at an unknown time'), 'age_s': time.time() - touched}


def _unreadable(holder: dict | None) -> bool:
  return holder is not None and 'pid' not in holder


class WorkdirLease:
  """`with WorkdirLease(workdir):` holds the lease or raises `WorkdirInUseError`.

  Args:
    workdir: the run's directory (created if missing).
    heartbeat_s: how often the holder touches the lease file.
    stale_after_s: a lease from another host, or an unreadable one, untouched this long belongs
      to a dead run.
  """

  def __init__(self, workdir: str, *, heartbeat_s: float = 10.0, stale_after_s: float = 120.0):
    self.url = files.is_url(workdir)
    self.path = files.join(workdir, LEASE_FILE)
    self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
    self.holder = {'host': socket.gethostname(), 'pid': os.getpid(),
                   'pid_start': _process_start(os.getpid()),
                   'started': time.strftime('%Y-%m-%d %H:%M:%S %Z')}
    self._stop = threading.Event()
    self._thread = None

  def _create(self) -> bool:
    try:
      files.makedirs(os.path.dirname(self.path))
      if self.url:  # no exclusive create in an object store: write, wait, see who won
        if files.exists(self.path):
          return False
        self._write_touched()
        time.sleep(OBJECT_STORE_SETTLE_S)
        holder = self._read()
        return holder is not None and all(holder.get(k) == v for k, v in self.holder.items())
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    except OSError as e:
      raise WorkdirNotWritable(f'Cannot create the workdir lease {self.path!r} '
                               f'({e.strerror or e}); choose a writable --workdir.') from e
    with os.fdopen(fd, 'w') as f:
      json.dump(self.holder, f)
    return True

  def _write_touched(self) -> None:
    """The lease in an object store, where the heartbeat's time is a field (no mtime)."""
    files.write_json(self.path, dict(self.holder, touched=time.time()))

  def _mtime(self) -> float:
    return epath.Path(self.path).stat().mtime if self.url else os.path.getmtime(self.path)

  def _read(self) -> dict | None:
    """The holder, with `age_s` since its heartbeat; only `age_s` (since the file changed) when
    the file names no holder; None when there is no lease."""
    try:
      text = files.read_bytes(self.path)
      mtime = self._mtime()
    except FileNotFoundError:  # released
      return None
    try:
      return _parse(json.loads(text), None if self.url else mtime)
    except (ValueError, KeyError, TypeError, OverflowError):  # damaged, or being written
      return {'age_s': time.time() - mtime}

  def _read_settled(self) -> dict | None:
    """`_read`, giving a just-changed unreadable lease `WRITE_GRACE_S` to be completed."""
    deadline = time.monotonic() + WRITE_GRACE_S
    holder = self._read()
    while (_unreadable(holder) and holder['age_s'] < WRITE_GRACE_S
           and time.monotonic() < deadline):
      time.sleep(0.1)
      holder = self._read()
    return holder

  def _stale(self, holder: dict) -> bool:
    if _unreadable(holder) or holder['host'] != self.holder['host']:
      return holder['age_s'] > self.stale_after_s
    pid, recorded = holder['pid'], holder['pid_start']
    if pid == self.holder['pid']:  # this process, or an earlier one with its pid (a container)
      return recorded != self.holder['pid_start']
    if not _pid_alive(pid):
      return True
    started = _process_start(pid)
    return None not in (recorded, started) and recorded != started  # the pid was reused

  def _refusal(self, holder: dict) -> str:
    workdir = os.path.dirname(self.path)
    if _unreadable(holder):
      return (f'{workdir} may be in use by another run: its lease {self.path} names no run and '
              f'changed {holder["age_s"]:.0f} s ago; it counts as left by a dead run once '
              f'unchanged for {self.stale_after_s:.0f} s. Use another --workdir, wait, or delete '
              'the file if no run uses this workdir.')
    return (f'{workdir} is in use by another run: pid {holder["pid"]} on {holder["host"]}, '
            f'started {holder["started"]} (lease {self.path}, touched {holder["age_s"]:.0f} s '
            'ago). Use another --workdir, or wait for that run to end.')

  def _take_over(self, holder: dict) -> None:
    if _unreadable(holder):
      _log.warning('Taking over the workdir lease %s: it names no run and has not changed for '
                   '%.0f s.', self.path, holder['age_s'])
    else:
      _log.warning('Taking over the workdir lease %s of pid %s on %s, started %s: that run has '
                   'ended.', self.path, holder['pid'], holder['host'], holder['started'])
    try:  # rename first, so that of two takers only one removes the stale file
      stale = epath.Path(f'{self.path}.stale.{os.getpid()}')
      epath.Path(self.path).rename(stale)
      stale.unlink()
    except FileNotFoundError:
      pass

  def acquire(self) -> None:
    for _ in range(3):  # a stale lease is replaced; a race with another taker is retried
      if self._create():
        break
      holder = self._read_settled()
      if holder is None:
        time.sleep(0.2)
        continue
      if not self._stale(holder):
        raise WorkdirInUseError(self._refusal(holder))
      self._take_over(holder)
    else:
      raise WorkdirInUseError(f'Could not take the lease {self.path}: it changed hands three '
                              'times; another run is starting on this workdir. Use another '
                              '--workdir, or try again once that run has started.')
    self._thread = threading.Thread(target=self._beat, daemon=True, name='workdir-lease')
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        if self.url:
          self._write_touched()
        else:
          os.utime(self.path)
      except FileNotFoundError:
        return

  def release(self) -> None:
    self._stop.set()
    holder = self._read()
    if holder is not None and all(holder.get(k) == self.holder[k]
                                  for k in ('host', 'pid', 'pid_start')):
      files.remove(self.path)

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


@contextlib.contextmanager
def hold(workdir: str, **kwargs):
  """Holds `workdir`'s lease for the block: taken by process 0, its outcome shared with every
  process, so that all of them refuse a workdir in use (`WorkdirInUseError`)."""
  lease, error = None, None
  if jax.process_index() == 0:
    lease = WorkdirLease(workdir, **kwargs)
    try:
      lease.acquire()
    except (WorkdirInUseError, PermissionError) as e:
      lease, error = None, e
  if jax.process_count() > 1:
    refused = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if refused and error is None:
      error = WorkdirInUseError('Process 0 could not take the workdir lease of '
                                f'{workdir}; its log says why.')
  if error is not None:
    raise error
  try:
    yield lease
  finally:
    if lease is not None:
      lease.release()
