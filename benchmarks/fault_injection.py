"""Fault injection: SIGKILL a training run at random steps, resume it each time, and check that
it ends with bit-for-bit the parameters of an uninterrupted run.

Also: a truncated newest checkpoint makes the next start fall back to the previous one with a
warning (and still end bit-exact); SIGTERM, SIGINT and SIGHUP at a random step save, exit with
0 / 130 / 0 and resume bit-exact; a second run on a workdir in use is refused at once while
the first ends bit-exact; a full disk (a tmpfs mounted for the purpose, where the machine
allows it) ends the run with one message and the run, moved to a larger disk, resumes
bit-exact; an unwritable workdir fails at start with a clear message (through the command
line). With `--evaluation`, SIGTERM, SIGINT and SIGHUP at a random point of dataset-distillation
evaluation (`dd_eval` on digits, after its first cell): no crash, the message, 0 / 130 / 0, the
stored cell kept byte for byte, and a rerun with the results of an uninterrupted run.
Recovery time = from restarting a killed run to its first new step logged. The runs train the
quickstart's model on moons in a child process (`--worker`) through the library's training
loop, without the evaluation that follows.

python benchmarks/fault_injection.py [--kills 10] [--steps 400] [--seed 0] [--evaluation] \
    [--workdir /tmp/fd-faults] [--out benchmarks/out/fault_injection.json]
"""

import argparse
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from flowdistill.data import sources
from flowdistill.experiments import load_config_file
from flowdistill.train import configured, lease, loop, parallel
from flowdistill.train.checkpoint import SAVE_MARGIN_BYTES
from flowdistill.train.step import make_train_step

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMMAND_TIMEOUT_S = 300


def config(steps: int, ckpt_every: int):
  c = load_config_file(ROOT / 'configs' / 'quickstart.py', 'moons')
  c.train.update(steps=steps, ckpt_every=ckpt_every, log_every=1, keep=3)
  c.data.batch_size, c.model.hidden = 256, 64
  return c


def worker(workdir: str, steps: int, ckpt_every: int) -> None:
  """The training part of `flowdistill.train.configured.train_fm` under the workdir lease, as
  `flowdistill.main` runs it (child process)."""
  c = config(steps, ckpt_every)
  with lease.hold(workdir):
    dataset = sources.load(c.data)
    _, loss_fn, optimizer, state = configured.fm_setup(c, dataset)
    loop.train(state, make_train_step(loss_fn, optimizer),
               sources.batch_source(dataset, c.data.batch_size, seed=c.seed, conditional=False),
               mesh=parallel.make_mesh(), workdir=workdir, num_steps=steps, log_every=1,
               ckpt_every=ckpt_every, keep=c.train.keep, progress=False)


def cli(workdir: pathlib.Path, steps: int, ckpt_every: int) -> list[str]:
  """The child's command line."""
  return [sys.executable, __file__, '--worker', str(workdir), '--steps', str(steps),
          '--ckpt-every', str(ckpt_every)]


def env() -> dict:
  return dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='', FLOWDISTILL_DISTRIBUTED='0')


def logged_steps(workdir: pathlib.Path) -> list[int]:
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return []
  return [json.loads(line)['step'] for line in path.read_text().splitlines()
          if line.endswith('}')]


def run_to_end(command: list[str]) -> subprocess.CompletedProcess:
  result = subprocess.run(command, env=env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S, check=False)
  if result.returncode:
    raise RuntimeError(f'{" ".join(command)} failed ({result.returncode}):\n'
                       f'{result.stderr[-3000:]}')
  return result


def run_and_kill(command, workdir, kill_at: int, signum: int = signal.SIGKILL) -> dict:
  """Starts `command`, sends `signum` once step `kill_at` is logged; returns what happened."""
  before = logged_steps(workdir)
  start = time.perf_counter()
  proc = subprocess.Popen(command, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  first_new_step_s = None
  deadline = start + COMMAND_TIMEOUT_S
  while proc.poll() is None and time.perf_counter() < deadline:
    steps = logged_steps(workdir)
    if first_new_step_s is None and len(steps) > len(before):
      first_new_step_s = time.perf_counter() - start
    if steps and steps[-1] >= kill_at:
      proc.send_signal(signum)
      break
    time.sleep(0.005)
  _, stderr = proc.communicate(timeout=60)
  steps = logged_steps(workdir)
  return {'kill_at': kill_at, 'killed_after_step': steps[-1] if steps else 0,
          'killed': proc.returncode == -9, 'exit_status': proc.returncode,
          'first_new_step_s': first_new_step_s, 'stderr': stderr}


def signal_stops(reference, base: pathlib.Path, steps: int, ckpt_every: int,
                 rng: random.Random) -> dict:
  """Each stop signal at a random step: the saved step, the exit status, and whether the
  resumed run ends bit-exact."""
  out = {}
  for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    workdir = base / signal.Signals(signum).name.lower()
    stop = run_and_kill(cli(workdir, steps, ckpt_every), workdir,
                        rng.randint(2, steps - 2), signum)
    saved = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
    run_to_end(cli(workdir, steps, ckpt_every))
    out[signal.Signals(signum).name] = {
        'signalled_after_step': stop['killed_after_step'], 'exit_status': stop['exit_status'],
        'saved_step': saved[-1] if saved else None,
        'message': 'rerun the same command to resume' in stop['stderr'],
        'bit_exact': bit_equal(reference, final_state(workdir, steps))}
  return out


def second_run(reference, base: pathlib.Path, steps: int, ckpt_every: int) -> dict:
  """A second run started on a workdir in use: its status, time to refusal and message; the
  first run's end state. The first run is paused (SIGSTOP) from its first logged step until
  the second has ended, so that it is still running however fast it trains."""
  workdir = base / 'shared'
  first = subprocess.Popen(cli(workdir, steps, ckpt_every), env=env(), cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  while not logged_steps(workdir) and first.poll() is None:
    time.sleep(0.005)
  first.send_signal(signal.SIGSTOP)
  start = time.perf_counter()
  second = subprocess.run(cli(workdir, steps, ckpt_every), env=env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                          check=False)
  refused_s = time.perf_counter() - start
  first.send_signal(signal.SIGCONT)
  first.wait(timeout=COMMAND_TIMEOUT_S)
  return {'exit_status': second.returncode, 'refused_s': refused_s,
          'message': next((line for line in second.stderr.splitlines()
                           if 'in use by another run' in line), ''),
          'first_exit_status': first.returncode,
          'first_bit_exact': bit_equal(reference, final_state(workdir, steps))}


def full_disk(reference, base: pathlib.Path, steps: int, ckpt_every: int) -> dict:
  """The run on a tmpfs with room for one and a half checkpoints beyond the save margin: how it
  ends, and whether it resumes bit-exact once moved to a larger disk. Skipped where tmpfs
  cannot be mounted."""
  mount = pathlib.Path(tempfile.mkdtemp(prefix='fd-full-'))
  state_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(reference))
  size = (SAVE_MARGIN_BYTES + state_bytes * 3 // 2) // 1024
  try:
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}k', 'tmpfs',
                              str(mount)], capture_output=True, text=True, check=False)
    refused = mounted.stderr.strip()[:80] if mounted.returncode else ''
  except OSError as e:  # no mount command
    refused = str(e)
  if refused:
    mount.rmdir()
    return {'skipped': f'cannot mount a tmpfs here ({refused})'}
  try:
    workdir = mount / 'run'
    start = time.perf_counter()
    ran = subprocess.run(cli(workdir, steps, ckpt_every), env=env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                         check=False)
    lines = ran.stderr.strip().splitlines()
    moved = base / 'moved'
    shutil.copytree(workdir, moved)
  finally:
    subprocess.run(['umount', str(mount)], check=False)
    mount.rmdir()
  run_to_end(cli(moved, steps, ckpt_every))
  return {'exit_status': ran.returncode, 'seconds': time.perf_counter() - start,
          'stderr_lines': len(lines), 'message': lines[-1] if lines else '',
          'bit_exact_after_move': bit_equal(reference, final_state(moved, steps))}



EVALUATION = ('--config=configs/dd_protocol.py:digits,cpu', '--config.dd.runs=1',
              '--config.dd.epochs=(12,)', '--config.dd.width=8', '--config.dd.epochs_per_call=1',
              '--config.dd.ipcs=(1,2)', '--config.dd_eval.baselines=("random",)',
              '--config.dd_eval.whole_data=False')


def evaluation_cli(workdir: pathlib.Path) -> list[str]:
  return [sys.executable, '-m', 'flowdistill.main', *EVALUATION, f'--workdir={workdir}']


def cell_results(workdir: pathlib.Path) -> dict:
  """{cell file: its accuracies and identity} (timings left out)."""
  return {p.name: {k: v for k, v in json.loads(p.read_text()).items() if 'seconds' not in k}
          for p in sorted((workdir / 'cells').glob('*.json'))}


def evaluation_stops(base: pathlib.Path, rng: random.Random) -> dict:
  """Each stop signal at a random moment of dd_eval's second cell (its compilation and runs, as
  long as the uninterrupted run took for it): how the command ended, whether the first cell
  was kept, and whether the rerun's cells are the uninterrupted run's."""
  env_ = dict(env(), FLOWDISTILL_CACHE=str(base / 'eval-cache'))
  reference = base / 'eval-reference'
  subprocess.run(evaluation_cli(reference), env=env_, cwd=ROOT, capture_output=True,
                 timeout=COMMAND_TIMEOUT_S, check=True)
  second_cell_s = (os.path.getmtime(reference / 'cells' / 'random_ipc2.json')
                   - os.path.getmtime(reference / 'cells' / 'random_ipc1.json'))
  out = {}
  for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    name = signal.Signals(signum).name
    workdir, delay = base / f'eval-{name.lower()}', rng.uniform(0, 0.8 * second_cell_s)
    proc = subprocess.Popen(evaluation_cli(workdir), env=env_, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = workdir / 'cells' / 'random_ipc1.json'
    while not first.exists() and proc.poll() is None:
      time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=COMMAND_TIMEOUT_S)
    kept = {p.name: p.read_bytes() for p in (workdir / 'cells').glob('*.json')}
    subprocess.run(evaluation_cli(workdir), env=env_, cwd=ROOT, capture_output=True,
                   timeout=COMMAND_TIMEOUT_S, check=True)
    out[name] = {
        'delay_s': delay, 'exit_status': proc.returncode,
        'crashed': proc.returncode in (-11, 139) or 'Fatal Python error' in stderr,
        'message': f'{name} outside training: stopped' in stderr,
        'cells_kept': all((workdir / 'cells' / k).read_bytes() == v for k, v in kept.items()),
        'same_results': cell_results(workdir) == cell_results(reference)}
  return out


def final_state(workdir: pathlib.Path, step: int):
  """The state of the checkpoint at `step` as host numpy arrays (no template needed)."""
  with ocp.CheckpointManager(workdir / 'checkpoints') as manager:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return restored['state']


def bit_equal(a, b) -> bool:
  """Same tree, dtypes, shapes and bytes."""
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  as_np = np.asarray
  return tree_a == tree_b and all(
      as_np(x).dtype == as_np(y).dtype and as_np(x).shape == as_np(y).shape
      and as_np(x).tobytes() == as_np(y).tobytes() for x, y in zip(leaves_a, leaves_b))


def truncate_newest(workdir: pathlib.Path) -> int:
  """Truncates every file of the newest checkpoint's state to half its size; returns its step."""
  step = max(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  for root, _, files in os.walk(workdir / 'checkpoints' / str(step) / 'state'):
    for name in files:
      path = pathlib.Path(root) / name
      path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  return step


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--kills', type=int, default=10)
  parser.add_argument('--steps', type=int, default=400)
  parser.add_argument('--ckpt-every', type=int, default=20)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--workdir', default='/tmp/fd-faults')
  parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'out' / 'fault_injection.json'))
  parser.add_argument('--evaluation', action='store_true',
                      help='also stop dataset-distillation evaluation with each signal')
  parser.add_argument('--worker', default='', help='(internal) train in this workdir')
  args = parser.parse_args(argv)
  if args.worker:
    worker(args.worker, args.steps, args.ckpt_every)
    return {}
  base = pathlib.Path(args.workdir)
  shutil.rmtree(base, ignore_errors=True)
  rng = random.Random(args.seed)
  reference, faulty = base / 'reference', base / 'faulty'

  start = time.perf_counter()
  run_to_end(cli(reference, args.steps, args.ckpt_every))
  uninterrupted_s = time.perf_counter() - start

  kills = []
  for _ in range(args.kills):
    done = logged_steps(faulty)
    low = (done[-1] if done else 0) + 1
    # Stratified: a random step in the next 1/remaining of what is left, so kills spread out.
    upper = low + (args.steps - 1 - low) // (args.kills - len(kills))
    kill_at = rng.randint(low, max(low, upper))
    kills.append(run_and_kill(cli(faulty, args.steps, args.ckpt_every), faulty, kill_at))
    print(kills[-1], flush=True)
  start = time.perf_counter()
  run_to_end(cli(faulty, args.steps, args.ckpt_every))
  last_run_s = time.perf_counter() - start
  exact = bit_equal(final_state(reference, args.steps), final_state(faulty, args.steps))

  # A truncated newest checkpoint: fall back to the previous one, warn, end bit-exact again.
  truncated = truncate_newest(faulty)
  rerun = run_to_end(cli(faulty, args.steps, args.ckpt_every))
  fallback_warned = f'Checkpoint at step {truncated}' in rerun.stderr and (
      'falling back' in rerun.stderr)
  exact_after_fallback = bit_equal(final_state(reference, args.steps),
                                   final_state(faulty, args.steps))

  # An unwritable workdir (a file where the folder should be), through the command line.
  blocked = base / 'blocked'
  blocked.write_text('not a folder')
  start = time.perf_counter()
  bad = subprocess.run([sys.executable, '-m', 'flowdistill.main',
                        f'--config={ROOT}/configs/quickstart.py', f'--workdir={blocked}/run'],
                       env=env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
  unwritable = {'exit_status': bad.returncode, 'seconds': time.perf_counter() - start,
                'message': next((line for line in bad.stderr.splitlines()
                                 if 'writable --workdir' in line), '')}

  final = final_state(reference, args.steps)
  signals = signal_stops(final, base, args.steps, args.ckpt_every, rng)
  shared = second_run(final, base, args.steps, args.ckpt_every)
  disk = full_disk(final, base, args.steps, args.ckpt_every)
  evaluation = evaluation_stops(base, rng) if args.evaluation else {}

  for k in kills:
    del k['stderr']
  recovered = [k['first_new_step_s'] for k in kills[1:] if k['first_new_step_s'] is not None]
  result = {
      'kills': kills, 'killed_mid_run': sum(k['killed'] for k in kills),
      'bit_exact': exact, 'fallback_step': truncated, 'fallback_warned': fallback_warned,
      'bit_exact_after_fallback': exact_after_fallback, 'unwritable': unwritable,
      'signals': signals, 'second_run': shared, 'full_disk': disk, 'evaluation': evaluation,
      'uninterrupted_s': uninterrupted_s, 'last_resumed_run_s': last_run_s,
      'recovery_s_median': sorted(recovered)[len(recovered) // 2] if recovered else None,
      'recovery_s_max': max(recovered) if recovered else None,
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=2)
  print(json.dumps({k: v for k, v in result.items() if k != 'kills'}, indent=2))
  return result


if __name__ == '__main__':
  outcome = main()
  sys.exit(0 if not outcome or (outcome['bit_exact'] and outcome['bit_exact_after_fallback']
                                and outcome['fallback_warned']
                                and outcome['unwritable']['message']) else 1)
