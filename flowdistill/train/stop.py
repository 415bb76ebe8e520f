"""Stop signals outside the training loop: recorded when they come, acted on at safe points.

A Python signal handler runs in the main thread, between bytecodes, wherever that thread is;
JAX's wait for an XLA compilation polls for signals, so it runs there too. An exception raised
from the handler abandons the compilation, which goes on in XLA's thread pool; the interpreter
then exits, destroys the PjRt client under it and dies of a segmentation fault. So the handler
of `watch` only records the signal, and the long loops (cells, evaluation runs and epochs,
fitting steps) call `check` where no XLA work is half done: it waits for the arrays they name
and raises `Stopped`, after they have saved what they can resume from.

The signals and exit statuses are the training loop's (`loop.Preempted`). A second SIGINT ends
the process at once, as in training, but with `os._exit` (no interpreter shutdown, for the
reason above); files are written atomically, so what was saved is kept. Outside `watch` (the
library used from Python), `check` never raises.
"""

import contextlib
import os
import signal
import threading

import jax

from flowdistill.train import parallel

_received: list[int] = []  # the first stop signal within `watch`


class Stopped(SystemExit):
  """A stop signal came outside training and was acted on at a safe point (`where`, a phrase
  for the message); the finished work is saved, and rerunning the command resumes.

  A `SystemExit` with `loop.Preempted`'s status: 130 after SIGINT, 0 after SIGTERM or SIGHUP.
  """

  def __init__(self, signum: int, where: str = ''):
    super().__init__(130 if signum == signal.SIGINT else 0)
    self.signum, self.where = signum, where


def requested() -> int | None:
  """The stop signal received within `watch`, or None."""
  return _received[0] if _received else None


def check(*pending, where: str = '') -> None:
  """Raises `Stopped` if a stop signal was received, once the arrays of `pending` (pytrees of
  work in flight) are computed; otherwise returns at once, without waiting."""
  signum = requested()
  if signum is not None:
    jax.block_until_ready(pending)
    raise Stopped(signum, where)


def _record(signum, frame):
  del frame
  if signum == signal.SIGINT and requested() == signal.SIGINT:
    os.write(2, b'\nSecond SIGINT: stopped at once; the finished work is kept.\n')
    os._exit(130)
  if not _received:
    _received.append(signum)


@contextlib.contextmanager
def watch(distributed: bool = False):
  """Within the block, SIGTERM, SIGINT and SIGHUP are recorded for `check` (not SIGTERM with
  `distributed`: JAX's preemption service owns it). The previous handlers, and no recorded
  signal, come back on exit. Only the main thread can install handlers; elsewhere it does
  nothing."""
  previous = {}
  if threading.current_thread() is threading.main_thread():
    previous = {s: signal.signal(s, _record) for s in parallel.STOP_SIGNALS
                if not (distributed and s == signal.SIGTERM)}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    _received.clear()
