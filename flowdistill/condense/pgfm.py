"""PGFM (seed 000, METHODS.md §4): class-conditional latent flow matching steered toward
per-class prototypes, to synthesise IPC images per class in a few ODE steps.

The seed gives only an abstract; this is the library's reading of it, every choice a field of
`PrototypeGuidance` (config `pgfm.prototype_guidance`). Sample j of class c starts from noise z0
and follows

    straight:  v_g = (1 - w(t)) v_θ(z, t, c) + w(t) (p - z) / (1 - t + δ)
    denoiser:  v_g = v_θ(z, t, c) + w(t) (p - ẑ1) / (1 - t + δ),   ẑ1 = z + (1 - t) v_θ

toward its prototype p = p_{c,j} (k-means with K = IPC on the class's scaled latents). At δ = 0
the two forms are one field, `(p − ẑ1)/(1 − t) = (p − z)/(1 − t) − v_θ`; δ > 0 separates them
(the denoiser form keeps more of v_θ early on). `w(t)`
decays from `w0` (constant, linear or cosine over [0, t_stop]) and is 0 for t >= t_stop, where
the sampler is the plain conditional flow. Straight with w ≡ 1 is the straight line to p; the
denoiser form shifts the model's data estimate toward p and keeps the learned velocity.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from flowdistill import ode
from flowdistill.condense.kmeans import kmeans

FORMS = ('straight', 'denoiser')
SCHEDULES = ('constant', 'linear', 'cosine')


@dataclasses.dataclass(frozen=True)
class PrototypeGuidance:
  """Path-to-prototype guidance: the pull toward the prototypes (not classifier-free guidance).

  Attributes:
    form: 'straight' (blend with the straight path to p) or 'denoiser' (pull ẑ1 toward p).
    w0: weight at t = 0; in [0, 1] for 'straight' (a convex blend), >= 0 for 'denoiser'.
    schedule: 'constant' (w0 until t_stop), 'linear' or 'cosine' (decay from w0 at t = 0 to 0
      at t_stop, so the switch-off is continuous).
    t_stop: guidance is 0 for t >= t_stop, in [0, 1]; t_stop = 0 is unguided sampling and
      t_stop = 1 never stops (w(1) = w0 for 'constant').
    delta: >= 0, keeps 1 / (1 - t + δ) finite at t = 1.
    trust: ρ > 0 bounds the pull of each sample to `||v_g − v_θ|| <= ρ ||v_θ||` (a trust
      region around the flow's own step, direction kept); 0: unbounded.
    warm_start: t0 in [0, 1): sampling starts at t0 from `(1 − t0) z0 + t0 p`, the linear
      path's state between the noise and the prototype, and the flow takes it on from there.
  """
  form: str = 'denoiser'
  w0: float = 1.0
  schedule: str = 'constant'
  t_stop: float = 0.6  # chosen on the validation split (benchmarks/RESULTS.md, issue 31)
  delta: float = 0.05
  trust: float = 0.0
  warm_start: float = 0.5

  def __post_init__(self):
    if self.form not in FORMS:
      raise ValueError(f'PrototypeGuidance.form={self.form!r} is not one of {FORMS}.')
    if self.schedule not in SCHEDULES:
      raise ValueError(f'PrototypeGuidance.schedule={self.schedule!r} is not one of '
                       f'{SCHEDULES}.')
    if not 0.0 <= self.t_stop <= 1.0:
      raise ValueError(f'PrototypeGuidance.t_stop must lie in [0, 1]; got {self.t_stop}.')
    if self.delta < 0:
      raise ValueError(f'PrototypeGuidance.delta must be >= 0; got {self.delta}.')
    if self.w0 < 0 or (self.form == 'straight' and self.w0 > 1):
      bound = '[0, 1] for the straight form (a convex blend)' if self.form == 'straight' \
          else '>= 0'
      raise ValueError(f'PrototypeGuidance.w0 must be {bound}; got {self.w0}.')
    if self.trust < 0:
      raise ValueError(f'PrototypeGuidance.trust must be >= 0 (0: unbounded); got {self.trust}.')
    if not 0 <= self.warm_start < 1:
      raise ValueError(f'PrototypeGuidance.warm_start must lie in [0, 1); got {self.warm_start}.')


def weight(pull: PrototypeGuidance, t):
  """w(t) for scalar or array t: the schedule on [0, t_stop), 0 from t_stop on."""
  t = jnp.asarray(t, jnp.float32)
  frac = t / pull.t_stop if pull.t_stop > 0 else jnp.zeros_like(t)
  shape = {'constant': jnp.ones_like(t), 'linear': 1.0 - frac,
           'cosine': 0.5 * (1.0 + jnp.cos(jnp.pi * frac))}[pull.schedule]
  if pull.t_stop >= 1.0:  # never stopped: the schedule holds at t = 1 too
    return pull.w0 * shape
  return jnp.where(t < pull.t_stop, pull.w0 * shape, 0.0)


def guided_velocity(v: ode.VelocityFn, prototypes, pull: PrototypeGuidance) -> ode.VelocityFn:
  """Wraps `v(z, t)` with the pull toward `prototypes` [B, ...] (one per sample); one call of
  the wrapped field is one call of `v`, so the solver's NFE stays true. Where w(t) = 0 the
  result is `v(z, t)` bit for bit (the pull is selected away, never multiplied by 0).

  With `pull.trust = ρ > 0` each sample's pull `g = v_g − v` is scaled to
  `min(1, ρ ||v|| / ||g||) g` (norms over the sample's entries): a step of size dt then moves
  the sample at most `ρ dt ||v||` away from the flow's own step."""

  def v_guided(z, t):
    u = v(z, t)
    w = weight(pull, t)
    on = w > 0
    gap = jnp.where(on, 1.0 - t + pull.delta, 1.0)  # no 1/0 where the pull is off
    if pull.form == 'straight':
      pulled = (1.0 - w) * u + w * (prototypes - z) / gap
    else:
      pulled = u + w * (prototypes - (z + (1.0 - t) * u)) / gap
    if pull.trust > 0:
      g = pulled - u
      pulled = u + trust_scale(g, u, pull.trust) * g
    return jnp.where(on, pulled, u)

  return v_guided


def trust_scale(g, u, ratio: float):
  """`min(1, ratio ||u|| / ||g||)` per sample of g, u [B, ...], shaped [B, 1, ..., 1]."""
  axes = tuple(range(1, g.ndim))
  norm = lambda a: jnp.sqrt(jnp.sum(jnp.square(a), axis=axes, keepdims=True))
  return jnp.minimum(1.0, ratio * norm(u) / jnp.maximum(norm(g), 1e-12))


def warm_start(z0, prototypes, t0: float):
  """`(1 − t0) z0 + t0 p` [B, ...]: the state at t0 of the linear path from each sample's noise
  z0 to its prototype p, where a warm-started sampler begins (t0 = 0: the noise)."""
  return (1.0 - t0) * z0 + t0 * prototypes


def sample(apply_fn, params, key, labels, prototypes, pull: PrototypeGuidance, *,
           solver: str = 'euler', steps: int = 8, cfg_scale: float | None = None,
           null_label: int | None = None):
  """Guided latents from noise at t = 0 (or the warm start at t0) to t = 1.

  Args:
    apply_fn, params: the class-conditional latent velocity model.
    key: sample i starts from `fold_in(key, i)` noise.
    labels: int [B]. prototypes: [B, h, w, c] scaled latents, the target of each sample.
    pull: the prototype guidance. solver, steps: a fixed-step solver of `ode.solve` (steps on
      [t0, 1]).
    cfg_scale: classifier-free guidance weight (None: the conditional model); needs `null_label`.

  Returns:
    (latents [B, h, w, c], info with 'nfe').
  """
  if labels.shape[0] != prototypes.shape[0]:
    raise ValueError(f'labels {labels.shape} and prototypes {prototypes.shape} must have one '
                     'row per sample.')
  v = ode.velocity_fn(apply_fn, params, cond=labels, cfg_scale=cfg_scale, null_label=null_label)
  z0 = ode.noise(key, labels.shape[0], prototypes.shape[1:], prototypes.dtype)
  z = warm_start(z0, prototypes, pull.warm_start) if pull.warm_start else z0
  return ode.solve(guided_velocity(v, prototypes, pull), z, solver=solver, steps=steps,
                   t0=pull.warm_start)


def class_prototypes(latents: np.ndarray, labels: np.ndarray, ipc: int, *, seed: int = 0,
                     n_init: int = 1) -> np.ndarray:
  """k-means (k-means++, fixed seed) with K = IPC on each class's latents.

  Args:
    latents: [N, h, w, c] scaled latents of the train split. labels: int [N] in [0, C).

  Returns:
    prototypes [C, IPC, h, w, c]; sample j of class c is assigned `prototypes[c, j]`.
  """
  labels = np.asarray(labels)
  counts = np.bincount(labels)
  if ipc < 1 or ipc > counts.min():
    small = int(counts.argmin())
    raise ValueError(f'IPC must be in [1, {counts.min()}] (class {small} has {counts.min()} '
                     f'latents); got {ipc}.')
  flat = np.asarray(latents, np.float64).reshape(len(latents), -1)
  out = [kmeans(flat[labels == c], ipc, seed=seed, n_init=n_init)[0]
         for c in range(len(counts))]
  return np.stack(out).reshape(len(counts), ipc, *latents.shape[1:]).astype(np.float32)


def jump_sample(apply_fn, params, key, labels, prototypes, pull: PrototypeGuidance, *,
                steps: int = 1):
  """Guided sampling with a flow-map student `X(z, s, t) = z + (t − s) u(z, s, t)`
  (`fewstep.flow_map`): each jump's mean velocity u takes the place of v_θ in the guided
  field at its start time s, so the pull is applied once per jump and a jump is one NFE.
  With w = 0 this is `flow_map.jump`.

  Args:
    apply_fn, params: a two-time class-conditional model. labels: int [B].
    prototypes: [B, h, w, c]. steps: jumps on a uniform grid from t0 (the warm start) to 1.

  Returns:
    (latents [B, h, w, c], info with 'nfe' = steps).
  """
  z0 = ode.noise(key, labels.shape[0], prototypes.shape[1:], prototypes.dtype)
  z0 = warm_start(z0, prototypes, pull.warm_start) if pull.warm_start else z0
  grid = ode.time_grid(steps, pull.warm_start)

  def one_jump(z, st):
    s, t = st
    b = jnp.full(z.shape[:1], 1.0, z.dtype)
    u = apply_fn(params, z, t * b, s=s * b, cond=labels)
    v = guided_velocity(lambda z, s: u, prototypes, pull)(z, s)
    return z + (t - s) * v, None

  z, _ = jax.lax.scan(one_jump, z0, jnp.stack([grid[:-1], grid[1:]], axis=1))
  return z, {'nfe': steps}
