"""Probability paths (interpolants) and the velocity / denoiser / noise / score conversions.

Convention: `t = 0` is noise, `t = 1` is data, and

    x_t = alpha(t) x0 + beta(t) x1 + gamma(t) z,    x0 ~ N(0, I), x1 ~ data, z ~ N(0, I).

The velocity `v(x, t) = E[d/dt x_t | x_t = x]` moves noise toward data. For a Gaussian source
the noise part `alpha x0 + gamma z` is itself `sigma(t) eps` with `sigma = sqrt(alpha^2 +
gamma^2)`, so the marginal velocity, denoiser, noise estimate and score of any path here are
the affine ones with `alpha` replaced by `sigma`: the conversions below use `sigma`.

All functions broadcast a time array of shape [B] (or a scalar) against data [B, ...].
"""

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

ScalarFn = Callable[[jax.Array], jax.Array]


def check_times(t, name: str = 't', *, low: float = 0.0, high: float = 1.0):
  """Raises ValueError if concrete times leave [low, high]; traced values pass unchecked."""
  if isinstance(t, jax.core.Tracer):
    return
  arr = np.asarray(t)
  if arr.size and (np.any(~np.isfinite(arr)) or arr.min() < low or arr.max() > high):
    raise ValueError(f'`{name}` must lie in [{low}, {high}]; got values in '
                     f'[{arr.min():.4g}, {arr.max():.4g}].')


def expand_time(t, x):
  """Broadcasts times [B] or [] against data x [B, ...] -> [B, 1, ..., 1] (or [])."""
  t = jnp.asarray(t, x.dtype)
  if t.ndim == 0:
    return t
  if t.shape[0] != x.shape[0]:
    raise ValueError(f'Times have batch size {t.shape[0]} but data has {x.shape[0]}.')
  return t.reshape(t.shape + (1,) * (x.ndim - 1))


@dataclasses.dataclass(frozen=True)
class AffinePath:
  """`x_t = alpha(t) x0 + beta(t) x1 + gamma(t) z` with scalar coefficient functions.

  Attributes:
    name: label used in configs and logs.
    alpha, beta: coefficient functions of a scalar time (jax-differentiable).
    gamma: optional coefficient of extra Gaussian noise `z` (stochastic interpolant); zero at
      both ends for an interpolant between the two marginals.
  """
  name: str
  alpha: ScalarFn
  beta: ScalarFn
  gamma: ScalarFn | None = None

  def coefficients(self, t):
    """Returns `(alpha, beta, gamma, d alpha, d beta, d gamma)` at times t (any shape)."""
    t = jnp.asarray(t, jnp.float32)

    def value_and_rate(fn):
      return jax.jvp(jax.vmap(fn), (t.reshape(-1),), (jnp.ones(t.size, t.dtype),))

    (a, da), (b, db) = value_and_rate(self.alpha), value_and_rate(self.beta)
    if self.gamma is None:
      g = dg = jnp.zeros_like(a)
    else:
      g, dg = value_and_rate(self.gamma)
    return tuple(c.reshape(t.shape) for c in (a, b, g, da, db, dg))

  def sample(self, x0, x1, t, z=None):
    """Point on the path and its time derivative.

    Args:
      x0: noise [B, ...]; x1: data [B, ...]; t: [B] or scalar;
      z: extra noise [B, ...], needed iff the path has `gamma`.

    Returns:
      (x_t, dx_t/dt), both [B, ...].
    """
    if x0.shape != x1.shape:
      raise ValueError(f'x0 {x0.shape} and x1 {x1.shape} must have the same shape.')
    check_times(t)
    a, b, g, da, db, dg = (expand_time(c, x1) for c in self.coefficients(t))
    xt, dxt = a * x0 + b * x1, da * x0 + db * x1
    if self.gamma is not None:
      if z is None:
        raise ValueError(f'Path {self.name!r} has gamma(t) noise: pass `z` to sample().')
      xt, dxt = xt + g * z, dxt + dg * z
    return xt, dxt

  def sigma(self, t):
    """Marginal noise scale and its rate: `sqrt(alpha^2 + gamma^2)`, d/dt of it."""
    a, _, g, da, _, dg = self.coefficients(t)
    sig = jnp.sqrt(a**2 + g**2)
    return sig, (a * da + g * dg) / jnp.maximum(sig, 1e-12)

  def _affine(self, t, x, eps):
    t = t if eps is None else jnp.clip(t, eps, 1.0 - eps)
    sig, dsig = self.sigma(t)
    _, b, _, _, db, _ = self.coefficients(t)
    return tuple(expand_time(c, x) for c in (sig, b, dsig, db))

  def to_denoiser(self, v, x, t, *, eps=None):
    """Data estimate `x1_hat = E[x1 | x_t = x]` from a velocity; singular where `beta' sigma
    - beta sigma'` vanishes. `eps` clips t to [eps, 1 - eps] first (documented option)."""
    sig, b, dsig, db = self._affine(t, x, eps)
    return (sig * v - dsig * x) / (sig * db - b * dsig)

  def to_noise(self, v, x, t, *, eps=None):
    """Noise estimate `eps_hat` (x = sigma eps_hat + beta x1_hat) from a velocity."""
    sig, b, dsig, db = self._affine(t, x, eps)
    return (db * x - b * v) / (sig * db - b * dsig)

  def to_score(self, v, x, t, *, eps=None):
    """Score `grad log p_t(x) = -eps_hat / sigma`; singular at the data end (sigma -> 0)."""
    sig, _, _, _ = self._affine(t, x, eps)
    return -self.to_noise(v, x, t, eps=eps) / sig

  def from_denoiser(self, x1_hat, x, t, *, eps=None):
    """Velocity from a data estimate."""
    sig, b, dsig, db = self._affine(t, x, eps)
    return db * x1_hat + dsig * (x - b * x1_hat) / sig

  def from_noise(self, eps_hat, x, t, *, eps=None):
    """Velocity from a noise estimate."""
    sig, b, dsig, db = self._affine(t, x, eps)
    return dsig * eps_hat + db * (x - sig * eps_hat) / b

  def from_score(self, score, x, t, *, eps=None):
    """Velocity from a score."""
    sig, _, _, _ = self._affine(t, x, eps)
    return self.from_noise(-sig * score, x, t, eps=eps)


def linear_path() -> AffinePath:
  """Rectified flow / conditional OT: `x_t = (1 - t) x0 + t x1`, velocity target `x1 - x0`."""
  return AffinePath('linear', lambda t: 1.0 - t, lambda t: t)


def trig_path() -> AffinePath:
  """Variance-preserving trigonometric path: `cos(pi t / 2) x0 + sin(pi t / 2) x1`."""
  return AffinePath('trig', lambda t: jnp.cos(0.5 * math.pi * t),
                    lambda t: jnp.sin(0.5 * math.pi * t))


def stochastic_path(noise_scale: float = 1.0) -> AffinePath:
  """Linear interpolant plus `gamma(t) z` with `gamma = noise_scale * t (1 - t)`.

  (`t (1 - t)` rather than `sqrt(t (1 - t))` keeps `d gamma / dt` bounded at the ends.)
  """
  return AffinePath('stochastic', lambda t: 1.0 - t, lambda t: t,
                    lambda t: noise_scale * t * (1.0 - t))


def ou_path(h: float) -> AffinePath:
  """Exact Ornstein–Uhlenbeck transition of length `h`, in this library's time direction.

  The OU process `dY = -Y dtau + sqrt(2) dW` started at data reaches
  `Y_h = e^{-h} y + sqrt(1 - e^{-2h}) z`. With `tau = h (1 - t)` this is the path
  `beta(t) = e^{-h (1 - t)}`, `alpha(t) = sqrt(1 - e^{-2 h (1 - t)})`: data at `t = 1`, the OU
  state after time `h` at `t = 0`. As `h -> inf` it becomes a variance-preserving path.
  """
  if not h > 0:
    raise ValueError(f'OU step length h must be > 0, got {h}.')
  return AffinePath(f'ou(h={h:g})',
                    lambda t: jnp.sqrt(-jnp.expm1(-2.0 * h * (1.0 - t)) + 1e-12),
                    lambda t: jnp.exp(-h * (1.0 - t)))


def ou_transition(x, h, z):
  """One exact OU step of length h from x: `e^{-h} x + sqrt(1 - e^{-2h}) z` ([B, ...])."""
  return jnp.exp(-h) * x + jnp.sqrt(-jnp.expm1(-2.0 * h)) * z


_PATHS = {'linear': linear_path, 'trig': trig_path, 'stochastic': stochastic_path}


def get_path(name: str, **kwargs) -> AffinePath:
  """Path by name: one of 'linear', 'trig', 'stochastic' (kwargs go to the constructor)."""
  if name not in _PATHS:
    raise ValueError(f'Unknown path {name!r}; choose one of {sorted(_PATHS)}.')
  return _PATHS[name](**kwargs)
