"""Reflow with marginal alignment (MA): λ, ε, warm-up and log-det chosen on validation W2,
test W2 reported once.

For each 2-D set: plain reflow, and reflow + MA in each form ('consistent' and 'clipped'
`align_time`) over the grid align_weight × score_eps × align_warmup × align_logdet, each over
the same seeds, at one step budget (`benchmarks/reflow_quality.py` trains and scores them).
Per form the setting with the least validation W2 (mean over seeds and over 1 and 2 NFE) is
chosen; only the chosen runs and plain reflow are then scored on the test draw. The table per
set gives W2 at 1 and 2 NFE, mean ± std (ddof 1) over seeds, validation and test, and whether
MA beats plain reflow on test by more than the larger of the two seed stds.

Short runs: the evaluated EMA is `--ema` (0.999 keeps a third of the warm start after 1000
steps), λ warms up linearly over each of `--warmups` steps (0: constant), the log-det is each of
`--logdets` ('exact', 'hutchinson'), the run's own report uses 100 NLL and KL points and 1 and
2 NFE, no plots.

python benchmarks/reflow_ma_sweep.py [--sets checkerboard,8gaussians] [--steps 1000]
    [--seeds 0,1,2] [--weights 0.001,0.01,0.1] [--eps 0.01,0.05] [--forms consistent,clipped]
    [--ema 0.995] [--warmups 500] [--logdets exact]
"""

import argparse
import itertools
import json
import os

import numpy as np
import reflow_quality as rq

NFES = (1, 2)


def train(name: str, variant: str, teacher_dir: str, args, seed: int, **align) -> str:
  """Trains one student with the sweep's short-run settings, unless a finished run of as many
  steps is there; its workdir."""
  from flowdistill import experiments

  config = rq.student_config(name, variant, teacher_dir, args.out, steps=args.steps, seed=seed,
                             **align)
  config.train.update(ema_rates=(args.ema,), eval_ema=args.ema)
  config.eval.update(plot=False, nll_samples=100, euler_steps=NFES)
  config.reflow.update(kl_samples=100)
  workdir = os.path.join(args.out, name, rq.run_tag(config, variant))
  if rq.finished_step(workdir) != args.steps:
    experiments.run(config, workdir)
  return workdir


def scores(workdirs, split: str) -> dict:
  """{nfe: [W2 per run]} on `split`."""
  per_run = [rq.split_w2(w, split, NFES) for w in workdirs]
  return {n: [r[n] for r in per_run] for n in NFES}


def objective(val: dict) -> float:
  """Validation criterion: mean W2 over seeds and NFE."""
  return float(np.mean([np.mean(v) for v in val.values()]))


def mean_std(values, digits: int = 4) -> str:
  return f'{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}'


def beats(ma: dict, plain: dict, digits: int = 4) -> str:
  """'yes' per NFE (the keys of `plain`, {nfe: [per seed]}) where MA's mean test score (lower
  is better) is below plain reflow's by more than the larger seed std."""
  out = []
  for n in plain:
    gap = np.mean(plain[n]) - np.mean(ma[n])
    std = max(np.std(plain[n], ddof=1), np.std(ma[n], ddof=1))
    out.append(f'{n}: {"yes" if gap > std else "no"} ({gap:+.{digits}f} vs {std:.{digits}f})')
  return '; '.join(out)


def table(name: str, rows: list) -> str:
  """Markdown table of (label, setting, val, test) rows."""
  head = ['variant', 'λ, ε, warm-up, log-det'] + [f'{s} W2 @{n}' for s in ('val', 'test')
                                                  for n in NFES]
  lines = [f'### {name}', '', '| ' + ' | '.join(head) + ' | ' + 'beats plain (test) |',
           '|' + '---|' * (len(head) + 1)]
  plain_test = rows[0][3]
  for label, setting, val, test in rows:
    cells = [label, setting] + [mean_std(val[n]) for n in NFES] + [mean_std(test[n])
                                                                 for n in NFES]
    verdict = '' if label == 'reflow' else beats(test, plain_test)
    lines.append('| ' + ' | '.join(cells + [verdict]) + ' |')
  return '\n'.join(lines)


def setting_label(weight: float, eps: float, warmup: int, logdet: str) -> str:
  """'λ, ε, warm-up, log-det' as the table prints it and `reflow_kl_along_t` reads it."""
  return f'{weight:g}, {eps:g}, {warmup}, {logdet}'


def sweep_set(name: str, args) -> tuple[dict, str]:
  """Runs one set's sweep; (its results, its table)."""
  teacher_dir = rq.ensure_teacher(name)
  seeds = [int(s) for s in args.seeds.split(',')]
  plain = [train(name, 'reflow', teacher_dir, args, s) for s in seeds]
  rows = [('reflow', '-', scores(plain, 'val'), scores(plain, 'test'))]
  grid = {}
  for form in args.forms.split(','):
    variant = 'reflow-ma' + (rq.CLIPPED if form == 'clipped' else '')
    for setting in itertools.product(map(float, args.weights.split(',')),
                                     map(float, args.eps.split(',')),
                                     map(int, args.warmups.split(',')), args.logdets.split(',')):
      weight, eps, warmup, logdet = setting
      runs = [train(name, variant, teacher_dir, args, s, align_weight=weight, score_eps=eps,
                    warmup=warmup, logdet=logdet, align_time=form) for s in seeds]
      grid[(form, *setting)] = (runs, scores(runs, 'val'))
    best = min((k for k in grid if k[0] == form), key=lambda k: objective(grid[k][1]))
    runs, val = grid[best]
    rows.append((f'reflow-ma ({form})', setting_label(*best[1:]), val, scores(runs, 'test')))
  results = {
      'grid_val': {f'{k[0]} {setting_label(*k[1:])}': v[1] for k, v in grid.items()},
      'table': [{'variant': r[0], 'setting': r[1], 'val': r[2], 'test': r[3]} for r in rows]}
  return results, table(name, rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sets', default='checkerboard,8gaussians')
  parser.add_argument('--steps', type=int, default=1000)
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--weights', default='0.001,0.01,0.1')
  parser.add_argument('--eps', default='0.01,0.05')
  parser.add_argument('--forms', default='consistent,clipped')
  parser.add_argument('--ema', type=float, default=0.995, help='the evaluated EMA rate')
  parser.add_argument('--warmups', default='500', help='steps of λ\'s linear warm-up')
  parser.add_argument('--logdets', default='exact', help='log-det estimators (exact, hutchinson)')
  parser.add_argument('--out', default=str(rq.ROOT / 'benchmarks' / 'out' / 'reflow_ma_sweep'))
  args = parser.parse_args()

  results, tables = {}, []
  for name in args.sets.split(','):
    results[name], text = sweep_set(name, args)
    tables.append(text)
    print(text, flush=True)
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, '_'.join(['sweep', *args.sets.split(','), str(args.steps),
                                          *args.forms.split(',')]))
  with open(stem + '.json', 'w') as f:
    json.dump(dict(args=vars(args), results=results), f, indent=2, ensure_ascii=False)
  with open(stem + '.md', 'w') as f:
    f.write('\n\n'.join(tables) + '\n')


if __name__ == '__main__':
  main()
