"""SFM against LGM from a finished `method='sfm'` run: peak XLA memory of the full compiled
distillation step (arguments + temporaries + outputs) at each IPC of `--memory-ipcs`,
steady-state s/step (compilation apart), and the steps and wall-clock time to the final
accuracy — the first snapshot within 0.5 points of the last one, by linear probes of the
snapshots the run kept every `sfm.snapshot_every` steps, scored on the validation split (the
step is a choice; the test split is never read here).

`--memory-only` measures the memory without a run: φ_d is then an untrained encoder of the
config's architecture (a compiled step's memory depends on shapes, never on weights).

FLOWDISTILL_MNIST_DIR=../shared/data/mnist python benchmarks/sfm_cost.py \
    --workdir runs/sfm-mnist-cpu --config mnist,cpu --probe-runs 2
FLOWDISTILL_MNIST_DIR=../shared/data/mnist python benchmarks/sfm_cost.py --memory-only
"""

import argparse
import dataclasses
import json
import os

import jax
import numpy as np
from flax import nnx

from flowdistill.condense import linear_probe, protocol, sfm, sfm_setup, ssl
from flowdistill.data import sources
from flowdistill.experiments import load_config_file
from flowdistill.models.encoder import ConvEncoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def curve(snapshots, phi, validation, num_classes, probe) -> list[dict]:
  """[{'step', 'seconds', 'accuracy'}] of each snapshot (linear probe on φ_d, validation
  accuracy)."""
  out = []
  embed = lambda x: phi.apply(phi.params, x)  # noqa: E731
  features = phi.features(validation['x'])
  for step, seconds, images in zip(snapshots['steps'], snapshots['seconds'],
                                   snapshots['images'], strict=True):
    result = linear_probe.evaluate_probe(
        embed, images, snapshots['labels'], features, validation['label'], num_classes,
        jax.random.key(1), probe, augment=ssl.view)
    out.append({'step': int(step), 'seconds': float(seconds), 'accuracy': result['mean']})
  return out


def untrained(dataset, config) -> tuple[ssl.FrozenBackbone, dict]:
  """(φ_d of the config's architecture at its initial weights, real statistics of its
  features on the first 1000 train images): the shapes of the distillation step, for memory."""
  settings = sfm_setup.ssl_settings(config)['distill']
  encoder = ConvEncoder(dataset.shape[-1], widths=settings.widths, rngs=nnx.Rngs(0))
  phi = ssl.FrozenBackbone(encoder, 'untrained', {})
  head = slice(0, 1000)
  return phi, sfm.real_statistics(phi.features(dataset.train['x'][head]),
                                  dataset.train['label'][head], dataset.num_classes)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', help='a finished method="sfm" run')
  parser.add_argument('--memory-only', action='store_true',
                      help='only the step memory, with an untrained φ_d (no run needed)')
  parser.add_argument('--config', default='mnist,cpu', help='the arg of configs/sfm.py')
  parser.add_argument('--methods', nargs='+', default=['sfm', 'lgm'])
  parser.add_argument('--probe-runs', type=int, default=2)
  parser.add_argument('--ipcs', type=int, nargs='+', help='a subset of the run\'s IPCs')
  parser.add_argument('--memory-ipcs', type=int, nargs='+', default=[1, 10, 50])
  parser.add_argument('--out', default='benchmarks/out/sfm_cost.json')
  args = parser.parse_args()
  if not (args.workdir or args.memory_only):
    parser.error('give --workdir (a finished method="sfm" run) or --memory-only')

  config = load_config_file(os.path.join(ROOT, 'configs', 'sfm.py'), args.config)
  dataset, validation = protocol.with_validation(sources.load(config.data), config.dd)
  if args.memory_only:
    phi, real = untrained(dataset, config)
  else:
    phi = sfm_setup.backbones(dataset, config, train=False)['distill']
    real = sfm_setup.statistics(phi, dataset, config)
  memory = []
  for ipc in args.memory_ipcs:
    for name in args.methods:
      loss_fn, loss_args = sfm_setup.distillation_loss(name, ipc, phi, real, dataset, config.sfm)
      images = np.zeros((dataset.num_classes * ipc, *dataset.shape), np.float32)
      memory.append({'method': name, 'ipc': ipc, **sfm_setup.step_cost(
          loss_fn, images, jax.random.key(0), *loss_args)})
      print(json.dumps(memory[-1]), flush=True)
  probe = dataclasses.replace(sfm_setup.probe_protocol(config), runs=args.probe_runs)
  ipcs = [] if args.memory_only else args.ipcs or config.dd.ipcs
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
        points = curve(dict(f), phi, validation, dataset.num_classes, probe)
      final = points[-1]['accuracy']
      reached = next(c for c in points if c['accuracy'] >= final - 0.005)
      rows.append({'method': name, 'ipc': ipc,
                   **{k: cell[k] for k in ('seconds_per_step', 'compile_and_first_seconds',
                                           'distill_seconds', 'peak_rss_mib')},
                   'steps_to_final': reached['step'], 'seconds_to_final': reached['seconds'],
                   'final_accuracy': final, 'curve': points})
      print(json.dumps({k: v for k, v in rows[-1].items() if k != 'curve'}), flush=True)
  by = {(r['method'], r['ipc']): r for r in rows}
  peak = {(m['method'], m['ipc']): m['xla_peak_bytes'] for m in memory}
  ratios = {f'ipc{ipc}': {'peak_memory': peak['sfm', ipc] / peak['lgm', ipc]}
            for ipc in args.memory_ipcs if ('sfm', ipc) in peak and ('lgm', ipc) in peak}
  for ipc in ipcs:
    if ('sfm', ipc) in by and ('lgm', ipc) in by:
      s, g = by['sfm', ipc], by['lgm', ipc]
      ratios.setdefault(f'ipc{ipc}', {}).update(
          seconds_per_step=s['seconds_per_step'] / g['seconds_per_step'],
          time_to_final=s['seconds_to_final'] / g['seconds_to_final'])
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'args': vars(args), 'memory': memory, 'rows': rows, 'ratios': ratios}, f,
              indent=2)
  print('| method | IPC | args MiB | temp MiB | outputs MiB | step peak MiB |')
  print('|---|---|---|---|---|---|')
  for m in memory:
    print(f'| {m["method"]} | {m["ipc"]} | ' + ' | '.join(
        f'{m[f"xla_{k}_bytes"] / 2**20:.1f}' for k in ('argument', 'temp', 'output', 'peak'))
        + ' |')
  print('| method | IPC | s/step | compile + first s | steps to final | s to final | '
        'final % (snapshot probe, validation) |')
  print('|---|---|---|---|---|---|---|')
  for r in rows:
    print(f'| {r["method"]} | {r["ipc"]} | {r["seconds_per_step"]:.4f} | '
          f'{r["compile_and_first_seconds"]:.1f} | {r["steps_to_final"]} | '
          f'{r["seconds_to_final"]:.0f} | {100 * r["final_accuracy"]:.1f} |')
  print(json.dumps(ratios))


if __name__ == '__main__':
  main()
