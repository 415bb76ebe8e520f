"""MNIST at CPU scale: a U-Net teacher and its few-step students, Fréchet distance vs NFE.

The configs/mnist.py teacher, shrunk so it trains on a CPU (a smaller U-Net, no attention,
batch 64, fewer steps; the full configs are for an accelerator), is trained (or resumed) once
in OUT/teacher. Each method then distils it with the same shrink and reports its Fréchet
distance next to the teacher's Euler at the same NFE, its 100-step Euler and its Dopri5 solve:

- flow_map: the configs/flow_map.py:lmd,mnist student at 1, 2, 4, 8 jumps, distilled from
  and compared with the teacher at the same guidance (target: 4 jumps at most 1.3x the
  teacher at 100 steps), and the cost per sample of one student jump against one teacher
  Euler step, unguided and guided (`--costs-only` measures it on finished workdirs);
- reflow, reflow-ma, piecewise, piecewise-ma: configs/reflow.py students on `--pairs` guided
  teacher trajectories (shared by the variants with the same number of windows), at equal
  training steps, with moment drift and per-window KL.

FLOWDISTILL_MNIST_DIR=../shared/data/mnist \
XLA_FLAGS=--xla_force_host_platform_device_count=8 \
  python benchmarks/mnist_cpu.py [--methods flow_map,reflow,reflow-ma] [--teacher-steps 3000]
      [--student-steps 1500] [--pairs 5000] [--costs-only]

Writes OUT/summary_<method>.json (default OUT: benchmarks/out/mnist_cpu).
"""

import argparse
import json
import os
import pathlib
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = ROOT / 'configs'
REFLOW_VARIANTS = ('reflow', 'reflow-ma', 'piecewise', 'piecewise-ma')


def shrink(config, args, steps: int):
  """The CPU-sized model and schedule shared by teacher and students."""
  config.model.update(channels=tuple(int(c) for c in args.channels.split(',')),
                      attention=False)
  config.data.batch_size = args.batch_size
  config.optim.update(lr=args.lr, warmup_steps=200)
  config.train.update(steps=steps, log_every=100, ckpt_every=500, ema_rates=(0.995,),
                      eval_ema=0.995)
  config.eval.update(num_samples=args.num_samples, nll_samples=args.nll_samples)
  return config


def student_config(method: str, args, teacher_dir: str):
  from flowdistill.experiments import load_config_file  # noqa: PLC0415

  if method == 'flow_map':
    config = load_config_file(CONFIGS / 'flow_map.py', 'lmd,mnist')
  else:
    config = load_config_file(CONFIGS / 'reflow.py', f'{method},mnist')
    windows = config.reflow.windows
    config.reflow.update(num_pairs=args.pairs, kl_samples=args.kl_samples,
                         pairs_dir=os.path.join(args.out, f'pairs_k{windows}'))
    config.eval.euler_steps = tuple(n for n in (1, 2, 4, 100) if n % windows == 0)
  config = shrink(config, args, args.student_steps)
  config.teacher.workdir = teacher_dir
  return config


def step_costs(teacher_dir: str, student_dir: str, batch: int = 250, repeats: int = 20):
  """Seconds per sample of one network step on one device, median of `repeats` timed calls
  after compile: the teacher's Euler step unguided and guided (both halves in one batch, as
  `ode.velocity_fn` runs them), and the student's jump."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from flowdistill import ode  # noqa: PLC0415
  from flowdistill.fewstep import flow_map  # noqa: PLC0415
  from flowdistill.train.teacher import load_trained  # noqa: PLC0415

  teacher, student = load_trained(teacher_dir), load_trained(student_dir)
  guidance = student.config.eval.cfg_scale
  x = ode.noise(jax.random.key(0), batch, teacher.data_shape)
  cond = jnp.arange(batch) % teacher.num_classes
  grid = ode.time_grid(1)
  steps = {
      'teacher Euler step': lambda: ode.solve(
          ode.velocity_fn(teacher.apply_fn, teacher.params, cond=cond), x, grid=grid)[0],
      f'teacher Euler step, guided {guidance:g}': lambda: ode.solve(
          ode.velocity_fn(teacher.apply_fn, teacher.params, cond=cond, cfg_scale=guidance,
                          null_label=teacher.num_classes), x, grid=grid)[0],
      'student jump': lambda: flow_map.jump(student.apply_fn, student.params, x, grid, cond)[0],
  }
  costs = {}
  for label, fn in steps.items():
    fn = jax.jit(fn)
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - start)
    costs[label] = float(np.median(times)) / batch
  return costs


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--methods', default='flow_map',
                      help=f'comma-separated: flow_map, {", ".join(REFLOW_VARIANTS)}')
  parser.add_argument('--teacher-steps', type=int, default=3000)
  parser.add_argument('--student-steps', type=int, default=1500)
  parser.add_argument('--pairs', type=int, default=5000, help='teacher trajectories (reflow)')
  parser.add_argument('--kl-samples', type=int, default=64, help='states per window KL (reflow)')
  parser.add_argument('--channels', default='16,32,32')
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--lr', type=float, default=1e-3)
  parser.add_argument('--num-samples', type=int, default=1000)
  parser.add_argument('--nll-samples', type=int, default=64)
  parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'out' / 'mnist_cpu'))
  parser.add_argument('--costs-only', action='store_true',
                      help='only measure the step costs of finished flow_map workdirs')
  args = parser.parse_args()
  methods = args.methods.split(',')
  unknown = set(methods) - {'flow_map', *REFLOW_VARIANTS}
  if unknown:
    parser.error(f'unknown --methods {sorted(unknown)}; choose from flow_map, '
                 f'{", ".join(REFLOW_VARIANTS)}')

  from flowdistill import experiments  # noqa: PLC0415
  from flowdistill.experiments import load_config_file  # noqa: PLC0415
  from flowdistill.train import configured  # noqa: PLC0415

  teacher_dir = os.path.join(args.out, 'teacher')
  if args.costs_only:
    print(json.dumps(step_costs(teacher_dir, os.path.join(args.out, 'flow_map')), indent=2))
    return
  start = time.time()
  configured.train_fm(shrink(load_config_file(CONFIGS / 'mnist.py', 'mnist'), args,
                             args.teacher_steps), teacher_dir)
  teacher_s = time.time() - start
  for method in methods:
    start = time.time()
    result = experiments.run(student_config(method, args, teacher_dir),
                             os.path.join(args.out, method))
    fd = {row['sampler']: row['fd'] for row in result['rows']}
    summary = {'args': vars(args), 'teacher_train_and_load_s': teacher_s,
               'student_train_and_eval_s': time.time() - start, 'result': result}
    if method == 'flow_map':
      summary['ratio_4_step_to_teacher_100'] = fd['student 4-jump'] / fd['teacher euler-100']
      summary['step_cost_s_per_sample'] = step_costs(teacher_dir,
                                                     os.path.join(args.out, method))
    with open(os.path.join(args.out, f'summary_{method}.json'), 'w') as f:
      json.dump(summary, f, indent=2)
    print(json.dumps({'method': method, 'fd': fd}, indent=2))


if __name__ == '__main__':
  main()
