"""Steps/s, compile time, memory and checkpoint save/restore time of the training step on
1 and 8 (simulated) devices and on several processes.

Two steps: the 2-D MLP step of `configs/quickstart.py` (batch 1024) and the MNIST U-Net step of
`configs/mnist.py` (batch 128, zeros as data: speed does not depend on pixel values), at the
same global batch on every topology. A topology is `D` (one process, D devices) or `PxD` (P
processes of D devices on localhost, `jax.distributed` over CPU collectives, each process
feeding its rows of the batch). Each (step, topology) runs in fresh processes so XLA_FLAGS can
set the device count. Save/restore: synchronous Orbax saves of the train state through the
library's `Checkpointer` (the first, which also sets Orbax up, then the median of three
more), then a restore onto the same shardings.

python benchmarks/train_step.py [--topologies 1,8,2x4] [--steps 2d,mnist] \
    [--out benchmarks/out/train_step.json]
"""

import argparse
import json
import os
import pathlib
import resource
import socket
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
# A fixed number of timed steps: every process must run the same count (collectives).
TIMED_STEPS = {'2d': 300, 'mnist': 5}
GLOBAL_BATCH = {'2d': 1024, 'mnist': 128}
SAVES = 4


def measure(kind: str, checkpoint_dir: str) -> dict:
  """Runs in each child process: builds the configured step, times it, saves and restores."""
  from flowdistill.train import parallel  # noqa: PLC0415

  parallel.maybe_initialize_distributed(False)  # started when the parent set the environment
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from flowdistill.data.sources import Dataset  # noqa: PLC0415
  from flowdistill.experiments import load_config_file  # noqa: PLC0415
  from flowdistill.train import configured  # noqa: PLC0415
  from flowdistill.train.checkpoint import Checkpointer  # noqa: PLC0415
  from flowdistill.train.step import make_train_step  # noqa: PLC0415

  rows = GLOBAL_BATCH[kind] // jax.process_count()
  if kind == '2d':
    config = load_config_file(ROOT / 'configs' / 'quickstart.py')
    dataset = Dataset(shape=(2,), toy='checkerboard')
    batch = {'x': np.random.default_rng(0).normal(size=(rows, 2)).astype(np.float32)}
  else:
    config = load_config_file(ROOT / 'configs' / 'mnist.py', 'mnist')
    dataset = Dataset(shape=(28, 28, 1), num_classes=10)
    batch = {'x': np.zeros((rows, 28, 28, 1), np.float32), 'label': np.zeros(rows, np.int32)}
  _, loss_fn, optimizer, state = configured.fm_setup(config, dataset)
  mesh = parallel.make_mesh()
  rep = parallel.replicated(mesh)
  step = jax.jit(make_train_step(loss_fn, optimizer), donate_argnums=0,
                 in_shardings=(rep, parallel.batch_sharding(mesh)), out_shardings=(rep, rep))
  state = parallel.replicate(state, mesh)
  gbatch = parallel.global_batch(batch, mesh)
  start = time.perf_counter()
  compiled = step.lower(state, gbatch).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  state, metrics = compiled(state, gbatch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(TIMED_STEPS[kind]):
    state, metrics = compiled(state, gbatch)
    jax.block_until_ready(metrics)  # at most one step in flight: see ENV-NOTES (CPU deadlock)
  elapsed = time.perf_counter() - start
  checkpointer = Checkpointer(checkpoint_dir, async_save=False)
  save_s = []
  for step in range(1, SAVES + 1):  # the first save also sets Orbax up
    start = time.perf_counter()
    checkpointer.save(step, state, {})
    checkpointer.wait()
    save_s.append(time.perf_counter() - start)
  start = time.perf_counter()
  restored, _ = checkpointer.restore(SAVES, state)
  jax.block_until_ready(restored)
  restore_s = time.perf_counter() - start
  checkpointer.close()
  return {'step': kind, 'processes': jax.process_count(), 'devices': jax.device_count(),
          'compile_s': compile_s, 'steps_per_s': TIMED_STEPS[kind] / elapsed,
          'first_save_s': save_s[0], 'save_s': float(np.median(save_s[1:])),
          'restore_s': restore_s,
          'xla_temp_mib': memory.temp_size_in_bytes / 2**20 if memory else None,
          'xla_args_mib': memory.argument_size_in_bytes / 2**20 if memory else None,
          'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_topology(kind: str, topology: str, checkpoint_dir: str) -> dict:
  """Runs `measure(kind)` on `topology` ('D' or 'PxD') in fresh processes; process 0's row."""
  processes, _, devices = topology.rpartition('x')
  processes = int(processes or 1)
  base = dict(os.environ, JAX_PLATFORMS='cpu',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  if processes > 1:
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      port = s.getsockname()[1]
    base.update(FLOWDISTILL_DISTRIBUTED='1', JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
                JAX_NUM_PROCESSES=str(processes))
  children = [subprocess.Popen(
      [sys.executable, __file__, '--child', kind, '--checkpoint-dir', checkpoint_dir],
      env=dict(base, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(processes)]
  outputs = [child.communicate() for child in children]
  for child, (_, err) in zip(children, outputs):
    if child.returncode:
      raise RuntimeError(f'{kind} on {topology} failed:\n{err[-3000:]}')
  return json.loads(outputs[0][0].strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--topologies', default='1,8,2x4')
  parser.add_argument('--steps', default='2d,mnist')
  parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'out' / 'train_step.json'))
  parser.add_argument('--child', default='')
  parser.add_argument('--checkpoint-dir', default='')
  args = parser.parse_args()
  if args.child:
    print(json.dumps(measure(args.child, args.checkpoint_dir)))
    return
  rows = []
  for kind in args.steps.split(','):
    for topology in args.topologies.split(','):
      with tempfile.TemporaryDirectory() as checkpoint_dir:
        rows.append(run_topology(kind, topology, checkpoint_dir))
      print(rows[-1], flush=True)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(rows, f, indent=2)
  print('| step | processes x devices | compile (s) | steps/s | first save (s) | save (s) | '
        'restore (s) | XLA temp (MiB) | XLA args (MiB) | peak RSS (MiB) |\n'
        '|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f'| {r["step"]} | {r["processes"]} x {r["devices"] // r["processes"]} | '
          f'{r["compile_s"]:.1f} | {r["steps_per_s"]:.2f} | {r["first_save_s"]:.2f} | '
          f'{r["save_s"]:.2f} | '
          f'{r["restore_s"]:.2f} | {r["xla_temp_mib"]:.1f} | {r["xla_args_mib"]:.1f} | '
          f'{r["peak_rss_mib"]:.0f} |')


if __name__ == '__main__':
  main()
