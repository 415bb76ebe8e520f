"""Where along t marginal alignment gains or loses: KL(q_τ ‖ p_τ) of one-window reflow students.

q_τ is the student's one-step Euler map from noise stopped at τ, `y = x + τ v(x, 0)` (its 1-NFE
sampler is τ = 1); p_τ is the teacher's time-τ marginal, its log-density from the teacher's ODE
back to noise (Dopri5, exact divergence). Estimate on fresh noise x, the same draw for every
student (paired): `mean[log N(x) − log|det ∂y/∂x| − log p_τ(y)]`. The students are those of
`benchmarks/reflow_ma_sweep.py`: plain reflow and, per MA form, the setting that sweep chose on
validation, every seed. MA's consistent form aligns at τ = 1 − ε; the clipped form maps to 1
and scores at 1 − ε.

python benchmarks/reflow_kl_along_t.py \
    --sweep benchmarks/out/reflow_ma_sweep/sweep_checkerboard_500_consistent_clipped.json \
    [--also consistent:0.001,0.05,250,exact] [--taus 0.25,0.5,0.75,0.9,0.95,1] [--points 500]
"""

import argparse
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import reflow_quality as rq

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOISE_SEED = 3_000_017


def label(weight, eps, warmup, logdet) -> str:
  return f'λ {weight}, ε {eps}, warm-up {warmup}, {logdet}'


def run_dirs(sweep: dict, name: str, also=()) -> dict:
  """{variant label: [workdir per seed]} of the sweep's plain and chosen MA runs of set `name`,
  and of each further (form, λ, ε, warm-up, log-det) in `also` that the sweep trained. The
  directories are named as the sweep names them (`reflow_quality.run_tag`)."""
  args = sweep['args']
  seeds = [int(s) for s in args['seeds'].split(',')]
  teacher_dir = rq.ensure_teacher(name)

  def dirs(variant, **align):
    return [os.path.join(args['out'], name, rq.run_tag(rq.student_config(
        name, variant, teacher_dir, args['out'], steps=args['steps'], seed=s, **align), variant))
            for s in seeds]

  def ma_dirs(form, weight, eps, warmup, logdet):
    return dirs('reflow-ma' + (rq.CLIPPED if form == 'clipped' else ''),
                align_weight=float(weight), score_eps=float(eps), warmup=int(warmup),
                logdet=logdet, align_time=form)

  out = {}
  for row in sweep['results'][name]['table']:
    if row['variant'] == 'reflow':
      out['reflow'] = dirs('reflow')
    else:
      form = row['variant'].split('(')[1].rstrip(')')
      setting = [s.strip() for s in row['setting'].split(',')]
      out[f'MA {form} {label(*setting)} (chosen)'] = ma_dirs(form, *setting)
  for form, *setting in also:
    runs = ma_dirs(form, *setting)
    if os.path.isdir(runs[0]) and runs not in out.values():
      out[f'MA {form} {label(*setting)}'] = runs
  return out


def kl_along_t(workdir: str, teacher, taus, points: int) -> list[float]:
  """[KL(q_τ ‖ p_τ) per τ] of the one-window student in `workdir`."""
  from flowdistill import ode
  from flowdistill.experiments.reflow_run import teacher_log_density
  from flowdistill.fewstep import reflow
  from flowdistill.train.teacher import load_trained

  student = load_trained(workdir)
  if student.config.reflow.windows != 1:
    raise ValueError(f'{workdir} has {student.config.reflow.windows} windows; this probe is '
                     'for one-window students.')
  x = ode.noise(jax.random.key(NOISE_SEED), points, student.data_shape)
  logp = teacher_log_density(teacher.apply_fn, teacher.params, student.config.eval,
                             jax.random.key(0))
  return [float(reflow.window_kls(student.apply_fn, student.params, logp, jnp.stack([x, x]),
                                  np.array([0.0, tau]))[0]) for tau in taus]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sweep', action='append', required=True,
                      help='a sweep_*.json of benchmarks/reflow_ma_sweep.py (repeatable)')
  parser.add_argument('--also', action='append', default=[],
                      help="a further trained setting to probe, 'form:λ,ε,warm-up,log-det' "
                           "(e.g. 'consistent:0.001,0.05,250,exact'; repeatable)")
  parser.add_argument('--taus', default='0.25,0.5,0.75,0.9,0.95,1')
  parser.add_argument('--points', type=int, default=500)
  parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'out' / 'reflow_kl_along_t'))
  args = parser.parse_args()

  from flowdistill.train.teacher import load_trained

  taus = [float(t) for t in args.taus.split(',')]
  also = [(a.split(':')[0], *a.split(':')[1].split(',')) for a in args.also]
  results, tables = {}, []
  for path in args.sweep:
    with open(path) as f:
      sweep = json.load(f)
    for name in sweep['results']:
      teacher = load_trained(rq.ensure_teacher(name))
      results[name] = {label: [kl_along_t(w, teacher, taus, args.points) for w in dirs]
                       for label, dirs in run_dirs(sweep, name, also).items()}
      lines = [f'### {name}', '', '| variant | ' + ' | '.join(f'KL at τ = {t:g}' for t in taus)
               + ' |', '|---|' + '---|' * len(taus)]
      for label, per_seed in results[name].items():
        kls = np.asarray(per_seed)
        lines.append(f'| {label} | ' + ' | '.join(
            f'{m:.3f} ± {s:.3f}' for m, s in zip(kls.mean(0), kls.std(0, ddof=1))) + ' |')
      tables.append('\n'.join(lines))
      print(tables[-1], flush=True)
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, 'kl_' + '_'.join(results))
  with open(stem + '.json', 'w') as f:
    json.dump(dict(args=vars(args), taus=taus, results=results), f, indent=2, ensure_ascii=False)
  with open(stem + '.md', 'w') as f:
    f.write('\n\n'.join(tables) + '\n')


if __name__ == '__main__':
  main()
