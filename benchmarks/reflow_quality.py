"""Reflow and piecewise reflow, each with and without marginal alignment, at equal budget.

For each 2-D set: reuse (or train) the quickstart teacher in benchmarks/out/teacher/<set>,
generate its trajectories once per window count (shared by the variants with that count),
train the four students for the same number of steps, and report W2 and the few-step NLL at
1, 2 and 4 NFE, the drift of the sample mean and covariance from the teacher's adaptive solve,
the per-window KL estimates and their TV bound. The target: alignment beats plain reflow at 1
and 2 NFE on every set.

python benchmarks/reflow_quality.py [--sets checkerboard,8gaussians,moons] [--steps 3000]
    [--align-weight 0.01] [--score-eps 0.01] [--logdet exact]
    [--variants reflow,reflow-ma,piecewise,piecewise-ma]
"""

import argparse
import json
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = ROOT / 'configs'


def summarise(result: dict) -> dict:
  """{nfe: {'w2', 'nll', 'mean_drift', 'cov_drift'}} of the student rows, plus the KLs."""
  rows = {}
  for row in result['rows']:
    if row['sampler'].startswith('student'):
      rows[int(row['nfe'])] = {k: row.get(k) for k in ('w2', 'nll', 'mean_drift', 'cov_drift')}
  return {'student': rows, 'ode_nll': result['nll'], 'window_kl': result['window_kl'],
          'tv_bound': result['tv_bound']}


def teacher_rows(result: dict) -> dict:
  return {row['sampler']: {'nfe': row['nfe'], 'w2': row['w2']} for row in result['rows']
          if row['sampler'].startswith('teacher')}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sets', default='checkerboard,8gaussians,moons')
  parser.add_argument('--variants', default='reflow,reflow-ma,piecewise,piecewise-ma')
  parser.add_argument('--steps', type=int, default=3000)
  parser.add_argument('--align-weight', type=float, default=None,
                      help='λ for the -ma variants (default: the config\'s)')
  parser.add_argument('--score-eps', type=float, default=None,
                      help='teacher-score time clip for the -ma variants (default: the config\'s)')
  parser.add_argument('--logdet', default=None, help='log-det method for the -ma variants')
  parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'out' / 'reflow'))
  args = parser.parse_args()

  from flowdistill import experiments
  from flowdistill.experiments import load_config_file

  summary = {}
  for name in args.sets.split(','):
    teacher_dir = str(ROOT / 'benchmarks' / 'out' / 'teacher' / name)
    experiments.run(load_config_file(CONFIGS / 'quickstart.py', name), teacher_dir)
    summary[name] = {}
    for variant in args.variants.split(','):
      config = load_config_file(CONFIGS / 'reflow.py', f'{variant},{name}')
      config.teacher.workdir = teacher_dir
      config.train.steps = args.steps
      if args.align_weight is not None and variant.endswith('-ma'):
        config.reflow.align_weight = args.align_weight
      if args.score_eps is not None and variant.endswith('-ma'):
        config.reflow.score_eps = args.score_eps
      if args.logdet is not None and variant.endswith('-ma'):
        config.reflow.align_logdet = args.logdet
      config.reflow.pairs_dir = os.path.join(args.out, name, f'pairs_k{config.reflow.windows}')
      tag = variant
      if variant.endswith('-ma'):
        tag += (f'-{config.reflow.align_weight:g}-eps{config.reflow.score_eps:g}'
                f'-{config.reflow.align_logdet}')
      result = experiments.run(config, os.path.join(args.out, name, tag))
      summary[name][tag] = summarise(result)
      summary[name]['teacher'] = teacher_rows(result)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f'summary_{"_".join(args.sets.split(","))}.json')
  with open(path, 'w') as f:
    json.dump(summary, f, indent=2)
  print(json.dumps(summary, indent=1))


if __name__ == '__main__':
  main()
