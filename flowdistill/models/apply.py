"""Turn an NNX module into the pure `(apply_fn, params)` pair every other part uses."""

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

ApplyFn = Callable[..., jax.Array]


def to_apply_fn(module: nnx.Module) -> tuple[ApplyFn, Any]:
  """Splits `module` into a pure function and its parameters (a nested dict of arrays).

  The returned `apply_fn(params, x, t, *, s=None, cond=None, train=False)` calls the module
  rebuilt from `params`; it is jittable and differentiable in `params`, `x`, `t` and `s`.
  Downstream code (losses, samplers, trainers) sees only this pair, so any model with the same
  signature (Linen, Equinox, a hand-written function) plugs in the same way.

  `t` is [B]. A module whose class sets `scalar_time = True` also takes a scalar `t` (embedded
  once for the batch); `apply_fn.scalar_time` says so, and ODE solvers then pass the scalar
  time of each stage instead of a [B] copy of it (`ode.velocity_fn`).
  """
  graphdef, state = nnx.split(module)
  params = nnx.to_pure_dict(state)

  def apply_fn(params, x, t, *, s=None, cond=None, train=False):
    return nnx.merge(graphdef, params)(x, t, s=s, cond=cond, train=train)

  apply_fn.scalar_time = getattr(module, 'scalar_time', False)
  return apply_fn, params
