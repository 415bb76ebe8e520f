"""Reflow and piecewise reflow, each with and without marginal alignment, at equal budget.

For each 2-D set: reuse (or train) the quickstart teacher in benchmarks/out/teacher/<set>,
generate its trajectories once per window count and seed (shared by the variants with that
count), train the students for the same number of steps, and report W2 and the few-step NLL at
1, 2 and 4 NFE, the drift of the sample mean and covariance from the teacher's adaptive solve,
the per-window KL estimates and their TV bound. W2 is also measured on two data draws of their
own, independent of the run's report: a validation draw (for choosing settings,
`benchmarks/reflow_ma_sweep.py`) and a test draw. The target: alignment beats plain reflow at 1
and 2 NFE on every set.

The -ma variants use `--align-time` (default: the config's, 'consistent'); a '-clipped' suffix
('reflow-ma-clipped', 'piecewise-ma-clipped') runs the earlier form beside it.

python benchmarks/reflow_quality.py [--sets checkerboard,8gaussians,moons] [--steps 3000]
    [--align-weight 0.01] [--score-eps 0.01] [--logdet exact] [--warmup 500]
    [--align-time consistent]
    [--seeds 0] [--variants reflow,reflow-ma,piecewise,piecewise-ma,reflow-ma-clipped]
"""

import argparse
import json
import os
import pathlib

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = ROOT / 'configs'
CLIPPED = '-clipped'
SPLIT_SEEDS = {'val': 1_000_003, 'test': 2_000_003}  # data and noise draws of each split
SPLIT_SIZE = 2000


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


def finished_step(workdir: str):
  """The step of the run in `workdir` that wrote its results, or None."""
  path = os.path.join(workdir, 'results.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f).get('step')


def ensure_teacher(name: str) -> str:
  """The quickstart teacher's workdir for toy set `name` (trained and scored on first use)."""
  from flowdistill import experiments
  from flowdistill.experiments import load_config_file

  teacher_dir = str(ROOT / 'benchmarks' / 'out' / 'teacher' / name)
  if finished_step(teacher_dir) is None:
    experiments.run(load_config_file(CONFIGS / 'quickstart.py', name), teacher_dir)
  return teacher_dir


def student_config(name: str, variant: str, teacher_dir: str, out: str, *, steps: int,
                   seed: int = 0, align_weight=None, score_eps=None, logdet=None,
                   align_time=None, warmup=None):
  """`configs/reflow.py` for `variant` (a config variant, or an -ma one with '-clipped') on
  set `name`; the alignment options (None: the config's) apply to -ma variants only."""
  from flowdistill.experiments import load_config_file

  base = variant.removesuffix(CLIPPED)
  config = load_config_file(CONFIGS / 'reflow.py', f'{base},{name}')
  config.teacher.workdir = teacher_dir
  config.train.steps = steps
  config.seed = seed
  if base.endswith('-ma'):
    options = {'align_weight': align_weight, 'score_eps': score_eps, 'align_logdet': logdet,
               'align_warmup': warmup,
               'align_time': 'clipped' if variant.endswith(CLIPPED) else align_time}
    config.reflow.update({k: v for k, v in options.items() if v is not None})
  config.reflow.pairs_dir = os.path.join(out, name, f'pairs_k{config.reflow.windows}_s{seed}')
  return config


def run_tag(config, variant: str) -> str:
  """The run's directory name: the variant, its alignment settings and the seed."""
  tag = variant
  if config.reflow.align_weight > 0:
    rc = config.reflow
    tag += (f'-{rc.align_weight:g}-eps{rc.score_eps:g}-{rc.align_logdet}-{rc.align_time}'
            f'-w{rc.align_warmup}')
  return f'{tag}-s{config.seed}'


def split_w2(workdir: str, split: str, nfes=(1, 2)) -> dict:
  """{nfe: W2} of the student in `workdir` at each NFE (Euler, whole steps per window) against
  `SPLIT_SIZE` fresh points of its data set; data and noise come from `split`'s own keys."""
  from flowdistill import ode
  from flowdistill.data import toy
  from flowdistill.eval import metrics
  from flowdistill.experiments.reflow_run import student_samplers
  from flowdistill.fewstep import reflow
  from flowdistill.train.teacher import load_trained

  student = load_trained(workdir)
  k_data, k_noise = jax.random.split(jax.random.key(SPLIT_SEEDS[split]))
  data = np.asarray(toy.sample(student.config.data.name, k_data, SPLIT_SIZE))
  x0 = ode.noise(k_noise, SPLIT_SIZE, student.data_shape)
  times = reflow.window_times(student.config.reflow.windows)
  out = {}
  for label, sampler, params in student_samplers(student.apply_fn, student.params, times, nfes):
    out[int(label.rsplit('-', 1)[1])] = metrics.w2(np.asarray(sampler(params, x0, None)[0]),
                                                   data)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sets', default='checkerboard,8gaussians,moons')
  parser.add_argument('--variants', default='reflow,reflow-ma,piecewise,piecewise-ma')
  parser.add_argument('--steps', type=int, default=3000)
  parser.add_argument('--seeds', default='0', help='comma-separated run seeds')
  parser.add_argument('--align-weight', type=float, default=None,
                      help='λ for the -ma variants (default: the config\'s)')
  parser.add_argument('--score-eps', type=float, default=None,
                      help='teacher-score time clip for the -ma variants (default: the config\'s)')
  parser.add_argument('--logdet', default=None, help='log-det method for the -ma variants')
  parser.add_argument('--warmup', type=int, default=None,
                      help='steps of λ\'s warm-up for the -ma variants')
  parser.add_argument('--align-time', default=None, choices=('consistent', 'clipped'),
                      help='form of the -ma variants without the -clipped suffix')
  parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'out' / 'reflow'))
  args = parser.parse_args()

  from flowdistill import experiments

  summary = {}
  for name in args.sets.split(','):
    teacher_dir = ensure_teacher(name)
    summary[name] = {}
    for variant in args.variants.split(','):
      for seed in map(int, args.seeds.split(',')):
        config = student_config(name, variant, teacher_dir, args.out, steps=args.steps,
                                seed=seed, align_weight=args.align_weight,
                                score_eps=args.score_eps, logdet=args.logdet,
                                warmup=args.warmup, align_time=args.align_time)
        workdir = os.path.join(args.out, name, run_tag(config, variant))
        result = experiments.run(config, workdir)
        summary[name][run_tag(config, variant)] = dict(
            summarise(result), w2_val=split_w2(workdir, 'val'), w2_test=split_w2(workdir, 'test'))
        summary[name]['teacher'] = teacher_rows(result)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f'summary_{"_".join(args.sets.split(","))}.json')
  with open(path, 'w') as f:
    json.dump(summary, f, indent=2)
  print(json.dumps(summary, indent=1))


if __name__ == '__main__':
  main()
