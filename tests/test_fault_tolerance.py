"""Stop signals (SIGTERM, SIGHUP, SIGINT), restore onto another device count, SIGKILL faults."""

import importlib.util
import pathlib
import re
import shutil
import signal

import jax
import numpy as np
import pytest

from flowdistill.data import sources
from flowdistill.experiments import method_config
from flowdistill.train import configured, loop, parallel
from flowdistill.train.checkpoint import Checkpointer
from flowdistill.train.step import make_train_step

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _config():
  config = method_config()
  config.data.name, config.data.batch_size = 'moons', 64
  config.model.hidden, config.model.depth, config.model.time_dim = 32, 2, 16
  return config


def _train(workdir, *, num_steps=12, num_devices=0, batches=None):
  config = _config()
  dataset = sources.load(config.data)
  _, loss_fn, optimizer, state = configured.fm_setup(config, dataset)
  batches = batches or sources.batch_source(dataset, 64, seed=0, conditional=False)
  return loop.train(state, make_train_step(loss_fn, optimizer), batches,
                    mesh=parallel.make_mesh(num_devices), workdir=str(workdir),
                    num_steps=num_steps, log_every=1, ckpt_every=6, progress=False)


def _bit_equal(a, b):
  return all(jax.tree.leaves(jax.tree.map(
      lambda x, y: np.asarray(x).tobytes() == np.asarray(y).tobytes(), a, b)))


@pytest.mark.parametrize('signum,code', [(signal.SIGTERM, 0), (signal.SIGHUP, 0),
                                          (signal.SIGINT, 130)])
def test_a_stop_signal_saves_the_step_exits_cleanly_and_the_next_start_resumes(tmp_path, signum,
                                                                              code):
  clean = sources.batch_source(sources.load(_config().data), 64, seed=0, conditional=False)

  def signal_at_step_8(start):
    for step, batch in enumerate(clean(start), start=start + 1):
      if step == 8:
        signal.raise_signal(signum)  # as a scheduler, Ctrl-C or a closed terminal would
      yield batch

  handlers = {s: signal.getsignal(s) for s in parallel.STOP_SIGNALS}
  with pytest.raises(loop.Preempted) as stopped:
    _train(tmp_path / 'split', batches=signal_at_step_8)
  assert stopped.value.step == 8 and stopped.value.code == code
  assert {s: signal.getsignal(s) for s in parallel.STOP_SIGNALS} == handlers  # restored
  ckpt = Checkpointer(str(tmp_path / 'split' / 'checkpoints'))
  assert ckpt.all_steps() == [6, 8]
  ckpt.close()
  resumed = _train(tmp_path / 'split')
  full = _train(tmp_path / 'full')
  assert int(resumed.step) == 12 and _bit_equal(resumed, full)


def test_a_second_ctrl_c_stops_at_once_and_the_run_resumes_from_its_last_checkpoint(tmp_path):
  clean = sources.batch_source(sources.load(_config().data), 64, seed=0, conditional=False)

  def two_ctrl_c_at_step_8(start):
    for step, batch in enumerate(clean(start), start=start + 1):
      if step == 8:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
      yield batch

  with pytest.raises(KeyboardInterrupt):
    _train(tmp_path / 'split', batches=two_ctrl_c_at_step_8)
  ckpt = Checkpointer(str(tmp_path / 'split' / 'checkpoints'))
  assert ckpt.all_steps() == [6]
  ckpt.close()
  assert _bit_equal(_train(tmp_path / 'split'), _train(tmp_path / 'full'))


@pytest.mark.parametrize('devices', [1, 4])
def test_checkpoint_written_on_8_devices_continues_on_fewer(tmp_path, devices):
  eight = _train(tmp_path / 'eight', num_devices=8)  # checkpoints at steps 6 and 12
  moved = tmp_path / 'moved'
  shutil.copytree(tmp_path / 'eight', moved)
  shutil.rmtree(moved / 'checkpoints' / '12')  # as if the 8-device job had stopped at step 6

  _, _, _, template = configured.fm_setup(_config(), sources.load(_config().data))
  ckpt = Checkpointer(str(moved / 'checkpoints'))
  on_eight, _ = ckpt.restore(6, parallel.replicate(template, parallel.make_mesh(8)))
  on_fewer, _ = ckpt.restore(6, parallel.replicate(template, parallel.make_mesh(devices)))
  ckpt.close()
  assert len(jax.tree.leaves(on_fewer.params)[0].devices()) == devices
  assert _bit_equal(on_eight, on_fewer)

  continued = _train(moved, num_devices=devices)
  assert int(continued.step) == 12
  for a, b in zip(jax.tree.leaves(continued), jax.tree.leaves(eight)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_sigkill_at_random_steps_resumes_bit_exact(tmp_path):
  spec = importlib.util.spec_from_file_location('fault_injection',
                                                ROOT / 'benchmarks' / 'fault_injection.py')
  fault_injection = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(fault_injection)
  result = fault_injection.main(['--kills', '1', '--steps', '30', '--ckpt-every', '10',
                                 '--workdir', str(tmp_path), '--out', str(tmp_path / 'r.json')])
  assert result['killed_mid_run'] == 1
  assert result['bit_exact']
  assert result['fallback_warned'] and result['fallback_step'] == 30
  assert result['bit_exact_after_fallback']
  assert result['unwritable']['exit_status'] != 0
  assert 'choose a writable --workdir' in result['unwritable']['message']
  for name, stop in result['signals'].items():
    assert stop['exit_status'] == (130 if name == 'SIGINT' else 0), name
    assert stop['saved_step'] == stop['signalled_after_step'] and stop['message'], name
    assert stop['bit_exact'], name
  shared = result['second_run']
  assert shared['exit_status'] != 0 and 'in use by another run' in shared['message']
  assert shared['first_exit_status'] == 0 and shared['first_bit_exact']
  disk = result['full_disk']
  if 'skipped' not in disk:
    assert disk['exit_status'] != 0 and disk['bit_exact_after_move']
    assert re.search(r'CheckpointWriteError: Cannot write the checkpoint of step \d+ .*the disk '
                     r'is full.*last good checkpoint \(step \d+\)', disk['message'])
