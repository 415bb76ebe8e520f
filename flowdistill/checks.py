"""Argument checks of the public functions: one error naming the argument and the fix.

Shape, dtype, rank and callability are checked at trace time (free under `jit`); finiteness is
a runtime check, opt-in through the samplers' and likelihoods' `check_finite`.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np


def check_model(apply_fn, name: str = 'apply_fn') -> None:
  """Refuses a model that is not callable."""
  if not callable(apply_fn):
    raise TypeError(f'`{name}` must be callable as {name}(params, x, t, *, cond=None); got a '
                    f'{type(apply_fn).__name__}. Pass the function, e.g. model.apply, not '
                    'its result or parameters.')


def check_data(x, name: str = 'x') -> None:
  """Refuses anything but floating-point data with a batch axis, [B, ...]."""
  if not hasattr(x, 'shape') or not hasattr(x, 'dtype'):
    raise TypeError(f'`{name}` must be an array [B, ...]; got a {type(x).__name__}.')
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f'`{name}` must be floating-point data; got dtype {x.dtype}. Convert it, '
                    f'e.g. {name}.astype(jnp.float32), scaled to the range the model was '
                    'trained on.')
  if len(x.shape) < 2:
    raise ValueError(f'`{name}` must be [B, ...] (a batch axis, then the data axes); got shape '
                     f'{tuple(x.shape)}. For B one-dimensional points pass {name}[:, None].')


def check_batch(batch) -> None:
  """Refuses a training batch without data `'x'` [B, ...]."""
  if not isinstance(batch, Mapping) or 'x' not in batch:
    keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
    raise TypeError(f"`batch` must be a dict with 'x' (data [B, ...]) and optionally 'label' "
                    f"[B] and 'x0' [B, ...]; got {keys}.")
  check_data(batch['x'], "batch['x']")


def check_output(out, x, name: str = 'apply_fn') -> None:
  """Refuses a model whose output is not shaped like its input (another data dimension)."""
  if tuple(out.shape) != tuple(x.shape):
    raise ValueError(f'`{name}` returned {tuple(out.shape)} for x of {tuple(x.shape)}: the data '
                     'has another dimension than the model was built for. Build the model for '
                     f'samples of shape {tuple(x.shape[1:])}, or pass data of the model\'s.')


def apply_model(apply_fn, params, x, t, **kwargs):
  """`apply_fn(params, x, t, **kwargs)`, its failure on data of the wrong shape (a matmul or
  convolution that does not fit) or an output not shaped like `x` named as one error."""
  try:
    out = apply_fn(params, x, t, **kwargs)
  except (TypeError, ValueError) as e:
    cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f'`apply_fn` failed on x of shape {tuple(x.shape)} ({type(e).__name__}: '
                     f'{cause[:300]}). Check that the data has the shape, and the labels the '
                     'classes, the model was built for.') from e
  check_output(out, x)
  return out


def _raise_if_not_finite(value, what: str) -> None:
  bad = int(np.sum(~np.all(np.isfinite(np.asarray(value).reshape(len(value), -1)), axis=1)))
  if bad:
    raise FloatingPointError(f'{bad} of {len(value)} {what} are NaN or infinite; check the '
                             'model parameters for NaNs (e.g. a diverged run) and the inputs.')


def check_finite(value, what: str):
  """Raises FloatingPointError if any row of `value` [B, ...] is not finite; returns `value`.

  Eager values are checked at once; under `jit` the check runs as a callback when the result
  is computed (the error then arrives wrapped in the runtime's).
  """
  if isinstance(value, jax.core.Tracer):
    jax.debug.callback(_raise_if_not_finite, value, what)
  else:
    _raise_if_not_finite(value, what)
  return value
