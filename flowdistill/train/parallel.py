"""Device mesh, sharding of batches and state, and opt-in multi-host start-up."""

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def maybe_initialize_distributed(enabled: bool) -> None:
  """Starts JAX's multi-host runtime when asked (config or FLOWDISTILL_DISTRIBUTED=1).

  Must run before any device query. On TPU pods and SLURM/GPU clusters the coordinator is
  found automatically; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID.
  """
  if not (enabled or os.environ.get('FLOWDISTILL_DISTRIBUTED') == '1'):
    return
  kwargs = {}
  if 'JAX_COORDINATOR_ADDRESS' in os.environ:
    kwargs = dict(coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
                  num_processes=int(os.environ['JAX_NUM_PROCESSES']),
                  process_id=int(os.environ['JAX_PROCESS_ID']))
  jax.distributed.initialize(**kwargs)


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D ('data',) mesh over the first `num_devices` devices (0 = all)."""
  devices = jax.devices()
  n = num_devices or len(devices)
  if n > len(devices):
    raise ValueError(f'config.train.num_devices={n} but only {len(devices)} devices exist.')
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
