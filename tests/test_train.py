"""Training system: exact resume, sharding invariance, checkpoint safety, NaN guard."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowdistill.data import sources
from flowdistill.experiments import method_config
from flowdistill.train import checkpoint, configured, loop, parallel
from flowdistill.train.checkpoint import Checkpointer, CheckpointMismatchError
from flowdistill.train.identity import ConfigChangedError
from flowdistill.train.step import make_train_step


def _config(**train):
  config = method_config()
  config.data.name = 'moons'
  config.data.batch_size = 64
  config.model.hidden, config.model.depth, config.model.time_dim = 32, 2, 16
  config.train.update({**dict(steps=12, log_every=4, ckpt_every=6), **train})
  return config


def _train(config, workdir, num_steps=None, num_devices=None, batches=None):
  dataset = sources.load(config.data)
  _, loss_fn, optimizer, state = configured.fm_setup(config, dataset)
  batches = batches or sources.batch_source(dataset, config.data.batch_size, seed=0,
                                            conditional=False)
  mesh = parallel.make_mesh(num_devices or config.train.num_devices)
  return loop.train(state, make_train_step(loss_fn, optimizer, config.train.steps_per_call),
                    batches, mesh=mesh, workdir=str(workdir),
                    num_steps=num_steps or config.train.steps,
                    steps_per_call=config.train.steps_per_call,
                    log_every=config.train.log_every, ckpt_every=config.train.ckpt_every,
                    progress=False)


def _same(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)))


@pytest.mark.parametrize('steps_per_call', [1, 3])
def test_fit_traces_its_step_once_and_returns_params_on_one_device(tmp_path, steps_per_call):
  """The jitted step compiles once per run, through logging, checkpoint saves and the last
  step, and once more on resume; evaluation gets parameters on a single device."""
  config = _config(steps=12, log_every=3, ckpt_every=6, steps_per_call=steps_per_call)
  dataset = sources.load(config.data)
  _, params, loss_fn = configured.fm_loss(config, dataset)
  traces = []

  def counted(params, batch, key):
    traces.append(batch['x'].shape)
    return loss_fn(params, batch, key)

  meta = configured.checkpoint_meta(config, dataset, two_time=False)
  batches = configured.fm_batches(config, dataset)
  state = configured.fit(config, params, counted, batches, str(tmp_path), meta=meta)
  assert int(state.step) == 12 and traces == [(64, 2)]
  assert all(len(x.devices()) == 1 for x in jax.tree.leaves(state))
  config.train.steps = 18
  configured.fit(config, params, counted, batches, str(tmp_path), meta=meta)
  assert len(traces) == 2


def test_interrupted_and_resumed_run_ends_with_identical_params(tmp_path):
  config = _config()
  full = _train(config, tmp_path / 'full')
  _train(config, tmp_path / 'split', num_steps=6)  # "killed" after the step-6 checkpoint
  resumed = _train(config, tmp_path / 'split')
  assert int(resumed.step) == 12
  assert _same(full.params, resumed.params) and _same(full.opt_state, resumed.opt_state)
  assert _same(full.ema, resumed.ema)
  lines = (tmp_path / 'full' / 'metrics.jsonl').read_text().splitlines()
  assert len(lines) == 3 and '"loss"' in lines[0]


def test_eight_devices_match_one_device(tmp_path):
  config = _config()
  one = _train(config, tmp_path / 'one', num_devices=1)
  eight = _train(config, tmp_path / 'eight', num_devices=8)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_scanned_dispatches_log_and_save_at_each_multiple_they_pass(tmp_path):
  _train(_config(steps=12, log_every=4, ckpt_every=5, steps_per_call=3), tmp_path)
  logged = [json.loads(line)['step'] for line in (tmp_path / 'metrics.jsonl').open()]
  assert logged == [6, 9, 12]  # Passing 4, 8 and 12 (the last step is always logged).
  assert sorted(int(p) for p in os.listdir(tmp_path / 'checkpoints') if p.isdigit()) == [
      6, 12]  # Passing 5 and 10, and the last step.


def test_scanned_steps_match_single_steps(tmp_path):
  single = _train(_config(), tmp_path / 'single')
  scanned = _train(_config(steps_per_call=3), tmp_path / 'scanned')
  for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(scanned.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_ot_on_host_trains_like_exact_ot_in_the_step(tmp_path):
  in_step = _config()
  in_step.fm.update(coupling='exact', ot_block_size=8, ot_solver='scipy')  # as the host
  on_host = in_step.copy_and_resolve_references()
  on_host.fm.ot_on_host = True
  plain = sources.batch_source(sources.load(in_step.data), 64, seed=0, conditional=False)

  def unpaired_noise(start):  # The host pipeline's noise of each step, paired in the step.
    for step, batch in enumerate(plain(start), start):
      noise = np.random.default_rng([0, step]).standard_normal(batch['x'].shape, np.float32)
      yield dict(batch, x0=noise)

  reference = _train(in_step, tmp_path / 'in_step', batches=unpaired_noise)
  _, _, state = configured.train_fm(on_host, str(tmp_path / 'on_host'))
  for a, b in zip(jax.tree.leaves(reference.params), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_checkpoint_of_another_model_is_refused_and_kept(tmp_path):
  _train(_config(), tmp_path)
  before = sorted(os.listdir(tmp_path / 'checkpoints'))
  other = _config()
  other.model.hidden = 48
  with pytest.raises(CheckpointMismatchError, match='fresh --workdir'):
    _train(other, tmp_path)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == before


def test_nan_stops_the_run_with_the_step_and_keeps_good_checkpoints(tmp_path):
  config = _config(steps=20, ckpt_every=5)
  dataset = sources.load(config.data)
  clean = sources.batch_source(dataset, 64, seed=0, conditional=False)

  def poisoned(start):
    for step, batch in enumerate(clean(start), start=start + 1):
      if step == 8:
        batch = {'x': np.full_like(batch['x'], np.nan)}
      yield batch

  with pytest.raises(loop.NonFiniteLossError, match='step 8.*last good checkpoint: step 5'):
    _train(config, tmp_path, batches=poisoned)
  ckpt = Checkpointer(str(tmp_path / 'checkpoints'))
  assert ckpt.all_steps() == [5]
  ckpt.close()


def test_corrupted_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
  config = _config()
  _train(config, tmp_path)
  latest = tmp_path / 'checkpoints' / '12' / 'state'
  for root, _, files in os.walk(latest):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'garbage')
  state = _train(config, tmp_path, num_steps=6)
  assert int(state.step) == 6
  assert 'falling back' in caplog.text


def test_unwritable_workdir_fails_at_start(tmp_path):
  blocked = tmp_path / 'ro'
  blocked.write_text('a file where a folder should be')
  with pytest.raises(PermissionError, match='writable --workdir'):
    Checkpointer(str(blocked / 'checkpoints'))


def test_a_changed_config_resumes_only_where_allowed_and_keeps_the_checkpoints(tmp_path):
  config = _config()
  dataset = sources.load(config.data)
  _, params, loss_fn = configured.fm_loss(config, dataset)

  def fit(c):
    return configured.fit(c, params, loss_fn, configured.fm_batches(c, dataset), str(tmp_path),
                          meta=configured.checkpoint_meta(c, dataset, two_time=False))

  fit(config)
  saved = {p: p.read_bytes() for p in (tmp_path / 'checkpoints').rglob('*') if p.is_file()}
  longer = config.copy_and_resolve_references()
  longer.train.update(steps=18, log_every=3)  # logging is not part of the run's identity
  longer.optim.lr = 2e-3
  with pytest.raises(ConfigChangedError,
                     match=r'step 12 .*\(optim.lr: 0.001 -> 0.002; train.steps: 12 -> 18\).*'
                           r'allow_config_change=optim.lr,train.steps'):
    fit(longer)
  assert {p: p.read_bytes() for p in saved} == saved
  longer.train.allow_config_change = 'train.steps, config.optim.lr'
  assert int(fit(longer).step) == 18


def test_a_full_disk_stops_before_writing_and_names_the_last_good_checkpoint(tmp_path,
                                                                            monkeypatch):
  config = _config()
  _train(config, tmp_path, num_steps=6)
  saved = {p: p.read_bytes() for p in (tmp_path / 'checkpoints').rglob('*') if p.is_file()}
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(checkpoint.shutil, 'disk_usage',
                      lambda path: usage._replace(free=2**20 + 100))
  with pytest.raises(checkpoint.CheckpointWriteError,
                     match=r'checkpoint of step 12 .*the disk is full \(1.0 MiB free, the '
                           r'checkpoint needs about 1.\d MiB\).*larger disk.*\(step 6\)'):
    _train(config, tmp_path)
  assert {p: p.read_bytes() for p in saved} == saved
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['6']


@pytest.mark.parametrize('os_error,cause', [
    ('Failed to write 1096444 bytes to file 17: No space left on device', 'the disk is full'),
    ('Disk quota exceeded', 'the disk quota is used up'),
    ('Permission denied', 'the workdir is not writable any more'),
    ('Transport endpoint is not connected', 'the filesystem is unreachable')])
def test_a_failed_write_is_one_error_with_its_cause(tmp_path, os_error, cause):
  ckpt = Checkpointer(str(tmp_path / 'checkpoints'))

  def failing_save(step, args, force):
    raise ValueError(f'RESOURCE_EXHAUSTED: Error writing in OCDBT database at local file '
                     f'"{tmp_path}/checkpoints/{step}.orbax-checkpoint-tmp/state": {os_error}'
                     if 'space' in os_error else f'Error writing {tmp_path}/checkpoints/'
                     f'{step}.orbax-checkpoint-tmp: [Errno 5] {os_error}')

  ckpt.manager.save = failing_save
  with pytest.raises(checkpoint.CheckpointWriteError,
                     match=rf'checkpoint of step 7 .*: {cause}.*Fix: .*\(none yet\)'):
    ckpt.save(7, {'w': jnp.zeros(3)}, {})
  ckpt.close()
