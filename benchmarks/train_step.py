"""Steps/s, compile time and memory of the training step on 1 and 8 (simulated) devices.

Two steps: the 2-D MLP step of `configs/quickstart.py` (batch 1024) and the MNIST U-Net step of
`configs/mnist.py` (batch 128, zeros as data: speed does not depend on pixel values). Each
(step, device count) runs in a fresh process so XLA_FLAGS can set the device count.

python benchmarks/train_step.py [--devices 1,8] [--out benchmarks/out/train_step.json]
"""

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
MEASURE_SECONDS = {'2d': 5.0, 'mnist': 20.0}


def measure(kind: str) -> dict:
  """Runs in the child process: builds the configured step and times it."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from flowdistill.config import load_config_file  # noqa: PLC0415
  from flowdistill.data.sources import Dataset  # noqa: PLC0415
  from flowdistill.experiments import flow_matching  # noqa: PLC0415
  from flowdistill.train import parallel  # noqa: PLC0415
  from flowdistill.train.step import make_train_step  # noqa: PLC0415

  if kind == '2d':
    config, dataset = load_config_file(ROOT / 'configs' / 'quickstart.py'), Dataset(shape=(2,), toy='checkerboard')
    batch = {'x': np.random.default_rng(0).normal(size=(1024, 2)).astype(np.float32)}
  else:
    config = load_config_file(ROOT / 'configs' / 'mnist.py', 'mnist')
    dataset = Dataset(shape=(28, 28, 1), num_classes=10)
    batch = {'x': np.zeros((128, 28, 28, 1), np.float32), 'label': np.zeros(128, np.int32)}
  _, loss_fn, optimizer, state = flow_matching.build(config, dataset)
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
  steps, start = 0, time.perf_counter()
  while time.perf_counter() - start < MEASURE_SECONDS[kind]:
    state, metrics = compiled(state, gbatch)
    jax.block_until_ready(metrics)  # at most one step in flight: see ENV-NOTES (CPU deadlock)
    steps += 1
  elapsed = time.perf_counter() - start
  return {'step': kind, 'devices': jax.device_count(), 'compile_s': compile_s,
          'steps_per_s': steps / elapsed,
          'xla_temp_mib': memory.temp_size_in_bytes / 2**20 if memory else None,
          'xla_args_mib': memory.argument_size_in_bytes / 2**20 if memory else None,
          'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--devices', default='1,8')
  parser.add_argument('--steps', default='2d,mnist')
  parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'out' / 'train_step.json'))
  parser.add_argument('--child', default='')
  args = parser.parse_args()
  if args.child:
    print(json.dumps(measure(args.child)))
    return
  rows = []
  for kind in args.steps.split(','):
    for n in args.devices.split(','):
      env = dict(os.environ, JAX_PLATFORMS='cpu',
                 XLA_FLAGS=f'--xla_force_host_platform_device_count={n}')
      out = subprocess.run([sys.executable, __file__, '--child', kind], env=env, check=True,
                           capture_output=True, text=True).stdout
      rows.append(json.loads(out.strip().splitlines()[-1]))
      print(rows[-1], flush=True)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(rows, f, indent=2)
  print('| step | devices | compile (s) | steps/s | XLA temp (MiB) | XLA args (MiB) | peak RSS '
        '(MiB) |\n|---|---|---|---|---|---|---|')
  for r in rows:
    print(f'| {r["step"]} | {r["devices"]} | {r["compile_s"]:.1f} | {r["steps_per_s"]:.2f} | '
          f'{r["xla_temp_mib"]:.1f} | {r["xla_args_mib"]:.1f} | {r["peak_rss_mib"]:.0f} |')


if __name__ == '__main__':
  main()
