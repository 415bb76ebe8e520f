"""The train state pytree and optimisers built from a config."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ('adam', 'adamw', 'radam')
SCHEDULES = ('constant', 'warmup', 'cosine')


class TrainState(flax.struct.PyTreeNode):
  """Everything a run needs to continue: one pytree, checkpointed whole.

  Attributes:
    step: int32 scalar, number of optimizer updates done.
    params: model parameters.
    opt_state: optax state.
    ema: {'0.999': params, ...} exponential moving averages, one per rate (string keys).
    key: the run's RNG key (typed key data, uint32 [2] for threefry).
  """
  step: jax.Array
  params: Any
  opt_state: Any
  ema: dict[str, Any]
  key: jax.Array


def make_schedule(config):
  """Learning-rate schedule from `config.optim` (lr, schedule, warmup_steps, total steps)."""
  lr, warmup = config.optim.lr, config.optim.warmup_steps
  if config.optim.schedule == 'constant':
    return optax.constant_schedule(lr)
  if config.optim.schedule == 'warmup':
    return optax.linear_schedule(0.0, lr, max(warmup, 1))
  return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1),
                                            max(config.train.steps, warmup + 1))


def make_optimizer(config) -> optax.GradientTransformation:
  """Optax optimiser from `config.optim`: name, schedule, weight decay, gradient clipping."""
  schedule = make_schedule(config)
  name = config.optim.name
  if name == 'adam':
    opt = optax.adam(schedule, b1=config.optim.b1, b2=config.optim.b2)
  elif name == 'adamw':
    opt = optax.adamw(schedule, b1=config.optim.b1, b2=config.optim.b2,
                      weight_decay=config.optim.weight_decay)
  else:
    opt = optax.radam(schedule, b1=config.optim.b1, b2=config.optim.b2)
  if config.optim.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(config.optim.grad_clip), opt)
  return opt


def init_state(params, optimizer, key, ema_rates=()) -> TrainState:
  """Fresh state at step 0; EMA copies start equal to `params`.

  The EMAs are real copies, so the state can be donated to a jitted step as it is.
  """
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params),
                    ema={ema_key(r): jax.tree.map(jnp.copy, params) for r in ema_rates},
                    key=jax.random.key_data(key))


def ema_key(rate: float) -> str:
  """Dictionary key of the EMA at `rate` (checkpoint-safe string)."""
  return f'{rate:g}'
