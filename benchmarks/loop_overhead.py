"""Steps/s of the command-line training loop against the bare jitted step it dispatches.

Usage:
  python benchmarks/loop_overhead.py [--config configs/quickstart.py] [--steps 2000]
      [--repeats 3] [--set train.steps_per_call=1 ...] [--out benchmarks/out/loop.json]

Both run the same model, loss, optimizer and batch size (the config's; the quickstart by
default), in one process, alternating (bare, loop) `--repeats` times:

- bare: `jax.jit(make_train_step(...), donate_argnums=0)` called back to back on 8 batches of
  the run's own data placed on the device beforehand; `--steps` steps after one warm-up call,
  `block_until_ready` on the last state only.
- loop: `configured.train_fm` (the CLI's path: data pipeline, two dispatches in flight, metrics,
  TensorBoard, progress bar, checkpoints every `train.ckpt_every`) for `--steps` steps in a
  fresh workdir; its rate is the steps between the first and the last metrics record divided
  by their wall-clock distance (the first window, with compilation, is left out).

Reported: the medians, and loop / bare (target >= 0.95, issue 20).
"""

import argparse
import ast
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

from flowdistill import config as config_lib
from flowdistill.data import sources
from flowdistill.train import configured, parallel
from flowdistill.train.step import make_train_step


def bare_rate(config, steps: int) -> float:
  """Steps/s of the jitted step alone on device-resident batches."""
  dataset = sources.load(config.data)
  _, loss_fn, optimizer, state = configured.fm_setup(config, dataset)
  step = jax.jit(make_train_step(loss_fn, optimizer, 1), donate_argnums=0)
  mesh = parallel.make_mesh(config.train.num_devices)
  data = configured.fm_batches(config, dataset)(0)
  batches = [parallel.global_batch(next(data), mesh) for _ in range(8)]
  state = parallel.replicate(state, mesh)
  state, _ = step(state, batches[0], {})
  jax.block_until_ready(state)
  start = time.perf_counter()
  for k in range(steps):
    state, _ = step(state, batches[k % 8], {})
  jax.block_until_ready(state)
  return steps / (time.perf_counter() - start)


def loop_rate(config, steps: int) -> float:
  """Steps/s of `configured.train_fm` between its first and last metrics records."""
  config = config.copy_and_resolve_references()
  config.train.steps = steps
  with tempfile.TemporaryDirectory() as workdir:
    configured.train_fm(config, workdir)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f]
  # Each record's steps_per_s covers the window since the previous record.
  seconds = sum((r['step'] - p['step']) / r['steps_per_s'] for p, r in zip(records, records[1:]))
  return (records[-1]['step'] - records[0]['step']) / seconds


def load_config(path: str, overrides: list[str]):
  """The config file at `path` (optionally `path:preset`) with `a.b=value` overrides."""
  path, _, preset = path.partition(':')
  config = config_lib.load_config_file(path, preset)
  for item in overrides:
    key, _, value = item.partition('=')
    *sections, name = key.split('.')
    node = config
    for section in sections:
      node = node[section]
    try:
      node[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[name] = value
  config_lib.validate(config)
  return config


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/quickstart.py')
  parser.add_argument('--steps', type=int, default=2000)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--set', nargs='*', default=[], help='config overrides a.b=value')
  parser.add_argument('--out', default='benchmarks/out/loop_overhead.json')
  args = parser.parse_args(argv)
  config = load_config(args.config, args.set)
  bare, loop = [], []
  for repeat in range(args.repeats):
    bare.append(bare_rate(config, args.steps))
    loop.append(loop_rate(config, args.steps))
    print(f'repeat {repeat}: bare {bare[-1]:.1f} steps/s, loop {loop[-1]:.1f} steps/s',
          file=sys.stderr, flush=True)
  result = {'config': args.config, 'overrides': args.set, 'steps': args.steps,
            'bare_steps_per_s': bare, 'loop_steps_per_s': loop,
            'bare_median': statistics.median(bare), 'loop_median': statistics.median(loop),
            'loop_over_bare': statistics.median(loop) / statistics.median(bare),
            'devices': jax.device_count(), 'cpu_count': os.cpu_count()}
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=1)
  print(json.dumps({k: np.round(v, 3).tolist() if isinstance(v, (float, list)) else v
                    for k, v in result.items()}, indent=1))


if __name__ == '__main__':
  main()
