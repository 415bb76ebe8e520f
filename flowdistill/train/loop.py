"""The training loop: sharded jitted steps, logging, checkpoints, resume, NaN guard."""

import logging
import signal
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from flowdistill.train import identity, parallel
from flowdistill.train.checkpoint import Checkpointer
from flowdistill.train.state import TrainState
from flowdistill.train.writer import MetricWriter

BatchSource = Callable[[int], Iterator[dict]]  # start step -> iterator of local numpy batches

_log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss or parameters."""


class Preempted(SystemExit):
  """The run got a stop signal and saved a checkpoint at `step`; rerunning the command resumes.

  A `SystemExit`, so an uncaught one ends the program cleanly: status 130 after SIGINT (as a
  shell reports Ctrl-C), 0 after SIGTERM or SIGHUP (a scheduler's stop, a closed terminal).
  """

  def __init__(self, step: int, directory: str, signum: int = signal.SIGTERM):
    super().__init__(130 if signum == signal.SIGINT else 0)
    self.step, self.directory, self.signum = step, directory, signum


def _stack(batches):
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def jit_step(step_fn, state: TrainState, extras: dict, mesh, leading_axes: int = 0):
  """`step_fn` jitted for `mesh`: the state (donated) and `extras` sharded by
  `parallel.state_sharding`, the batch over every device after `leading_axes` (1 when a call
  scans over k steps), the metrics replicated."""
  shardings = parallel.state_sharding(state, mesh)
  return jax.jit(step_fn, donate_argnums=0,
                 in_shardings=(shardings, parallel.batch_sharding(mesh, leading_axes),
                               parallel.state_sharding(extras, mesh)),
                 out_shardings=(shardings, parallel.replicated(mesh)))


def train(state: TrainState, step_fn, batches: BatchSource, *, mesh, workdir: str,
          num_steps: int, steps_per_call: int = 1, log_every: int = 100,
          ckpt_every: int = 1000, keep: int = 3, meta: dict | None = None,
          extras: dict | None = None, progress: bool = True) -> TrainState:
  """Trains `state` to `num_steps` updates, resuming from the newest checkpoint in `workdir`.

  Args:
    state: a freshly initialised state (its structure is the restore target).
    step_fn: `step(state, batch) -> (state, metrics)` from `make_train_step` (not jitted).
    batches: `batches(start_step)` -> iterator of this process's numpy batches from that step;
      batch k must depend only on k so a resumed run sees the data of an uninterrupted one.
    mesh: the ('data', 'fsdp') device mesh (`parallel.make_mesh`); the state and `extras`
      are sharded over 'fsdp' by `parallel.state_sharding`, the batch over every device.
    steps_per_call: updates per dispatch (the step function scans over stacked batches).
    meta: JSON-able facts stored beside each checkpoint; with the run's `config` (JSON) in
      it, a resume under another config is refused (`identity.check_resume`).
    extras: frozen inputs of the loss (e.g. {'teacher_params': ...}), placed like the state,
      not saved.

  Raises:
    identity.ConfigChangedError: the newest checkpoint was made under another config.
    NonFiniteLossError: at the first non-finite loss or parameter norm, naming the step; the
      checkpoints already written are left untouched.
    Preempted: after SIGTERM, SIGINT or SIGHUP (on any process), once a checkpoint of the step
      that all processes agreed on is written.

  With several processes (`jax.distributed`), every process calls this with its own rows of
  each global batch. The returned state is on this process's first device (`host_local`), so
  that evaluation does not repeat its work on every device of the mesh.
  """
  ckpt = Checkpointer(f'{workdir}/checkpoints', keep=keep)
  # The step donates the state, so it must own every buffer: one shared with the caller (e.g.
  # a warm start from teacher params, which are also `extras`) would be freed while in use.
  state = parallel.place(jax.tree.map(jnp.copy, state), mesh)
  restored = ckpt.restore_latest(state)
  if restored is not None:
    try:
      identity.check_resume(restored[1], meta or {}, ckpt.directory, int(restored[0].step))
    except identity.ConfigChangedError:
      ckpt.close()
      raise
    state = restored[0]
    _log.info('Resumed from step %d in %s.', int(state.step), ckpt.directory)
  start = int(state.step)
  if start >= num_steps:
    ckpt.close()
    return parallel.host_local(state)
  if start % steps_per_call or num_steps % steps_per_call:
    ckpt.close()
    raise ValueError(f'config.train.steps ({num_steps}) and the resumed step ({start}) must be '
                     f'multiples of config.train.steps_per_call ({steps_per_call}); choose a '
                     'steps_per_call that divides both, or a fresh --workdir.')

  leading = 1 if steps_per_call > 1 else 0
  extras = parallel.place(extras or {}, mesh)
  jitted = jit_step(step_fn, state, extras, mesh, leading)
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  data = batches(start)
  bar = tqdm.tqdm(total=num_steps, initial=start, disable=not progress or jax.process_index(),
                  dynamic_ncols=True, desc='train')
  pending = None  # (step, metrics) of the previous dispatch: at most two steps in flight
  last_time, last_step = time.perf_counter(), start

  def crossed(step, every):  # A dispatch of k steps may pass a multiple without landing on it.
    return step // every != (step - steps_per_call) // every

  def settle(step, metrics):
    nonlocal last_time, last_step
    metrics = jax.device_get(metrics)
    if not all(np.all(np.isfinite(m)) for m in jax.tree.leaves(metrics)):
      saved = ckpt.all_steps()
      raise NonFiniteLossError(
          f'Non-finite loss or parameters at step {step} ({metrics}); last good checkpoint: '
          f'{f"step {saved[-1]}" if saved else "none"} in {ckpt.directory}. Lower '
          'config.optim.lr, enable config.optim.grad_clip, or check the data for NaNs.')
    if crossed(step, log_every) or step == num_steps:
      now = time.perf_counter()
      rate = (step - last_step) / max(now - last_time, 1e-9)
      last_time, last_step = now, step
      writer.write(step, dict(metrics, steps_per_s=rate))
      bar.set_postfix(loss=f'{float(metrics["loss"]):.4f}', steps_per_s=f'{rate:.1f}')

  with parallel.PreemptionWatch() as watch:
    try:
      for dispatch, step in enumerate(range(start + steps_per_call, num_steps + 1,
                                            steps_per_call)):
        local = [next(data) for _ in range(steps_per_call)]
        batch = parallel.global_batch(_stack(local) if leading else local[0], mesh, leading)
        state, metrics = jitted(state, batch, extras)
        if pending is not None:
          settle(*pending)
        pending = (step, metrics)
        bar.update(steps_per_call)
        preempted = watch.reached(dispatch)
        if preempted or crossed(step, ckpt_every) or step == num_steps:
          settle(*pending)
          pending = None
          ckpt.save(step, state, dict(meta or {}, data_step=step))
        if preempted:
          ckpt.wait()
          name = signal.Signals(watch.signum).name
          _log.warning('Preempted (%s): saved step %d in %s; rerun the same command to '
                       'resume.', name, step, ckpt.directory)
          raise Preempted(step, ckpt.directory, watch.signum)
      if pending is not None:
        settle(*pending)
    finally:
      bar.close()
      writer.close()
      ckpt.close()
  return parallel.host_local(state)
