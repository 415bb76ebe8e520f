"""Reflow with and without marginal alignment (MA) on MNIST, in a frozen VAE's latent space.

The teacher is the class-conditional latent flow of a finished PGFM run
(`<pgfm workdir>/latent_fm`, a U-Net on the VAE's [8, 8, 4] latents, trained on the train split
less the validation split); its students are reflowed on its own trajectories
(`configs/reflow.py`, warm-started from it). Samples are decoded by the run's frozen VAE and
judged in pixel space by the run's feature net: Fréchet distance (FD) against real images and
how often the judge reads the conditioning label, at 1, 2 and 4 Euler NFE. The teacher itself
at the same NFE is the baseline reflow must beat; its adaptive solve is the floor.

Selection as in `benchmarks/reflow_ma_sweep.py`: per MA form ('consistent', 'clipped') the λ
with the least validation FD (mean over seeds and 1 and 2 NFE; real images: the PGFM run's
validation split) is chosen, and only the chosen runs, plain reflow and the teacher are scored
on the test split. MA beats reflow where its mean test FD is lower by more than the larger of
the two seed stds (ddof 1).

FLOWDISTILL_MNIST_DIR=../shared/data/mnist python benchmarks/reflow_mnist_latent.py
    [--pgfm-workdir runs/pgfm-mnist-cpu] [--steps 600] [--batch 64] [--seeds 0,1,2]
    [--weights 0.0001,0.001] [--clipped-weights 0.001] [--forms consistent,clipped]
    [--windows 1] [--pairs 4000] [--ema 0.99]
"""

import argparse
import json
import os

import jax
import numpy as np
import reflow_ma_sweep as sweep
import reflow_quality as rq

NFES = (1, 2, 4)
SELECT_NFES = (1, 2)
SPLIT_SEEDS = {'val': 1_000_003, 'test': 2_000_003}  # noise draws of each split


def student_config(run, variant: str, out: str, args, seed: int, **align):
  """`configs/reflow.py:<variant>` on the PGFM run's latents, distilling its latent flow;
  `align` (align_weight, align_time) applies to -ma variants."""
  from flowdistill import files
  from flowdistill.experiments import load_config_file

  base = variant.removesuffix(rq.CLIPPED)
  config = load_config_file(rq.CONFIGS / 'reflow.py', base)
  flow = run.flow.config
  config.data.update(source=flow.data.source, path=flow.data.path, path_env='',
                     batch_size=args.batch, conditional=True)
  config.model.update(**flow.model)
  config.teacher.workdir = files.join(run.workdir, 'latent_fm')
  config.seed = seed
  config.reflow.update(windows=args.windows, num_pairs=args.pairs, pair_chunk=500,
                       pair_rtol=1e-4, pair_atol=1e-4, align_logdet='hutchinson',
                       kl_samples=64, align_warmup=args.warmup,
                       pairs_dir=os.path.join(out, f'pairs_k{args.windows}_s{seed}'))
  if base.endswith('-ma'):
    config.reflow.update(align_weight=align['align_weight'],
                         align_time='clipped' if variant.endswith(rq.CLIPPED) else 'consistent')
  config.optim.update(lr=args.lr, warmup_steps=100)
  config.train.update(steps=args.steps, ckpt_every=500, log_every=100, ema_rates=(args.ema,),
                      eval_ema=args.ema)
  # the run's own report: cheap (its judge is trained on latents); the benchmark scores pixels
  config.eval.update(num_samples=200, nll_samples=32, nll_divergence='hutchinson', rtol=1e-4,
                     atol=1e-4, euler_steps=NFES, plot=False, classifier_steps=300,
                     cfg_scale=1.0)
  return config


def train(run, variant: str, args, seed: int, **align) -> str:
  """Trains one student unless a finished run of as many steps is there; its workdir."""
  from flowdistill import experiments

  config = student_config(run, variant, args.out, args, seed, **align)
  workdir = os.path.join(args.out, rq.run_tag(config, variant))
  if rq.finished_step(workdir) != args.steps:
    experiments.run(config, workdir)
  return workdir


def real_images(run, split: str) -> np.ndarray:
  """[N, 28, 28, 1] real images of `split`: the run's validation split, or the test split."""
  return run.validation['x'] if split == 'val' else run.dataset.test['x']


def score_samplers(run, samplers: dict, split: str, num: int) -> dict:
  """{label: {'fd', 'accuracy'}} of each latent sampler `fn(x0, labels) -> latents` on the
  noise draw of `split`, decoded and judged against `num` real images of `split`."""
  from flowdistill import ode
  from flowdistill.eval import metrics

  shape = run.latents['train']['x'].shape[1:]
  x0 = ode.noise(jax.random.key(SPLIT_SEEDS[split]), num, shape)
  labels = np.arange(num, dtype=np.int32) % run.dataset.num_classes
  real = run.judge.features(real_images(run, split)[:num])
  out = {}
  for label, sample in samplers.items():
    images = run.frozen.decode_scaled(np.asarray(sample(x0, labels)))
    out[label] = {'fd': metrics.frechet_distance(run.judge.features(images), real),
                  'accuracy': float(np.mean(run.judge.predict(images) == labels))}
  return out


def as_latent_fns(samplers) -> dict:
  """{label: fn(x0, labels) -> latents} from `[(label, sampler, params)]` (jitted samplers
  `sampler(params, x0, cond) -> (x1, nfe)`, as `eval.report` and `reflow_run` build them)."""
  return {label: (lambda x0, c, s=sampler, p=params: s(p, x0, c)[0])
          for label, sampler, params in samplers}


def student_samplers(workdir: str) -> dict:
  """{nfe: fn(x0, labels)}: the student in `workdir`, whole Euler steps in each window."""
  from flowdistill.experiments.reflow_run import student_samplers as make
  from flowdistill.fewstep import reflow
  from flowdistill.train.teacher import load_trained

  student = load_trained(workdir)
  times = reflow.window_times(student.config.reflow.windows)
  fns = as_latent_fns(make(student.apply_fn, student.params, times, NFES))
  return {int(label.rsplit('-', 1)[1]): fn for label, fn in fns.items()}


def teacher_samplers(run) -> dict:
  """{'teacher euler-n' | 'teacher dopri5': fn(x0, labels)} of the latent flow."""
  import ml_collections

  from flowdistill.eval import report

  solvers = ml_collections.ConfigDict(dict(euler_steps=NFES, adaptive_solver='dopri5',
                                           rtol=1e-4, atol=1e-4))
  return as_latent_fns(report.velocity_samplers(run.flow.apply_fn, run.flow.params, solvers,
                                                prefix='teacher '))


def runs_scores(run, workdirs, split: str, num: int) -> dict:
  """{nfe: {'fd': [per run], 'accuracy': [per run]}} on `split`."""
  per_run = [score_samplers(run, student_samplers(w), split, num) for w in workdirs]
  return {n: {m: [r[n][m] for r in per_run] for m in ('fd', 'accuracy')} for n in per_run[0]}


def objective(val: dict) -> float:
  """Validation criterion: mean FD over seeds and the NFE of `SELECT_NFES` the student has
  (piecewise: multiples of its window count)."""
  return float(np.mean([np.mean(val[n]['fd']) for n in SELECT_NFES if n in val]))


def fds(scores: dict) -> dict:
  """{nfe: [FD per run]} of `runs_scores` output."""
  return {n: v['fd'] for n, v in scores.items()}


def table(rows: list, teacher: dict) -> str:
  """Markdown: per variant FD (val, test) and test label accuracy at each NFE."""
  plain = rows[0][3]
  nfes = list(plain)
  head = (['variant', 'λ'] + [f'val FD @{n}' for n in nfes] + [f'test FD @{n}' for n in nfes]
          + [f'test acc @{n}' for n in nfes] + ['beats plain (test FD)'])
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for label, setting, val, test in rows:
    cells = ([label, setting] + [sweep.mean_std(val[n]['fd'], 2) for n in nfes]
             + [sweep.mean_std(test[n]['fd'], 2) for n in nfes]
             + [sweep.mean_std(100 * np.asarray(test[n]['accuracy']), 1) for n in nfes]
             + ['' if label == rows[0][0] else sweep.beats(fds(test), fds(plain), 2)])
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += ['', '| teacher (the latent flow) | val FD | test FD | test acc |', '|---|---|---|---|']
  for label in teacher['val']:
    lines.append(f'| {label} | {teacher["val"][label]["fd"]:.2f} | '
                 f'{teacher["test"][label]["fd"]:.2f} | '
                 f'{100 * teacher["test"][label]["accuracy"]:.1f} |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--pgfm-workdir', default=str(rq.ROOT / 'runs' / 'pgfm-mnist-cpu'))
  parser.add_argument('--steps', type=int, default=600)
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--weights', default='0.0001,0.001', help='λ grid, consistent form')
  parser.add_argument('--clipped-weights', default='0.001', help='λ grid, clipped form')
  parser.add_argument('--forms', default='consistent,clipped')
  parser.add_argument('--windows', type=int, default=1, help='1: reflow; 2: piecewise')
  parser.add_argument('--pairs', type=int, default=4000, help='teacher trajectories per seed')
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--lr', type=float, default=2e-4)
  parser.add_argument('--ema', type=float, default=0.99, help='the evaluated EMA rate')
  parser.add_argument('--warmup', type=int, default=250, help='steps of λ\'s warm-up')
  parser.add_argument('--samples', type=int, default=1000, help='samples scored per split')
  parser.add_argument('--out', default=str(rq.ROOT / 'benchmarks' / 'out' / 'reflow_mnist'))
  args = parser.parse_args()

  from flowdistill.condense import pgfm_workdir

  run = pgfm_workdir.load_finished(args.pgfm_workdir)
  seeds = [int(s) for s in args.seeds.split(',')]
  prefix = 'piecewise' if args.windows > 1 else 'reflow'
  plain = [train(run, prefix, args, s) for s in seeds]
  rows = [(prefix, '-', runs_scores(run, plain, 'val', args.samples),
           runs_scores(run, plain, 'test', args.samples))]
  grid = {}
  for form in args.forms.split(','):
    variant = f'{prefix}-ma' + (rq.CLIPPED if form == 'clipped' else '')
    weights = args.clipped_weights if form == 'clipped' else args.weights
    for weight in map(float, weights.split(',')):
      runs = [train(run, variant, args, s, align_weight=weight) for s in seeds]
      grid[(form, weight)] = (runs, runs_scores(run, runs, 'val', args.samples))
    best = min((k for k in grid if k[0] == form), key=lambda k: objective(grid[k][1]))
    runs, val = grid[best]
    rows.append((f'{prefix}-ma ({form})', f'{best[1]:g}', val,
                 runs_scores(run, runs, 'test', args.samples)))
  teacher = {split: score_samplers(run, teacher_samplers(run), split, args.samples)
             for split in ('val', 'test')}
  text = table(rows, teacher)
  print(text, flush=True)
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, f'{prefix}_{args.steps}')
  results = {'grid_val': {f'{f} λ={w:g}': v[1] for (f, w), v in grid.items()},
             'table': [{'variant': r[0], 'setting': r[1], 'val': r[2], 'test': r[3]}
                       for r in rows], 'teacher': teacher}
  with open(stem + '.json', 'w') as f:
    json.dump(dict(args=vars(args), results=results), f, indent=2, ensure_ascii=False)
  with open(stem + '.md', 'w') as f:
    f.write(text + '\n')


if __name__ == '__main__':
  main()
