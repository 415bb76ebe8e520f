"""The flow-matching loss."""

import inspect
from typing import Any

import jax
import jax.numpy as jnp

from flowdistill import checks, errors
from flowdistill.couplings import check_names, couple
from flowdistill.paths import AffinePath
from flowdistill.timesampling import TIME_DISTRIBUTIONS, sample_times


def drop_labels(key, labels, rate: float, null_label: int):
  """Replaces each label by `null_label` with probability `rate` (classifier-free guidance)."""
  if rate <= 0.0:
    return labels
  return jnp.where(jax.random.bernoulli(key, rate, labels.shape), null_label, labels)


def _check_names(time_distribution, coupling, coupling_kwargs):
  """Refuses unknown names when the loss is built (errors.BadInput), not at its first call."""
  if time_distribution not in TIME_DISTRIBUTIONS:
    raise errors.BadInput(f'Unknown `time_distribution`={time_distribution!r}; valid options '
                          f'are {TIME_DISTRIBUTIONS}.')
  options = set(inspect.signature(couple).parameters) - {'x0', 'x1', 'key', 'method', 'labels'}
  unknown = sorted(set(coupling_kwargs) - options)
  if unknown:
    raise errors.BadInput(f'Unknown `coupling_kwargs` {unknown}; valid keys are '
                          f'{sorted(options)} (see `couplings.couple`).')
  check_names(coupling, coupling_kwargs.get('solver', 'auction'))


def make_loss(apply_fn, path: AffinePath, *, time_distribution: str = 'uniform',
              time_kwargs: dict[str, Any] | None = None, coupling: str = 'independent',
              coupling_kwargs: dict[str, Any] | None = None, label_dropout: float = 0.0,
              null_label: int | None = None):
  """Builds `loss_fn(params, batch, key) -> (loss, metrics)` for flow matching.

  `loss = E || v(x_t, t, c) - d/dt x_t ||^2` (mean over all elements), with `x0 ~ N(0, I)`
  paired to the data by `coupling`, and `t` from `time_distribution`.

  Args:
    apply_fn: the model (`apply_fn(params, x, t, *, cond=None, train=False)`).
    path: the probability path.
    time_distribution, time_kwargs: see `timesampling.sample_times`.
    coupling, coupling_kwargs: see `couplings.couple` ('independent', 'exact', 'sinkhorn').
    label_dropout: probability of replacing a label by `null_label` (needs `null_label`).
    null_label: the model's "no class" label; None for an unconditional model.

  The batch is a dict with `'x'` (data [B, ...]), optionally `'label'` (int [B]) and `'x0'`
  (a source batch [B, ...] replacing Gaussian noise, for data-to-data transport).
  """
  checks.check_model(apply_fn)
  time_kwargs = dict(time_kwargs or {})
  coupling_kwargs = dict(coupling_kwargs or {})
  _check_names(time_distribution, coupling, coupling_kwargs)
  if label_dropout > 0.0 and null_label is None:
    raise ValueError('`label_dropout` > 0 needs the model `null_label`.')

  def loss_fn(params, batch, key):
    checks.check_batch(batch)
    x1 = batch['x']
    labels = batch.get('label') if null_label is not None else None
    k_noise, k_couple, k_time, k_z, k_drop = jax.random.split(key, 5)
    x0 = batch['x0'] if 'x0' in batch else jax.random.normal(k_noise, x1.shape, x1.dtype)
    x0, x1, labels = couple(x0, x1, k_couple, method=coupling, labels=labels, **coupling_kwargs)
    t = sample_times(k_time, x1.shape[0], time_distribution, **time_kwargs)
    z = None if path.gamma is None else jax.random.normal(k_z, x1.shape, x1.dtype)
    xt, target = path.sample(x0, x1, t, z)
    cond = None
    if labels is not None and null_label is not None:
      cond = drop_labels(k_drop, labels, label_dropout, null_label)
    v = checks.apply_model(apply_fn, params, xt, t, cond=cond, train=True)
    loss = jnp.mean((v - target)**2)
    return loss, {'loss': loss}

  return loss_fn
