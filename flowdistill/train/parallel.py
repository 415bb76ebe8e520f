"""Device mesh, sharding of batches and state, and opt-in multi-host start-up."""

import logging
import os
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

_log = logging.getLogger(__name__)


def maybe_initialize_distributed(enabled: bool) -> None:
  """Starts JAX's multi-host runtime when asked (config or FLOWDISTILL_DISTRIBUTED=1).

  Must run before any device query. On TPU pods and SLURM/GPU clusters the coordinator is
  found automatically; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID.
  """
  if not (enabled or os.environ.get('FLOWDISTILL_DISTRIBUTED') == '1'):
    return
  if jax.distributed.is_initialized():
    return
  kwargs = {}
  if 'JAX_COORDINATOR_ADDRESS' in os.environ:
    missing = [k for k in ('JAX_NUM_PROCESSES', 'JAX_PROCESS_ID') if k not in os.environ]
    if missing:
      raise ValueError(f'JAX_COORDINATOR_ADDRESS is set but {missing} are not; set all three '
                       '(or none, on TPU pods and SLURM where JAX finds them itself).')
    kwargs = {'coordinator_address': os.environ['JAX_COORDINATOR_ADDRESS'],
              'num_processes': int(os.environ['JAX_NUM_PROCESSES']),
              'process_id': int(os.environ['JAX_PROCESS_ID'])}
  jax.distributed.initialize(**kwargs)
  _log.info('jax.distributed: process %d of %d, %d local devices of %d.',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D ('data',) mesh over the first `num_devices` devices (0 = all)."""
  devices = jax.devices()
  n = num_devices or len(devices)
  if n > len(devices):
    raise ValueError(f'config.train.num_devices={n} but only {len(devices)} devices exist; set '
                     f'it to 0 (all devices) or at most {len(devices)}.')
  return Mesh(np.asarray(devices[:n]), ('data',))


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
  """Sharding of a batch over 'data' (after `leading_axes` unsharded axes, e.g. k steps)."""
  return NamedSharding(mesh, P(*([None] * leading_axes), 'data'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict, mesh: Mesh, leading_axes: int = 0) -> dict:
  """Global arrays from this process's numpy batch (rows of the global batch it owns)."""
  sharding = batch_sharding(mesh, leading_axes)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def replicate(tree, mesh: Mesh):
  """Places a pytree (e.g. the train state) on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def host_local(tree):
  """A replicated global pytree as arrays on this process's first device.

  Evaluation runs there: on process 0 alone (which cannot compute over other processes'
  devices), and without repeating every sample on each device of the mesh, which a jitted
  function of replicated inputs would do.
  """
  return jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class PreemptionWatch:
  """Says when a run has been asked to stop (SIGTERM, SIGINT, SIGHUP), at a step all processes
  agree on.

  With `jax.distributed` started, JAX's preemption service owns SIGTERM and
  `multihost_utils.reached_preemption_sync_point` names the same step on every process; SIGINT
  and SIGHUP are turned into a SIGTERM to this process so they take the same path. Otherwise,
  inside the `with` block, a handler records the signal. A second SIGINT raises
  `KeyboardInterrupt` at once (the checkpoint writes are atomic, so nothing saved is harmed).
  The previous handlers come back on exit. Call `reached(i)` once per dispatch, with `i`
  counting dispatches from 0 on every process.
  """

  def __init__(self):
    self.signum = None  # the first stop signal received
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      distributed = jax.distributed.is_initialized()
      for signum in STOP_SIGNALS:
        if not (distributed and signum == signal.SIGTERM):
          self._previous[signum] = signal.signal(signum, self._on_signal)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _on_signal(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signum == signal.SIGINT:
      raise KeyboardInterrupt
    if self.signum is None:
      self.signum = signum
    if jax.distributed.is_initialized():
      os.kill(os.getpid(), signal.SIGTERM)

  def reached(self, dispatch: int) -> bool:
    if jax.distributed.is_initialized():
      reached = multihost_utils.reached_preemption_sync_point(dispatch)
      if reached and self.signum is None:
        self.signum = signal.SIGTERM
      return reached
    return self.signum is not None
