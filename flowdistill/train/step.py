"""One jitted optimisation step (or k of them per dispatch)."""

import jax
import optax

from flowdistill import fitting
from flowdistill.train.state import TrainState


def make_train_step(loss_fn, optimizer: optax.GradientTransformation,
                    steps_per_call: int = 1, *, pass_step: bool = False):
  """Builds `step(state, batch, extras=None) -> (state, metrics)`.

  Args:
    loss_fn: `loss_fn(params, batch, key, **extras) -> (loss, metrics)`; `extras` holds frozen
      inputs such as `teacher_params`, passed explicitly at every call (never closed over).
    optimizer: the optax transformation the state was initialised with.
    steps_per_call: k > 1 runs k updates in one `lax.scan`; the batch then has a leading axis
      of size k and the metrics are those of the last update.
    pass_step: also call the loss with `step=state.step` (int32 scalar, updates done so far),
      for losses with a schedule (e.g. a regulariser weight that warms up).

  The key of update n is `fold_in(state.key, n)`, so a resumed run draws the same randomness
  as an uninterrupted one.
  """

  update = fitting.make_update(loss_fn, optimizer, has_aux=True)

  def one_step(state: TrainState, batch, extras=None):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    step_kwargs = {'step': state.step} if pass_step else {}
    out = update(state.params, state.opt_state, batch, key, **step_kwargs, **(extras or {}))
    params = out.params
    ema = {name: jax.tree.map(lambda e, p, r=float(name): r * e + (1 - r) * p, avg, params)
           for name, avg in state.ema.items()}
    metrics = dict(out.aux, loss=out.loss, grad_norm=optax.tree.norm(out.grads),
                   param_norm=optax.tree.norm(params))
    return state.replace(step=state.step + 1, params=params, opt_state=out.opt_state,
                         ema=ema), metrics

  if steps_per_call == 1:
    return one_step

  def multi_step(state, batches, extras=None):
    state, metrics = jax.lax.scan(lambda st, b: one_step(st, b, extras), state, batches)
    return state, jax.tree.map(lambda m: m[-1], metrics)

  return multi_step
