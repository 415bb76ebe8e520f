"""2 processes x 4 devices (jax.distributed on localhost, via launch/local.sh) train like 1 and
8 devices in one process, and survive a SIGTERM sent to one of the processes."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from flowdistill.data import sources
from flowdistill.experiments import load_config_file
from flowdistill.train import configured, loop, parallel
from flowdistill.train.checkpoint import Checkpointer
from flowdistill.train.step import make_train_step

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS = 24
OVERRIDES = {
    'train.steps': STEPS, 'train.steps_per_call': 1, 'train.log_every': 1,
    'train.ckpt_every': 12, 'train.keep': 5,
    'data.batch_size': 64, 'model.hidden': 32, 'model.depth': 2, 'model.time_dim': 16,
    'eval.num_samples': 64, 'eval.nll_samples': 16, 'eval.euler_steps': (1,),
    'eval.plot': False,
}


def _config():
  config = load_config_file(ROOT / 'configs' / 'quickstart.py', 'moons')
  for key, value in OVERRIDES.items():
    section, name = key.split('.')
    config[section][name] = value
  return config


def _flag(value):
  return f'({value[0]},)' if isinstance(value, tuple) else str(value)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(workdir, *, sigterm_process_1=False):
  """Runs launch/local.sh (2 processes x 4 devices); optionally SIGTERMs process 1 as soon as
  it has joined the cluster. Returns the launcher's exit status."""
  args = [f'--config={ROOT}/configs/quickstart.py:moons', f'--workdir={workdir}']
  args += [f'--config.{k}={_flag(v)}' for k, v in OVERRIDES.items()]
  env = dict(os.environ, PYTHON=sys.executable, XLA_FLAGS='')
  launcher = subprocess.Popen(
      ['bash', str(ROOT / 'launch' / 'local.sh'), '--processes', '2', '--devices', '4',
       '--port', str(_free_port()), '--timeout', '240', '--grace', '60', '--', *args],
      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  if sigterm_process_1:
    log, pid = workdir / 'logs' / 'process_1.log', workdir / 'logs' / 'process_1.pid'
    while launcher.poll() is None and not (
        log.exists() and 'jax.distributed: process 1 of 2' in log.read_text()):
      time.sleep(0.05)
    os.kill(int(pid.read_text()), 15)
  return launcher.wait(timeout=300)


def _losses(workdir) -> dict[int, float]:
  lines = (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()
  steps = [json.loads(line)['step'] for line in lines]
  assert len(steps) == len(set(steps)), f'steps logged twice: {steps}'
  return {json.loads(line)['step']: json.loads(line)['loss'] for line in lines}


def _train_here(config, workdir, num_devices):
  dataset = sources.load(config.data)
  _, loss_fn, optimizer, state = configured.fm_setup(config, dataset)
  batches = sources.batch_source(dataset, config.data.batch_size, seed=config.seed,
                                 conditional=False)
  return loop.train(state, make_train_step(loss_fn, optimizer), batches,
                    mesh=parallel.make_mesh(num_devices), workdir=str(workdir),
                    num_steps=STEPS, log_every=1, ckpt_every=12, progress=False), state


def test_two_processes_match_one_and_eight_devices_and_survive_sigterm(tmp_path):
  workdir = tmp_path / 'two_processes'
  assert _launch(workdir, sigterm_process_1=True) == 0
  logs = [(workdir / 'logs' / f'process_{i}.log').read_text() for i in range(2)]
  assert all('Preempted (SIGTERM): saved step' in log for log in logs), logs[1][-2000:]
  ckpt = Checkpointer(str(workdir / 'checkpoints'))
  preempted_at = ckpt.all_steps()[-1]
  ckpt.close()
  assert preempted_at < STEPS
  assert not (workdir / 'results.json').exists()

  assert _launch(workdir) == 0
  log = (workdir / 'logs' / 'process_0.log').read_text()
  assert f'Resumed from step {preempted_at}' in log
  assert (workdir / 'results.json').exists()

  config = _config()
  one, template = _train_here(config, tmp_path / 'one', 1)
  eight, _ = _train_here(config, tmp_path / 'eight', 8)
  reference = _losses(tmp_path / 'one')
  assert sorted(reference) == list(range(1, STEPS + 1))
  for other in (_losses(tmp_path / 'eight'), _losses(workdir)):
    assert sorted(other) == sorted(reference)
    np.testing.assert_allclose([other[k] for k in sorted(other)],
                               [reference[k] for k in sorted(reference)], rtol=2e-5)

  # The 2-process run's last checkpoint restores on one device, close to the 1-device run.
  ckpt = Checkpointer(str(workdir / 'checkpoints'))
  restored, _ = ckpt.restore(STEPS, parallel.replicate(template, parallel.make_mesh(1)))
  ckpt.close()
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(one.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(eight.params), jax.tree.leaves(one.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
