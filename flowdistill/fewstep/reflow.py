"""Reflow, piecewise reflow and marginal-distribution alignment (seed 003, METHODS.md §2).

Reflow trains a student velocity by flow matching on teacher pairs: noise `x_0` and the end
`x_1` of the teacher's ODE from it. Piecewise reflow splits `[0, 1]` into K windows
`t_0 < ... < t_K` and does the same on the teacher states `(x_{t_k}, x_{t_{k+1}})`; one network
covers all windows, and a sampler takes whole Euler steps inside each window (NFE a multiple
of K). Vanilla reflow is K = 1; reflowing a reflowed student gives 2-, 3-rectified flow.

Marginal alignment (reference design; the paper's full text was not available). The student's
few-step map of window k, `Phi_k` (`align_steps` Euler steps), pushes the teacher marginal
`p_{t_k}` to `q_{k+1}` with `log q_{k+1}(Phi x) = log p_{t_k}(x) - log|det dPhi/dx|`. Its KL to
the teacher marginal `p_{t_{k+1}}` has the reparameterised gradient of the surrogate

    L_MA = E_x[ -log|det dPhi/dx| - stopgrad(s_T(Phi x, t_{k+1})) . Phi x ],

which needs only the frozen teacher's score (from its velocity): `log p_{t_k}(x)` does not
depend on the student, so the KL's gradient is `E[-d log|det dPhi/dx| - s_T(Phi x) . dPhi x]`,
the surrogate's, provided the score is taken at the time where `Phi` ends. The score is clipped
to `t <= 1 - eps` (the linear path's conversion is singular at the data end), so by default
(`align_time='consistent'`) the last window's map stops at `1 - eps` in this term (sampling
still maps to 1) and the KL compares student and teacher at `1 - eps`. The earlier form
(`'clipped'`) maps to 1 and scores at `1 - eps`: the gradient of `KL(q_1 || p_{1 - eps})`,
which pulls data-end samples toward data shrunk by `1 - eps` and blurred by eps noise.
Inside a window a reflow student's marginal is that of straight lines, not the teacher's, so
even at the reflow optimum the consistent term still pulls at `1 - eps` (for Gaussian data:
on the spread, by O(eps), not on the mean).

The log-determinant is exact (Jacobian) in low dimension; in high dimension it is the student
ODE's continuous form `sum_j dt * div v(x_j, t_j)` with a Hutchinson divergence. The per-window
KLs bound the final error: `TV(student, teacher) <= sum_k sqrt(KL_k / 2)`.
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from flowdistill import ode
from flowdistill.paths import AffinePath, expand_time

LOGDETS = ('exact', 'trace', 'hutchinson')
ALIGN_TIMES = ('consistent', 'clipped')


def window_times(num_windows: int) -> np.ndarray:
  """Uniform window boundaries `t_0 = 0 < ... < t_K = 1`: [K + 1] (static, NumPy)."""
  if num_windows < 1:
    raise ValueError(f'The number of windows must be >= 1, got {num_windows}.')
  return np.linspace(0.0, 1.0, num_windows + 1, dtype=np.float32)


def window_grid(times, steps_per_window: int) -> np.ndarray:
  """Euler grid with `steps_per_window` equal steps inside each window: [K * n + 1]."""
  if steps_per_window < 1:
    raise ValueError(f'`steps_per_window` must be >= 1, got {steps_per_window}.')
  times = np.asarray(times, np.float32)
  r = np.arange(steps_per_window, dtype=np.float32) / steps_per_window
  inner = times[:-1, None] + r[None] * (times[1:] - times[:-1])[:, None]
  return np.concatenate([inner.reshape(-1), times[-1:]])


def teacher_trajectory(v: ode.VelocityFn, x0, times, *, solver: str = 'dopri5',
                       rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 4096,
                       steps: int = 64):
  """The teacher's states at the window boundaries, by consecutive accurate solves.

  Args:
    v: teacher velocity `v(x, t)`; x0: noise [B, ...] at `times[0]`; times: [K + 1] static
      (NumPy or a list, not traced).
    solver, rtol, atol, max_steps: see `ode.solve` (`steps` per window for fixed solvers).

  Returns:
    (states [K + 1, B, ...] with states[k] at times[k], info with the total 'nfe').
  """
  if solver not in ode.SOLVERS:
    raise ValueError(f'Unknown solver {solver!r}; choose one of {list(ode.SOLVERS)}.')
  times = [float(t) for t in np.asarray(times)]
  states, nfe = [x0], 0
  for k in range(len(times) - 1):
    x, info = ode.solve(v, states[-1], solver=solver, t0=times[k], t1=times[k + 1],
                        steps=steps, rtol=rtol, atol=atol, max_steps=max_steps)
    states.append(x)
    nfe = nfe + info['nfe']
  return jnp.stack(states), {'nfe': nfe}


def euler_map(apply_fn, params, x, t0, t1, steps: int, cond=None):
  """`steps` Euler steps of the student from t0 to t1 (each [B] or scalar): [B, ...]."""
  dt = (t1 - t0) / steps

  def step(j, x):
    t = jnp.broadcast_to(t0 + j * dt, x.shape[:1])
    return x + expand_time(dt, x) * apply_fn(params, x, t, cond=cond)

  # A Python loop (steps is a small static count), not a `lax` loop: differentiated through a
  # loop, even of one trip, XLA:CPU ran a U-Net's weight-gradient convolutions ~16x slower.
  for j in range(steps):
    x = step(j, x)
  return x


def euler_map_logdet(apply_fn, params, x, t0, t1, steps: int, *, cond=None,
                     method: str = 'exact', probes=None):
  """The student's window map `Phi(x)` and its log-density change.

  Args:
    x: [B, ...]; t0, t1: [B] window ends; steps: Euler steps in the window.
    method: 'exact' — `log|det dPhi/dx|` of the composite Euler map by its Jacobian (D
      columns per sample; low dimension); 'trace' — the student ODE's continuous form
      `sum_j dt tr J(x_j)` (the log-determinant of the flow up to O(dt^2), finite even where
      the Euler map folds), exact traces; 'hutchinson' — the same with the trace estimated as
      `eps . J eps` with `probes` [K, B, ...] (any dimension; unbiased).

  Returns:
    (Phi(x) [B, ...], log-det [B]).
  """
  dim = math.prod(x.shape[1:])
  if method == 'exact':
    # One jvp of the batched map per input coordinate gives that Jacobian column for every
    # row at once (rows are independent); much faster to differentiate than a per-row jacfwd.
    fn = lambda y: euler_map(apply_fn, params, y, t0, t1, steps, cond)
    basis = jnp.eye(dim, dtype=x.dtype).reshape((dim, 1) + x.shape[1:])
    ys, columns = jax.vmap(lambda e: jax.jvp(fn, (x,), (jnp.broadcast_to(e, x.shape),)))(basis)
    jacobian = jnp.moveaxis(columns.reshape(dim, x.shape[0], dim), 0, -1)  # [B, D, D]
    return ys[0], jnp.linalg.slogdet(jacobian)[1]
  if method == 'trace':
    # The basis vectors as probes: D * mean_i e_i . J e_i = tr J, exactly.
    basis = jnp.eye(dim, dtype=x.dtype).reshape((dim, 1) + x.shape[1:])
    probes, scale = jnp.broadcast_to(basis, (dim,) + x.shape), dim
  elif method == 'hutchinson':
    if probes is None:
      raise ValueError('The Hutchinson log-det needs `probes` (ode.divergence_probes).')
    scale = 1
  else:
    raise ValueError(f'Unknown log-det method {method!r}; choose one of {list(LOGDETS)}.')
  dt = (t1 - t0) / steps

  def step(j, carry):
    x, logdet = carry
    vel, div = ode.hutchinson_divergence(lambda y, tj: apply_fn(params, y, tj, cond=cond), x,
                                         t0 + j * dt, probes)
    return x + expand_time(dt, x) * vel, logdet + dt * scale * div

  carry = (x, jnp.zeros(x.shape[:1], x.dtype))
  for j in range(steps):  # unrolled, as in `euler_map`
    carry = step(j, carry)
  return carry


def teacher_score(teacher_apply_fn, teacher_params, path: AffinePath, x, t, *, cond=None,
                  eps: float | None = 1e-2):
  """The teacher's score `grad log p_t(x)` from its velocity (t [B]; clipped to
  `[eps, 1 - eps]`, since the linear path's conversion is singular at the data end). The
  velocity is taken at the clipped time too: mixing times would give a wrong score (at t = 1
  the linear path's velocity is about x, which the conversion at 1 - eps reads as `-x`)."""
  if eps is not None:
    t = jnp.clip(t, eps, 1.0 - eps)
  v = teacher_apply_fn(teacher_params, x, t, cond=cond)
  return path.to_score(v, x, t)


def alignment_surrogate(apply_fn, params, score_fn: Callable, x, t0, t1, *, steps: int = 1,
                        cond=None, logdet: str = 'exact', probes=None):
  """Per-sample marginal-alignment surrogate of KL(q_{k+1} || p_{t_{k+1}}).

  Args:
    score_fn: `score_fn(y, t) -> [B, ...]`, the frozen teacher score at the window end.
    x: teacher states [B, ...] at t0 [B]; t1 [B] the window ends.

  Returns:
    (surrogate [B] = -logdet - stopgrad(score(Phi x)) . Phi x, logdet [B]); its gradient in
    the student params is the KL's.
  """
  y, ld = euler_map_logdet(apply_fn, params, x, t0, t1, steps, cond=cond, method=logdet,
                           probes=probes)
  score = jax.lax.stop_gradient(score_fn(y, t1))
  return -ld - jnp.sum((score * y).reshape(y.shape[0], -1), -1), ld


def alignment_end(t1, eps: float | None, align_time: str = 'consistent'):
  """Where the student's window map stops in the alignment term: [B] from window ends t1 [B].

  'consistent': at the teacher-score time `clip(t1, eps, 1 - eps)`, so the KL compares both
  marginals at one time; 'clipped': at t1 (the score is still taken at the clipped time).
  """
  if align_time not in ALIGN_TIMES:
    raise ValueError(f'Unknown align_time {align_time!r}; choose one of {list(ALIGN_TIMES)}.')
  if align_time == 'clipped' or eps is None:
    return t1
  return jnp.clip(t1, eps, 1.0 - eps)


def align_weight_at(step, weight: float, warmup: int):
  """λ at `step`: linear warm-up from 0 over `warmup` steps, then `weight` (constant if 0)."""
  if warmup <= 0 or step is None:
    return jnp.asarray(weight, jnp.float32)
  return weight * jnp.minimum(1.0, step.astype(jnp.float32) / warmup)


def make_loss(apply_fn, times, *, teacher_apply_fn=None, teacher_path: AffinePath | None = None,
              align_weight: float = 0.0, align_warmup: int = 0, align_steps: int = 1,
              logdet: str = 'exact', num_probes: int = 1, score_eps: float | None = 1e-2,
              align_time: str = 'consistent'):
  """Builds `loss_fn(params, batch, key, teacher_params=None, step=None)` for (piecewise)
  reflow with optional marginal alignment.

  Each row picks a window k and a time `t = t_k + r (t_{k+1} - t_k)`, `r ~ U[0, 1]`, and
  regresses `v(x_t, t)` onto the straight-line velocity `(x_{k+1} - x_k) / (t_{k+1} - t_k)`
  at `x_t = (1 - r) x_k + r x_{k+1}`. With `align_weight` > 0 it adds `λ(step) L_MA` on the
  same rows (window k's map of the teacher state `x_k`).

  Args:
    apply_fn: the student velocity model.
    times: window boundaries [K + 1] (see `window_times`).
    teacher_apply_fn, teacher_path: the frozen teacher and its path (for its score); needed
      iff `align_weight` > 0.
    align_weight, align_warmup: λ, and the steps of its linear warm-up (0: constant).
    align_steps: Euler steps of the student's window map in the regulariser.
    logdet, num_probes: 'exact', 'trace' or 'hutchinson' (with that many Rademacher probes);
      see `euler_map_logdet`.
    score_eps: clip of the teacher-score time (None: no clip).
    align_time: 'consistent' — the student's map in the regulariser stops at the (clipped)
      score time, so its gradient is that of the KL at one time; 'clipped' — the map runs to
      the window end while the score is taken at the clipped time (the earlier form, kept for
      comparison). See `alignment_end`.

  The batch holds `'states'` [B, K + 1, ...] (teacher states at `times`, see
  `teacher_trajectory`) and optionally `'label'` [B] for a class-conditional student.
  """
  times = jnp.asarray(times, jnp.float32)
  num_windows = times.shape[0] - 1
  if num_windows < 1:
    raise ValueError('`times` needs at least two window boundaries.')
  if logdet not in LOGDETS:
    raise ValueError(f'Unknown log-det method {logdet!r}; choose one of {list(LOGDETS)}.')
  align = align_weight > 0.0
  if align and (teacher_apply_fn is None or teacher_path is None):
    raise ValueError('Marginal alignment (align_weight > 0) needs `teacher_apply_fn` and '
                     '`teacher_path` for the teacher score.')
  ends = np.asarray(alignment_end(times[1:], score_eps, align_time))
  if align and np.any(ends <= np.asarray(times[:-1])):
    raise ValueError(f'align_time={align_time!r} ends each window map at its score time, '
                     f'but score_eps={score_eps} puts that at or before the start of a window '
                     f"(boundaries {times.tolist()}); use a score_eps below every window's "
                     'length.')

  def loss_fn(params, batch, key, teacher_params=None, step=None):
    states = batch['states']
    if states.shape[1] != num_windows + 1:
      raise ValueError(f"batch['states'] holds {states.shape[1]} times per row but the loss "
                       f'has {num_windows} windows ({num_windows + 1} boundaries).')
    cond = batch.get('label')
    k_window, k_time, k_probe = jax.random.split(key, 3)
    rows = jnp.arange(states.shape[0])
    k = jax.random.randint(k_window, states.shape[:1], 0, num_windows)
    x_lo, x_hi = states[rows, k], states[rows, k + 1]
    t_lo, t_hi = times[k], times[k + 1]
    r = jax.random.uniform(k_time, states.shape[:1])
    xt = x_lo + expand_time(r, x_lo) * (x_hi - x_lo)
    target = (x_hi - x_lo) / expand_time(t_hi - t_lo, x_lo)
    v = apply_fn(params, xt, t_lo + r * (t_hi - t_lo), cond=cond, train=True)
    traj = jnp.mean((v - target)**2)
    metrics = {'traj_loss': traj}
    loss = traj
    if align:
      if teacher_params is None:
        raise ValueError('Marginal alignment needs `teacher_params`.')
      score_fn = lambda y, t: teacher_score(teacher_apply_fn, teacher_params, teacher_path, y,
                                            t, cond=cond, eps=score_eps)
      probes = (ode.divergence_probes(k_probe, num_probes, x_lo) if logdet == 'hutchinson'
                else None)
      t_end = alignment_end(t_hi, score_eps, align_time)
      surrogate, ld = alignment_surrogate(apply_fn, params, score_fn, x_lo, t_lo, t_end,
                                          steps=align_steps, cond=cond, logdet=logdet,
                                          probes=probes)
      weight = align_weight_at(step, align_weight, align_warmup)
      loss = loss + weight * jnp.mean(surrogate)
      metrics.update(align_surrogate=jnp.mean(surrogate), align_logdet=jnp.mean(ld),
                     align_weight=weight)
    return loss, dict(metrics, loss=loss)

  return loss_fn


def window_kls(apply_fn, params, teacher_logp: Callable, states, times, *, steps: int = 1,
               cond=None, logdet: str = 'exact', probes=None):
  """Monte-Carlo `KL(q_{k+1} || p_{t_{k+1}})` of each window's student map.

  Args:
    teacher_logp: `teacher_logp(x [B, ...], t float) -> [B]`, the teacher's marginal
      log-density at time t (e.g. `ode.log_likelihood` of the teacher with `t_data=t`).
    states: teacher states [K + 1, B, ...] at `times` [K + 1] (samples of `p_{t_k}`).

  Returns:
    [K] estimates `mean[log p_{t_k}(x) - logdet - log p_{t_{k+1}}(Phi_k x)]`.
  """
  kls = []
  for k in range(len(times) - 1):
    x = states[k]
    t0 = jnp.full(x.shape[:1], times[k], x.dtype)
    t1 = jnp.full(x.shape[:1], times[k + 1], x.dtype)
    y, ld = euler_map_logdet(apply_fn, params, x, t0, t1, steps, cond=cond, method=logdet,
                             probes=probes)
    kls.append(jnp.mean(teacher_logp(x, float(times[k])) - ld
                        - teacher_logp(y, float(times[k + 1]))))
  return jnp.stack(kls)


def tv_bound(kls):
  """The telescoping bound `sum_k sqrt(KL_k / 2)` on TV(student, teacher) (KL clipped at 0)."""
  return jnp.sum(jnp.sqrt(jnp.maximum(jnp.asarray(kls), 0.0) / 2.0))


def euler_log_likelihood(apply_fn, params, x, grid, *, cond=None, iters: int = 50):
  """`log p(x)` of the Euler sampler over `grid` [K + 1] by the change of variables (2-D).

  Each Euler step `y -> y + dt v(y, t)` is inverted by the fixed-point iteration
  `y <- x - dt v(y, t)` (a contraction while `dt Lip(v) < 1`), then
  `log p(x) = log N(y_0) - sum_k log|det(I + dt J(y_k))|` with exact Jacobians.

  Returns:
    (log p [B], info with 'inverse_error': max |forward(inverse(x)) - x|).
  """
  grid = jnp.asarray(grid, x.dtype)

  def invert(xk, ts):
    t, dt = jnp.full(x.shape[:1], ts[0], x.dtype), ts[1] - ts[0]
    y = jax.lax.fori_loop(0, iters, lambda _, y: xk - dt * apply_fn(params, y, t, cond=cond),
                          xk)
    _, ld = euler_map_logdet(apply_fn, params, y, t, t + dt, 1, cond=cond)
    return y, ld

  y0, logdets = jax.lax.scan(invert, x, jnp.stack([grid[:-1], grid[1:]], 1), reverse=True)
  forward = ode.solve(ode.velocity_fn(apply_fn, params, cond=cond), y0, solver='euler',
                      grid=grid)[0]
  return (ode.standard_normal_logpdf(y0) - logdets.sum(0),
          {'inverse_error': jnp.max(jnp.abs(forward - x))})
