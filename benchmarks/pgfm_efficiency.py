"""PGFM efficiency as a user would measure it: seconds per synthetic image and for the whole
synthesis of an IPC set (k-means prototypes, sampling, decoding), each sampler at its own step
count, with the accuracy its set reaches, against the mode-guided diffusion counterpart on the
same latent flow (no new training).

Reads a finished `method='pgfm'` workdir. PGFM runs at the run's sampler (`config.pgfm`: its
guidance, solver and steps); the counterpart runs at each of `--counterpart-steps` and is
compared at the step count its accuracy needs, chosen on the validation split: the fewest
steps whose validation accuracy reaches its best within one standard deviation (the test
split is printed, never read). `--student` adds a flow-map student of the latent flow
(`configs/pgfm_student.py:WORKDIR`), guided once per jump, at `--student-steps`. Every time is
the mean ± std of `--repeats` timed calls after compilation, all samplers back to back before
any set is scored (only that phase needs an idle machine); accuracies are mean ± std over
`--runs` ConvNet-3.

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


def _times(fn, repeats: int) -> tuple[np.ndarray, np.ndarray]:
  """(the output of `fn()`, seconds of `repeats` calls after a first, compiling one)."""
  out = jax.block_until_ready(fn())
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    seconds.append(time.perf_counter() - start)
  return out, np.asarray(seconds)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--ipc', type=int, default=10)
  parser.add_argument('--counterpart-steps', type=int, nargs='+', default=[10, 25, 50, 100, 250])
  parser.add_argument('--lam', type=float, default=0.1)
  parser.add_argument('--stop-fraction', type=float, default=0.5)
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--epochs', type=int, default=300)
  parser.add_argument('--repeats', type=int, default=3)
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
  pull = pgfm_workdir.prototype_guidance(config)
  train = done.latents['train']
  _, prototype_seconds = _times(lambda: pgfm.class_prototypes(
      train['x'], train['label'], args.ipc, seed=config.dd.seed,
      n_init=config.pgfm.prototype_n_init), args.repeats)

  @functools.partial(jax.jit, static_argnames='steps')
  def pgfm_sample(params, steps):
    z, info = pgfm.sample(flow.apply_fn, params, key, labels, targets, pull, steps=steps,
                          solver=config.pgfm.solver)
    return z, info['nfe']

  @functools.partial(jax.jit, static_argnames='steps')
  def counterpart_sample(params, steps):
    z, info = mgd.sample(flow.apply_fn, params, key, labels, targets.shape[1:], path,
                         steps=steps, prototypes=targets, lam=args.lam,
                         stop_step=round(args.stop_fraction * steps))
    return z, info['nfe']

  families = [('pgfm', pgfm_sample, flow.params, [config.pgfm.steps]),
              ('counterpart', counterpart_sample, flow.params, args.counterpart_steps)]
  if args.student:
    student = load_trained(args.student)

    @functools.partial(jax.jit, static_argnames='steps')
    def student_sample(params, steps):
      z, info = pgfm.jump_sample(student.apply_fn, params, key, labels, targets, pull,
                                 steps=steps)
      return z, info['nfe']

    families.append(('flow_map', student_sample, student.params, args.student_steps))
  timed = []  # every sampler timed back to back before any scoring, so no ConvNet runs between
  for family, fn, params, grid in families:
    for steps in grid:
      (z, nfe), sampling = _times(lambda fn=fn, steps=steps, params=params: fn(params, steps=steps),
                                  args.repeats)
      images, decoding = _times(lambda z=z: frozen.decode_scaled(z), args.repeats)
      timed.append((family, steps, int(nfe), np.asarray(images), sampling,
                    prototype_seconds + sampling + decoding))
  print('every sampler timed; scoring the sets', flush=True)
  rows = []
  for family, steps, nfe, images, sampling, synthesis in timed:
    result = synset_eval.evaluate_synset(images, np.asarray(labels), split,
                                         jax.random.fold_in(key, steps), protocol)
    row = {'family': family, 'steps': steps, 'nfe': nfe,
           'val': result['val_mean'], 'val_std': result['val_std'],
           'test': result['mean'], 'test_std': result['std'],
           'mc': coverage.mode_coverage(judge.features(images), np.asarray(labels),
                                        modes)['mc'],
           'ms_per_image': 1e3 * sampling.mean() / len(images),
           'ms_per_image_std': 1e3 * sampling.std() / len(images),
           'synthesis_s': synthesis.mean(), 'synthesis_s_std': synthesis.std()}
    rows.append(row)
    print(json.dumps(row), flush=True)

  chosen = {}
  for family, *_ in families:
    mine = [r for r in rows if r['family'] == family]
    best = max(mine, key=lambda r: r['val'])
    chosen[family] = min((r for r in mine if r['val'] >= best['val'] - best['val_std']),
                         key=lambda r: r['nfe'])
  ratio = chosen['counterpart']['ms_per_image'] / chosen['pgfm']['ms_per_image']
  summary = {'chosen_steps': {f: r['steps'] for f, r in chosen.items()},
             'per_image_ratio_counterpart_over_pgfm': ratio,
             'synthesis_ratio_counterpart_over_pgfm': (chosen['counterpart']['synthesis_s']
                                                       / chosen['pgfm']['synthesis_s'])}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'args': vars(args), 'rows': rows, 'summary': summary}, f, indent=2)
  pm = lambda r, k, scale=100, fmt='.1f': (f'{scale * r[k]:{fmt}} ± '
                                           f'{scale * r[k + "_std"]:{fmt}}')
  print('| family | N | NFE | val % | test % | MC | ms / image | synthesis s |')
  print('|---|---|---|---|---|---|---|---|')
  for r in rows:
    mark = ' (chosen on val)' if chosen[r['family']] is r else ''
    print(f'| {r["family"]}{mark} | {r["steps"]} | {r["nfe"]} | {pm(r, "val")} | '
          f'{pm(r, "test")} | {r["mc"]:.2f} | {pm(r, "ms_per_image", 1, ".2f")} | '
          f'{pm(r, "synthesis_s", 1, ".2f")} |')
  print(json.dumps(summary))


if __name__ == '__main__':
  main()
