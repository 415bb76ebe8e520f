"""Quality vs NFE of a trained 2-D flow-matching teacher, and the quickstart's end-to-end time.

Trains `configs/quickstart.py` on each toy set (exactly what the README's first command runs
for the checkerboard), then reports W2 at 1, 2, 4, 8, 16, 100 Euler steps and with Dopri5
(with its NFE), and the exact-trace NLL against the checkerboard's exact entropy.

python benchmarks/teacher_quality.py [--sets checkerboard,8gaussians,moons] [--out DIR]
"""

import argparse
import json
import os
import pathlib
import shutil
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sets', default='checkerboard,8gaussians,moons')
  parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'out' / 'teacher'))
  args = parser.parse_args()

  import jax  # noqa: PLC0415

  from flowdistill import experiments  # noqa: PLC0415
  from flowdistill.experiments import load_config_file, validate  # noqa: PLC0415

  summary = {}
  for name in args.sets.split(','):
    workdir = os.path.join(args.out, name)
    shutil.rmtree(workdir, ignore_errors=True)
    config = load_config_file(ROOT / 'configs' / 'quickstart.py', name)
    validate(config, num_devices=jax.device_count())
    start = time.perf_counter()
    result = experiments.run(config, workdir)
    result['wall_s'] = time.perf_counter() - start
    summary[name] = result
  with open(os.path.join(args.out, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  lines = ['| set | ' + ' | '.join(r['sampler'] for r in next(iter(summary.values()))['rows'])
           + ' | NLL (nats) | exact entropy | wall time (s) |']
  lines.append('|' + '---|' * (len(lines[0].split('|')) - 2))
  for name, result in summary.items():
    cells = [f'{r["w2"]:.3f} (NFE {r["nfe"]:.0f})' for r in result['rows']]
    target = result['nll_target']
    lines.append(f'| {name} | ' + ' | '.join(cells) + f' | {result["nll"]:.3f} | '
                 + (f'{target:.3f}' if target else 'n/a') + f' | {result["wall_s"]:.0f} |')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
