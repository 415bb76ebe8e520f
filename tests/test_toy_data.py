"""Tests for the 2-D toy distributions: layouts, exact densities, seeding."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowdistill.data import sources, toy

KEY = jax.random.key(0)
# The documented 8gaussians layout, restated independently of the module.
CENTRES = 2.0 * math.sqrt(2.0) * np.stack(
    [np.cos(np.arange(8) * np.pi / 4), np.sin(np.arange(8) * np.pi / 4)], axis=-1)
SIGMA = math.sqrt(2.0) / 4.0
N = 80_000  # one shared draw per distribution: each new (name, n) costs a compilation


@functools.cache
def _draw(name):
  """`sample(name, KEY, N)` as float64 numpy [N, 2], drawn once per test session."""
  x = toy.sample(name, KEY, N)
  assert x.shape == (N, 2) and x.dtype == jnp.float32
  return np.asarray(x, np.float64)


@pytest.mark.parametrize('name', toy.NAMES)
def test_sample_finite_with_unit_to_few_std(name):
  x = _draw(name)
  assert np.all(np.isfinite(x))
  std = x.std(axis=0)
  assert np.all((std > 0.8) & (std < 2.6)), std


@pytest.mark.parametrize('name', toy.NAMES)
def test_same_key_same_samples_other_key_other_samples(name):
  np.testing.assert_array_equal(toy.sample(name, KEY, N), _draw(name))
  other = np.asarray(toy.sample(name, jax.random.key(1), N))
  assert np.mean(np.all(other == _draw(name), axis=1)) < 1e-3


def test_smaller_draw_is_a_prefix_also_inside_a_user_jit():
  # Point i depends only on (key, i), not on n.
  small = jax.jit(lambda key: toy.sample('checkerboard', key, 100))(KEY)
  np.testing.assert_array_equal(small, _draw('checkerboard')[:100])


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match='valid names') as err:
    toy.sample('swissroll', KEY, 8)
  assert all(name in str(err.value) for name in toy.NAMES)


def test_checkerboard_support_and_mass_per_square():
  x = _draw('checkerboard')
  logp = toy.log_density('checkerboard', x)
  np.testing.assert_allclose(logp, -math.log(32.0))  # every sample on the support
  assert np.all((x >= -4) & (x < 4))
  cells = np.floor(x / 2).astype(int)
  assert np.all((cells.sum(axis=1) % 2) == 0)
  squares, counts = np.unique(cells, axis=0, return_counts=True)
  assert len(squares) == 8
  np.testing.assert_allclose(counts / N, 1 / 8, atol=0.006)  # ~5 standard errors
  # Uniform within a square: the offset from the square's corner is uniform on [0, 2)^2.
  offset = x - 2 * cells
  np.testing.assert_allclose(offset.mean(axis=0), [1.0, 1.0], atol=0.02)
  np.testing.assert_allclose(offset.var(axis=0), [1 / 3, 1 / 3], atol=0.01)


def test_checkerboard_density_off_support():
  x = jnp.array([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-3.0, -1.0], [4.5, 0.5], [0.5, -4.5]])
  logp = np.asarray(toy.log_density('checkerboard', x))
  np.testing.assert_allclose(logp[:2], -math.log(32.0))
  assert np.all(logp[2:] == -np.inf)


@pytest.mark.parametrize('name', ['8gaussians', 'checkerboard', 'gaussian'])
def test_log_density_integrates_to_one(name):
  h = 0.05
  grid = np.arange(-8.0, 8.0, h) + h / 2  # cell midpoints
  xx, yy = np.meshgrid(grid, grid)
  logp = toy.log_density(name, np.stack([xx, yy], axis=-1))  # [H, W, 2] -> [H, W]
  assert logp.shape == xx.shape
  assert float(jnp.sum(jnp.exp(logp)) * h * h) == pytest.approx(1.0, abs=1e-3)


def test_eight_gaussians_layout_and_density():
  x = _draw('8gaussians')
  sq = ((x[:, None, :] - CENTRES[None]) ** 2).sum(-1)
  nearest = sq.argmin(axis=1)
  np.testing.assert_allclose(np.bincount(nearest, minlength=8) / N, 1 / 8, atol=0.006)
  # Squared distance to the own centre is sigma^2 chi^2_2, of mean 2 sigma^2 and std 2 sigma^2.
  assert sq.min(axis=1).mean() == pytest.approx(2 * SIGMA**2, rel=0.02)
  # The density is the equal mixture of isotropic Gaussians.
  expected = np.log(np.mean(np.exp(-sq / (2 * SIGMA**2)), axis=1) / (2 * np.pi * SIGMA**2))
  np.testing.assert_allclose(toy.log_density('8gaussians', x), expected, rtol=1e-5, atol=1e-5)


def test_gaussian_moments_and_entropy():
  x = _draw('gaussian')
  np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=0.02)
  np.testing.assert_allclose(np.cov(x, rowvar=False), np.eye(2), atol=0.02)
  # Inverse-CDF normals have the right tails: P(|z| > 3.02) = 1 / 395.
  assert np.mean(np.abs(x[:, 0]) > 3.02) == pytest.approx(1 / 395, rel=0.2)
  mean_nll = -float(jnp.mean(toy.log_density('gaussian', x)))
  assert mean_nll == pytest.approx(toy.entropy('gaussian'), abs=0.01)


def test_checkerboard_entropy_is_the_nll_target():
  assert toy.entropy('checkerboard') == pytest.approx(math.log(32.0))
  x = _draw('checkerboard')
  assert -float(jnp.mean(toy.log_density('checkerboard', x))) == pytest.approx(
      toy.entropy('checkerboard'), rel=1e-6)


def test_moons_lie_on_the_two_arcs():
  x = _draw('moons')
  # Arcs of radius 2 around (-1, -0.2) (upper) and (1, 0.8) (lower), noise std 0.2.
  radial = np.stack([np.abs(np.linalg.norm(x - c, axis=1) - 2.0)
                     for c in ([-1.0, -0.2], [1.0, 0.8])])
  assert np.mean(radial.min(axis=0) < 0.6) > 0.99
  # Mean: arc means (-1, -0.2 + 4 / pi) and (1, 0.8 - 4 / pi) averaged.
  np.testing.assert_allclose(x.mean(axis=0), [0.0, 0.3], atol=0.03)


def test_spirals_are_point_symmetric():
  x = _draw('spirals')
  np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=0.03)
  radius = np.linalg.norm(x, axis=1)
  assert np.quantile(radius, 0.999) < 3.7
  # Two arms related by x -> -x: the radius distribution is the same on both half-planes.
  upper, lower = radius[x[:, 1] > 0], radius[x[:, 1] < 0]
  assert abs(np.median(upper) - np.median(lower)) < 0.1


@pytest.mark.parametrize('name', ['moons', 'spirals', 'nope'])
def test_density_and_entropy_unknown_raise(name):
  with pytest.raises(ValueError, match=name):
    toy.log_density(name, jnp.zeros((3, 2)))
  with pytest.raises(ValueError, match=name):
    toy.entropy(name)


def test_log_density_bad_shape():
  with pytest.raises(ValueError, match='x must have shape'):
    toy.log_density('gaussian', jnp.zeros((3, 3)))


def test_sample_pair_moons_to_8gaussians():
  x0, x1 = toy.sample_pair('moons->8gaussians', KEY, N)
  assert x0.shape == x1.shape == (N, 2)
  np.testing.assert_allclose(x0.mean(axis=0), [0.0, 0.3], atol=0.03)  # moons
  # Targets are 8gaussians: each within 5 sigma of some centre.
  sq = ((np.asarray(x1)[:, None, :] - CENTRES[None]) ** 2).sum(-1)
  assert np.all(sq.min(axis=1) < (5 * SIGMA) ** 2)
  a0, a1 = toy.sample_pair('moons->8gaussians', KEY, N)
  np.testing.assert_array_equal(a0, x0)
  np.testing.assert_array_equal(a1, x1)
  b0, _ = toy.sample_pair('moons->8gaussians', jax.random.key(5), N)
  assert not np.allclose(b0, x0)
  # The two sides come from different keys, not from the single-set draws.
  assert not np.allclose(x0, _draw('moons'))


@pytest.mark.parametrize('name', ['moons', 'moons->swissroll', 'moons-8gaussians'])
def test_sample_pair_bad_name(name):
  with pytest.raises(ValueError, match='moons->8gaussians'):
    toy.sample_pair(name, KEY, 8)


@pytest.mark.parametrize('start', [0, 45])
def test_training_batches_are_the_draw_of_their_step_from_any_start(start):
  # The source draws TOY_CHUNK steps per device call; batch k must still be draw k.
  dataset = sources.Dataset(shape=(2,), toy='moons')
  batches = sources.batch_source(dataset, 16, seed=3, conditional=False)(start)
  key = jax.random.key(3)
  for step in range(start, start + sources.TOY_CHUNK + 5):
    np.testing.assert_array_equal(next(batches)['x'],
                                  toy.sample('moons', jax.random.fold_in(key, step), 16))
