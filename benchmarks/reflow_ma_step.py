"""Seconds per gradient of the reflow loss, plain and with marginal alignment (MA), on the MNIST
latent U-Net — the network of `configs/pgfm.py:mnist,cpu`'s latent flow ([8, 8, 4] latents, 10
classes), randomly initialised (the time does not depend on the weights); the teacher of the
alignment term is a second copy.

Rows: plain reflow; MA with the Hutchinson log-det (what image runs use), 1 and 2 Euler steps
of the window map. Each row: `jit(value_and_grad(loss))` at batch `--batch`, compiled once,
then the median of `--repeats` timed calls. To time another version of the library (e.g. the
commit before a change), put its checkout first on the path:

python benchmarks/reflow_ma_step.py [--batch 64] [--repeats 5]
PYTHONPATH=/path/to/other/checkout python benchmarks/reflow_ma_step.py --out other.json
"""

import argparse
import json
import os
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import machine

ROOT = pathlib.Path(__file__).resolve().parent.parent
LATENT_SHAPE = (8, 8, 4)
CLASSES = 10


def loss_grad(align_steps: int | None):
  """A jitted `(params, batch, key, teacher_params, step) -> (loss, grads)` on the latent U-Net
  (`align_steps` None: plain reflow), and its params."""
  from flowdistill.experiments import load_config_file
  from flowdistill.fewstep import reflow
  from flowdistill.models.factory import build_model
  from flowdistill.train import configured

  config = load_config_file(ROOT / 'configs' / 'pgfm.py', 'mnist,cpu')
  apply_fn, params = build_model(config.model, LATENT_SHAPE, num_classes=CLASSES, seed=0)
  align = {} if align_steps is None else dict(
      teacher_apply_fn=apply_fn, teacher_path=configured.build_path(config.path),
      align_weight=1e-4, align_steps=align_steps, logdet='hutchinson', score_eps=0.05)
  loss_fn = reflow.make_loss(apply_fn, reflow.window_times(1), **align)
  grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  return grad, params


def time_row(align_steps: int | None, batch: int, repeats: int) -> dict:
  grad, params = loss_grad(align_steps)
  key = jax.random.key(1)
  data = {'states': jax.random.normal(key, (batch, 2, *LATENT_SHAPE)),
          'label': jnp.arange(batch, dtype=jnp.int32) % CLASSES}
  args = (params, data, key, params, jnp.asarray(1000))
  start = time.perf_counter()
  jax.block_until_ready(grad(*args))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(grad(*args))
    times.append(time.perf_counter() - start)
  return {'compile_s': compile_s, 'median_s': statistics.median(times), 'times_s': times}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'out' / 'reflow_ma_step.json'))
  args = parser.parse_args()
  import flowdistill

  load_start = os.getloadavg()
  rows = {'reflow': None, 'reflow + MA, 1 map step': 1, 'reflow + MA, 2 map steps': 2}
  results = {name: time_row(steps, args.batch, args.repeats) for name, steps in rows.items()}
  env = {'machine': machine.describe(), 'library': os.path.dirname(flowdistill.__file__),
         'load_avg_start': load_start, 'load_avg_end': os.getloadavg()}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'environment': env, 'settings': vars(args), 'results': results}, f, indent=2)
  print(machine.headline(env['machine']), '| library', env['library'], '| load',
        load_start, '->', env['load_avg_end'])
  print('| row | s per gradient (median) | × plain | compile s |\n|---|---|---|---|')
  plain = results['reflow']['median_s']
  for name, r in results.items():
    print(f"| {name} | {r['median_s']:.3f} | {r['median_s'] / plain:.1f} | "
          f"{r['compile_s']:.1f} |")


if __name__ == '__main__':
  main()
