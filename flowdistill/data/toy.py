"""Seeded 2-D toy distributions: samplers, exact log-densities and entropies.

Every sampler is a pure, jittable function of a `jax.random` key. Point `i` of a draw is a fixed
transform of a few uniforms drawn from `fold_in(key, i)` alone, so `sample(name, key, m)` is a
prefix of `sample(name, key, n)` for `m <= n`, and the result does not depend on how the work is
split across devices.

The layouts are those of FFJORD's `toy_data.py` (Grathwohl et al., 2019), which torchcfm and most
flow-matching code reuse; each coordinate has a standard deviation between about 1 and 2.5:

- `8gaussians`: equal mixture of `N(c_k, sigma^2 I)`, `c_k = r (cos(k pi / 4), sin(k pi / 4))`,
  `r = 2 sqrt(2)`, `sigma = sqrt(2) / 4` (FFJORD's radius 4 and std 0.5, divided by sqrt(2)).
- `moons`: scikit-learn's two moons with noise 0.1 (angles drawn uniformly instead of on a
  grid), scaled by 2 and shifted by (-1, -0.2): arcs of radius 2 centred at (-1, -0.2) (upper)
  and (1, 0.8) (lower), Gaussian noise of std 0.2.
- `checkerboard`: uniform on the 8 squares of side 2 in `[-4, 4)^2` where
  `floor(x / 2) + floor(y / 2)` is even: area 32, density 1/32 there, entropy `log 32` nats.
- `spirals`: FFJORD's `2spirals`, two interleaved arms out to radius about 3.2.
- `gaussian`: the standard normal `N(0, I_2)`.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from flowdistill.errors import BadInput

NAMES = ('8gaussians', 'moons', 'checkerboard', 'spirals', 'gaussian')

_RADIUS = 2.0 * math.sqrt(2.0)
_SIGMA = math.sqrt(2.0) / 4.0
_CENTRES = _RADIUS * np.stack(
    [np.cos(np.arange(8) * np.pi / 4), np.sin(np.arange(8) * np.pi / 4)], axis=-1)
_CHECKERBOARD_AREA = 32.0
_DENSITY_NAMES = ('8gaussians', 'checkerboard', 'gaussian')
_OPEN_MINUS_ONE = np.nextafter(np.float32(-1.0), np.float32(0.0))


def _normal(u):
  """Standard normals from uniforms in [0, 1), by the inverse CDF (as `jax.random.normal`)."""
  return math.sqrt(2.0) * jax.lax.erf_inv(jnp.maximum(2.0 * u - 1.0, _OPEN_MINUS_ONE))


def _eight_gaussians(u):
  centre = jnp.asarray(_CENTRES, jnp.float32)[jnp.floor(8.0 * u[0]).astype(jnp.int32)]
  return centre + _SIGMA * _normal(u[1:3])


def _moons(u):
  angle = jnp.pi * u[1]
  upper = jnp.stack([jnp.cos(angle), jnp.sin(angle)])
  lower = jnp.stack([1.0 - jnp.cos(angle), 0.5 - jnp.sin(angle)])
  point = jnp.where(u[0] < 0.5, lower, upper) + 0.1 * _normal(u[2:4])
  return 2.0 * point + jnp.array([-1.0, -0.2])


def _checkerboard(u):
  col = jnp.floor(4.0 * u[0]) - 2.0  # floor(x / 2) in {-2, ..., 1}
  row = 2.0 * jnp.floor(2.0 * u[1]) - 2.0 + col % 2  # floor(y / 2), same parity as col
  corner = 2.0 * jnp.stack([col, row])
  point = corner + 2.0 * u[2:4]
  # `corner + 2 u` can round up onto the far edge, which belongs to a neighbouring square.
  return jnp.minimum(point, jnp.nextafter(corner + 2.0, corner))


def _spirals(u):
  angle = 3.0 * jnp.pi * jnp.sqrt(u[1])  # up to 540 degrees
  arm = jnp.stack([-jnp.cos(angle) * angle, jnp.sin(angle) * angle]) + 0.5 * u[2:4]
  sign = jnp.where(u[0] < 0.5, -1.0, 1.0)
  return sign * arm / 3.0 + 0.1 * _normal(u[4:6])


def _gaussian(u):
  return _normal(u[0:2])


# name -> (map from uniforms [k] to a point [2], k).
_SAMPLERS = {
    '8gaussians': (_eight_gaussians, 3),
    'moons': (_moons, 4),
    'checkerboard': (_checkerboard, 4),
    'spirals': (_spirals, 6),
    'gaussian': (_gaussian, 2),
}


def _check_name(name: str):
  if name not in NAMES:
    raise BadInput(f'Unknown toy distribution {name!r}; valid names: {", ".join(NAMES)}.')


@functools.partial(jax.jit, static_argnames=('name', 'n'))
def sample(name: str, key: jax.Array, n: int) -> jax.Array:
  """Draws `n` points from a toy distribution.

  Args:
    name: one of `NAMES` (static under `jit`).
    key: a `jax.random` key.
    n: number of points (static under `jit`).

  Returns:
    float32 array [n, 2]; row `i` depends only on `fold_in(key, i)`.
  """
  _check_name(name)
  transform, num_uniforms = _SAMPLERS[name]
  uniforms = jax.vmap(
      lambda i: jax.random.uniform(jax.random.fold_in(key, i), (num_uniforms,)))(jnp.arange(n))
  return jax.vmap(transform)(uniforms)


def _parse_pair(name: str):
  source, sep, target = name.partition('->')
  if not sep or source not in NAMES or target not in NAMES:
    raise BadInput(
        f'Bad toy pair {name!r}: write "<source>-><target>" with both in {", ".join(NAMES)}, '
        'e.g. "moons->8gaussians".')
  return source, target


def sample_pair(name: str, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """Draws `n` independent (source, target) pairs for data-to-data transport.

  The pairs are independently coupled; couple them with `flowdistill.couplings` if needed.

  Args:
    name: `"<source>-><target>"` with both names in `NAMES`, e.g. `"moons->8gaussians"`
      (static under `jit`).
    key: a `jax.random` key.
    n: number of pairs (static under `jit`).

  Returns:
    `(x0, x1)`, float32 arrays [n, 2]: `x0` from the source (t = 0), `x1` from the target (t = 1).
  """
  source, target = _parse_pair(name)
  x0 = sample(source, jax.random.fold_in(key, 0), n)
  x1 = sample(target, jax.random.fold_in(key, 1), n)
  return x0, x1


@functools.partial(jax.jit, static_argnames='name')
def log_density(name: str, x: jax.Array) -> jax.Array:
  """Exact log-density of a toy distribution, for `8gaussians`, `checkerboard` and `gaussian`.

  Args:
    name: a name in `NAMES` with a known density (static under `jit`).
    x: points [..., 2], e.g. [n, 2].

  Returns:
    log p(x), shape [...]; `-inf` off the support (checkerboard).
  """
  _check_name(name)
  if name not in _DENSITY_NAMES:
    raise BadInput(
        f'Toy distribution {name!r} has no closed-form density; known for: '
        f'{", ".join(_DENSITY_NAMES)}.')
  x = jnp.asarray(x, jnp.float32)
  if x.ndim < 1 or x.shape[-1] != 2:
    raise BadInput(f'x must have shape [..., 2]; got {x.shape}.')
  if name == 'gaussian':
    return -0.5 * jnp.sum(x**2, axis=-1) - math.log(2.0 * math.pi)
  if name == '8gaussians':
    sq_dist = jnp.sum((x[..., None, :] - jnp.asarray(_CENTRES, jnp.float32))**2, axis=-1)
    log_comp = -sq_dist / (2.0 * _SIGMA**2) - math.log(2.0 * math.pi * _SIGMA**2)
    return jax.nn.logsumexp(log_comp, axis=-1) - math.log(8.0)
  cell = jnp.floor(x / 2.0)
  inside = jnp.all((cell >= -2) & (cell <= 1), axis=-1) & (jnp.sum(cell, axis=-1) % 2 == 0)
  return jnp.where(inside, -math.log(_CHECKERBOARD_AREA), -jnp.inf)


def entropy(name: str) -> float:
  """Exact differential entropy in nats: the best achievable mean NLL of a model of `name`.

  `checkerboard`: log 32 ~ 3.466 nats (1.733 per dimension); `gaussian`: 1 + log(2 pi). The
  other sets have no closed form (for `8gaussians` it is log 8 + 1 + log(2 pi sigma^2) up to the
  tiny overlap of the components).

  Args:
    name: `checkerboard` or `gaussian`.

  Returns:
    The entropy, a Python float.
  """
  _check_name(name)
  if name == 'checkerboard':
    return math.log(_CHECKERBOARD_AREA)
  if name == 'gaussian':
    return 1.0 + math.log(2.0 * math.pi)
  raise BadInput(
      f'Toy distribution {name!r} has no closed-form entropy; known for: checkerboard, gaussian.')
