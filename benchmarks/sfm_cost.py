"""SFM against LGM from a finished `method='sfm'` run: XLA memory of the compiled distillation
step (temp and argument bytes), steady-state s/step (compilation apart), and the steps and
wall-clock time to the final accuracy — the first snapshot within 0.5 points of the last one,
from linear probes of the snapshots the run kept every `sfm.snapshot_every` steps.

FLOWDISTILL_MNIST_DIR=../shared/data/mnist python benchmarks/sfm_cost.py \
    --workdir runs/sfm-mnist-cpu --config mnist,cpu --probe-runs 2
"""

import argparse
import dataclasses
import json
import os

import jax
import numpy as np

from flowdistill.condense import linear_probe, sfm_setup, ssl
from flowdistill.config import load_config_file
from flowdistill.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def curve(snapshots, phi, test_features, dataset, protocol) -> list[dict]:
  """[{'step', 'seconds', 'accuracy'}] of each snapshot (linear probe on φ_d)."""
  out = []
  embed = lambda x: phi.apply(phi.params, x)  # noqa: E731
  for step, seconds, images in zip(snapshots['steps'], snapshots['seconds'],
                                   snapshots['images'], strict=True):
    result = linear_probe.evaluate_probe(
        embed, images, snapshots['labels'], test_features, dataset.test['label'],
        dataset.num_classes, jax.random.key(1), protocol, augment=ssl.view)
    out.append({'step': int(step), 'seconds': float(seconds), 'accuracy': result['mean']})
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, help='a finished method="sfm" run')
  parser.add_argument('--config', default='mnist,cpu', help='the arg of configs/sfm.py')
  parser.add_argument('--methods', nargs='+', default=['sfm', 'lgm'])
  parser.add_argument('--probe-runs', type=int, default=2)
  parser.add_argument('--ipcs', type=int, nargs='+', help='a subset of the run\'s IPCs')
  parser.add_argument('--out', default='benchmarks/out/sfm_cost.json')
  args = parser.parse_args()

  config = load_config_file(os.path.join(ROOT, 'configs', 'sfm.py'), args.config)
  dataset = sources.load(config.data)
  phi = sfm_setup.backbones(dataset, config, train=False)['distill']
  test_features = phi.features(dataset.test['x'])
  protocol = dataclasses.replace(sfm_setup.probe_protocol(config), runs=args.probe_runs)
  ipcs = args.ipcs or config.dd.ipcs
  rows = []
  for ipc in ipcs:
    for name in args.methods:
      stem = f'{name}_ipc{ipc}'
      snapshot_path = os.path.join(args.workdir, 'snapshots', f'{stem}.npz')
      cell_path = os.path.join(args.workdir, 'cells', f'{stem}.json')
      if not (os.path.isfile(snapshot_path) and os.path.isfile(cell_path)):
        raise FileNotFoundError(f'{snapshot_path} or {cell_path} is missing; run '
                                f'--config=configs/sfm.py:{args.config} '
                                f'--workdir={args.workdir} to the end first.')
      with open(cell_path) as f:
        cell = json.load(f)
      with np.load(snapshot_path) as f:
        points = curve(dict(f), phi, test_features, dataset, protocol)
      final = points[-1]['accuracy']
      reached = next(c for c in points if c['accuracy'] >= final - 0.005)
      rows.append({'method': name, 'ipc': ipc,
                   **{k: cell[k] for k in ('xla_temp_bytes', 'xla_argument_bytes',
                                           'seconds_per_step', 'compile_and_first_seconds',
                                           'distill_seconds', 'peak_rss_mib')},
                   'steps_to_final': reached['step'], 'seconds_to_final': reached['seconds'],
                   'final_accuracy': final, 'curve': points})
      print(json.dumps({k: v for k, v in rows[-1].items() if k != 'curve'}), flush=True)
  by = {(r['method'], r['ipc']): r for r in rows}
  ratios = {}
  for ipc in ipcs:
    if ('sfm', ipc) in by and ('lgm', ipc) in by:
      s, g = by['sfm', ipc], by['lgm', ipc]
      ratios[f'ipc{ipc}'] = {'temp': s['xla_temp_bytes'] / g['xla_temp_bytes'],
                             'seconds_per_step': s['seconds_per_step'] / g['seconds_per_step'],
                             'time_to_final': s['seconds_to_final'] / g['seconds_to_final']}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'args': vars(args), 'rows': rows, 'ratios': ratios}, f, indent=2)
  print('| method | IPC | XLA temp MiB | XLA args MiB | s/step | compile + first s | '
        'steps to final | s to final | final % (snapshot probe) |')
  print('|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f'| {r["method"]} | {r["ipc"]} | {r["xla_temp_bytes"] / 2**20:.1f} | '
          f'{r["xla_argument_bytes"] / 2**20:.1f} | {r["seconds_per_step"]:.4f} | '
          f'{r["compile_and_first_seconds"]:.1f} | {r["steps_to_final"]} | '
          f'{r["seconds_to_final"]:.0f} | {100 * r["final_accuracy"]:.1f} |')
  print(json.dumps(ratios))


if __name__ == '__main__':
  main()
