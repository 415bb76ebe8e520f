"""One optax update as a pure function, and the loop that runs it: the training step shared by
the library's small trainers (VAE, SimCLR backbone, classifiers, linear probes, synthetic images)
and the core of the train state's step.

    update = make_update(loss_fn, optimizer, has_aux=True)   # pure: jit, scan or vmap it
    params, history = fit(update, params, optimizer.init(params), steps=1000, args=(images,))

`fit` calls `update(params, opt_state, i, *args)` with the step index `i` (int32), from which the
loss draws its minibatch and key (`fold_in(key, i)`), so a run resumed from its state file
(`state_path`) takes the same steps as one that never stopped; a stop signal ends `fit` after
the step it came in, with that step in the state file.
"""

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flowdistill import files
from flowdistill.train import stop as stop_signals


class Update(NamedTuple):
  """One optimizer update: the new `params` and `opt_state`, the `loss` (scalar) at the old
  params, the loss's `aux` output (None without `has_aux`) and the `grads` (a pytree like
  params)."""
  params: Any
  opt_state: Any
  loss: jax.Array
  aux: Any
  grads: Any


def make_update(loss_fn: Callable, optimizer: optax.GradientTransformation, *,
                has_aux: bool = False) -> Callable[..., Update]:
  """`update(params, opt_state, *args, **kwargs) -> Update`: one step of `optimizer` on
  `loss_fn(params, *args, **kwargs)` (a scalar, or `(scalar, aux)` with `has_aux`).

  Pure and not jitted: jit it, or run it under `lax.scan` / `vmap`. The optimizer sees the
  params (`optimizer.update(grads, opt_state, params)`), as weight decay needs.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)

  def update(params, opt_state, /, *args, **kwargs) -> Update:
    value, grads = grad_fn(params, *args, **kwargs)
    loss, aux = value if has_aux else (value, None)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return Update(optax.apply_updates(params, updates), opt_state, loss, aux, grads)

  return update


def random_batch(data_key, i, batch_size: int, num: int) -> tuple[jax.Array, jax.Array]:
  """(indices int [batch_size] drawn with replacement from [0, num), a key for the rest of
  the loss) of step i, both from `fold_in(data_key, i)`: the minibatch of the small trainers,
  the same whether or not the run was resumed."""
  k = jax.random.fold_in(data_key, i)
  return jax.random.randint(k, (batch_size,), 0, num), jax.random.fold_in(k, 1)


def default_record(out: Update) -> dict:
  """The metrics `fit` keeps per step: {'loss', **aux} (aux a dict of scalars, or None)."""
  return {'loss': out.loss, **(out.aux or {})}


def fit(update: Callable[..., Update], params, opt_state, *, steps: int, args: tuple = (),
        record: Callable[[Update], dict] = default_record,
        on_progress: Callable[[int, Any, dict], None] | None = None,
        progress_every: int = 100, state_path: str | None = None, start: int = 0,
        stop: int | None = None, history: dict | None = None) -> tuple[Any, dict]:
  """Runs steps `start, ..., stop - 1` of `update`, jitted once.

  Args:
    update: from `make_update`; called as `update(params, opt_state, i, *args)`, i an int32
      scalar (the loss derives its minibatch and key from it).
    params, opt_state: the state before step `start`.
    steps: the run's number of steps: progress comes every `progress_every` steps and at `steps`.
    args: the other arguments of every update (data, frozen inputs), passed to the jitted step.
    record: `Update -> {name: scalar}`, the metrics kept per step (computed inside the step).
    on_progress: called as `(done, params, metrics of the last step)` at each progress point.
    state_path: an `.npz` file written after each `on_progress` call (`step`, the params and
      optimizer-state leaves `leaf0`, ..., and the history by name). A call that finds it
      continues from it and reaches the same result as a run that never stopped.
    start, stop: the steps of this call (`stop` defaults to `steps`), for runs in phases that
      change the parameters or restart the optimizer in between. The file is read where its
      step lies in (start, stop]; a step past `stop` means the run got beyond this phase (the
      inputs come back unchanged, for the phase that holds the step to restore); one at or
      before `start` was written by an earlier phase and is not read.
    history: {name: [start]} metrics of the steps before `start` (earlier phases).

  Returns:
    (params, history {name: numpy [stop]}), the params after step `stop - 1`.

  Raises:
    flowdistill.train.stop.Stopped: after the step during which a stop signal came, once the
      state file (if any) holds that step, so that a rerun continues from it.
  """
  stop = steps if stop is None else stop
  logs = {k: list(v) for k, v in (history or {}).items()}
  saved = files.load_npz(state_path) if state_path and files.exists(state_path) else None
  at = -1 if saved is None else int(saved['step'])
  if at > steps:
    raise ValueError(f'{state_path} holds a run at step {at}, past the {steps} steps of this one; '
                     'delete it to start over.')
  if at > stop:  # finished before: a later phase restores the file
    return params, _stacked(logs)
  done = start
  if at > start:
    done, (params, opt_state), logs = _restore(state_path, saved, (params, opt_state))

  names = []  # record's order (set while tracing): jit would return the dict's keys sorted

  def step(params, opt_state, i, *args):
    out = update(params, opt_state, i, *args)
    metrics = record(out)
    names[:] = metrics
    return out.params, out.opt_state, tuple(metrics.values())

  step = jax.jit(step)
  for i in range(done, stop):
    params, opt_state, values = step(params, opt_state, jnp.int32(i), *args)
    metrics = dict(zip(names, values, strict=True))
    for name, value in metrics.items():
      logs.setdefault(name, []).append(value)
    progress = (i + 1) % progress_every == 0 or i + 1 == steps
    if progress and on_progress is not None:
      on_progress(i + 1, params, metrics)
    stopping = stop_signals.requested() is not None
    if state_path is not None and (progress or stopping):
      _write_state(state_path, i + 1, (params, opt_state), logs)
    if stopping:
      saved = f', saved in {state_path}' if state_path is not None else ''
      stop_signals.check(params, opt_state, logs,
                         where=f'at fitting step {i + 1} of {steps}{saved}')
  return params, _stacked(logs)


def _is_reserved(name: str) -> bool:
  return name in ('step', 'leaves') or re.fullmatch(r'leaf\d+', name) is not None


def _stacked(logs: dict) -> dict:
  return {name: np.asarray(jnp.stack(values)) for name, values in logs.items()}


def _write_state(path: str, done: int, tree, logs: dict) -> None:
  if clash := [k for k in logs if _is_reserved(k)]:
    raise ValueError(f'Metric names {clash} are reserved in the state file; rename them.')
  leaves = jax.tree.leaves(tree)
  files.save_npz(path, step=done, leaves=len(leaves), **_stacked(logs),
                 **{f'leaf{k}': np.asarray(leaf) for k, leaf in enumerate(leaves)})


def _restore(path: str, saved: dict, template) -> tuple[int, Any, dict]:
  """(step, tree like `template`, history lists) of a state file's contents `saved`."""
  leaves, treedef = jax.tree.flatten(template)
  count = int(saved['leaves'])
  if count != len(leaves) or any(saved[f'leaf{k}'].shape != np.shape(leaf)
                                 for k, leaf in enumerate(leaves)):
    raise ValueError(f'{path} holds {count} arrays of other shapes than the {len(leaves)} of '
                     'this run (another model or optimizer); delete it to start over.')
  tree = jax.tree.unflatten(treedef, [jnp.asarray(saved[f'leaf{k}']) for k in range(count)])
  history = {k: list(v) for k, v in saved.items() if not _is_reserved(k)}
  return int(saved['step']), tree, history
