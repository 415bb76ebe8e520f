"""Tests of the noise-data couplings against scipy, sorting in 1-D and brute force."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from flowdistill import errors, fm, paths
from flowdistill.couplings import couple, ot_cost, pair_on_host

KEY = jax.random.PRNGKey(0)


def _batches(seed, batch, dim, shift=1.0):
  """Noise [batch, dim] and a shifted, stretched 'data' batch [batch, dim] (numpy float32)."""
  rng = np.random.default_rng(seed)
  x0 = rng.normal(size=(batch, dim)).astype(np.float32)
  x1 = (shift + rng.normal(size=(batch, dim)) * np.linspace(2.0, 0.5, dim)).astype(np.float32)
  return x0, x1


@functools.partial(jax.jit, static_argnames=('method', 'block_size', 'num_iters', 'solver'))
def _jit_couple(x0, x1, key, labels=None, labels0=None, **kwargs):
  return couple(x0, x1, key, labels=labels, labels0=labels0, **kwargs)


def _source_index(x0, paired):
  """Row index into x0 [B, D] of each row of `paired` [B, D] (rows of x0 are distinct)."""
  match = np.all(np.asarray(paired)[:, None] == np.asarray(x0)[None], axis=-1)
  assert np.all(match.sum(1) == 1), 'a paired row is not a row of x0'
  return match.argmax(1)


def _scipy_perm(x0, x1):
  """Exact OT in float64: perm[j] is the x0 row paired with x1 row j."""
  cost = ((x1[:, None].astype(np.float64) - x0[None])**2).sum(-1)
  return scipy.optimize.linear_sum_assignment(cost)[1]


def test_independent_is_identity():
  x0, x1 = _batches(0, 16, 3)
  labels = jnp.arange(16)
  y0, y1, lab = _jit_couple(x0, x1, KEY, labels, method='independent')
  np.testing.assert_array_equal(y0, x0)
  np.testing.assert_array_equal(y1, x1)
  np.testing.assert_array_equal(lab, labels)


def test_exact_is_permutation_of_x0_and_keeps_x1():
  x0, x1 = _batches(1, 32, 2)
  x0i = x0.reshape(32, 1, 2).repeat(3, 1)  # [B, 1, 2] -> [B, 3, 2]: works on any shape.
  x1i = x1.reshape(32, 1, 2).repeat(3, 1)
  labels = jnp.zeros(32, jnp.int32)
  y0, y1, lab = _jit_couple(x0i, x1i, KEY, labels, method='exact')
  assert y0.shape == x0i.shape
  np.testing.assert_array_equal(y1, x1i)
  np.testing.assert_array_equal(lab, labels)
  index = _source_index(x0, y0[:, 0])
  assert sorted(index) == list(range(32))
  np.testing.assert_array_equal(index, _scipy_perm(x0, x1))


def test_exact_1d_pairs_sorted_with_sorted():
  rng = np.random.default_rng(2)
  batch = 40
  # Values at least 0.5 apart, so no pairing is a near-tie in float32.
  x0 = rng.permutation(np.cumsum(rng.uniform(0.5, 1.5, batch)) - 20).astype(np.float32)
  x1 = rng.permutation(np.cumsum(rng.uniform(0.5, 1.5, batch)) - 5).astype(np.float32)
  y0, _, _ = _jit_couple(x0[:, None], x1[:, None], KEY, method='exact')
  expected = np.sort(x0)[np.argsort(np.argsort(x1))]
  np.testing.assert_array_equal(np.asarray(y0)[:, 0], expected)


def test_exact_cost_is_minimal():
  x0, x1 = _batches(3, 48, 2)
  y0, _, _ = _jit_couple(x0, x1, KEY, method='exact')
  best = float(ot_cost(y0, x1))
  assert best < float(ot_cost(x0, x1))
  rng = np.random.default_rng(3)
  random_costs = [float(ot_cost(x0[rng.permutation(48)], x1)) for _ in range(50)]
  assert best <= min(random_costs)


def _pair_cost(x0, x1, perm):
  """Summed float64 squared distance of the pairs (x0[perm[j]], x1[j])."""
  return float(((x1.astype(np.float64) - x0[perm])**2).sum())


@pytest.mark.parametrize('seed', [4, 5, 6])
@pytest.mark.parametrize('solver', ['scipy', 'auction'])
def test_exact_equals_scipy(seed, solver):
  x0, x1 = _batches(seed, 64, 2)
  y0, _, _ = _jit_couple(x0, x1, KEY, method='exact', solver=solver)
  index, best = _source_index(x0, y0), _scipy_perm(x0, x1)
  if solver == 'scipy':
    np.testing.assert_array_equal(index, best)
  else:  # Certified within its default relative gap of 1e-3.
    assert _pair_cost(x0, x1, best) <= _pair_cost(x0, x1, index) <= (
        (1 + 1e-3) * _pair_cost(x0, x1, best))


def test_sinkhorn_small_epsilon_approaches_exact():
  x0, x1 = _batches(7, 64, 2)
  exact, _, _ = _jit_couple(x0, x1, KEY, method='exact', block_size=32)
  exact_cost = float(ot_cost(exact, x1))
  costs = {}
  for epsilon in (1e-3, 1.0):  # Traced: one compilation.
    y0, y1, _ = _jit_couple(x0, x1, KEY, method='sinkhorn', block_size=32, epsilon=epsilon,
                           num_iters=2000)
    np.testing.assert_array_equal(y1, x1)
    index = _source_index(x0, y0)  # Every paired row is a row of x0 ...
    np.testing.assert_array_equal(index // 32, np.arange(64) // 32)  # ... of the same block.
    costs[epsilon] = float(ot_cost(y0, x1))
  # A sampled pairing may repeat x0 rows, so its cost can also fall below the exact one.
  assert abs(costs[1e-3] / exact_cost - 1) < 0.03
  assert costs[1.0] > 1.2 * exact_cost  # Large epsilon: towards the independent coupling.


@pytest.mark.parametrize('solver', ['scipy', 'auction'])
def test_exact_blocks_solve_each_block(solver):
  x0, x1 = _batches(8, 96, 2)
  y0, _, _ = _jit_couple(x0, x1, KEY, method='exact', block_size=32, solver=solver)
  index = _source_index(x0, y0)
  for b in range(3):
    rows = slice(32 * b, 32 * (b + 1))
    np.testing.assert_array_equal(index[rows] // 32, b)
    got = _pair_cost(x0[rows], x1[rows], index[rows] - 32 * b)
    best = _pair_cost(x0[rows], x1[rows], _scipy_perm(x0[rows], x1[rows]))
    assert best <= got <= (1 + 1e-3) * best


@pytest.mark.parametrize('method,solver', [('exact', 'scipy'), ('exact', 'auction'),
                                           ('sinkhorn', 'auction')])
def test_within_class(method, solver):
  x0, x1 = _batches(9, 60, 2)
  rng = np.random.default_rng(9)
  labels = rng.integers(0, 4, 60)
  y0, _, lab = _jit_couple(x0, x1, KEY, jnp.asarray(labels), method=method, block_size=30,
                           solver=solver)
  np.testing.assert_array_equal(lab, labels)
  index = _source_index(x0, y0)
  np.testing.assert_array_equal(labels[index], labels)  # x0 row i belongs to class labels[i].
  if method == 'exact':
    for block in (slice(0, 30), slice(30, 60)):
      for c in range(4):
        rows = np.flatnonzero(labels[block] == c) + block.start
        best = _pair_cost(x0, x1[rows], rows[_scipy_perm(x0[rows], x1[rows])])
        assert best <= _pair_cost(x0, x1[rows], index[rows]) <= (1 + 1e-3) * best



@pytest.mark.parametrize('block_size', [None, 32])
def test_pair_on_host_equals_in_step_exact(block_size):
  x0, x1 = _batches(10, 96, 3)
  labels = np.random.default_rng(10).integers(0, 3, 96)
  for lab in (None, labels):
    in_step, _, _ = _jit_couple(x0, x1, KEY, None if lab is None else jnp.asarray(lab),
                                method='exact', block_size=block_size, solver='scipy')
    np.testing.assert_array_equal(pair_on_host(x0, x1, labels=lab, block_size=block_size),
                                  in_step)

def test_within_class_with_source_labels():
  x0, x1 = _batches(10, 40, 3)
  labels = np.repeat(np.arange(4), 10)
  labels0 = np.random.default_rng(10).permutation(labels)
  y0, _, _ = _jit_couple(x0, x1, KEY, jnp.asarray(labels), jnp.asarray(labels0),
                         method='exact')
  np.testing.assert_array_equal(labels0[_source_index(x0, y0)], labels)


def test_sharded_vmapped_and_differentiable():
  x0, x1 = _batches(11, 64, 2)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('data',))  # As train/parallel.py.
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  y0, _, _ = _jit_couple(jax.device_put(x0, sharding), jax.device_put(x1, sharding), KEY,
                         method='exact', block_size=16)
  np.testing.assert_array_equal(y0, _jit_couple(x0, x1, KEY, method='exact', block_size=16)[0])

  batched = jax.jit(jax.vmap(lambda a, b: couple(a, b, KEY, method='exact')[0]))(
      x0.reshape(4, 16, 2), x1.reshape(4, 16, 2))
  np.testing.assert_array_equal(batched.reshape(64, 2), y0)

  grad = jax.jit(jax.grad(lambda a: ot_cost(*couple(a, x1, KEY, method='exact')[:2])))(x0)
  y0 = _jit_couple(x0, x1, KEY, method='exact')[0]
  np.testing.assert_allclose(grad[_source_index(x0, y0)], 2 * (y0 - x1) / 64, rtol=1e-5,
                             atol=1e-6)


def test_errors():
  x0, x1 = _batches(12, 8, 2)
  with pytest.raises(errors.BadInput, match=r"`method`='hungarian'.*'exact'"):
    couple(x0, x1, KEY, method='hungarian')
  with pytest.raises(errors.BadInput, match=r"`solver`='lapjv'.*'auction'"):
    couple(x0, x1, KEY, method='exact', solver='lapjv')
  with pytest.raises(ValueError, match=r'x0 \(8, 2\) and x1 \(6, 2\)'):
    couple(x0, x1[:6], KEY, method='exact')
  with pytest.raises(ValueError, match=r'`block_size`=3 .* batch size 8'):
    couple(x0, x1, KEY, method='exact', block_size=3)
  with pytest.raises(ValueError, match='`labels` must have shape'):
    couple(x0, x1, KEY, method='exact', labels=jnp.zeros(7, jnp.int32))
  with pytest.raises(ValueError, match='`labels0`.*needs `labels`'):
    couple(x0, x1, KEY, method='exact', labels0=jnp.zeros(8, jnp.int32))


def _apply_fn(params, x, t, *, cond=None, train=False):
  return x * params['w']


@pytest.mark.parametrize('kwargs,match', [
    ({'coupling': 'exactt'}, r"`method`='exactt'.*\('independent', 'exact', 'sinkhorn'\)"),
    ({'coupling': 'exact', 'coupling_kwargs': {'solver': 'hungarian'}},
     r"`solver`='hungarian'.*\('auction', 'scipy'\)"),
    ({'coupling': 'exact', 'coupling_kwargs': {'ot_tolerance': 1e-3}},
     r"Unknown `coupling_kwargs` \['ot_tolerance'\].*'ot_tol'"),
    ({'time_distribution': 'logitnormal'}, r"`time_distribution`='logitnormal'.*'logit_normal'"),
])
def test_loss_refuses_unknown_names_when_built(kwargs, match):
  with pytest.raises(errors.BadInput, match=match):
    fm.make_loss(_apply_fn, paths.get_path('linear'), **kwargs)


def test_non_finite_samples_under_jit_are_paired_as_given_and_refused_eagerly():
  x0, x1 = _batches(13, 8, 2)
  x1[2, 0] = np.nan
  y0, _, _ = _jit_couple(x0, x1, KEY, method='exact')
  np.testing.assert_array_equal(y0, x0)
  with pytest.raises(errors.BadInput, match='NaN or -inf'):
    couple(x0, x1, KEY, method='exact')
