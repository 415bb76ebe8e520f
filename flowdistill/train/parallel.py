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


BATCH_AXES = ('data', 'fsdp')  # a batch is split over every device of the mesh
FSDP_MIN_SIZE = 2**14  # arrays with fewer elements stay replicated (biases, norms, scalars)


def make_mesh(num_devices: int = 0, *, data: int = -1, fsdp: int = 1) -> Mesh:
  """A 2-D ('data', 'fsdp') mesh over the first `num_devices` devices (0 = all).

  `fsdp` devices share one copy of the parameters and optimizer state (`state_sharding`);
  `data = -1` takes the rest. With `fsdp = 1` this is plain data parallelism.
  """
  devices = jax.devices()
  n = num_devices or len(devices)
  if n > len(devices):
    raise ValueError(f'config.train.num_devices={n} but only {len(devices)} devices exist; set '
                     f'it to 0 (all devices) or at most {len(devices)}.')
  return Mesh(np.asarray(devices[:n]).reshape(mesh_shape(n, data, fsdp)), BATCH_AXES)


def mesh_shape(num_devices: int, data: int = -1, fsdp: int = 1) -> tuple[int, int]:
  """(data, fsdp) of `config.train.mesh` over `num_devices` devices (`data = -1`: the rest).

  Raises ValueError naming the key when the mesh does not cover the devices exactly.
  """
  if fsdp < 1 or num_devices % fsdp:
    raise ValueError(f'config.train.mesh.fsdp={fsdp} must be >= 1 and divide the {num_devices} '
                     'devices.')
  if data == -1:
    return num_devices // fsdp, fsdp
  if data < 1 or data * fsdp != num_devices:
    raise ValueError(f'config.train.mesh.data={data} times fsdp={fsdp} must equal the '
                     f'{num_devices} devices; set config.train.mesh.data=-1 (the rest).')
  return data, fsdp


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
  """Sharding of a batch over all devices (after `leading_axes` unsharded axes, e.g. k steps)."""
  return NamedSharding(mesh, P(*([None] * leading_axes), BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int = FSDP_MIN_SIZE) -> P:
  """Where an array of `shape` lives under FSDP: its largest axis that `fsdp` divides is split
  over 'fsdp' (the first such axis on ties); arrays below `min_size` elements, or with no such
  axis, are replicated (big_vision's `fsdp` sharding rule)."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  divisible = [i for i, d in enumerate(shape) if d % fsdp == 0]
  if not divisible:
    return P()
  axis = max(divisible, key=lambda i: (shape[i], -i))
  return P(*([None] * axis), 'fsdp')


def state_sharding(tree, mesh: Mesh, min_size: int = FSDP_MIN_SIZE):
  """`NamedSharding`s for every leaf of `tree` (state, teacher params) by `fsdp_spec`: sharded
  over 'fsdp', replicated over 'data'."""
  fsdp = mesh.shape['fsdp']
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp, min_size)),
                      tree)


def place(tree, mesh: Mesh):
  """Puts a pytree (the train state, frozen extras) on the mesh by `state_sharding`."""
  return jax.device_put(tree, state_sharding(tree, mesh))


def global_batch(local_batch: dict, mesh: Mesh, leading_axes: int = 0) -> dict:
  """Global arrays from this process's numpy batch (rows of the global batch it owns)."""
  sharding = batch_sharding(mesh, leading_axes)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def replicate(tree, mesh: Mesh):
  """Places a pytree on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def host_local(tree):
  """A global pytree (replicated or FSDP-sharded) as whole arrays on this process's first
  device.

  Evaluation runs there: on process 0 alone (which cannot compute over other processes'
  devices), and without repeating every sample on each device of the mesh, which a jitted
  function of replicated inputs would do. Sharded arrays are gathered first.
  """
  sharded = [x for x in jax.tree.leaves(tree)
             if isinstance(x, jax.Array) and not x.is_fully_replicated]
  if sharded:
    tree = jax.jit(lambda t: t, out_shardings=replicated(sharded[0].sharding.mesh))(tree)
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
