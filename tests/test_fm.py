"""The flow-matching loss: its minimiser is the marginal velocity; it compiles once."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flowdistill import closed_form as cf
from flowdistill import fm, paths
from flowdistill.models.apply import to_apply_fn
from flowdistill.models.mlp import MLP

MEAN, STD = jnp.array([2.0, -1.0]), jnp.array([0.5, 1.5])


def _gaussian_batch(key, n=4096):
  return {'x': MEAN + STD * jax.random.normal(key, (n, 2))}


@pytest.mark.parametrize('path', [paths.linear_path(), paths.trig_path()], ids=lambda p: p.name)
def test_training_the_exact_family_recovers_the_data_gaussian(path):
  """Fit (mean, std) of the closed-form velocity by minimising the FM loss."""
  loss_fn = fm.make_loss(cf.make_apply_fn(path), path)
  params = {'mean': jnp.zeros(2), 'std': jnp.ones(2)}
  opt = optax.adam(3e-2)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, key):
    k_data, k_loss = jax.random.split(key)
    grads = jax.grad(lambda p: loss_fn(p, _gaussian_batch(k_data), k_loss)[0])(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  for i in range(600):
    params, opt_state = step(params, opt_state, jax.random.key(i))
  np.testing.assert_allclose(params['mean'], MEAN, atol=0.08)
  np.testing.assert_allclose(jnp.abs(params['std']), STD, atol=0.08)


def test_exact_velocity_has_lower_loss_than_a_perturbed_one():
  path = paths.linear_path()
  loss_fn = fm.make_loss(cf.make_apply_fn(path), path)
  batch, key = _gaussian_batch(jax.random.key(0), 20000), jax.random.key(1)
  exact = loss_fn({'mean': MEAN, 'std': STD}, batch, key)[0]
  for delta in (0.2, -0.2):
    worse = loss_fn({'mean': MEAN + delta, 'std': STD}, batch, key)[0]
    assert worse > exact + 0.01


def test_jitted_loss_does_not_retrace():
  apply_fn, params = to_apply_fn(MLP(2, hidden=16, depth=2, rngs=nnx.Rngs(0)))
  traces = []
  loss_fn = fm.make_loss(apply_fn, paths.linear_path())

  @jax.jit
  def grad_step(params, batch, key):
    traces.append(1)
    return jax.grad(lambda p: loss_fn(p, batch, key)[0])(params)

  for i in range(3):
    grad_step(params, _gaussian_batch(jax.random.key(i), 64), jax.random.key(i))
  assert len(traces) == 1


def test_label_dropout_and_source_batch():
  labels = jnp.arange(1000) % 3
  assert jnp.all(fm.drop_labels(jax.random.key(0), labels, 0.0, 3) == labels)
  dropped = fm.drop_labels(jax.random.key(0), labels, 0.3, 3)
  assert 0.25 < float(jnp.mean(dropped == 3)) < 0.35
  assert jnp.all((dropped == labels) | (dropped == 3))
  seen = {}

  def spy(params, x, t, *, cond=None, train=False):
    seen['x'], seen['t'], seen['cond'] = x, t, cond
    return jnp.zeros_like(x)

  x0 = jnp.full((4, 2), 3.0)
  loss_fn = fm.make_loss(spy, paths.linear_path(), label_dropout=0.5, null_label=7)
  batch = {'x': jnp.zeros((4, 2)), 'x0': x0, 'label': jnp.array([0, 1, 2, 3])}
  loss, _ = loss_fn(None, batch, jax.random.key(0))
  t = seen['t'][:, None]
  np.testing.assert_allclose(seen['x'], (1 - t) * x0, atol=1e-6)  # data-to-data source used
  np.testing.assert_allclose(loss, 9.0, atol=1e-5)  # target x1 - x0 = -3 everywhere
  assert set(np.asarray(seen['cond']).tolist()) <= {0, 1, 2, 3, 7}


def test_label_dropout_needs_a_null_label():
  with pytest.raises(ValueError, match='null_label'):
    fm.make_loss(lambda *a, **k: None, paths.linear_path(), label_dropout=0.1)
