"""PGFM ablation over the prototype guidance (form, schedule, w0, t_stop, trust region, warm
start) and the flow's classifier-free guidance weight (`cfg_scale`) at one IPC, chosen on the
validation split among the settings that keep the flow's diversity and land in their
prototype's mode (`--min-diversity`, `--min-landing`; all settings if none does). Per
setting: ConvNet-3 accuracy on the validation split (what the choice reads) and on the test
split (printed beside it, never read), mode coverage (feature-net space), landing rate,
within-class diversity relative to real latents and per-class Fréchet distance, with the
decoded prototypes and unguided sampling as reference rows.

Reads a finished `method='pgfm'` workdir (nothing is retrained); every other sampler setting
(δ, solver, steps) is the run's.

FLOWDISTILL_MNIST_DIR=../shared/data/mnist python benchmarks/pgfm_ablation.py \
    --workdir runs/pgfm-mnist-cpu --ipc 10 --t-stops 0.4 0.6 --trusts 0 0.5 --warm-starts 0 0.5
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

from flowdistill.condense import coverage, pgfm, pgfm_workdir, protocol, synset_eval


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--ipc', type=int, default=10)
  parser.add_argument('--forms', nargs='+', default=['denoiser'])
  parser.add_argument('--schedules', nargs='+', default=['constant'])
  parser.add_argument('--w0s', type=float, nargs='+', default=[1.0])
  parser.add_argument('--t-stops', type=float, nargs='+', default=[0.4, 0.6, 1.0])
  parser.add_argument('--trusts', type=float, nargs='+', default=[0.0])
  parser.add_argument('--warm-starts', type=float, nargs='+', default=[0.0])
  parser.add_argument('--cfg-scales', type=float, nargs='+', default=[1.0],
                      help='classifier-free guidance weights of the flow (1: the conditional '
                           'model)')
  parser.add_argument('--settings', nargs='+', default=None,
                      help='explicit settings instead of the product, e.g. '
                           '"t_stop=0.6,cfg_scale=2"')
  parser.add_argument('--min-diversity', type=float, default=0.8,
                      help='eligible settings keep this share of the real within-class diversity')
  parser.add_argument('--min-landing', type=float, default=0.9,
                      help='... and land this share of samples in their prototype\'s cell')
  parser.add_argument('--runs', type=int, default=2)
  parser.add_argument('--epochs', type=int, default=100)
  parser.add_argument('--out', default='benchmarks/out/pgfm_ablation.json')
  args = parser.parse_args()

  done = pgfm_workdir.load_finished(args.workdir)
  config, frozen, judge = done.config, done.frozen, done.judge
  task = done.scoring(args.ipc, runs=args.runs, epochs=args.epochs)
  labels, assigned, protos, targets, modes, split, proto = (task[k] for k in (
      'labels', 'assigned', 'prototypes', 'targets', 'modes', 'split', 'protocol'))
  key = jax.random.key(config.seed)
  base = pgfm_workdir.prototype_guidance(config)
  train_latents = done.latents['train']
  real_features = judge.features(done.dataset.train['x'])

  @functools.partial(jax.jit, static_argnames=('pull', 'cfg_scale'))
  def sample(params, pull, cfg_scale=1.0):
    guided = cfg_scale != 1.0
    return pgfm.sample(done.flow.apply_fn, params, key, jnp.asarray(labels), targets, pull,
                       solver=config.pgfm.solver, steps=config.pgfm.steps,
                       cfg_scale=cfg_scale if guided else None,
                       null_label=done.dataset.num_classes if guided else None)[0]

  def score(name: str, z) -> dict:
    images = frozen.decode_scaled(z)
    result = synset_eval.evaluate_synset(images, labels, split, jax.random.fold_in(key, 1), proto)
    features = judge.features(images)
    row = {'set': name, 'val': result['val_mean'], 'val_std': result['val_std'],
           'test': result['mean'], 'test_std': result['std'],
           'mc': coverage.mode_coverage(features, labels, modes)['mc'],
           'landing_rate': coverage.landing_rate(z, labels, assigned, protos),
           'diversity': coverage.diversity(z, labels, train_latents['x'],
                                           train_latents['label']),
           'fd_per_class': coverage.per_class_frechet(features, labels, real_features,
                                                      done.dataset.train['label'])}
    print(json.dumps(row), flush=True)
    return row

  references = [score('decoded prototypes', np.asarray(targets)),
                score('unguided', np.asarray(sample(done.flow.params,
                                                    dataclasses.replace(base, w0=0.0))))]
  if args.settings:
    settings = [dict(item.split('=') for item in setting.split(',')) for setting in args.settings]
    pulls = [(dataclasses.replace(base, **{k: type(getattr(base, k))(v) for k, v in s.items()
                                           if k != 'cfg_scale'}),
              float(s.get('cfg_scale', 1.0))) for s in settings]
  else:
    pulls = [(dataclasses.replace(base, form=form, schedule=schedule, w0=w0, t_stop=t_stop,
                                  trust=trust, warm_start=warm), cfg)
             for form, schedule, w0, t_stop, trust, warm, cfg in itertools.product(
                 args.forms, args.schedules, args.w0s, args.t_stops, args.trusts,
                 args.warm_starts, args.cfg_scales) if not (form == 'straight' and w0 > 1)]
  rows = []
  for pull, cfg_scale in pulls:
    row = score('pgfm', np.asarray(sample(done.flow.params, pull, cfg_scale)))
    rows.append(dict(row, cfg_scale=cfg_scale, **{k: getattr(pull, k) for k in (
        'form', 'schedule', 'w0', 't_stop', 'trust', 'warm_start')}))
  eligible = [i for i, r in enumerate(rows) if r['diversity'] >= args.min_diversity
              and r['landing_rate'] >= args.min_landing]
  pool = eligible or list(range(len(rows)))
  chosen = pool[protocol.choose([rows[i] for i in pool], key='val')]
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'args': vars(args), 'references': references, 'rows': rows, 'chosen': chosen,
               'eligible': eligible}, f, indent=2)
  pct = lambda r, k: f'{100 * r[k]:.1f} ± {100 * r[k + "_std"]:.1f}'
  tail = lambda r: (f'{r["mc"]:.2f} | {r["landing_rate"]:.2f} | {r["diversity"]:.2f} | '
                    f'{r["fd_per_class"] or float("nan"):.1f}')
  print('| set | form | schedule | w0 | t_stop | trust | warm start | cfg | val % | test % | MC | '
        'landing | diversity | FD per class |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|---|---|')
  for r in references:
    print(f'| {r["set"]} | | | | | | | | {pct(r, "val")} | {pct(r, "test")} | {tail(r)} |')
  for i, r in enumerate(rows):
    mark = ' (chosen on val)' if i == chosen else (' (eligible)' if i in eligible else '')
    print(f'| pgfm{mark} | {r["form"]} | {r["schedule"]} | {r["w0"]} | {r["t_stop"]} | '
          f'{r["trust"]} | {r["warm_start"]} | {r["cfg_scale"]} | {pct(r, "val")} | '
          f'{pct(r, "test")} | {tail(r)} |')


if __name__ == '__main__':
  main()
