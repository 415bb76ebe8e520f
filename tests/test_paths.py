"""Paths against closed forms: derivatives, endpoints, conversions, Gaussian marginals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowdistill import closed_form as cf
from flowdistill import paths

MEAN, STD = jnp.array([2.0, -1.0, 0.5]), jnp.array([0.5, 1.5, 1.0])
ALL_PATHS = [paths.linear_path(), paths.trig_path(), paths.stochastic_path(0.7),
             paths.ou_path(0.5)]


def _draw(key, n=4096):
  k0, k1, kz, kt = jax.random.split(key, 4)
  x0 = jax.random.normal(k0, (n, 3))
  x1 = MEAN + STD * jax.random.normal(k1, (n, 3))
  return x0, x1, jax.random.normal(kz, (n, 3)), jax.random.uniform(kt, (n,), minval=0.05,
                                                                    maxval=0.95)


@pytest.mark.parametrize('path', ALL_PATHS, ids=lambda p: p.name)
def test_time_derivative_matches_finite_difference(path):
  x0, x1, z, t = _draw(jax.random.key(0), 64)
  z = z if path.gamma is not None else None
  _, dxt = path.sample(x0, x1, t, z)
  h = 1e-3
  fd = (path.sample(x0, x1, t + h, z)[0] - path.sample(x0, x1, t - h, z)[0]) / (2 * h)
  np.testing.assert_allclose(dxt, fd, atol=2e-3)


def test_endpoints():
  x0, x1, z, _ = _draw(jax.random.key(1), 16)
  for path in ALL_PATHS[:3]:
    zz = z if path.gamma is not None else None
    np.testing.assert_allclose(path.sample(x0, x1, 0.0, zz)[0], x0, atol=1e-6)
    np.testing.assert_allclose(path.sample(x0, x1, 1.0, zz)[0], x1, atol=1e-6)
  ou = paths.ou_path(0.3)
  np.testing.assert_allclose(ou.sample(x0, x1, 1.0)[0], x1, atol=1e-5)
  np.testing.assert_allclose(ou.sample(x0, x1, 0.0)[0], paths.ou_transition(x1, 0.3, x0),
                             atol=1e-5)


@pytest.mark.parametrize('path', ALL_PATHS, ids=lambda p: p.name)
def test_closed_form_velocity_is_the_conditional_mean(path):
  """Regress d/dt x_t on x_t per coordinate at fixed t: slope and intercept are the closed
  form's (the marginal velocity of a Gaussian problem is affine in x)."""
  n, t = 200_000, 0.37
  k0, k1, kz = jax.random.split(jax.random.key(2), 3)
  x0 = jax.random.normal(k0, (n, 3))
  x1 = MEAN + STD * jax.random.normal(k1, (n, 3))
  z = jax.random.normal(kz, (n, 3)) if path.gamma is not None else None
  xt, dxt = path.sample(x0, x1, jnp.full((n,), t), z)
  for d in range(3):
    slope, intercept = np.polyfit(np.asarray(xt[:, d]), np.asarray(dxt[:, d]), 1)
    probe = jnp.array([[0.0] * 3, [1.0] * 3])
    v = cf.velocity(path, probe, t, MEAN, STD)
    np.testing.assert_allclose(intercept, v[0, d], atol=0.02)
    np.testing.assert_allclose(slope, v[1, d] - v[0, d], atol=0.02)


@pytest.mark.parametrize('path', ALL_PATHS, ids=lambda p: p.name)
def test_conversions_match_gaussian_closed_forms(path):
  x = jax.random.normal(jax.random.key(3), (32, 3)) * 2
  t = jnp.linspace(0.1, 0.9, 32)
  v = cf.velocity(path, x, t, MEAN, STD)
  np.testing.assert_allclose(path.to_score(v, x, t), cf.score(path, x, t, MEAN, STD),
                             rtol=1e-4, atol=1e-4)
  mu, var = cf._moments(path, t, x, MEAN, STD)[:2]
  _, b, *_ = (paths.expand_time(c, x) for c in path.coefficients(t))
  x1_hat = MEAN + b * STD**2 / var * (x - mu)  # E[x1 | x_t = x] for Gaussians
  np.testing.assert_allclose(path.to_denoiser(v, x, t), x1_hat, rtol=1e-4, atol=1e-4)
  for to, frm in [(path.to_denoiser, path.from_denoiser), (path.to_noise, path.from_noise),
                  (path.to_score, path.from_score)]:
    np.testing.assert_allclose(frm(to(v, x, t), x, t), v, rtol=1e-4, atol=1e-4)


def test_linear_path_formulas_from_methods():
  """METHODS.md: x1_hat = x + (1 - t) v, x0_hat = x - t v, score = (t v - x) / (1 - t)."""
  path = paths.linear_path()
  x, v = jax.random.normal(jax.random.key(4), (2, 8, 3))
  t = jnp.linspace(0.05, 0.95, 8)[:, None]
  np.testing.assert_allclose(path.to_denoiser(v, x, t[:, 0]), x + (1 - t) * v, atol=1e-5)
  np.testing.assert_allclose(path.to_noise(v, x, t[:, 0]), x - t * v, atol=1e-5)
  np.testing.assert_allclose(path.to_score(v, x, t[:, 0]), (t * v - x) / (1 - t), atol=1e-4)


def test_score_clipping_keeps_it_finite_at_the_data_end():
  path = paths.linear_path()
  x, v = jnp.ones((2, 3)), jnp.ones((2, 3))
  assert not np.all(np.isfinite(path.to_score(v, x, jnp.ones(2))))
  assert np.all(np.isfinite(path.to_score(v, x, jnp.ones(2), eps=1e-3)))


def test_bad_inputs_name_the_argument():
  path = paths.linear_path()
  x = jnp.zeros((4, 2))
  with pytest.raises(ValueError, match='`t` must lie in'):
    path.sample(x, x, jnp.full((4,), 1.5))
  with pytest.raises(ValueError, match='same shape'):
    path.sample(x, jnp.zeros((4, 3)), 0.5)
  with pytest.raises(ValueError, match='batch size'):
    path.sample(x, x, jnp.full((3,), 0.5))
  with pytest.raises(ValueError, match='Unknown path'):
    paths.get_path('curvy')
  with pytest.raises(ValueError, match='pass `z`'):
    paths.stochastic_path().sample(x, x, 0.5)
