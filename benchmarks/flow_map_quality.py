"""Flow-map students (LMD, EMD, PFMM, FMM) vs their teacher: W2 at 1, 2, 4, 8 steps.

For each 2-D set: train the quickstart teacher (or reuse benchmarks/out/teacher/<set> from
teacher_quality.py), distil it by LMD and EMD, distil the LMD student further by PFMM (2
teacher jumps), and learn a map from scratch by FMM; each student gets the same number of
steps. Reports W2 per NFE next to the teacher's Euler at the same NFE and its adaptive solve,
the targets (2-step <= 1.2x, 1-step <= 1.5x the teacher's adaptive W2), the loss curves'
stability and wall time per sample.

python benchmarks/flow_map_quality.py [--sets checkerboard,8gaussians,moons] [--steps 4000]
"""

import argparse
import json
import os
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = ROOT / 'configs'
LOSSES = ('lmd', 'emd', 'pfmm', 'fmm')


def loss_stability(workdir: str) -> dict:
  """Last logged loss and the relative spread of the last half of the logged losses."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    losses = np.array([json.loads(line)['loss'] for line in f])
  tail = losses[len(losses) // 2:]
  return {'final_loss': float(losses[-1]), 'tail_rel_std': float(tail.std() / abs(tail.mean()))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sets', default='checkerboard,8gaussians,moons')
  parser.add_argument('--steps', type=int, default=4000)
  parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'out' / 'flow_map'))
  args = parser.parse_args()

  from flowdistill import experiments  # noqa: PLC0415
  from flowdistill.experiments import load_config_file  # noqa: PLC0415

  summary = {}
  for name in args.sets.split(','):
    teacher_dir = str(ROOT / 'benchmarks' / 'out' / 'teacher' / name)
    teacher_result = experiments.run(load_config_file(CONFIGS / 'quickstart.py', name), teacher_dir)
    results = {}
    for loss in LOSSES:
      config = load_config_file(CONFIGS / 'flow_map.py', f'{loss},{name}')
      config.train.steps = args.steps
      config.teacher.workdir = {'lmd': teacher_dir, 'emd': teacher_dir, 'fmm': '',
                                'pfmm': os.path.join(args.out, name, 'lmd')}[loss]
      workdir = os.path.join(args.out, name, loss)
      result = experiments.run(config, workdir)
      results[loss] = {'rows': result['rows'], 'nll': result['nll'],
                       **loss_stability(workdir)}
    summary[name] = {'teacher': teacher_result, 'students': results}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  print(format_tables(summary))


def format_tables(summary) -> str:
  lines = []
  for name, entry in summary.items():
    teacher = {r['sampler']: r for r in entry['teacher']['rows']}
    adaptive = next(r for r in entry['teacher']['rows'] if r['sampler'] in ('dopri5', 'tsit5'))
    floor = entry['teacher']['rows'][0]['w2']
    lines += [f'\n### {name} (teacher {adaptive["sampler"]}: W2 {adaptive["w2"]:.3f} at NFE '
              f'{adaptive["nfe"]:.0f}; finite-sample floor {floor:.3f})', '',
              '| model | 1 step | 2 steps | 4 steps | 8 steps | 1-step / adaptive | '
              '2-step / adaptive | NLL (nats) | final loss | loss spread |',
              '|---|---|---|---|---|---|---|---|---|---|']
    lines.append('| teacher (Euler) | ' + ' | '.join(
        f'{teacher[f"euler-{k}"]["w2"]:.3f}' for k in (1, 2, 4, 8)) + ' | | | '
        f'{entry["teacher"]["nll"]:.3f} | | |')
    for loss, res in entry['students'].items():
      w2 = {r['sampler']: r['w2'] for r in res['rows']}
      steps = [w2[f'student {k}-jump'] for k in (1, 2, 4, 8)]
      lines.append(f'| {loss} | ' + ' | '.join(f'{v:.3f}' for v in steps)
                   + f' | {steps[0] / adaptive["w2"]:.2f} | {steps[1] / adaptive["w2"]:.2f} | '
                   f'{res["nll"]:.3f} | {res["final_loss"]:.4f} | {res["tail_rel_std"]:.2f} |')
  return '\n'.join(lines)


if __name__ == '__main__':
  main()
