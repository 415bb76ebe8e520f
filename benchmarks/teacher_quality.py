"""Quality vs NFE of a trained 2-D flow-matching teacher, and the quickstart's end-to-end time.

Trains `configs/quickstart.py` on each toy set (exactly what the README's first command runs
for the checkerboard), then reports W2 at 1, 2, 4, 8, 16, 100 Euler steps and with Dopri5
(with its NFE), and the exact-trace NLL against the checkerboard's exact entropy. `--seeds`
and `--time-dim` (the MLP's time-embedding width, `config.model.time_dim`) compare settings:
with more than one seed the table ends with each set's mean ± std over the seeds.

python benchmarks/teacher_quality.py [--sets checkerboard,8gaussians,moons] [--seeds 0,1,2]
    [--time-dim 64] [--out DIR]
"""

import argparse
import json
import os
import pathlib
import shutil
import statistics
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sets', default='checkerboard,8gaussians,moons')
  parser.add_argument('--seeds', default='0', help='comma-separated config.seed values')
  parser.add_argument('--time-dim', type=int, default=0,
                      help="config.model.time_dim (0: the config's own)")
  parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'out' / 'teacher'))
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(',')]

  import jax  # noqa: PLC0415

  from flowdistill import experiments  # noqa: PLC0415
  from flowdistill.experiments import load_config_file, validate  # noqa: PLC0415

  plain = seeds == [0] and not args.time_dim  # the issue-2 table's names
  width = args.time_dim or 'config'
  summary, by_set = {}, {}
  for name in args.sets.split(','):
    for seed in seeds:
      config = load_config_file(ROOT / 'configs' / 'quickstart.py', name)
      config.seed = seed
      if args.time_dim:
        config.model.time_dim = args.time_dim
      validate(config, num_devices=jax.device_count())
      run = name if plain else f'{name}-td{width}-s{seed}'
      workdir = os.path.join(args.out, run)
      shutil.rmtree(workdir, ignore_errors=True)
      start = time.perf_counter()
      result = experiments.run(config, workdir)
      result['wall_s'] = time.perf_counter() - start
      summary[run] = result
      by_set.setdefault(name, []).append(result)
  stem = 'summary' if plain else f'summary-td{width}-s{args.seeds.replace(",", "_")}'
  with open(os.path.join(args.out, f'{stem}.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  lines = ['| set | ' + ' | '.join(r['sampler'] for r in next(iter(summary.values()))['rows'])
           + ' | NLL (nats) | exact entropy | wall time (s) |']
  lines.append('|' + '---|' * (len(lines[0].split('|')) - 2))
  for name, result in summary.items():
    cells = [f'{r["w2"]:.3f} (NFE {r["nfe"]:.0f})' for r in result['rows']]
    target = result['nll_target']
    lines.append(f'| {name} | ' + ' | '.join(cells) + f' | {result["nll"]:.3f} | '
                 + (f'{target:.3f}' if target else 'n/a') + f' | {result["wall_s"]:.0f} |')
  if len(seeds) > 1:
    for name, runs in by_set.items():
      columns = list(zip(*[[row['w2'] for row in r['rows']] + [r['nll']] for r in runs]))
      cells = [f'{statistics.mean(c):.3f} ± {statistics.stdev(c):.3f}' for c in columns]
      lines.append(f'| {name}, mean ± std over seeds {args.seeds} | ' + ' | '.join(cells)
                   + ' | | |')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
