"""ODE sampling and log-likelihood of flow models.

Fixed-step solvers (Euler, midpoint, Heun) are a `lax.scan` over a time grid; adaptive solves
(Tsit5, Dopri5 with a PID controller) and likelihoods go through diffrax. Every call returns an
`info` dict whose `'nfe'` is the number of velocity evaluations (a classifier-free-guided
evaluation counts once: its conditional and unconditional halves run as one batch).
"""

import math
from collections.abc import Callable

import diffrax
import jax
import jax.numpy as jnp

from flowdistill import checks, errors
from flowdistill.paths import check_times

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]  # v(x [B, ...], t []) -> [B, ...]

FIXED_SOLVERS = ('euler', 'midpoint', 'heun')
ADAPTIVE_SOLVERS = ('tsit5', 'dopri5')
SOLVERS = FIXED_SOLVERS + ADAPTIVE_SOLVERS
# Fresh evaluations per step of each fixed solver, and per attempted step of the adaptive
# first-same-as-last Runge-Kutta pairs.
_STAGES = {'euler': 1, 'midpoint': 2, 'heun': 2, 'tsit5': 6, 'dopri5': 6}


def velocity_fn(apply_fn, params, *, cond=None, cfg_scale: float | None = None,
                null_label: int | None = None) -> VelocityFn:
  """Closes a model over its parameters as `v(x, t)` with a scalar time.

  Args:
    apply_fn, params: the model pair (`apply_fn(params, x, t, *, cond=None)`).
    cond: labels [B] for a class-conditional model, else None.
    cfg_scale: classifier-free guidance weight w: `v = v_u + w (v_c - v_u)` at every stage
      (w = 1 is the conditional model). None disables guidance.
    null_label: the label index meaning "no class" (the model's `num_classes`).
  """
  checks.check_model(apply_fn)
  if cfg_scale is not None and (cond is None or null_label is None):
    raise ValueError('Classifier-free guidance needs `cond` labels and the model `null_label`.')

  scalar_time = getattr(apply_fn, 'scalar_time', False)

  def v(x, t):
    checks.check_data(x)
    if cond is not None and cond.shape[0] != x.shape[0]:
      raise ValueError(f'`cond` has batch {cond.shape[0]} but x has {x.shape[0]}.')
    # one time for the batch: a model that declares `scalar_time` embeds it once
    tb = jnp.asarray(t, x.dtype) if scalar_time else jnp.full((x.shape[0],), t, x.dtype)
    if cfg_scale is None:
      return checks.apply_model(apply_fn, params, x, tb, cond=cond)
    both = checks.apply_model(apply_fn, params, jnp.concatenate([x, x]),
                              tb if scalar_time else jnp.concatenate([tb, tb]),
                              cond=jnp.concatenate([cond, jnp.full_like(cond, null_label)]))
    v_c, v_u = jnp.split(both, 2)
    return v_u + cfg_scale * (v_c - v_u)

  return v


def guided_apply_fn(apply_fn, cfg_scale: float, null_label: int):
  """A model whose output is the classifier-free-guided velocity `v_u + w (v_c - v_u)`, behind
  the same `apply_fn(params, x, t, *, cond)` contract (e.g. a guided teacher to distil)."""

  def guided(params, x, t, *, s=None, cond=None, train=False):
    if cond is None:
      raise ValueError('A guided model needs `cond` labels.')
    t = jnp.broadcast_to(t, x.shape[:1])
    both = apply_fn(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                    s=None if s is None else jnp.concatenate([s, s]),
                    cond=jnp.concatenate([cond, jnp.full_like(cond, null_label)]), train=train)
    v_c, v_u = jnp.split(both, 2)
    return v_u + cfg_scale * (v_c - v_u)

  return guided


def time_grid(steps: int, t0: float = 0.0, t1: float = 1.0):
  """Uniform grid of `steps + 1` times from t0 to t1 (either direction)."""
  if steps < 1:
    raise ValueError(f'`steps` must be >= 1, got {steps}.')
  return jnp.linspace(t0, t1, steps + 1)


def _fixed_step(v, solver, x, t, dt):
  if solver == 'euler':
    return x + dt * v(x, t)
  if solver == 'midpoint':
    return x + dt * v(x + 0.5 * dt * v(x, t), t + 0.5 * dt)
  k1 = v(x, t)
  k2 = v(x + dt * k1, t + dt)
  return x + 0.5 * dt * (k1 + k2)


def check_solver(solver: str) -> None:
  """Refuses an unknown solver name (errors.BadInput); for builders of samplers to call before
  any work."""
  if solver not in SOLVERS:
    raise errors.BadInput(f'Unknown solver {solver!r}; choose one of {list(SOLVERS)}.')


def solve(v: VelocityFn, x, *, solver: str = 'euler', steps: int | None = None, grid=None,
          t0: float = 0.0, t1: float = 1.0, rtol: float = 1e-5, atol: float = 1e-5,
          max_steps: int = 4096, return_trajectory: bool = False, check_finite: bool = False):
  """Integrates `dx/dt = v(x, t)` from t0 to t1.

  Args:
    v: velocity `v(x [B, ...], t []) -> [B, ...]`.
    x: initial state [B, ...] at t0.
    solver: 'euler', 'midpoint', 'heun' (fixed step) or 'tsit5', 'dopri5' (adaptive).
    steps / grid: for fixed-step solvers, a uniform grid of `steps` steps from t0 to t1, or an
      explicit monotone time grid [K + 1] (then t0, t1 are ignored).
    rtol, atol, max_steps: adaptive solver tolerances and step budget.
    return_trajectory: fixed-step solvers only; also return the states on the grid.
    check_finite: raise FloatingPointError where the result is NaN or infinite; an adaptive
      solve that fails on a non-finite velocity reports it so, rather than as running out of
      `max_steps` (its step controller shrinks the step until then).

  Returns:
    (x at t1 [B, ...], info) with info['nfe'] (and info['trajectory'] [K + 1, B, ...]).
  """
  check_solver(solver)
  checks.check_data(x)
  if solver in ADAPTIVE_SOLVERS:
    if return_trajectory:
      raise ValueError('`return_trajectory` needs a fixed-step solver.')
    check_times(jnp.array([t0, t1]), 't0/t1')
    x_end, info = _adaptive_solve(v, x, solver, t0, t1, rtol, atol, max_steps, check_finite)
    return _checked(x_end, check_finite), info
  if grid is None:
    if steps is None:
      raise ValueError(f'Solver {solver!r} needs `steps` or an explicit `grid`.')
    grid = time_grid(steps, t0, t1)
  grid = jnp.asarray(grid, x.dtype)
  check_times(grid, 'grid')

  def step(x, ts):
    x = _fixed_step(v, solver, x, ts[0], ts[1] - ts[0])
    return x, (x if return_trajectory else None)

  x_end, traj = jax.lax.scan(step, x, jnp.stack([grid[:-1], grid[1:]], axis=1))
  info = {'nfe': _STAGES[solver] * (grid.shape[0] - 1)}
  if return_trajectory:
    info['trajectory'] = jnp.concatenate([x[None], traj])
  return _checked(x_end, check_finite), info


def _checked(x, check_finite):
  return checks.check_finite(x, 'samples') if check_finite else x


def _adaptive_solver(solver):
  return {'tsit5': diffrax.Tsit5, 'dopri5': diffrax.Dopri5}[solver]()


def _diffrax_nfe(solver, stats):
  # First-same-as-last pairs: one evaluation to start, then `stages` per attempted step
  # (checked against a runtime counter in the tests).
  return _STAGES[solver] * stats['num_steps'] + 1


def _adaptive_solve(v, x, solver, t0, t1, rtol, atol, max_steps, check_finite):
  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(lambda t, y, args: v(y, t)), _adaptive_solver(solver), t0, t1, None, x,
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), max_steps=max_steps,
      throw=not check_finite)
  x_end = _checked_end(v, sol) if check_finite else sol.ys[-1]
  return x_end, {'nfe': _diffrax_nfe(solver, sol.stats)}


def _checked_end(v, sol):
  """The end state [B, ...] of a solve run with `throw=False`; NaN for the samples whose
  velocity is not finite at the last accepted state of a failed solve (the step controller
  rejects such steps until `max_steps`), and diffrax's error for any other failure."""
  failed = sol.result != diffrax.RESULTS.successful
  y, t = sol.ys[-1], sol.ts[-1]
  vel = jax.lax.cond(failed, lambda: v(y, t), lambda: jnp.zeros_like(y))
  bad = ~jnp.all(jnp.isfinite(vel.reshape(y.shape[0], -1)), axis=1)
  y = jnp.where(bad.reshape((-1,) + (1,) * (y.ndim - 1)), jnp.nan, y)
  return sol.result.error_if(y, failed & ~jnp.any(bad))


def noise(key, num: int, shape: tuple[int, ...], dtype=jnp.float32):
  """Standard normal samples [num, *shape]; sample i uses `fold_in(key, i)`, so it does not
  depend on the batch size or the number of devices."""
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num))
  return jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(keys)


def sample(apply_fn, params, key, num: int, shape: tuple[int, ...], *, cond=None,
           cfg_scale: float | None = None, null_label: int | None = None,
           check_finite: bool = False, **solve_kwargs):
  """Draws `num` samples of `shape` from noise at t = 0 to data at t = 1.

  `solve_kwargs` go to `solve` (solver, steps, grid, tolerances, return_trajectory);
  `check_finite` raises FloatingPointError on NaN or infinite samples (e.g. NaN parameters).
  Returns (samples [num, *shape], info with 'nfe').
  """
  v = velocity_fn(apply_fn, params, cond=cond, cfg_scale=cfg_scale, null_label=null_label)
  return solve(v, noise(key, num, shape), check_finite=check_finite, **solve_kwargs)


def standard_normal_logpdf(x):
  """`log N(x; 0, I)` summed over non-batch axes: [B, ...] -> [B]."""
  flat = x.reshape(x.shape[0], -1)
  return -0.5 * (jnp.sum(flat**2, -1) + flat.shape[1] * jnp.log(2 * jnp.pi))


def _probe_products(v: VelocityFn, x, t, probes):
  """`v(x, t)` and `eps_k . (J eps_k)` per probe, from one `jvp` per probe whose primal (the
  velocity) is computed once: probes are `vmap`ped, `x` is not.

  Returns:
    (v(x, t) [B, ...], products [K, B]).
  """

  def one(eps):
    vel, jvp = jax.jvp(lambda y: v(y, t), (x,), (eps,))
    return vel, jnp.sum((eps * jvp).reshape(x.shape[0], -1), -1)

  vel, products = jax.vmap(one, out_axes=(None, 0))(probes)
  return vel, products


def velocity_and_divergence(v: VelocityFn, x, t):
  """`v(x, t)` and `div_x v(x, t)` by the exact Jacobian trace, `sum_i e_i . (J e_i)` over the
  D coordinate directions (D tangent passes beside one primal; low dimension).

  Returns:
    (v(x, t) [B, ...], divergence [B]).
  """
  dim = math.prod(x.shape[1:])
  basis = jnp.eye(dim, dtype=x.dtype).reshape((dim, 1) + x.shape[1:])
  vel, products = _probe_products(v, x, t, jnp.broadcast_to(basis, (dim,) + x.shape))
  return vel, jnp.sum(products, 0)


def exact_divergence(v: VelocityFn, x, t):
  """`div_x v(x, t)` per sample by the full Jacobian trace (D tangent passes): [B]."""
  return velocity_and_divergence(v, x, t)[1]


def hutchinson_divergence(v: VelocityFn, x, t, probes):
  """Velocity and the unbiased divergence estimate `mean_k eps_k . (J eps_k)`.

  Args:
    probes: [K, B, ...] probe vectors (see `divergence_probes`).

  Returns:
    (v(x, t) [B, ...], div estimate [B]); the velocity is the primal of the same `jvp`.
  """
  vel, products = _probe_products(v, x, t, probes)
  return vel, jnp.mean(products, 0)


def divergence_probes(key, num: int, x, kind: str = 'rademacher'):
  """Probe vectors [num, B, ...] for the Hutchinson estimator, per sample index."""
  eps = jnp.moveaxis(noise(key, x.shape[0], (num,) + x.shape[1:], x.dtype), 1, 0)
  if kind == 'rademacher':
    return jnp.sign(eps)
  if kind == 'gaussian':
    return eps
  raise ValueError(f'Unknown probe kind {kind!r}; choose "rademacher" or "gaussian".')


def integrate_with_divergence(v: VelocityFn, x, key=None, *, t0: float = 1.0, t1: float = 0.0,
                              divergence: str = 'exact', num_probes: int = 1,
                              probe: str = 'rademacher', solver: str = 'dopri5',
                              steps: int = 100, rtol: float = 1e-5, atol: float = 1e-5,
                              max_steps: int = 4096):
  """Solves `dx/dt = v(x, t)` from t0 to t1 together with `delta = int_{t0}^{t1} div v dt`.

  The building block of likelihoods: for a flow whose time-t1 marginal has density q,
  `log p_{t0}(x) = log q(x(t1)) + delta` (`log_likelihood` takes q = N(0, I), t1 = 0; a chain of
  flows sums the deltas of its pieces).

  Args:
    v: velocity `v(x [B, ...], t []) -> [B, ...]`.
    x: state [B, ...] at t0; key: needed for the Hutchinson estimator.
    t0, t1: start and end times (either direction).
    divergence: 'exact' (Jacobian trace; low dimension) or 'hutchinson' (jvp probes; images).
    num_probes, probe: Hutchinson probes per sample, 'rademacher' or 'gaussian'.
    solver: any of SOLVERS; fixed-step ones take `steps` uniform steps.

  Returns:
    (x(t1) [B, ...], delta [B], info with 'nfe').
  """
  check_solver(solver)
  check_times(jnp.array([t0, t1]), 't0/t1')
  if divergence == 'exact':
    field = lambda t, state, args: velocity_and_divergence(v, state[0], t)
  elif divergence == 'hutchinson':
    if key is None:
      raise ValueError('The Hutchinson divergence needs a `key`.')
    probes = divergence_probes(key, num_probes, x, probe)
    field = lambda t, state, args: hutchinson_divergence(v, state[0], t, probes)
  else:
    raise ValueError(f'Unknown divergence {divergence!r}; choose "exact" or "hutchinson".')

  state = (x, jnp.zeros(x.shape[0], x.dtype))
  if solver in ADAPTIVE_SOLVERS:
    kwargs = dict(solver=_adaptive_solver(solver), dt0=None,
                  stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol))
  else:
    kwargs = dict(solver={'euler': diffrax.Euler, 'midpoint': diffrax.Midpoint,
                          'heun': diffrax.Heun}[solver](), dt0=(t1 - t0) / steps)
  sol = diffrax.diffeqsolve(diffrax.ODETerm(field), t0=t0, t1=t1, y0=state,
                            max_steps=max(max_steps, steps), **kwargs)
  nfe = (_diffrax_nfe(solver, sol.stats) if solver in ADAPTIVE_SOLVERS
         else _STAGES[solver] * steps)
  return sol.ys[0][-1], sol.ys[1][-1], {'nfe': nfe}


def log_likelihood(apply_fn, params, x, key=None, *, cond=None, divergence: str = 'exact',
                   num_probes: int = 1, probe: str = 'rademacher', solver: str = 'dopri5',
                   steps: int = 100, rtol: float = 1e-5, atol: float = 1e-5,
                   max_steps: int = 4096, t_data: float = 1.0, check_finite: bool = False):
  """`log p(x)` of the model's time-`t_data` marginal by the instantaneous change of variables.

  Integrates `(x, delta)` from `t_data` back to 0 with `d delta / dt = div v`, then
  `log p(x) = log N(x(0); 0, I) + delta(0)` (see `integrate_with_divergence`).

  Args:
    x: data [B, ...]; key: needed for the Hutchinson estimator.
    divergence: 'exact' (Jacobian trace; low dimension) or 'hutchinson' (jvp probes; images).
    num_probes, probe: Hutchinson probes per sample, 'rademacher' or 'gaussian'.
    solver: any of SOLVERS; fixed-step ones use `steps`.
    t_data: end time of the model path (below 1 to avoid a singular end).
    check_finite: raise FloatingPointError where log p is NaN or infinite.

  Returns:
    (log p [B], info with 'nfe' and 'prior_logp' [B], 'x0' [B, ...]).
  """
  check_times(t_data, 't_data')
  checks.check_data(x)
  v = velocity_fn(apply_fn, params, cond=cond)
  x0, delta, info = integrate_with_divergence(
      v, x, key, t0=t_data, t1=0.0, divergence=divergence, num_probes=num_probes, probe=probe,
      solver=solver, steps=steps, rtol=rtol, atol=atol, max_steps=max_steps)
  prior = standard_normal_logpdf(x0)
  logp = prior + delta
  if check_finite:
    logp = checks.check_finite(logp[:, None], 'log-likelihoods')[:, 0]
  return logp, {'nfe': info['nfe'], 'prior_logp': prior, 'x0': x0}


def bits_per_dim(logp, num_dims: int, data_range: float = 2.0, levels: int = 256):
  """Bits per dimension of discrete images from `log p` of their dequantised continuous
  version scaled to an interval of width `data_range` (e.g. [-1, 1]): [B] -> [B]."""
  logp_discrete = logp + num_dims * jnp.log(data_range / levels)
  return -logp_discrete / (num_dims * jnp.log(2.0))
