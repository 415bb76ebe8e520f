"""Local flow matching vs global flow matching: NLL and W2 versus training compute.

Per data set (2-D checkerboard, 16-D tabular mixture): global flow matching (a one-block
chain, which the tests show is exactly global FM; 3x256 MLP) trained for each of `--global`
steps (one run, extended by resuming: the schedule is constant after warm-up, so an extended
run equals an uninterrupted one), and 4-block chains of 3x120 MLPs (93-98 % of its
parameters) trained for each of `--block` steps per block. Compute = steps x parameters summed
over blocks (the push-forward's forward passes are reported beside it). The chain at the
largest budget is also distilled block by block into one-jump flow maps (LMD), sampled at
blocks x 1 and blocks x 2 NFE. Target: a chain reaches global FM's final NLL with <= 60 % of
its training compute.

python benchmarks/local_fm_quality.py [--sets checkerboard,tabular] [--global 1000,3000]
    [--block 600,1800] [--distill 500]
"""

import argparse
import json
import os
import pathlib
import shutil
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def make_config(name: str, *, blocks: int, hidden: int, steps: int, distill: int = 0):
  from flowdistill.experiments import load_config_file, validate
  config = load_config_file(ROOT / 'configs' / 'local_fm.py', name)
  config.local_fm.update(num_blocks=blocks, distill_steps=distill)
  config.model.hidden = hidden
  config.optim.update(lr=1e-3, schedule='warmup', warmup_steps=200)
  # EMA 0.995: a 0.999 average keeps 55 % of the initialisation after a 600-step block.
  config.train.update(ema_rates=(0.995,), eval_ema=0.995)
  config.train.update(steps=steps, ckpt_every=steps, log_every=max(steps // 4, 1), keep=1)
  per_block = (1, 25) if blocks > 1 else (4, 100)  # the same total NFE
  config.eval.update(euler_steps=per_block, plot=False, num_samples=1000, nll_samples=500)
  validate(config)
  return config


def summarize(result: dict, label: str, steps: int, wall: float) -> dict:
  rows = {r['sampler']: r for r in result['rows']}
  return {'model': label, 'steps': steps, 'params_total': result['params_per_block'] * len(
      result['step_sizes']), 'train_compute': result['train_compute'],
          'pushforward_compute': result['pushforward_compute'], 'nll': result['nll'],
          'nll_target': result.get('nll_target'),
          'w2': {k: (v['nfe'], v['w2']) for k, v in rows.items()}, 'wall_s': wall}


def run_set(name: str, args, out: str) -> list:
  from flowdistill import experiments
  entries, previous = [], None
  for steps in args.global_steps:
    workdir = os.path.join(out, name, f'global_{steps}')
    if previous and not os.path.exists(workdir):  # resume the shorter run's trajectory
      shutil.copytree(os.path.join(previous, 'block_0', 'checkpoints'),
                      os.path.join(workdir, 'block_0', 'checkpoints'))
    start = time.perf_counter()
    result = experiments.run(make_config(name, blocks=1, hidden=256, steps=steps), workdir)
    entries.append(summarize(result, 'global FM 3x256', steps, time.perf_counter() - start))
    previous = workdir
  for steps in args.block_steps:
    distill = args.distill if steps == max(args.block_steps) else 0
    start = time.perf_counter()
    config = make_config(name, blocks=4, hidden=120, steps=steps, distill=distill)
    result = experiments.run(config, os.path.join(out, name, f'chain_{steps}'))
    entries.append(summarize(result, '4-block chain 3x120', steps, time.perf_counter() - start))
  return entries


def format_tables(summary: dict) -> str:
  lines = []
  for name, entries in summary.items():
    final = next(e for e in reversed(entries) if e['model'].startswith('global'))
    target = entries[0]['nll_target']
    lines += [(f'\n### {name} (NLL under the true density: '
              f'{"—" if target is None else f"{target:.3f}"}; W2 data floor '
              f'{entries[0]["w2"]["data (a second sample: the finite-sample floor)"][1]:.3f})'), '',
              ('| model | steps (per block) | params | compute (steps x params) | % of global '
              'final | + push-forward | NLL (nats) | W2 @ NFE 4 | W2 @ NFE 100 |'
              ' W2 dopri5 (NFE) | distilled W2 @ NFE 4 / 8 |'), '|' + '---|' * 11]
    for e in entries:
      w2 = [v for k, v in e['w2'].items() if 'euler' in k]
      adaptive = next(v for k, v in e['w2'].items() if 'dopri5' in k)
      distilled = [v for k, v in e['w2'].items() if 'distilled' in k]
      lines.append(
          f'| {e["model"]} | {e["steps"]} | {e["params_total"]} | {e["train_compute"]:.3g} | '
          f'{100 * e["train_compute"] / final["train_compute"]:.0f} % | '
          f'{e["pushforward_compute"]:.2g} | {e["nll"]:.3f} | '
          + ' | '.join(f'{v[1]:.3f}' for v in w2) + f' | {adaptive[1]:.3f} ({adaptive[0]:.0f}) | '
          + (' / '.join(f'{v[1]:.3f}' for v in distilled) or '') + ' |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sets', default='checkerboard,tabular')
  parser.add_argument('--global', dest='global_steps', default='1000,3000')
  parser.add_argument('--block', dest='block_steps', default='600,1800')
  parser.add_argument('--distill', type=int, default=500)
  parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'out' / 'local_fm'))
  args = parser.parse_args()
  args.global_steps = [int(s) for s in args.global_steps.split(',')]
  args.block_steps = [int(s) for s in args.block_steps.split(',')]
  summary_file = os.path.join(args.out, 'summary.json')
  summary = {}
  if os.path.exists(summary_file):
    with open(summary_file) as f:
      summary = json.load(f)
  for name in args.sets.split(','):
    summary[name] = run_set(name, args, args.out)
    os.makedirs(args.out, exist_ok=True)
    with open(summary_file, 'w') as f:
      json.dump(summary, f, indent=2)
  print(format_tables(summary))


if __name__ == '__main__':
  main()
