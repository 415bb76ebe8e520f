"""Flow map matching against the exact Gaussian flow map."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flowdistill import closed_form as cf
from flowdistill import paths
from flowdistill.fewstep import flow_map
from flowdistill.models import MLP, to_apply_fn

MEAN, STD = jnp.array([2.0, -1.0]), jnp.array([0.5, 1.5])
EXACT = {'mean': MEAN, 'std': STD}
WRONG = {'mean': MEAN + 0.3, 'std': STD * 1.2}
PATH = paths.linear_path()
APPLY = cf.make_apply_fn(PATH)


def _batch(key, n=2048):
  return {'x': MEAN + STD * jax.random.normal(key, (n, 2))}


@pytest.mark.parametrize('make', [
    lambda: flow_map.lmd_loss(APPLY, APPLY, PATH),
    lambda: flow_map.lmd_loss(APPLY, APPLY, PATH, scheme='uniform'),
    lambda: flow_map.emd_loss(APPLY, APPLY, PATH),
    lambda: flow_map.emd_loss(APPLY, APPLY, PATH, scheme='band', band=0.3),
    lambda: flow_map.pfmm_loss(APPLY, APPLY, PATH, teacher_jumps=3),
], ids=['lmd', 'lmd-uniform', 'emd', 'emd-band', 'pfmm'])
def test_distillation_losses_vanish_exactly_at_the_exact_map(make):
  loss_fn = make()
  batch, key = _batch(jax.random.key(0)), jax.random.key(1)
  exact, _ = loss_fn(EXACT, batch, key, EXACT)
  wrong, _ = loss_fn(WRONG, batch, key, EXACT)
  assert exact < 1e-6 and wrong > 1e-2, (exact, wrong)


def test_direct_fmm_is_minimal_and_invertible_at_the_exact_map():
  loss_fn = flow_map.fmm_loss(APPLY, PATH)
  batch, key = _batch(jax.random.key(0), 8192), jax.random.key(1)
  exact, metrics = loss_fn(EXACT, batch, key)
  wrong, _ = loss_fn(WRONG, batch, key)
  assert metrics['invertibility'] < 1e-8
  assert wrong > exact + 0.05


@pytest.mark.parametrize('steps', [1, 2, 7])
def test_sampler_with_the_exact_map_is_exact_at_any_step_count(steps):
  x, info = flow_map.sample(APPLY, EXACT, jax.random.key(3), 256, (2,), steps=steps)
  x0 = flow_map.ode.noise(jax.random.key(3), 256, (2,))
  np.testing.assert_allclose(x, cf.flow_map(PATH, x0, 0.0, 1.0, MEAN, STD), atol=1e-4)
  assert info['nfe'] == steps


def test_jump_likelihood_and_tangent_velocity_match_closed_forms():
  x = MEAN + STD * jax.random.normal(jax.random.key(4), (64, 2))
  for grid in (jnp.array([0.0, 1.0]), jnp.array([0.0, 0.3, 0.7, 1.0])):
    logp, info = flow_map.log_likelihood_jumps(APPLY, EXACT, x, grid)
    np.testing.assert_allclose(logp, cf.log_density(PATH, x, 1.0, MEAN, STD), atol=1e-3)
    assert info['inverse_error'] < 1e-4
  v = flow_map.tangent_velocity(APPLY)(EXACT, x, jnp.full(64, 0.4))
  np.testing.assert_allclose(v, cf.velocity(PATH, x, 0.4, MEAN, STD), atol=1e-5)


def test_series_logdet_for_images_matches_the_exact_jacobian():
  # The closed-form map is diagonal, so Rademacher probes leave only the series truncation.
  x = MEAN + STD * jax.random.normal(jax.random.key(4), (64, 2))
  grid = jnp.array([0.0, 0.3, 0.7, 1.0])
  probes = flow_map.ode.divergence_probes(jax.random.key(5), 1, x)
  logp, _ = flow_map.log_likelihood_jumps(APPLY, EXACT, x, grid, logdet='series', probes=probes,
                                      terms=12)
  np.testing.assert_allclose(logp, cf.log_density(PATH, x, 1.0, MEAN, STD), atol=1e-3)
  # A random two-time network (full Jacobians): unbiased within the Hutchinson error.
  apply_fn, params = to_apply_fn(MLP(2, hidden=32, depth=2, two_time=True, rngs=nnx.Rngs(1)))
  leaves, tree = jax.tree.flatten(params)  # the output layer starts at zero: perturb it all
  keys = jax.random.split(jax.random.key(7), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.3 * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])
  map_fn = lambda y: flow_map.flow_map(apply_fn, params, y, 0.4, 0.6)
  exact = jax.vmap(lambda y: jnp.linalg.slogdet(jax.jacfwd(
      lambda z: map_fn(z[None])[0])(y))[1])(x[:4])
  probes = flow_map.ode.divergence_probes(jax.random.key(6), 4000, x[:4])
  per_probe = jax.vmap(lambda p: flow_map.logdet_series(map_fn, x[:4], p[None]))(probes)
  stderr = per_probe.std(0) / np.sqrt(probes.shape[0])
  assert np.all(np.abs(per_probe.mean(0) - exact) < 4 * stderr + 1e-4), (per_probe.mean(0),
                                                                        exact, stderr)
  assert float(jnp.abs(exact).max()) > 1e-2


def test_trained_lmd_map_has_small_semigroup_and_invertibility_residuals():
  apply_fn, params = to_apply_fn(MLP(2, hidden=64, depth=3, two_time=True, rngs=nnx.Rngs(0)))
  loss_fn = flow_map.lmd_loss(apply_fn, APPLY, PATH, scheme='uniform')
  opt = optax.adam(optax.cosine_decay_schedule(3e-3, 1500))
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, key):
    k_data, k_loss = jax.random.split(key)
    grads = jax.grad(lambda p: loss_fn(p, _batch(k_data, 256), k_loss, EXACT)[0])(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for i in range(1500):
    params, opt_state = step(params, opt_state, jax.random.key(i))
  x = jax.random.normal(jax.random.key(7), (512, 2))
  s, t, u = 0.1, 0.5, 0.9
  X = lambda x, a, b: flow_map.flow_map(apply_fn, params, x, a, b)
  rms = lambda r: jnp.sqrt(jnp.mean(r**2))
  semigroup = rms(X(X(x, s, t), t, u) - X(x, s, u))
  inverse = rms(X(X(x, s, u), u, s) - x)
  scale = rms(X(x, s, u) - x)
  assert semigroup < 0.02 * scale and inverse < 0.05 * scale, (semigroup, inverse, scale)
  exact = cf.flow_map(PATH, x, 0.0, 1.0, MEAN, STD)
  two_step = flow_map.jump(apply_fn, params, x, jnp.array([0.0, 0.5, 1.0]))[0]
  assert rms(two_step - exact) < 0.25 * rms(x - exact)  # a short run: well on its way


def test_bad_time_scheme_is_named():
  with pytest.raises(ValueError, match='Unknown time scheme'):
    flow_map.lmd_loss(APPLY, APPLY, PATH, scheme='diagonal')
