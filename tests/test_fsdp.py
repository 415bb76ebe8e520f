"""FSDP: the sharding rule, equal losses to data parallelism, smaller per-device state, and
checkpoints that move between meshes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from flowdistill.data import sources
from flowdistill.experiments import method_config, validate
from flowdistill.train import configured, loop, parallel
from flowdistill.train.checkpoint import Checkpointer
from flowdistill.train.step import make_train_step


@pytest.mark.parametrize('shape, spec', [
    ((256, 512), P(None, 'fsdp')),     # the largest divisible axis
    ((512, 256), P('fsdp')),
    ((3, 3, 64, 64), P(None, None, 'fsdp')),  # ties: the first
    ((1001, 20), P()),                 # no axis divisible by 8
    ((256,), P()),                     # below the minimum size
    ((), P()),
    ((4, 4096), P(None, 'fsdp')),
])
def test_fsdp_rule_shards_the_largest_divisible_axis_of_large_arrays(shape, spec):
  assert parallel.fsdp_spec(shape, 8) == spec
  assert parallel.fsdp_spec(shape, 1) == P()


def _config(fsdp=1, devices=8, steps=20):
  config = method_config()
  config.data.name = 'moons'
  config.data.batch_size = 64
  config.model.update(hidden=512, depth=3, time_dim=32)
  config.train.update(steps=steps, log_every=1, ckpt_every=10, num_devices=devices)
  config.train.mesh.fsdp = fsdp
  validate(config, num_devices=8)
  return config


def _fit(config, workdir):
  dataset = sources.load(config.data)
  _, params, loss_fn = configured.fm_loss(config, dataset)
  meta = configured.checkpoint_meta(config, dataset, two_time=False)
  batches = configured.fm_batches(config, dataset)
  state = configured.fit(config, params, loss_fn, batches, str(workdir), meta=meta)
  losses = [json.loads(line)['loss'] for line in
            (workdir / 'metrics.jsonl').read_text().splitlines()]
  return state, losses


def test_fsdp_trains_like_data_parallel_and_holds_an_eighth_of_the_state(tmp_path):
  data_state, data_losses = _fit(_config(fsdp=1), tmp_path / 'data')
  fsdp_state, fsdp_losses = _fit(_config(fsdp=8), tmp_path / 'fsdp')
  assert len(data_losses) == len(fsdp_losses) == 20
  # Sharded matmuls sum in another order: float32 rounding, nothing more.
  np.testing.assert_allclose(fsdp_losses, data_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(fsdp_state.params), jax.tree.leaves(data_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)

  arguments = {fsdp: _state_argument_bytes(_config(fsdp=fsdp)) for fsdp in (1, 8)}
  assert arguments[8] <= arguments[1] / 6, arguments


def _state_argument_bytes(config):
  """Per-device argument bytes of the compiled step, as XLA reports them."""
  dataset = sources.load(config.data)
  _, loss_fn, optimizer, state = configured.fm_setup(config, dataset)
  mesh = parallel.make_mesh(8, fsdp=config.train.mesh.fsdp)
  state = parallel.place(state, mesh)
  batch = parallel.global_batch(next(configured.fm_batches(config, dataset)(0)), mesh)
  jitted = loop.jit_step(make_train_step(loss_fn, optimizer), state, {}, mesh)
  return jitted.lower(state, batch, {}).compile().memory_analysis().argument_size_in_bytes


def test_fsdp_state_is_sharded_on_the_mesh_and_gathered_for_evaluation():
  config = _config(fsdp=8)
  _, _, _, state = configured.fm_setup(config, sources.load(config.data))
  placed = parallel.place(state, parallel.make_mesh(8, fsdp=8))
  kernel = placed.params['hidden'][1]['kernel']
  assert kernel.sharding.spec == P('fsdp') and kernel.addressable_shards[0].data.shape == (64, 512)
  assert placed.opt_state[1][0].mu['hidden'][1]['kernel'].sharding.spec == P('fsdp')
  local = parallel.host_local(placed)
  assert all(len(x.devices()) == 1 for x in jax.tree.leaves(local))
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), local,
                                          state)))


@pytest.mark.parametrize('devices, fsdp', [(1, 1), (8, 4)])
def test_fsdp_checkpoint_restores_bit_exact_on_another_mesh(tmp_path, devices, fsdp):
  config = _config(fsdp=8, steps=10)
  trained, _ = _fit(config, tmp_path)
  _, _, _, template = configured.fm_setup(config, sources.load(config.data))
  ckpt = Checkpointer(str(tmp_path / 'checkpoints'))
  restored, _ = ckpt.restore(10, parallel.place(template, parallel.make_mesh(devices, fsdp=fsdp)))
  ckpt.close()
  kernel = restored.params['hidden'][1]['kernel']
  assert len(kernel.devices()) == devices
  assert kernel.sharding.spec == (P('fsdp') if fsdp > 1 else P())
  same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                      parallel.host_local(restored), trained)
  assert all(jax.tree.leaves(same))


def test_mesh_that_does_not_fit_the_devices_is_refused_by_name():
  config = _config()
  config.train.mesh.fsdp = 3
  with pytest.raises(ValueError, match=r'config.train.mesh.fsdp=3 must be >= 1 and divide'):
    validate(config, num_devices=8)
  config.train.mesh.update(fsdp=2, data=2)
  with pytest.raises(ValueError, match=r'config.train.mesh.data=2 times fsdp=2'):
    validate(config, num_devices=8)
