"""Speed of one flow-matching training step: the library's JAX step vs the same step in PyTorch.

Usage:
  python benchmarks/fm_step.py [--steps N] [--seconds S] [--only SUBSTRINGS]
      [--out benchmarks/out/fm_step.json]

The JAX step is the library's own: `make_loss` (linear path) on `MLP(2, hidden=256, depth=3,
time_dim=64)`, Adam (lr 1e-3) through `make_train_step`, under `jax.jit(..., donate_argnums=0)`,
batch 1024 of 2-D checkerboard data pre-generated on the device (a few batches in rotation, so
data generation is not timed). Variants: the couplings of `flowdistill.couplings` ('independent',
'exact' and 'sinkhorn', on the whole batch and in blocks of 32/64/128/256 rows), 'exact' solved
on the host ahead of the step as `config.fm.ot_on_host` does (the next batch is paired while
the previous step computes, at most two steps in flight, as in the training loop; noise drawn
and batches sent to the device every step), and `steps_per_call=10` (a `lax.scan` over 10
batches per dispatch) for 'independent'.

The PyTorch step (CPU, eager, 2 threads) is the same computation written by hand: sinusoidal
embedding of `t` (width 64, highest frequency 10, max period 10000, as the library's) ->
Linear-SiLU-Linear, concatenated with x, 3 x (Linear(., 256) + SiLU), Linear(256, 2); MSE to
`x1 - x0` at `x_t = (1 - t) x0 + t x1`, `t ~ U[0, 1]`; Adam lr 1e-3; the initial parameters
are copied from the JAX model, and the script checks that both models give the same loss and
output-layer gradient on one batch. It also tries `torch.compile` on the model (eager Adam)
and reports it as a separate row if it works. PyTorch is optional (install the CPU wheel with
`pip install torch==2.13.0`); without it the script measures JAX only and says so.

Timing: the first call (trace + compile + one step) is reported as the compile time; after a
short warm-up, steps run back to back until at least `--seconds` have passed (or exactly
`--steps` steps), with `block_until_ready` on the last result only. Each measurement is
repeated `--repeats` times, interleaved across variants (each JAX repeat re-jits and so
recompiles), and the median is reported. Derived figures: JAX 'independent' / PyTorch eager
steps/s (target >= 2x) and, for each OT variant, the overhead
`(t_step_OT - t_step_independent) / t_step_OT` (target <= 25 %).
"""

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Repo root.

import machine  # pylint: disable=wrong-import-position

from flowdistill.couplings import pair_on_host  # pylint: disable=wrong-import-position
from flowdistill.data import toy
from flowdistill.fm import make_loss
from flowdistill.models.apply import to_apply_fn
from flowdistill.models.mlp import MLP
from flowdistill.paths import linear_path
from flowdistill.train.state import init_state
from flowdistill.train.step import make_train_step

BATCH = 1024
DIM = 2
HIDDEN = 256
DEPTH = 3
TIME_DIM = 64
LR = 1e-3
NUM_BATCHES = 8  # Pre-generated batches in rotation (per call).
WARMUP_SECONDS = 0.5
MIN_TIMED_CALLS = 3
SPEED_TARGET = 2.0
OVERHEAD_TARGET = 0.25
QUIET_CORES = 0.1  # CPU cores other processes may use during a timed loop without a retry.


@dataclasses.dataclass(frozen=True)
class Variant:
  """One JAX configuration: a coupling, its block size, and updates per dispatch."""
  coupling: str = 'independent'
  block_size: int | None = None
  steps_per_call: int = 1
  on_host: bool = False

  @property
  def name(self) -> str:
    """Row label, e.g. 'jax exact (block 128)'."""
    name = f'jax {self.coupling}' + (' on host' if self.on_host else '')
    if self.coupling != 'independent':
      name += ' (full batch)' if self.block_size is None else f' (block {self.block_size})'
    if self.steps_per_call > 1:
      name += f', {self.steps_per_call} steps/call'
    return name


VARIANTS = (
    Variant(),
    Variant(steps_per_call=10),
    Variant('exact'),
    Variant('exact', 256),
    Variant('exact', 128),
    Variant('exact', 64),
    Variant('exact', 32),
    Variant('sinkhorn'),
    Variant('sinkhorn', 256),
    Variant('sinkhorn', 128),
    Variant('sinkhorn', 64),
    Variant('exact', 256, on_host=True),
    Variant('exact', 128, on_host=True),
    Variant('exact', 64, on_host=True),
    Variant('exact', 32, on_host=True),
)


def cpu_seconds():
  """(CPU seconds used by all processes, by this one) so far; the first is Linux only (NaN
  elsewhere)."""
  own = sum(os.times()[:4])
  try:
    with open('/proc/stat') as f:
      jiffies = [int(v) for v in f.readline().split()[1:9]]
  except OSError:
    return math.nan, own
  busy = sum(jiffies) - jiffies[3] - jiffies[4]  # Minus idle and iowait.
  return busy / os.sysconf('SC_CLK_TCK'), own


def time_loop(run, num_calls: int) -> float:
  """Seconds taken by `run(num_calls)`: that many back-to-back steps, waiting on the last."""
  start = time.perf_counter()
  run(num_calls)
  return time.perf_counter() - start


def measure(run, steps_per_call: int, steps: int | None, seconds: float, retries: int):
  """Compile time and steps/s of a step runner.

  The timed loop is run again (up to `retries` times) while other processes use more than
  `QUIET_CORES` CPU cores during it: on a shared 2-core machine they distort the timings, and
  PyTorch's spinning threads suffer most.

  Args:
    run: `run(n)` makes n calls of the step and waits for the last result.
    steps_per_call: updates per call.
    steps: timed updates (rounded up to whole calls); None to time at least `seconds`.
    seconds: minimum timed duration when `steps` is None.
    retries: how many times a disturbed timed loop is repeated.

  Returns:
    (compile seconds, steps per second, number of timed steps, CPU cores used by other
    processes during the timed steps).
  """
  compile_s = time_loop(run, 1)
  warm_calls, warm_s = 1, time_loop(run, 1)
  while warm_s < WARMUP_SECONDS:
    warm_calls *= 2
    warm_s = time_loop(run, warm_calls)
  if steps is None:
    calls = max(MIN_TIMED_CALLS, math.ceil(seconds * warm_calls / warm_s))
  else:
    calls = max(1, math.ceil(steps / steps_per_call))
  for _ in range(retries + 1):
    all_start, own_start = cpu_seconds()
    elapsed = time_loop(run, calls)
    all_end, own_end = cpu_seconds()
    others = ((all_end - all_start) - (own_end - own_start)) / elapsed
    if not others > QUIET_CORES:
      break
  return compile_s, calls * steps_per_call / elapsed, calls * steps_per_call, others


def toy_batches(key, num: int, steps_per_call: int):
  """`num` batches {'x': [BATCH, 2]} (or [k, BATCH, 2] for k steps per call) on the device."""
  x = toy.sample('checkerboard', key, num * steps_per_call * BATCH)
  shape = (num, steps_per_call, BATCH, DIM) if steps_per_call > 1 else (num, BATCH, DIM)
  x = jax.block_until_ready(x.reshape(shape))
  return [{'x': b} for b in x]


def jax_runner(variant: Variant, batches):
  """`run(n)` for the library's jitted step in `variant`, from a fresh state and a new jit."""
  model = MLP(DIM, hidden=HIDDEN, depth=DEPTH, time_dim=TIME_DIM, rngs=nnx.Rngs(0))
  apply_fn, params = to_apply_fn(model)
  coupling_kwargs = {} if variant.block_size is None else {'block_size': variant.block_size}
  in_step = 'independent' if variant.on_host else variant.coupling
  loss_fn = make_loss(apply_fn, linear_path(), coupling=in_step,
                      coupling_kwargs=coupling_kwargs if in_step != 'independent' else {})
  optimizer = optax.adam(LR)
  step = jax.jit(make_train_step(loss_fn, optimizer, variant.steps_per_call), donate_argnums=0)
  state = init_state(params, optimizer, jax.random.key(1))
  counter = 0
  host_x = [np.asarray(b['x']) for b in batches]
  rng = np.random.default_rng(2)

  def run(num_calls):
    nonlocal state, counter
    metrics = None
    for _ in range(num_calls):
      state, metrics = step(state, batches[counter % len(batches)])
      counter += 1
    jax.block_until_ready(metrics['loss'])

  def run_paired_on_host(num_calls):
    nonlocal state, counter
    pending = None
    for _ in range(num_calls):
      x = host_x[counter % len(host_x)]
      noise = rng.standard_normal(x.shape, np.float32)
      batch = {'x': x, 'x0': pair_on_host(noise, x, block_size=variant.block_size)}
      state, metrics = step(state, batch)
      counter += 1
      if pending is not None:
        jax.block_until_ready(pending)
      pending = metrics['loss']
    jax.block_until_ready(pending)

  return run_paired_on_host if variant.on_host else run


def torch_model_and_step(torch, jax_params, compile_model: bool):
  """The PyTorch twin of the JAX step, initialised from `jax_params`: `(model, step(x1))`."""
  nn = torch.nn

  class TorchMLP(nn.Module):
    """Same layers and order of operations as `flowdistill.models.mlp.MLP` (one-time)."""

    def __init__(self):
      super().__init__()
      half = TIME_DIM // 2
      freqs = 10.0 * torch.exp(
          -math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
      self.register_buffer('freqs', freqs)
      self.t_mlp = nn.Sequential(nn.Linear(TIME_DIM, TIME_DIM), nn.SiLU(),
                                 nn.Linear(TIME_DIM, TIME_DIM))
      widths = [DIM + TIME_DIM] + [HIDDEN] * DEPTH
      self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
      self.out = nn.Linear(HIDDEN, DIM)

    def forward(self, x, t):
      args = t[:, None] * self.freqs[None, :]
      emb = self.t_mlp(torch.cat([torch.sin(args), torch.cos(args)], dim=-1))
      h = torch.cat([x, emb], dim=-1)
      for layer in self.hidden:
        h = nn.functional.silu(layer(h))
      return self.out(h)

  model = TorchMLP()
  linears = [model.t_mlp[0], model.t_mlp[2], *model.hidden, model.out]
  jax_linears = [jax_params['time']['t_mlp']['layers'][0], jax_params['time']['t_mlp']['layers'][2],
                 *(jax_params['hidden'][i] for i in range(DEPTH)), jax_params['out']]
  with torch.no_grad():
    for lin, p in zip(linears, jax_linears):
      lin.weight.copy_(torch.from_numpy(np.asarray(p['kernel']).T.copy()))
      lin.bias.copy_(torch.from_numpy(np.asarray(p['bias']).copy()))
  forward = torch.compile(model) if compile_model else model
  optimizer = torch.optim.Adam(model.parameters(), lr=LR)

  def step(x1):
    x0 = torch.randn_like(x1)
    t = torch.rand(x1.shape[0])
    xt = (1.0 - t[:, None]) * x0 + t[:, None] * x1
    loss = torch.mean((forward(xt, t) - (x1 - x0))**2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss

  return model, step


def check_torch_twin(torch, jax_batch):
  """Raises if the PyTorch model and loss differ from the JAX ones on one fixed batch.

  Compares the loss and the gradient of the output layer's kernel (which depends on every
  hidden activation, the time embedding included) at the same x0, x1, t and initial params;
  the output kernel is set to random values first so that the loss is not trivial.
  """
  model = MLP(DIM, hidden=HIDDEN, depth=DEPTH, time_dim=TIME_DIM, rngs=nnx.Rngs(0))
  apply_fn, params = to_apply_fn(model)
  keys = jax.random.split(jax.random.key(2), 3)
  params['out']['kernel'] = 0.1 * jax.random.normal(keys[0], (HIDDEN, DIM))
  x1 = jax_batch['x']
  x0 = jax.random.normal(keys[1], x1.shape)
  t = jax.random.uniform(keys[2], (x1.shape[0],))

  def loss_fn(p):
    xt = (1.0 - t[:, None]) * x0 + t[:, None] * x1
    return jnp.mean((apply_fn(p, xt, t) - (x1 - x0))**2)

  jax_loss, jax_grads = jax.value_and_grad(loss_fn)(params)
  tmodel, _ = torch_model_and_step(torch, params, compile_model=False)
  tx0, tx1, tt = (torch.from_numpy(np.asarray(a).copy()) for a in (x0, x1, t))
  txt = (1.0 - tt[:, None]) * tx0 + tt[:, None] * tx1
  loss = torch.mean((tmodel(txt, tt) - (tx1 - tx0))**2)
  loss.backward()
  np.testing.assert_allclose(loss.item(), float(jax_loss), rtol=1e-4)
  np.testing.assert_allclose(tmodel.out.weight.grad.numpy().T,
                             np.asarray(jax_grads['out']['kernel']), rtol=1e-3, atol=1e-5)


def torch_runner(torch, jax_params, x_batches, compile_model: bool):
  """`run(n)` for the PyTorch step on the pre-generated batches (CPU tensors)."""
  _, step = torch_model_and_step(torch, jax_params, compile_model)
  return cycling_runner(step, [torch.from_numpy(np.asarray(b['x']).copy()) for b in x_batches])


def cycling_runner(step, batches):
  """`run(n)`: n calls of a PyTorch `step(batch) -> loss` over `batches` in turn, continuing
  where the previous call stopped; waits for the last loss."""
  counter = 0

  def run(num_calls):
    nonlocal counter
    loss = None
    for _ in range(num_calls):
      loss = step(batches[counter % len(batches)])
      counter += 1
    loss.item()

  return run


def import_torch():
  """PyTorch set to 2 threads, or None (with a message) if it is not installed."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    print('PyTorch is not installed: skipping the PyTorch rows '
          '(`pip install torch==2.13.0` for the CPU wheel).', file=sys.stderr)
    return None
  torch.set_num_threads(2)
  torch.manual_seed(0)
  return torch


def run_all(args):
  """Runs every measurement `args.repeats` times; returns {row name: result dict}."""
  torch = import_torch()
  key_small, key_multi = jax.random.split(jax.random.key(0))
  small = toy_batches(key_small, NUM_BATCHES, 1)
  multi = toy_batches(key_multi, NUM_BATCHES, 10)
  runs = {}
  for variant in VARIANTS:
    if args.only and variant != Variant() and not any(s in variant.name for s in args.only):
      continue
    batches = multi if variant.steps_per_call > 1 else small
    runs[variant.name] = (lambda v=variant, b=batches: jax_runner(v, b), variant.steps_per_call)
  if torch is not None:
    check_torch_twin(torch, small[0])
    params = to_apply_fn(MLP(DIM, hidden=HIDDEN, depth=DEPTH, time_dim=TIME_DIM,
                             rngs=nnx.Rngs(0)))[1]
    runs['torch eager'] = (lambda: torch_runner(torch, params, small, False), 1)
    if not args.no_compile:
      runs['torch.compile (model; eager Adam)'] = (
          lambda: torch_runner(torch, params, small, True), 1)
  results = {name: {'compile_s': [], 'steps_per_s': [], 'timed_steps': [], 'other_cpu_cores': []}
             for name in runs}
  for rep in range(args.repeats):
    for name, (make, steps_per_call) in list(runs.items()):
      try:
        compile_s, rate, timed, others = measure(make(), steps_per_call, args.steps,
                                                 args.seconds, args.retries)
      except Exception as err:  # pylint: disable=broad-except
        if not name.startswith('torch.compile'):
          raise
        print(f'{name}: skipped ({type(err).__name__}: {str(err).splitlines()[0][:200]})',
              file=sys.stderr)
        del runs[name], results[name]
        continue
      row = results[name]
      row['compile_s'].append(compile_s)
      row['steps_per_s'].append(rate)
      row['timed_steps'].append(timed)
      row['other_cpu_cores'].append(others)
      print(f'[repeat {rep + 1}/{args.repeats}] {name}: {rate:.1f} steps/s '
            f'({timed} steps), first call {compile_s:.2f} s', file=sys.stderr, flush=True)
  for row in results.values():
    row['compile_s_median'] = statistics.median(row['compile_s'])
    row['steps_per_s_median'] = statistics.median(row['steps_per_s'])
    row['ms_per_step'] = 1e3 / row['steps_per_s_median']
  return results, torch


def derived(results):
  """Speed ratio vs PyTorch eager and OT overheads, with their targets."""
  base = results[Variant().name]['ms_per_step']
  out = {'ot_overhead': {}}
  for name, row in results.items():
    if name.startswith('jax ') and 'independent' not in name:
      out['ot_overhead'][name] = (row['ms_per_step'] - base) / row['ms_per_step']
  if 'torch eager' in results:
    out['jax_vs_torch_eager'] = results['torch eager']['ms_per_step'] / base
    out['speed_target_met'] = out['jax_vs_torch_eager'] >= SPEED_TARGET
  out['ot_overhead_target_met'] = {name: v <= OVERHEAD_TARGET
                                   for name, v in out['ot_overhead'].items()}
  return out


def markdown(results, extra, repeats: int) -> str:
  """The results table and the derived figures as markdown."""
  torch_ms = results.get('torch eager', {}).get('ms_per_step')
  lines = [f'| step | first call (s) | steps/s (median of {repeats}) | ms/step | × torch eager '
           '| OT overhead |', '|---|---:|---:|---:|---:|---:|']
  for name, row in results.items():
    speedup = f'{torch_ms / row["ms_per_step"]:.2f}' if torch_ms else '–'
    overhead = extra['ot_overhead'].get(name)
    overhead = '–' if overhead is None else f'{100 * overhead:.0f} %'
    lines.append(f'| {name} | {row["compile_s_median"]:.2f} | {row["steps_per_s_median"]:.1f} '
                 f'| {row["ms_per_step"]:.2f} | {speedup} | {overhead} |')
  if 'jax_vs_torch_eager' in extra:
    met = 'met' if extra['speed_target_met'] else 'NOT met'
    lines.append(f'\nJAX independent / torch eager: {extra["jax_vs_torch_eager"]:.2f}× '
                 f'(target ≥ {SPEED_TARGET:g}×: {met}).')
  within = [n for n, ok in extra['ot_overhead_target_met'].items() if ok]
  lines.append(f'OT variants within the {100 * OVERHEAD_TARGET:.0f} % overhead target: '
               f'{", ".join(within) if within else "none"}.')
  return '\n'.join(lines)


def environment(torch) -> dict:
  """Versions and machine facts recorded with the results."""
  import flax  # pylint: disable=import-outside-toplevel
  import ott  # pylint: disable=import-outside-toplevel
  return {'python': platform.python_version(), 'jax': jax.__version__,
          'jaxlib': jax.lib.__version__, 'flax': flax.__version__, 'optax': optax.__version__,
          'ott-jax': ott.__version__, 'torch': None if torch is None else torch.__version__,
          'torch_threads': None if torch is None else torch.get_num_threads(),
          'machine': machine.describe(torch=torch),
          'XLA_FLAGS': os.environ.get('XLA_FLAGS', '')}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=None,
                      help='timed steps per measurement (default: as many as fill --seconds)')
  parser.add_argument('--seconds', type=float, default=3.0,
                      help='minimum timed duration per measurement when --steps is not given')
  parser.add_argument('--repeats', type=int, default=3, help='repeats; the median is reported')
  parser.add_argument('--retries', type=int, default=5,
                      help='reruns of a timed loop disturbed by other processes')
  parser.add_argument('--no-compile', action='store_true', help='skip the torch.compile row')
  parser.add_argument('--only', type=lambda s: s.split(','), default=None,
                      help='comma-separated substrings: only the JAX rows whose names contain '
                           'one (the independent baseline always runs), e.g. "on host"')
  parser.add_argument('--out', default='benchmarks/out/fm_step.json', help='JSON output path')
  args = parser.parse_args()
  load_start = os.getloadavg()
  results, torch = run_all(args)
  env = environment(torch) | {'load_avg_start': load_start, 'load_avg_end': os.getloadavg()}
  others = max(max(row['other_cpu_cores']) for row in results.values())
  if others > QUIET_CORES:
    print(f'Warning: other processes used up to {others:.2f} CPU cores during a timed loop; '
          'the timings are disturbed. Rerun on an idle machine.', file=sys.stderr)
  extra = derived(results)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'environment': env, 'settings': vars(args) | {'batch': BATCH},
               'results': results, 'derived': extra}, f, indent=2)
  print(machine.headline(env['machine']))
  print(markdown(results, extra, args.repeats))


if __name__ == '__main__':
  main()
