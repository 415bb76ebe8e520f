"""PGFM efficiency: accuracy and mode coverage against NFE for the guided ODE and for the
mode-guided diffusion counterpart on the same latent flow (no new training), at one IPC.

Reads a finished `method='pgfm'` workdir (its config.json, latent_fm/ run, prototypes and the
cached VAE). For each sampler family and step count N it synthesises the IPC set, times the
synthesis after compilation, trains `--runs` ConvNet-3 on it (`--epochs`, DSA) and measures
mode coverage in the feature-net space, and the total synthesis time (k-means prototypes,
sampling after compilation, decoding). q* is the best accuracy of either family; N* the
smallest N of a family within 0.5 points of q*; efficiency is (NFE · s per NFE) at N* of the
counterpart over the same for PGFM. `--student` adds a flow-map student of the latent flow
(`configs/pgfm_student.py:WORKDIR`), guided once per jump (`pgfm.jump_sample`), at 1, 2 and 4
NFE, with its N* against the same q*.

FLOWDISTILL_MNIST_DIR=../shared/data/mnist python benchmarks/pgfm_efficiency.py \
    --workdir runs/pgfm-mnist-cpu --ipc 10
"""

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from flowdistill.condense import coverage, pgfm, pgfm_workdir, synset_eval
from flowdistill.condense import mode_guided_diffusion as mgd
from flowdistill.train import configured
from flowdistill.train.teacher import load_trained


def _timed(fn, *args):
  """(output, seconds) of a second call (the first compiles)."""
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return np.asarray(out), time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--ipc', type=int, default=10)
  parser.add_argument('--pgfm-steps', type=int, nargs='+', default=[1, 2, 4, 8, 16, 32])
  parser.add_argument('--counterpart-steps', type=int, nargs='+', default=[10, 25, 50, 100, 250])
  parser.add_argument('--lam', type=float, default=0.1)
  parser.add_argument('--stop-fraction', type=float, default=0.5)
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--epochs', type=int, default=300)
  parser.add_argument('--student', default='',
                      help='workdir of a flow-map student (method flow_map) of latent_fm/')
  parser.add_argument('--student-steps', type=int, nargs='+', default=[1, 2, 4])
  parser.add_argument('--out', default='benchmarks/out/pgfm_efficiency.json')
  args = parser.parse_args()

  done = pgfm_workdir.load_finished(args.workdir)
  config, frozen, flow, judge = done.config, done.frozen, done.flow, done.judge
  task = done.scoring(args.ipc, runs=args.runs, epochs=args.epochs)
  labels, targets, modes, split, protocol = (jnp.asarray(task['labels']), task['targets'],
                                             task['modes'], task['split'], task['protocol'])
  path = configured.build_path(config.path)
  key = jax.random.key(config.seed)
  guidance = pgfm_workdir.prototype_guidance(config)

  @functools.partial(jax.jit, static_argnames='steps')
  def pgfm_sample(params, steps):
    return pgfm.sample(flow.apply_fn, params, key, labels, targets, guidance, steps=steps,
                       solver=config.pgfm.solver)[0]

  @functools.partial(jax.jit, static_argnames='steps')
  def counterpart_sample(params, steps):
    return mgd.sample(flow.apply_fn, params, key, labels, targets.shape[1:], path, steps=steps,
                      prototypes=targets, lam=args.lam,
                      stop_step=round(args.stop_fraction * steps))[0]

  start = time.perf_counter()
  pgfm.class_prototypes(done.latents['train']['x'], done.latents['train']['label'], args.ipc,
                        seed=config.dd.seed, n_init=config.pgfm.prototype_n_init)
  prototype_seconds = time.perf_counter() - start
  rows = []
  families = [('pgfm', pgfm_sample, flow.params, args.pgfm_steps,
               2 if config.pgfm.solver in ('heun', 'midpoint') else 1),
              ('counterpart', counterpart_sample, flow.params, args.counterpart_steps, 1)]
  if args.student:
    student = load_trained(args.student)

    @functools.partial(jax.jit, static_argnames='steps')
    def student_sample(params, steps):
      return pgfm.jump_sample(student.apply_fn, params, key, labels, targets, guidance,
                              steps=steps)[0]

    families.append(('flow_map', student_sample, student.params, args.student_steps, 1))
  for family, fn, params, grid, per_step in families:
    for steps in grid:
      z, seconds = _timed(functools.partial(fn, steps=steps), params)
      start = time.perf_counter()
      images = frozen.decode_scaled(z)
      decode_seconds = time.perf_counter() - start
      result = synset_eval.evaluate_synset(images, np.asarray(labels), split,
                                        jax.random.fold_in(key, steps), protocol)
      row = {'family': family, 'steps': steps, 'nfe': steps * per_step,
             'accuracy': result['mean'], 'std': result['std'],
             'mc': coverage.mode_coverage(judge.features(images), np.asarray(labels),
                                          modes)['mc'],
             'seconds_per_image': seconds / len(images),
             'seconds_per_nfe': seconds / (steps * per_step),
             'synthesis_seconds': prototype_seconds + seconds + decode_seconds}
      rows.append(row)
      print(json.dumps(row), flush=True)

  best = max(r['accuracy'] for r in rows if r['family'] in ('pgfm', 'counterpart'))
  star = {}
  for family, *_ in families:
    ok = [r for r in rows if r['family'] == family and r['accuracy'] >= best - 0.005]
    star[family] = min(ok, key=lambda r: r['nfe']) if ok else None
  summary = {'q_star': best, 'n_star': {f: r and r['steps'] for f, r in star.items()},
             'prototype_seconds': prototype_seconds,
             'synthesis_seconds_at_n_star': {f: r and r['synthesis_seconds']
                                             for f, r in star.items()}}
  if star['pgfm'] and star['counterpart']:
    cost = {f: r['nfe'] * r['seconds_per_nfe'] for f, r in star.items() if r}
    summary.update(efficiency=cost['counterpart'] / cost['pgfm'],
                   nfe_ratio=star['counterpart']['nfe'] / star['pgfm']['nfe'],
                   mc_at_n_star={f: r['mc'] for f, r in star.items() if r})
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'args': vars(args), 'rows': rows, 'summary': summary}, f, indent=2)
  print('| family | N | NFE | accuracy % | MC | s / image |')
  print('|---|---|---|---|---|---|')
  for r in rows:
    print(f'| {r["family"]} | {r["steps"]} | {r["nfe"]} | {100 * r["accuracy"]:.1f} ± '
          f'{100 * r["std"]:.1f} | {r["mc"]:.3f} | {r["seconds_per_image"]:.2e} |')
  print(json.dumps(summary))


if __name__ == '__main__':
  main()
