"""Tests for the sample-quality metrics, against closed forms."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from flowdistill.eval import metrics

KEY = jax.random.key(0)


def _rng(seed=0):
  return np.random.default_rng(seed)


# --- w2 ---------------------------------------------------------------------------------------


def test_w2_of_translation_is_the_shift():
  x = _rng().normal(size=(300, 3))
  c = np.array([1.0, -2.0, 0.5])
  assert metrics.w2(x, x + c) == pytest.approx(np.linalg.norm(c), rel=1e-10)
  perm = _rng(1).permutation(300)  # the order of the points does not matter
  assert metrics.w2(x, (x + c)[perm]) == pytest.approx(np.linalg.norm(c), rel=1e-10)
  assert metrics.w2(x, x) == 0.0


def test_w2_in_one_dimension_matches_sorted_matching():
  x, y = _rng().normal(size=(500, 1)), _rng(1).exponential(size=(500, 1))
  expected = math.sqrt(np.mean((np.sort(x[:, 0]) - np.sort(y[:, 0])) ** 2))
  assert metrics.w2(x, y) == pytest.approx(expected, rel=1e-10)


def test_w2_matches_brute_force_over_permutations():
  x, y = _rng().normal(size=(6, 2)), _rng(1).normal(size=(6, 2))
  best = min(np.mean(np.sum((x - y[list(p)]) ** 2, axis=1))
             for p in itertools.permutations(range(6)))
  assert metrics.w2(x, y) == pytest.approx(math.sqrt(best), rel=1e-10)


def test_w2_shape_errors_name_the_argument():
  x = np.zeros((10, 2))
  with pytest.raises(ValueError, match='y has 9 points'):
    metrics.w2(x, np.zeros((9, 2)))
  with pytest.raises(ValueError, match='y has dimension 3'):
    metrics.w2(x, np.zeros((10, 3)))
  with pytest.raises(ValueError, match='x must be a 2-D array'):
    metrics.w2(np.zeros(10), x)


# --- sliced_w2 --------------------------------------------------------------------------------


def test_sliced_w2_of_translation():
  d = 4
  x = jnp.asarray(_rng().normal(size=(256, d)), jnp.float32)
  c = jnp.array([1.0, -2.0, 0.5, 1.5])
  value = metrics.sliced_w2(x, x + c, KEY, num_projections=4000)
  # E (theta . c)^2 = |c|^2 / d; the MC relative error of the mean of 4000 is ~2%.
  assert float(value) == pytest.approx(float(jnp.linalg.norm(c)) / math.sqrt(d), rel=0.04)


def test_sliced_w2_in_one_dimension_is_exact_w2():
  x, y = _rng().normal(size=(300, 1)), _rng(1).exponential(size=(300, 1))
  value = metrics.sliced_w2(jnp.asarray(x), jnp.asarray(y), KEY, num_projections=8)
  assert float(value) == pytest.approx(metrics.w2(x, y), rel=1e-5)


def test_sliced_w2_seeding_and_identity():
  x, y = (jnp.asarray(_rng(s).normal(size=(128, 3)), jnp.float32) for s in (0, 1))
  assert float(metrics.sliced_w2(x, x, KEY)) == 0.0
  a = metrics.sliced_w2(x, y, KEY)
  assert float(a) == float(metrics.sliced_w2(x, y, KEY))
  assert float(a) != float(metrics.sliced_w2(x, y, jax.random.key(1)))
  with pytest.raises(ValueError, match='y has 100 points'):
    metrics.sliced_w2(x, y[:100], KEY)


# --- mmd and energy distance ------------------------------------------------------------------


def test_mmd_kernel_convention_on_two_points():
  x, y = jnp.zeros((1, 1)), jnp.full((1, 1), 1.5)
  rbf = lambda h: math.exp(-1.5**2 / (2 * h**2))
  assert float(metrics.mmd(x, y, bandwidths=(1.0,))) == pytest.approx(2 - 2 * rbf(1.0), rel=1e-5)
  assert float(metrics.mmd(x, y, bandwidths=(1.0, 2.0))) == pytest.approx(
      2 - rbf(1.0) - rbf(2.0), rel=1e-5)


def test_mmd_identical_zero_shifted_positive():
  x = jnp.asarray(_rng().normal(size=(400, 2)), jnp.float32)
  y = jnp.asarray(_rng(1).normal(size=(400, 2)), jnp.float32)
  assert abs(float(metrics.mmd(x, x))) < 1e-6
  same = float(metrics.mmd(x, y))  # two samples of one law: only the O(1/n) bias
  shifted = float(metrics.mmd(x, y + jnp.array([1.0, 0.0])))
  assert 0 <= same < 0.005 and shifted > 0.03  # ~0.003 and ~0.04 here
  assert shifted == pytest.approx(float(metrics.mmd(y + jnp.array([1.0, 0.0]), x)), rel=1e-5)
  with pytest.raises(ValueError, match='y has dimension 3'):
    metrics.mmd(x, jnp.zeros((5, 3)))


def test_energy_distance_matches_scipy_in_one_dimension():
  x, y = _rng().normal(size=(200, 1)), _rng(1).normal(0.5, 2.0, size=(150, 1))
  expected = scipy.stats.energy_distance(x[:, 0], y[:, 0]) ** 2
  assert float(metrics.energy_distance(jnp.asarray(x), jnp.asarray(y))) == pytest.approx(
      expected, rel=1e-4)


def test_energy_distance_identical_zero_shifted_positive():
  x = jnp.asarray(_rng().normal(size=(400, 2)), jnp.float32)
  y = jnp.asarray(_rng(1).normal(size=(400, 2)), jnp.float32)
  assert abs(float(metrics.energy_distance(x, x))) < 1e-5
  same = float(metrics.energy_distance(x, y))
  shifted = float(metrics.energy_distance(x, y + jnp.array([1.0, 0.0])))
  assert 0 <= same < 0.02 and shifted > 0.2  # ~0.006 and ~0.4 here
  grad = jax.grad(metrics.energy_distance)(x, x)  # zero distances: finite gradient
  assert bool(jnp.all(jnp.isfinite(grad)))
  with pytest.raises(ValueError, match='x must be a 2-D array'):
    metrics.energy_distance(x[0], y)


# --- straightness -----------------------------------------------------------------------------


def _times(num_steps, ndim=3):
  """The uniform grid t_k = k / T, shaped [T + 1, 1, ...] to broadcast against [B, ...]."""
  return np.linspace(0.0, 1.0, num_steps + 1).reshape((-1,) + (1,) * (ndim - 1))


def test_straightness_of_straight_constant_speed_path_is_zero():
  x0, x1 = _rng().normal(size=(16, 3)), _rng(1).normal(size=(16, 3))
  t = _times(200)
  traj = jnp.asarray((1 - t) * x0 + t * x1, jnp.float32)
  assert abs(float(metrics.straightness(traj))) < 1e-4


def test_straightness_of_curved_and_accelerating_paths():
  t = _times(1000)
  # Half circle of radius 1 at speed pi: int |v|^2 = pi^2, chord 2.
  half_circle = np.concatenate([np.cos(np.pi * t), np.sin(np.pi * t)], axis=-1)  # [T + 1, 1, 2]
  # Straight but accelerating, x_t = t^2 c: int |2 t c|^2 = 4 |c|^2 / 3, chord |c|^2.
  accelerating = t**2 * np.array([[3.0, 4.0]])
  value = metrics.straightness(jnp.asarray(np.concatenate([half_circle, accelerating], axis=1)))
  assert float(value) == pytest.approx(((np.pi**2 - 4) + 25 / 3) / 2, rel=1e-4)


def test_straightness_works_on_image_batches_and_checks_shape():
  t = _times(10, ndim=5)
  traj = jnp.asarray(t * np.ones((2, 4, 4, 1)), jnp.float32)  # [T + 1, B, H, W, C]
  assert abs(float(metrics.straightness(traj))) < 1e-5
  with pytest.raises(ValueError, match='trajectory must have shape'):
    metrics.straightness(jnp.zeros((5, 3)))


# --- Fréchet distance -------------------------------------------------------------------------


def test_gaussian_frechet_diagonal_closed_form():
  mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([2.0, 1.0, 0.0])
  var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
  assert metrics.gaussian_frechet(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(
      expected, rel=1e-12)


def test_gaussian_frechet_full_two_by_two_closed_form():
  # For 2x2 PSD M, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)); here M ~ cov1 cov2.
  cov1 = np.array([[2.0, 0.8], [0.8, 1.0]])
  cov2 = np.array([[1.0, -0.5], [-0.5, 3.0]])
  trace_sqrt = math.sqrt(np.trace(cov1 @ cov2) + 2 * math.sqrt(np.linalg.det(cov1 @ cov2)))
  expected = np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt
  assert metrics.gaussian_frechet(np.zeros(2), cov1, np.zeros(2), cov2) == pytest.approx(
      expected, rel=1e-12)


def test_frechet_distance_of_samples():
  feat = _rng().normal(size=(2000, 8))
  assert abs(metrics.frechet_distance(feat, feat)) < 1e-9
  mu, scale = np.full(8, 0.5), 2.0
  other = mu + scale * _rng(1).normal(size=(20_000, 8))
  # Population value: 8 * 0.5^2 + 8 * (2 - 1)^2 = 10; the estimate is off by O(k / sqrt(n)).
  assert metrics.frechet_distance(feat, other) == pytest.approx(10.0, rel=0.05)


def test_frechet_shape_errors_name_the_argument():
  with pytest.raises(ValueError, match='feat_y has dimension 3'):
    metrics.frechet_distance(np.zeros((10, 2)), np.zeros((10, 3)))
  with pytest.raises(ValueError, match='feat_x needs at least 2 rows'):
    metrics.frechet_distance(np.zeros((1, 2)), np.zeros((10, 2)))
  with pytest.raises(ValueError, match='cov2 must have shape'):
    metrics.gaussian_frechet(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))
