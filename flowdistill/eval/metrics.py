"""Sample-quality metrics: transport distances, kernel two-sample statistics, path straightness
and the Fréchet distance between Gaussian fits of features.

`w2`, `frechet_distance` and `gaussian_frechet` run on the host in float64 (NumPy / SciPy) and
return Python floats. `sliced_w2`, `mmd`, `energy_distance` and `straightness` are jitted JAX
functions that return scalar arrays. Point clouds are [n, d] arrays, one point per row.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
import scipy.spatial.distance


def _check_clouds(x, y, names=('x', 'y'), *, same_size: bool):
  """Raises ValueError unless `x` [n, d] and `y` [m, d] are 2-D with equal d (and n = m)."""
  for arr, name in zip((x, y), names):
    if arr.ndim != 2:
      raise ValueError(f'{name} must be a 2-D array [n, d]; got shape {tuple(arr.shape)}.')
  if y.shape[1] != x.shape[1]:
    raise ValueError(
        f'{names[1]} has dimension {y.shape[1]} but {names[0]} has {x.shape[1]}; the point '
        'clouds must live in the same space.')
  if same_size and y.shape[0] != x.shape[0]:
    raise ValueError(
        f'{names[1]} has {y.shape[0]} points but {names[0]} has {x.shape[0]}; pass clouds of '
        'equal size (subsample the larger one).')


def w2(x, y) -> float:
  """Exact 2-Wasserstein distance between two empirical measures of equal size.

  With uniform weights and n = m points, an optimal plan is a permutation, found by the
  Hungarian algorithm on the squared Euclidean costs: O(n^3) time, O(n^2) memory, a few seconds
  for n of a few thousand. Clouds of different sizes are rejected rather than silently
  subsampled, so that the caller chooses which points to compare.

  Args:
    x: points [n, d].
    y: points [n, d].

  Returns:
    `sqrt(min over permutations s of mean_i |x_i - y_s(i)|^2)`, a Python float.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  _check_clouds(x, y, same_size=True)
  cost = scipy.spatial.distance.cdist(x, y, 'sqeuclidean')
  rows, cols = scipy.optimize.linear_sum_assignment(cost)
  return float(np.sqrt(cost[rows, cols].mean()))


@functools.partial(jax.jit, static_argnames='num_projections')
def sliced_w2(x, y, key, num_projections: int = 128) -> jax.Array:
  """Monte-Carlo sliced 2-Wasserstein distance between two clouds of equal size.

  Projects both clouds on `num_projections` random unit directions (uniform on the sphere);
  in 1-D the optimal matching pairs sorted values.

  Args:
    x: points [n, d].
    y: points [n, d].
    key: a `jax.random` key for the directions.
    num_projections: number of directions (static under `jit`).

  Returns:
    Scalar `sqrt(mean over directions theta of W2^2(theta . x, theta . y))`. For d = 1 it equals
    `w2(x, y)`; for a translation `y = x + c` its square is `mean (theta . c)^2 ~ |c|^2 / d`.
  """
  _check_clouds(x, y, same_size=True)
  theta = jax.random.normal(key, (num_projections, x.shape[1]))
  theta = theta / jnp.linalg.norm(theta, axis=-1, keepdims=True)
  proj_x = jnp.sort(jnp.matmul(x, theta.T, precision=jax.lax.Precision.HIGHEST), axis=0)
  proj_y = jnp.sort(jnp.matmul(y, theta.T, precision=jax.lax.Precision.HIGHEST), axis=0)
  return jnp.sqrt(jnp.mean((proj_x - proj_y)**2))


def _sq_dists(a, b):
  """Squared Euclidean distances [n, m] between rows of a [n, d] and b [m, d], clipped at 0."""
  cross = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
  sq = jnp.sum(a**2, axis=-1)[:, None] + jnp.sum(b**2, axis=-1)[None, :] - 2.0 * cross
  return jnp.maximum(sq, 0.0)


def _centre(x, y):
  """Shifts both clouds by their joint mean: distances are unchanged, rounding errors shrink."""
  mean = jnp.mean(jnp.concatenate([x, y]), axis=0)
  return x - mean, y - mean


@jax.jit
def mmd(x, y, bandwidths=(0.1, 0.3, 1.0, 3.0, 10.0)) -> jax.Array:
  """Squared maximum mean discrepancy with a multi-bandwidth RBF kernel (biased estimate).

  The kernel is `k(a, b) = mean_h exp(-|a - b|^2 / (2 h^2))` over the bandwidths `h`; pick them on
  the scale of the data's pairwise distances. The estimate is the biased V-statistic
  `mean K_xx + mean K_yy - 2 mean K_xy` (diagonals included): it is the exact squared MMD
  between the two empirical measures, so it is >= 0 and 0 for identical clouds (up to rounding),
  at the price of an O(1/n) positive bias. Memory is O((n + m)^2) whatever the number of
  bandwidths: the pairwise distances are shared and the bandwidths are mapped over in turn.

  Args:
    x: points [n, d].
    y: points [m, d].
    bandwidths: RBF length scales, a sequence of floats.

  Returns:
    Scalar squared MMD.
  """
  _check_clouds(x, y, same_size=False)
  x, y = _centre(x, y)
  d_xx, d_yy, d_xy = _sq_dists(x, x), _sq_dists(y, y), _sq_dists(x, y)

  def mmd_sq(bandwidth):
    k = lambda d: jnp.mean(jnp.exp(-d / (2.0 * bandwidth**2)))
    return k(d_xx) + k(d_yy) - 2.0 * k(d_xy)

  return jnp.mean(jax.lax.map(mmd_sq, jnp.asarray(bandwidths, jnp.float32)))


def _safe_sqrt(sq):
  """sqrt with a zero (not NaN) gradient at 0."""
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


@jax.jit
def energy_distance(x, y) -> jax.Array:
  """Energy distance of Székely and Rizzo, `2 E|X - Y| - E|X - X'| - E|Y - Y'|` (biased estimate).

  The estimate is the V-statistic (diagonals included): the exact energy distance between the
  two empirical measures, so it is >= 0 and 0 for identical clouds (up to rounding). It is a
  squared quantity:
  in 1-D it equals `2 int (F - G)^2`, the square of `scipy.stats.energy_distance`.

  Args:
    x: points [n, d].
    y: points [m, d].

  Returns:
    Scalar energy distance.
  """
  _check_clouds(x, y, same_size=False)
  x, y = _centre(x, y)
  mean_dist = lambda a, b: jnp.mean(_safe_sqrt(_sq_dists(a, b)))
  return 2.0 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)


@jax.jit
def straightness(trajectory) -> jax.Array:
  """Straightness of ODE paths (Liu et al., 2022): `E[int_0^1 |v_t|^2 dt - |x_1 - x_0|^2]`.

  Equal to `E int_0^1 |(x_1 - x_0) - v_t|^2 dt`; 0 exactly for straight constant-speed paths and
  > 0 otherwise. The velocity is the finite difference of consecutive states, so the integral is
  `T sum_k |x_{k+1} - x_k|^2`, which is >= `|x_T - x_0|^2` for every path.

  Args:
    trajectory: states [T + 1, B, ...] on the uniform grid `t_k = k / T`, T >= 1.

  Returns:
    Scalar straightness, averaged over the batch.
  """
  if trajectory.ndim < 3 or trajectory.shape[0] < 2:
    raise ValueError(
        'trajectory must have shape [T + 1, B, ...] with T >= 1 (time first, then batch); got '
        f'{tuple(trajectory.shape)}.')
  num_steps = trajectory.shape[0] - 1
  feature_axes = tuple(range(2, trajectory.ndim))
  steps = jnp.diff(trajectory, axis=0)
  kinetic = num_steps * jnp.sum(steps**2, axis=(0,) + feature_axes)
  chord = jnp.sum((trajectory[-1] - trajectory[0])**2, axis=tuple(a - 1 for a in feature_axes))
  return jnp.mean(kinetic - chord)


def _psd_sqrt(matrix):
  """Symmetric square root of a symmetric PSD matrix; negative rounding eigenvalues -> 0."""
  eigvals, eigvecs = np.linalg.eigh(matrix)
  return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def gaussian_frechet(mu1, cov1, mu2, cov2) -> float:
  """Squared Fréchet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2).

  `|mu1 - mu2|^2 + tr(cov1 + cov2 - 2 (cov1^1/2 cov2 cov1^1/2)^1/2)`, the quantity reported as
  FID. The square roots are taken by symmetric eigendecompositions, so no complex parts arise;
  eigenvalues that rounding makes slightly negative count as 0.

  Args:
    mu1: mean [k].
    cov1: covariance [k, k], symmetric positive semi-definite.
    mu2: mean [k].
    cov2: covariance [k, k], symmetric positive semi-definite.

  Returns:
    The squared distance, a Python float.
  """
  mu1, cov1, mu2, cov2 = (np.asarray(a, np.float64) for a in (mu1, cov1, mu2, cov2))
  if mu1.ndim != 1:
    raise ValueError(f'mu1 must be a vector [k]; got shape {mu1.shape}.')
  k = mu1.shape[0]
  for arr, name, shape in ((cov1, 'cov1', (k, k)), (mu2, 'mu2', (k,)), (cov2, 'cov2', (k, k))):
    if arr.shape != shape:
      raise ValueError(f'{name} must have shape {shape} to match mu1 [{k}]; got {arr.shape}.')
  root1 = _psd_sqrt((cov1 + cov1.T) / 2.0)
  cross = root1 @ cov2 @ root1
  cross_eigvals = np.linalg.eigvalsh((cross + cross.T) / 2.0)
  trace_sqrt = np.sum(np.sqrt(np.clip(cross_eigvals, 0.0, None)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt)


def frechet_distance(feat_x, feat_y) -> float:
  """Squared Fréchet distance between Gaussian fits of two feature sets (FID on given features).

  Means and unbiased covariances (`ddof = 1`) of each set, then `gaussian_frechet`.

  Args:
    feat_x: features [n, k], n >= 2.
    feat_y: features [m, k], m >= 2.

  Returns:
    The squared distance, a Python float.
  """
  feat_x = np.asarray(feat_x, np.float64)
  feat_y = np.asarray(feat_y, np.float64)
  _check_clouds(feat_x, feat_y, ('feat_x', 'feat_y'), same_size=False)
  for feat, name in ((feat_x, 'feat_x'), (feat_y, 'feat_y')):
    if feat.shape[0] < 2:
      raise ValueError(f'{name} needs at least 2 rows to fit a covariance; got {feat.shape[0]}.')
  return gaussian_frechet(
      feat_x.mean(axis=0), np.atleast_2d(np.cov(feat_x, rowvar=False)),
      feat_y.mean(axis=0), np.atleast_2d(np.cov(feat_y, rowvar=False)))


def moment_drift(x, y) -> dict[str, float]:
  """How far the first two moments of `x` [n, ...] are from those of `y` [m, ...] (flattened):
  `{'mean_drift': ||mean_x - mean_y||, 'cov_drift': ||cov_x - cov_y||_F}` (float64, host)."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  y = np.asarray(y, np.float64).reshape(len(y), -1)
  _check_clouds(x, y, same_size=False)
  return {'mean_drift': float(np.linalg.norm(x.mean(0) - y.mean(0))),
          'cov_drift': float(np.linalg.norm(np.cov(x, rowvar=False) - np.cov(y, rowvar=False)))}
