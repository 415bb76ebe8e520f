"""Flow map matching (Boffi, Albergo & Vanden-Eijnden, arXiv 2406.07507).

A two-time model `u(x, s, t)` defines the flow map `X(x, s, t) = x + (t - s) u(x, s, t)` of the
probability-flow ODE: `X(x, s, s) = x`, `d/dt X = b(X, t)`, and `u(x, t, t) = b(x, t)`. Jumping
`x <- X(x, t_k, t_{k+1})` over any grid samples in as many steps as the grid has, chosen after
training. Losses (each a factory returning `loss_fn(params, batch, key, ...) -> (loss,
metrics)`; teacher parameters are explicit arguments):

- `lmd_loss`: Lagrangian map distillation from a teacher velocity,
  `|| d/dt X(I_s, s, t) - b(X(I_s, s, t), t) ||^2`;
- `emd_loss`: Eulerian map distillation,
  `|| d/ds X(I_s, s, t) + grad_x X(I_s, s, t) b(I_s, s) ||^2`;
- `fmm_loss`: direct flow map matching without a teacher, with the invertibility term;
- `pfmm_loss`: progressive flow map matching onto K jumps of a teacher map.

`I_s` is the interpolant at time `s` between noise and a data batch.
"""

import jax
import jax.numpy as jnp

from flowdistill import ode
from flowdistill.paths import AffinePath, expand_time

TIME_SCHEMES = ('uniform', 'ordered', 'band')


def flow_map(apply_fn, params, x, s, t, cond=None):
  """`X(x, s, t) = x + (t - s) u(x, s, t)`: x [B, ...], s, t [B] or scalars -> [B, ...]."""
  s = jnp.broadcast_to(jnp.asarray(s, x.dtype), x.shape[:1])
  t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
  return x + expand_time(t - s, x) * apply_fn(params, x, t, s=s, cond=cond)


def sample_time_pairs(key, num: int, scheme: str = 'uniform', *, band: float = 1.0):
  """`(s, t)` pairs [num] each, on [0, 1]^2.

  Args:
    scheme: 'uniform' (the square, both directions), 'ordered' (`s <= t`), 'band' (the
      square restricted to `|t - s| <= band`; grow `band` during training for a curriculum).
    band: half-width of the band (scheme 'band').
  """
  k_s, k_t = jax.random.split(key)
  s, t = jax.random.uniform(k_s, (num,)), jax.random.uniform(k_t, (num,))
  if scheme == 'uniform':
    return s, t
  if scheme == 'ordered':
    return jnp.minimum(s, t), jnp.maximum(s, t)
  if scheme == 'band':
    return s, jnp.clip(s + band * (2.0 * t - 1.0), 0.0, 1.0)
  raise ValueError(f'Unknown time scheme {scheme!r}; choose one of {list(TIME_SCHEMES)}.')


def _interpolant(path, batch, key, s):
  x1 = batch['x']
  k_noise, k_z = jax.random.split(key)
  x0 = batch['x0'] if 'x0' in batch else jax.random.normal(k_noise, x1.shape, x1.dtype)
  z = None if path.gamma is None else jax.random.normal(k_z, x1.shape, x1.dtype)
  return path.sample(x0, x1, s, z)


def _mean_sq(r):
  return jnp.mean(r**2)


def _time_kwargs(scheme, band):
  if scheme not in TIME_SCHEMES:
    raise ValueError(f'Unknown time scheme {scheme!r}; choose one of {list(TIME_SCHEMES)}.')
  return {'scheme': scheme, 'band': band}


def _distillation_points(path, batch, key, times):
  """`(s, t, I_s, labels)` for a batch: time pairs and the interpolant at `s`."""
  k_time, k_path = jax.random.split(key)
  s, t = sample_time_pairs(k_time, batch['x'].shape[0], **times)
  xs, _ = _interpolant(path, batch, k_path, s)
  return s, t, xs, batch.get('label')


def lmd_loss(apply_fn, teacher_apply_fn, path: AffinePath, *, scheme: str = 'ordered',
             band: float = 1.0):
  """Lagrangian map distillation: `loss_fn(params, batch, key, teacher_params)`.

  `d/dt X(I_s, s, t)` comes from one `jax.jvp` along `t` at the interpolant point `I_s` (not at
  `X(I_s)`); the teacher velocity is evaluated at `X(I_s, s, t)` without gradient.
  """
  times = _time_kwargs(scheme, band)

  def loss_fn(params, batch, key, teacher_params):
    s, t, xs, cond = _distillation_points(path, batch, key, times)
    x_t, dx_dt = jax.jvp(lambda tt: flow_map(apply_fn, params, xs, s, tt, cond), (t,),
                         (jnp.ones_like(t),))
    target = teacher_apply_fn(teacher_params, jax.lax.stop_gradient(x_t), t, cond=cond)
    loss = _mean_sq(dx_dt - jax.lax.stop_gradient(target))
    return loss, {'loss': loss}

  return loss_fn


def emd_loss(apply_fn, teacher_apply_fn, path: AffinePath, *, scheme: str = 'ordered',
             band: float = 1.0):
  """Eulerian map distillation: `loss_fn(params, batch, key, teacher_params)`.

  `d/ds X + grad_x X . b(I_s, s)` is one `jax.jvp` of `(x, s) -> X(x, s, t)` along the tangent
  `(b(I_s, s), 1)`.
  """
  times = _time_kwargs(scheme, band)

  def loss_fn(params, batch, key, teacher_params):
    s, t, xs, cond = _distillation_points(path, batch, key, times)
    b = jax.lax.stop_gradient(teacher_apply_fn(teacher_params, xs, s, cond=cond))
    _, residual = jax.jvp(lambda x, ss: flow_map(apply_fn, params, x, ss, t, cond), (xs, s),
                          (b, jnp.ones_like(s)))
    loss = _mean_sq(residual)
    return loss, {'loss': loss}

  return loss_fn


def fmm_loss(apply_fn, path: AffinePath, *, invertibility_weight: float = 1.0):
  """Direct flow map matching, no teacher: `loss_fn(params, batch, key)`.

  With `s, t` uniform and independent (both directions) and `y = X(I_t, t, s)`,
  `|| d/dt X(y, s, t) - d/dt I_t ||^2 + w || X(y, s, t) - I_t ||^2`: the first term matches
  the velocity along the path, the second makes the backward and forward jumps inverse.
  """

  def loss_fn(params, batch, key):
    k_time, k_path = jax.random.split(key)
    s, t = sample_time_pairs(k_time, batch['x'].shape[0], 'uniform')
    xt, dxt = _interpolant(path, batch, k_path, t)
    cond = batch.get('label')
    y = flow_map(apply_fn, params, xt, t, s, cond)
    x_back, dx_dt = jax.jvp(lambda tt: flow_map(apply_fn, params, y, s, tt, cond), (t,),
                            (jnp.ones_like(t),))
    velocity, invertibility = _mean_sq(dx_dt - dxt), _mean_sq(x_back - xt)
    loss = velocity + invertibility_weight * invertibility
    return loss, {'loss': loss, 'velocity': velocity, 'invertibility': invertibility}

  return loss_fn


def pfmm_loss(apply_fn, teacher_apply_fn, path: AffinePath, *, teacher_jumps: int = 2,
              scheme: str = 'ordered', band: float = 1.0):
  """Progressive flow map matching: `loss_fn(params, batch, key, teacher_params)`.

  The student's one jump `X(I_s, s, t)` regresses onto `teacher_jumps` jumps of a frozen
  teacher flow map over the uniform grid from `s` to `t`. Stages: distil a K-jump teacher into
  a student, then use that student as the next stage's teacher.
  """
  times = _time_kwargs(scheme, band)

  def loss_fn(params, batch, key, teacher_params):
    s, t, xs, cond = _distillation_points(path, batch, key, times)
    fractions = jnp.linspace(0.0, 1.0, teacher_jumps + 1)
    grid = s[None] + fractions[:, None] * (t - s)[None]  # [K + 1, B]
    target, _ = jax.lax.scan(
        lambda x, st: (flow_map(teacher_apply_fn, teacher_params, x, st[0], st[1], cond),
                       None), xs, jnp.stack([grid[:-1], grid[1:]], axis=1))
    student = flow_map(apply_fn, params, xs, s, t, cond)
    loss = _mean_sq(student - jax.lax.stop_gradient(target))
    return loss, {'loss': loss}

  return loss_fn


def tangent_velocity(apply_fn):
  """The velocity `b(x, t) = u(x, t, t)` of a flow-map model, as a one-time `apply_fn`."""

  def velocity_apply_fn(params, x, t, *, s=None, cond=None, train=False):
    del s
    return apply_fn(params, x, t, s=t, cond=cond, train=train)

  return velocity_apply_fn


def jump(apply_fn, params, x, grid, cond=None, return_trajectory: bool = False):
  """Applies the map over a time grid [K + 1] from state x [B, ...] at `grid[0]`.

  Returns (x at grid[-1], info with 'nfe' = K, and 'trajectory' [K + 1, B, ...] if asked).
  """
  grid = jnp.asarray(grid, x.dtype)

  def step(x, st):
    x = flow_map(apply_fn, params, x, st[0], st[1], cond)
    return x, (x if return_trajectory else None)

  x_end, traj = jax.lax.scan(step, x, jnp.stack([grid[:-1], grid[1:]], axis=1))
  info = {'nfe': grid.shape[0] - 1}
  if return_trajectory:
    info['trajectory'] = jnp.concatenate([x[None], traj])
  return x_end, info


def sample(apply_fn, params, key, num: int, shape: tuple[int, ...], *, steps: int | None = None,
           grid=None, cond=None, return_trajectory: bool = False):
  """`num` samples in `steps` jumps (uniform grid from 0 to 1) or over an explicit `grid`."""
  if grid is None:
    grid = ode.time_grid(steps if steps is not None else 1)
  return jump(apply_fn, params, ode.noise(key, num, shape), grid, cond, return_trajectory)


def logdet_series(map_fn, x, probes, terms: int = 10):
  """Hutchinson estimate of `log|det dX/dx|` for maps of any dimension (e.g. images).

  Uses `log det(I + A) = sum_k (-1)^(k+1) tr(A^k) / k` with `A = dX/dx - I` and
  `tr(A^k) ~ eps . A^k eps` (k jvps per probe), truncated after `terms`. Unbiased up to the
  truncation, which is small when the spectral radius of A is well below 1: short jumps, i.e.
  a k-jump map with k not too small (check against `terms`).

  Args:
    map_fn: the row-wise map `[B, ...] -> [B, ...]`; x: [B, ...]; probes: [K, B, ...].

  Returns:
    log-det estimates [B].
  """

  def one(eps):
    def term(w, k):
      w = jax.jvp(map_fn, (x,), (w,))[1] - w
      sign = jnp.where(k % 2 == 0, 1.0, -1.0)
      return w, sign / (k + 1) * jnp.sum((eps * w).reshape(x.shape[0], -1), -1)

    _, series = jax.lax.scan(term, eps, jnp.arange(terms))
    return series.sum(0)

  return jnp.mean(jax.vmap(one)(probes), 0)


def log_likelihood_jumps(apply_fn, params, x, grid, *, cond=None, logdet: str = 'exact',
                         probes=None, terms: int = 10):
  """`log p(x)` of the k-jump sampler by the change of variables.

  The data points x [B, ...] are mapped back to noise by the backward jumps over the reversed
  grid (the learned inverse), then `log p(x) = log N(x_0) - sum_k log|det dX(x_k)/dx|` with the
  forward jumps' Jacobians at the recovered points.

  Args:
    cond: labels [B] for a class-conditional map, else None.
    logdet: 'exact' (Jacobians, D columns per jump; low dimension) or 'series'
      (`logdet_series` with `probes` [K, B, ...] and `terms`; images).

  Returns:
    (log p [B], info with 'inverse_error': max |forward(backward(x)) - x|).
  """
  grid = jnp.asarray(grid, x.dtype)
  x0, back = jump(apply_fn, params, x, grid[::-1], cond, return_trajectory=True)
  points = back['trajectory'][::-1]  # [K + 1, B, ...], points[k] at grid[k]

  def exact(xk, sk, tk):
    single = lambda y, c: flow_map(apply_fn, params, y[None], sk, tk,
                                   None if c is None else c[None])[0]
    return jax.vmap(lambda y, c: jnp.linalg.slogdet(jax.jacfwd(single)(y, c))[1])(xk, cond)

  def series(xk, sk, tk):
    return logdet_series(lambda y: flow_map(apply_fn, params, y, sk, tk, cond), xk, probes,
                         terms)

  if logdet not in ('exact', 'series'):
    raise ValueError(f'Unknown log-det method {logdet!r}; choose "exact" or "series".')
  if logdet == 'series' and probes is None:
    raise ValueError('logdet="series" needs `probes` (ode.divergence_probes).')
  # One jump at a time: a vmap over jumps multiplies the memory of the Jacobian products by K.
  per_jump = exact if logdet == 'exact' else series
  logdets = jax.lax.map(lambda args: per_jump(*args), (points[:-1], grid[:-1], grid[1:]))
  forward, _ = jump(apply_fn, params, x0, grid, cond)
  return (ode.standard_normal_logpdf(x0) - logdets.sum(0),
          {'inverse_error': jnp.max(jnp.abs(forward - x))})
