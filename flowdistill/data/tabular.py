"""Generated tabular data with an exact density: a 16-D Gaussian mixture.

A stand-in for the tabular benchmarks (POWER, GAS, ...) that needs no download and has a known
log-density, so a model's NLL can be compared with the best achievable value (the data's
entropy, estimated without bias by `-mean log p` on held-out points).

`mixture16`: 8 components in 16 dimensions with unequal weights (Dirichlet(2) draws), means of
norm 3 in random directions, and full covariances `Q diag(s^2) Q^T` with random rotations `Q`
and scales `s` in [0.25, 1] — correlated, not axis-aligned, so the flow must learn rotations.
The parameters are a fixed function of the seed 16 (`numpy.random.default_rng`). Point `i` of a
draw depends only on `fold_in(key, i)`, as for the 2-D toys. The train and test splits are
fixed draws (keys 0 and 1) of `TRAIN_SIZE` and `TEST_SIZE` points: a finite training set like
a real tabular benchmark's.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from flowdistill.errors import BadInput

NAMES = ('mixture16',)
TRAIN_SIZE = 50_000
TEST_SIZE = 10_000


@functools.cache
def _parameters(name: str):
  """(log weights [K], means [K, D], Cholesky factors [K, D, D], inverse factors) as numpy."""
  check_name(name)
  rng = np.random.default_rng(16)
  num, dim = 8, 16
  weights = rng.dirichlet(np.full(num, 2.0))
  directions = rng.normal(size=(num, dim))
  means = 3.0 * directions / np.linalg.norm(directions, axis=1, keepdims=True)
  rotations = np.linalg.qr(rng.normal(size=(num, dim, dim)))[0]
  scales = rng.uniform(0.25, 1.0, size=(num, dim))
  covs = np.einsum('kij,kj,klj->kil', rotations, scales**2, rotations)
  chol = np.linalg.cholesky(covs)
  return (np.log(weights).astype(np.float32), means.astype(np.float32),
          chol.astype(np.float32), np.linalg.inv(chol).astype(np.float32))


def check_name(name: str):
  if name not in NAMES:
    raise BadInput(f'Unknown tabular data set {name!r}; choose one of {list(NAMES)}.')


def dim(name: str) -> int:
  """Dimension of one sample."""
  return _parameters(name)[1].shape[1]


@functools.partial(jax.jit, static_argnames=('name', 'n'))
def sample(name: str, key: jax.Array, n: int) -> jax.Array:
  """`n` points [n, D] float32; row i depends only on `fold_in(key, i)`."""
  log_w, means, chol, _ = (jnp.asarray(a) for a in _parameters(name))

  def one(i):
    k_comp, k_eps = jax.random.split(jax.random.fold_in(key, i))
    comp = jax.random.categorical(k_comp, log_w)
    return means[comp] + chol[comp] @ jax.random.normal(k_eps, (means.shape[1],))

  return jax.vmap(one)(jnp.arange(n))


@functools.partial(jax.jit, static_argnames='name')
def log_density(name: str, x: jax.Array) -> jax.Array:
  """Exact `log p(x)`: x [B, D] -> [B]."""
  log_w, means, _, inv_chol = (jnp.asarray(a) for a in _parameters(name))
  x = jnp.asarray(x, jnp.float32)
  if x.ndim != 2 or x.shape[1] != means.shape[1]:
    raise BadInput(f'x must have shape [B, {means.shape[1]}]; got {x.shape}.')
  white = jnp.einsum('kij,bkj->bki', inv_chol, x[:, None, :] - means[None])  # [B, K, D]
  log_det = jnp.sum(jnp.log(jnp.diagonal(inv_chol, axis1=1, axis2=2)), -1)  # log|det L^-1|
  log_comp = (-0.5 * jnp.sum(white**2, -1) + log_det
              - 0.5 * means.shape[1] * math.log(2 * math.pi))
  return jax.nn.logsumexp(log_comp + log_w, axis=-1)


def splits(name: str) -> dict:
  """{'train': {'x': [TRAIN_SIZE, D]}, 'test': {'x': [TEST_SIZE, D]}} as float32 numpy."""
  return {'train': {'x': np.asarray(sample(name, jax.random.key(0), TRAIN_SIZE))},
          'test': {'x': np.asarray(sample(name, jax.random.key(1), TEST_SIZE))}}
