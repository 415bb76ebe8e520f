"""SFM against LGM at one IPC: XLA memory of the compiled distillation step (temp and argument
bytes), steady-state s/step (compilation apart), peak RSS, and the steps and wall-clock time to
the final accuracy (the first snapshot within 0.5 points of the last one, from linear probes of
snapshots taken every `--curve-every` steps).

Uses the backbones and statistics that `method='sfm'` cached for the same config (run it first;
a missing backbone is refused with that command).

FLOWDISTILL_MNIST_DIR=../shared/data/mnist python benchmarks/sfm_cost.py \
    --config=mnist,cpu --ipc 10 --steps 1000 --curve-every 100
"""

import argparse
import dataclasses
import json
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from flowdistill.condense import image_param, linear_probe
from flowdistill.config import load_config_file
from flowdistill.data import sources
from flowdistill.experiments import sfm_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='mnist,cpu', help='the arg of configs/sfm.py')
  parser.add_argument('--ipc', type=int, default=10)
  parser.add_argument('--methods', nargs='+', default=['sfm', 'lgm'])
  parser.add_argument('--steps', type=int, default=1000)
  parser.add_argument('--curve-every', type=int, default=100)
  parser.add_argument('--probe-runs', type=int, default=2)
  parser.add_argument('--probe-epochs', type=int, default=300)
  parser.add_argument('--out', default='benchmarks/out/sfm_cost.json')
  args = parser.parse_args()

  config = load_config_file(os.path.join(ROOT, 'configs', 'sfm.py'), args.config)
  p = config.sfm
  dataset = sources.load(config.data)
  nets = sfm_run.backbones(dataset, config, train=False)
  phi = nets['distill']
  real = sfm_run.statistics(phi, dataset, config)
  test_features = phi.features(dataset.test['x'])
  labels = np.repeat(np.arange(dataset.num_classes), args.ipc)
  count = len(labels)
  protocol = dataclasses.replace(sfm_run.probe_protocol(p), runs=args.probe_runs,
                                 epochs=args.probe_epochs)
  key = jax.random.key(config.dd.seed)
  rows = []
  for name in args.methods:
    loss_fn, loss_args = sfm_run.make_loss(name, args.ipc, phi, real, dataset, p)
    cost = sfm_run.step_cost(loss_fn, jnp.zeros((count, *dataset.shape)), key, *loss_args)
    snapshots = []
    start = time.perf_counter()

    def progress(done, loss, images, snapshots=snapshots, start=start):
      snapshots.append({'step': done, 'seconds': time.perf_counter() - start, 'loss': loss,
                        'images': images()})

    image_param.distill(loss_fn, dataset.shape, count, key, steps=args.steps, lr=p.lr,
                        mode=p.param, grow_every=p.grow_every, loss_args=loss_args,
                        on_progress=progress, progress_every=args.curve_every)
    first = snapshots[0]
    # snapshot rendering is excluded from the step rate: it is measured between snapshots
    seconds_per_step = ((snapshots[-1]['seconds'] - first['seconds'])
                        / max(1, snapshots[-1]['step'] - first['step']))
    curve = []
    for snap in snapshots:
      result = linear_probe.evaluate_probe(
          lambda x: phi.apply(phi.params, x), snap['images'], labels, test_features,
          dataset.test['label'], dataset.num_classes, jax.random.key(1), protocol,
          augment=sfm_run.augment)
      curve.append({'step': snap['step'], 'seconds': snap['seconds'], 'loss': snap['loss'],
                    'accuracy': result['mean']})
      print(json.dumps({'method': name, **curve[-1]}), flush=True)
    final = curve[-1]['accuracy']
    reached = next(c for c in curve if c['accuracy'] >= final - 0.005)
    rows.append({'method': name, **cost, 'seconds_per_step': seconds_per_step,
                 'compile_and_first_chunk_seconds': first['seconds'],
                 'steps_to_final': reached['step'], 'seconds_to_final': reached['seconds'],
                 'final_accuracy': final,
                 'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                 'curve': curve})
  summary = {}
  by = {r['method']: r for r in rows}
  if 'sfm' in by and 'lgm' in by:
    summary = {'temp_ratio': by['sfm']['xla_temp_bytes'] / by['lgm']['xla_temp_bytes'],
               'time_to_final_ratio': by['sfm']['seconds_to_final'] / by['lgm']['seconds_to_final'],
               'step_time_ratio': by['sfm']['seconds_per_step'] / by['lgm']['seconds_per_step']}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'args': vars(args), 'rows': rows, 'summary': summary}, f, indent=2)
  print('| method | XLA temp MiB | XLA args MiB | s/step | steps to final | s to final | '
        'final % | peak RSS MiB (process) |')
  print('|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f'| {r["method"]} | {r["xla_temp_bytes"] / 2**20:.1f} | '
          f'{r["xla_argument_bytes"] / 2**20:.1f} | {r["seconds_per_step"]:.4f} | '
          f'{r["steps_to_final"]} | {r["seconds_to_final"]:.0f} | '
          f'{100 * r["final_accuracy"]:.1f} | {r["peak_rss_mib"]:.0f} |')
  print(json.dumps(summary))


if __name__ == '__main__':
  main()
