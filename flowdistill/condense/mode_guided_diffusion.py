"""The diffusion counterpart of PGFM on the same network: stochastic sampling of the model's
path with MGD³-style mode guidance (no new training).

A flow-matching velocity on an affine path `x_t = σ_t x0 + β_t x1` gives the data estimate
`x̂1 = path.to_denoiser(v)` and the score `path.to_score(v)`, so the same network drives

- `ancestral` steps: `x_{t'} ~ q(x_{t'} | x_t, x1 = x̂1)`, the Gaussian posterior of the Markov
  chain whose marginals are the path's (DDPM's sampler, exact per step up to x̂1);
- `euler_maruyama` steps of the reverse SDE `dx = [v + ½ g² ∇log p_t] dt + g dW` with
  `g² = 2 σ² (β'/β − σ'/σ)` (the path's own diffusion), from `t_min` (g is infinite at t = 0).

Mode guidance (MGD³, public sampling code: λ = 0.1, off after 25 of 50 steps) adds
`−λ σ_t (x̂1 − p)` to the mean of each step before `stop_step`, with p the sample's prototype.
"""

import jax
import jax.numpy as jnp

from flowdistill import ode
from flowdistill.paths import AffinePath, expand_time

SAMPLERS = ('ancestral', 'euler_maruyama')


def _coefficients(path: AffinePath, t, x):
  sig, dsig = path.sigma(t)
  _, b, _, _, db, _ = path.coefficients(t)
  return tuple(expand_time(c, x) for c in (sig, b, dsig, db))


def ancestral_step(path: AffinePath, x, x1_hat, t, t_next):
  """Mean and std of `q(x_{t_next} | x_t = x, x1 = x1_hat)` for t < t_next (toward data).

  With a = β_t/β_t', the forward step is `x_t = a x_t' + N(0, s²)`, s² = σ_t² − a² σ_t'²;
  the posterior is N((β_t' s² x1 + a σ_t'² x)/σ_t², σ_t'² s²/σ_t²) (at t = 0, a = 0: the
  path's marginal given x1; at t' = 1, σ_t' = 0: x1).
  """
  sig, b, _, _ = _coefficients(path, t, x)
  sig_n, b_n, _, _ = _coefficients(path, t_next, x)
  a = b / b_n
  s2 = jnp.maximum(sig**2 - (a * sig_n)**2, 0.0)
  mean = (b_n * s2 * x1_hat + a * sig_n**2 * x) / sig**2
  return mean, sig_n * jnp.sqrt(s2) / sig


def _euler_maruyama_step(path: AffinePath, x, u, t, t_next):
  sig, b, dsig, db = _coefficients(path, t, x)
  g2 = 2 * sig**2 * (db / b - dsig / sig)
  dt = t_next - t
  return x + dt * (u + 0.5 * g2 * path.to_score(u, x, t)), jnp.sqrt(g2 * dt)


def sample(apply_fn, params, key, labels, shape: tuple[int, ...], path: AffinePath, *,
           steps: int = 50, sampler: str = 'ancestral', prototypes=None, lam: float = 0.0,
           stop_step: int | None = None, t_min: float = 1e-3, cfg_scale: float | None = None,
           null_label: int | None = None):
  """Stochastic samples of a class-conditional velocity model, optionally mode-guided.

  Args:
    apply_fn, params: the velocity model on `path` (no gamma noise).
    key: sample i's start and step noise depend only on `key`, i and the step.
    labels: int [B]. shape: one sample's shape.
    steps: N uniform steps from 0 (`t_min` for 'euler_maruyama') to 1.
    prototypes: [B, *shape] guidance targets (None: unguided). lam: guidance strength λ.
    stop_step: guidance acts on steps k < stop_step (None: all steps).
    cfg_scale, null_label: classifier-free guidance weight of the velocity.

  Returns:
    (samples [B, *shape], info with 'nfe' = steps).
  """
  if sampler not in SAMPLERS:
    raise ValueError(f'Unknown diffusion sampler {sampler!r}; choose one of {SAMPLERS}.')
  if path.gamma is not None:
    raise ValueError(f'Path {path.name!r} has gamma(t) noise; the counterpart needs an affine '
                     'path x_t = σ_t x0 + β_t x1.')
  if lam and prototypes is None:
    raise ValueError('Mode guidance (lam > 0) needs `prototypes`.')
  v = ode.velocity_fn(apply_fn, params, cond=labels, cfg_scale=cfg_scale, null_label=null_label)
  num = labels.shape[0]
  t0 = 0.0 if sampler == 'ancestral' else t_min
  grid = jnp.linspace(t0, 1.0, steps + 1)
  stop = steps if stop_step is None else stop_step
  guided = prototypes is not None and lam > 0 and stop > 0
  x = ode.noise(jax.random.fold_in(key, 0), num, shape) * path.sigma(jnp.float32(t0))[0]

  def step(x, inputs):
    k, t, t_next = inputs
    u = v(x, t)
    x1_hat = path.to_denoiser(u, x, t)
    if sampler == 'ancestral':
      mean, std = ancestral_step(path, x, x1_hat, t, t_next)
    else:
      mean, std = _euler_maruyama_step(path, x, u, t, t_next)
    if guided:
      sig = path.sigma(t)[0]
      mean = jnp.where(k < stop, mean - lam * sig * (x1_hat - prototypes), mean)
    xi = ode.noise(jax.random.fold_in(key, k + 1), num, shape, x.dtype)
    return mean + std * xi, None

  ks = jnp.arange(steps)
  x, _ = jax.lax.scan(step, x, (ks, grid[:-1], grid[1:]))
  return x, {'nfe': steps}
