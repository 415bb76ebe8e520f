"""PGFM ablation over the guidance form, w0, t_stop (and optionally the schedule): accuracy of
ConvNet-3 trained on each synthetic set, mode coverage (feature-net space), landing rate and
diversity, at one IPC.

Reads a finished `method='pgfm'` workdir (nothing is retrained); every other guidance setting
(schedule, δ, solver, steps) is the run's.

FLOWDISTILL_MNIST_DIR=../shared/data/mnist python benchmarks/pgfm_ablation.py \
    --workdir runs/pgfm-mnist-cpu --ipc 10 --forms straight denoiser --w0s 0.25 0.5 1.0 \
    --t-stops 0.6 0.9 1.0
"""

import argparse
import dataclasses
import functools
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from flowdistill.condense import coverage, pgfm, pgfm_workdir, synset_eval


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--ipc', type=int, default=10)
  parser.add_argument('--forms', nargs='+', default=list(pgfm.FORMS))
  parser.add_argument('--w0s', type=float, nargs='+', default=[0.25, 0.5, 1.0])
  parser.add_argument('--t-stops', type=float, nargs='+', default=[0.6, 0.9, 1.0])
  parser.add_argument('--schedules', nargs='+', default=None,
                      help="w(t) schedules (default: the run's)")
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--epochs', type=int, default=300)
  parser.add_argument('--out', default='benchmarks/out/pgfm_ablation.json')
  args = parser.parse_args()

  done = pgfm_workdir.load_finished(args.workdir)
  config, frozen, judge = done.config, done.frozen, done.judge
  task = done.scoring(args.ipc, runs=args.runs, epochs=args.epochs)
  labels, assigned, protos, targets, modes, split, protocol = (task[k] for k in (
      'labels', 'assigned', 'prototypes', 'targets', 'modes', 'split', 'protocol'))
  key = jax.random.key(config.seed)
  base = pgfm_workdir.prototype_guidance(config)

  @functools.partial(jax.jit, static_argnames='guidance')
  def sample(params, guidance):
    return pgfm.sample(done.flow.apply_fn, params, key, jnp.asarray(labels), targets, guidance,
                       solver=config.pgfm.solver, steps=config.pgfm.steps)[0]

  rows = []
  schedules = args.schedules or [base.schedule]
  for form, schedule, w0, t_stop in itertools.product(args.forms, schedules, args.w0s,
                                                      args.t_stops):
    if form == 'straight' and w0 > 1:
      continue
    guidance = dataclasses.replace(base, form=form, schedule=schedule, w0=w0, t_stop=t_stop)
    z = np.asarray(sample(done.flow.params, guidance))
    images = frozen.decode_scaled(z)
    result = synset_eval.evaluate_synset(images, labels, split, jax.random.fold_in(key, 1),
                                      protocol)
    row = {'form': form, 'schedule': schedule, 'w0': w0, 't_stop': t_stop,
           'accuracy': result['mean'], 'std': result['std'],
           'mc': coverage.mode_coverage(judge.features(images), labels, modes)['mc'],
           'landing_rate': coverage.landing_rate(z, labels, assigned, protos),
           'diversity': coverage.diversity(z, labels, done.latents['train']['x'],
                                           done.latents['train']['label'])}
    rows.append(row)
    print(json.dumps(row), flush=True)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'args': vars(args), 'rows': rows}, f, indent=2)
  print('| form | schedule | w0 | t_stop | accuracy % | MC | landing | diversity |')
  print('|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f'| {r["form"]} | {r["schedule"]} | {r["w0"]} | {r["t_stop"]} | '
          f'{100 * r["accuracy"]:.1f} ± '
          f'{100 * r["std"]:.1f} | {r["mc"]:.3f} | {r["landing_rate"]:.3f} | '
          f'{r["diversity"]:.3f} |')


if __name__ == '__main__':
  main()
