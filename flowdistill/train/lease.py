"""One run per workdir: an exclusive lease file `WORKDIR/.lease`, held for the run's lifetime.

The lease is created with `O_CREAT | O_EXCL` (atomic on local disks and NFS), holds
`{host, pid, started, touched}` and is touched every `heartbeat_s` by a daemon thread. In an
object store (a gs:// workdir) there is no exclusive create: a run writes the lease when it is
absent, waits `OBJECT_STORE_SETTLE_S` and reads it back; of two runs that both wrote, only the
last writer finds itself there (the other is refused), and the heartbeat rewrites `touched`.
A lease left by a killed run is stale — on the same host its pid is gone, on another host (a
shared filesystem or a bucket) its heartbeat is older than `stale_after_s` — and is taken over;
a live one is refused with its holder and the fix. With several processes only process 0 takes
the lease; the others learn the outcome from it (`agree`).
"""

import contextlib
import json
import os
import socket
import threading
import time

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from flowdistill import files

LEASE_FILE = '.lease'
OBJECT_STORE_SETTLE_S = 2.0  # longer than a check-then-write takes, so the last writer is seen


class WorkdirInUseError(RuntimeError):
  """Another live run holds the workdir's lease."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # a live process of another user
    return True
  return True


class WorkdirLease:
  """`with WorkdirLease(workdir):` holds the lease or raises `WorkdirInUseError`.

  Args:
    workdir: the run's directory (created if missing).
    heartbeat_s: how often the holder touches the lease file.
    stale_after_s: a lease from another host untouched this long belongs to a dead run.
  """

  def __init__(self, workdir: str, *, heartbeat_s: float = 10.0, stale_after_s: float = 120.0):
    self.url = files.is_url(workdir)
    self.path = files.join(workdir, LEASE_FILE)
    self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
    self.holder = {'host': socket.gethostname(), 'pid': os.getpid(),
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
        return holder is not None and all(holder[k] == v for k, v in self.holder.items())
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    except OSError as e:
      raise PermissionError(f'Cannot create the workdir lease {self.path!r} ({e.strerror or e});'
                            ' choose a writable --workdir.') from e
    with os.fdopen(fd, 'w') as f:
      json.dump(self.holder, f)
    return True

  def _write_touched(self) -> None:
    """The lease in an object store, where the heartbeat's time is a field (no mtime)."""
    files.write_json(self.path, dict(self.holder, touched=time.time()))

  def _read(self) -> dict | None:
    try:
      holder = files.read_json(self.path)
      touched = holder['touched'] if self.url else os.path.getmtime(self.path)
      return dict(holder, age_s=time.time() - touched)
    except (FileNotFoundError, json.JSONDecodeError):  # released, or being written right now
      return None

  def _stale(self, holder: dict) -> bool:
    if holder['host'] == self.holder['host']:
      return not _pid_alive(int(holder['pid']))
    return holder['age_s'] > self.stale_after_s

  def acquire(self) -> None:
    for _ in range(3):  # a stale lease is replaced; a race with another taker is retried
      if self._create():
        break
      holder = self._read()
      if holder is None:
        time.sleep(0.2)
        continue
      if not self._stale(holder):
        raise WorkdirInUseError(
            f'{os.path.dirname(self.path)} is in use by another run: pid {holder["pid"]} on '
            f'{holder["host"]}, started {holder["started"]} (lease {self.path}, touched '
            f'{holder["age_s"]:.0f} s ago). Use another --workdir, or wait for that run to end.')
      try:  # rename first, so that of two takers only one removes the stale file
        stale = epath.Path(f'{self.path}.stale.{os.getpid()}')
        epath.Path(self.path).rename(stale)
        stale.unlink()
      except FileNotFoundError:
        pass
    else:
      raise WorkdirInUseError(f'Could not take the lease {self.path}: it changed hands three '
                              'times; another run is starting on this workdir.')
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
    if holder is not None and holder['pid'] == self.holder['pid'] and (
        holder['host'] == self.holder['host']):
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
