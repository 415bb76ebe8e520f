"""Tests of the on-device auction assignment against scipy's exact solver."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from flowdistill import fm, paths
from flowdistill.auction import auction_assignment


@functools.partial(jax.jit, static_argnames=('tol',))
def _solve(cost, tol=1e-4):
  return auction_assignment(cost, tol=tol, with_info=True)


def _optimum(cost):
  rows, cols = scipy.optimize.linear_sum_assignment(np.asarray(cost, np.float64))
  return float(np.asarray(cost, np.float64)[rows, cols].sum())


def _cost_of(cost, perm):
  perm = np.asarray(perm)
  assert sorted(perm.tolist()) == list(range(len(perm))), 'not a permutation'
  return float(np.asarray(cost, np.float64)[np.arange(len(perm)), perm].sum())


@pytest.mark.parametrize('n,seed', [(1, 0), (2, 1), (7, 2), (32, 3), (32, 4)])
def test_integer_costs_are_solved_exactly(n, seed):
  # With tol = 0 the last phase has n * eps * spread < 1: exact for integer costs.
  cost = np.random.default_rng(seed).integers(0, 100, (n, n)).astype(np.float32)
  perm, _ = _solve(jnp.asarray(cost), tol=0.0)
  assert _cost_of(cost, perm) == _optimum(cost)


@pytest.mark.parametrize('seed', [0, 1])
def test_geometric_costs_are_within_the_certified_gap(seed):
  rng = np.random.default_rng(seed)
  x0, x1 = rng.normal(size=(2, 200, 3)).astype(np.float32)
  x1 = x1 * np.array([2.0, 1.0, 0.5], np.float32) + 1.0
  cost = ((x1[:, None] - x0[None])**2).sum(-1)
  perm, info = _solve(jnp.asarray(cost), tol=1e-3)
  best = _optimum(cost)
  gap = (_cost_of(cost, perm) - best) / best
  assert float(info['gap']) <= 1e-3
  assert -1e-6 <= gap <= float(info['gap']) + 1e-6  # The certificate bounds the true gap.


def test_ties_and_degenerate_matrices_give_permutations():
  perm, _ = _solve(jnp.zeros((16, 16)))  # Every assignment is optimal.
  _cost_of(np.zeros((16, 16)), perm)
  cost = np.ones((12, 12), np.float32) - np.eye(12, dtype=np.float32)[::-1]
  perm, _ = _solve(jnp.asarray(cost), tol=0.0)  # One zero per row: the anti-diagonal.
  np.testing.assert_array_equal(perm, np.arange(12)[::-1])


def test_non_finite_cost_pairs_as_given():
  cost = np.random.default_rng(0).random((8, 8)).astype(np.float32)
  cost[3, 5] = np.nan
  perm, info = _solve(jnp.asarray(cost))
  np.testing.assert_array_equal(perm, np.arange(8))
  assert int(info['phases']) == 0


def test_vmap_over_blocks_equals_one_solve_per_block():
  cost = jnp.asarray(np.random.default_rng(5).random((4, 24, 24)), jnp.float32)
  batched = jax.jit(jax.vmap(auction_assignment))(cost)
  for b in range(4):
    np.testing.assert_array_equal(batched[b], jax.jit(auction_assignment)(cost[b]))


def test_non_square_cost_is_refused():
  with pytest.raises(ValueError, match=r'square \[N, N\].*\(3, 4\)'):
    auction_assignment(jnp.zeros((3, 4)))


@pytest.mark.parametrize('solver,host_calls', [('auction', False), ('scipy', True)])
def test_exact_ot_step_has_no_host_callback(solver, host_calls):
  def apply_fn(params, x, t, *, cond=None, train=False):
    return x * params['w'] + t[:, None]

  loss_fn = fm.make_loss(apply_fn, paths.get_path('linear'), coupling='exact',
                         coupling_kwargs={'solver': solver})
  step = jax.jit(jax.grad(lambda p, batch, key: loss_fn(p, batch, key)[0]))
  text = step.lower({'w': jnp.ones(2)}, {'x': jnp.zeros((64, 2))},
                    jax.random.PRNGKey(0)).as_text()
  assert ('custom_call' in text) == host_calls
