"""Exact quantities for Gaussian data: the yardstick the tests (and curious users) measure by.

With noise `x0 ~ N(0, I)` and data `x1 ~ N(m, diag(s^2))`, every affine path has Gaussian
marginals `p_t = N(beta m, diag(sigma^2 + beta^2 s^2))` and its probability-flow ODE is an affine
map per coordinate, so the velocity, the two-time flow map, the score and the log-density are
all known in closed form. `mean` and `std` broadcast against one sample's shape.
"""

import jax.numpy as jnp

from flowdistill.paths import AffinePath, expand_time


def _moments(path: AffinePath, t, x, mean, std):
  sig, dsig = (expand_time(c, x) for c in path.sigma(t))
  _, b, _, _, db, _ = (expand_time(c, x) for c in path.coefficients(t))
  var = sig**2 + (b * std)**2
  dvar_half = sig * dsig + b * db * std**2
  return b * mean, var, db * mean, dvar_half


def velocity(path: AffinePath, x, t, mean, std):
  """Marginal velocity `E[d/dt x_t | x_t = x]`, x [B, ...], t [B] or scalar -> [B, ...]."""
  mu, var, dmu, dvar_half = _moments(path, t, x, mean, std)
  return dmu + dvar_half / var * (x - mu)


def flow_map(path: AffinePath, x, s, t, mean, std):
  """Exact flow map `X(x, s, t)` of the probability-flow ODE (any direction) -> [B, ...]."""
  mu_s, var_s, _, _ = _moments(path, s, x, mean, std)
  mu_t, var_t, _, _ = _moments(path, t, x, mean, std)
  return mu_t + jnp.sqrt(var_t / var_s) * (x - mu_s)


def log_density(path: AffinePath, x, t, mean, std):
  """`log p_t(x)` summed over all non-batch axes -> [B]."""
  mu, var, _, _ = _moments(path, t, x, mean, std)
  var = jnp.broadcast_to(var, x.shape)
  terms = -0.5 * ((x - mu)**2 / var + jnp.log(2 * jnp.pi * var))
  return terms.reshape(x.shape[0], -1).sum(-1)


def score(path: AffinePath, x, t, mean, std):
  """`grad_x log p_t(x)` -> [B, ...]."""
  mu, var, _, _ = _moments(path, t, x, mean, std)
  return -(x - mu) / var


def make_apply_fn(path: AffinePath):
  """An exact model behind the library's `apply_fn` contract, with params `{'mean', 'std'}`.

  One-time calls return the velocity; two-time calls (`s` given) return the flow-map increment
  `u(x, s, t) = (X(x, s, t) - x) / (t - s)`, which equals the velocity at `s = t`.
  """

  def apply_fn(params, x, t, *, s=None, cond=None, train=False):
    del cond, train
    m, sd = params['mean'], params['std']
    v = velocity(path, x, t if s is None else s, m, sd)
    if s is None:
      return v
    gap = expand_time(jnp.asarray(t) - jnp.asarray(s), x)
    safe_gap = jnp.where(jnp.abs(gap) < 1e-6, 1.0, gap)
    u = (flow_map(path, x, s, t, m, sd) - x) / safe_gap
    return jnp.where(jnp.abs(gap) < 1e-6, v, u)

  return apply_fn
