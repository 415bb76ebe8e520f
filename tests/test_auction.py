"""Tests of the on-device auction assignment against scipy's exact solver."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from flowdistill import auction, errors, fm, paths
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


# 2048 points in 2-D (the OT-CFM case at scale) needs eps far below the 200-point case's to
# certify 1e-3: the default `min_eps` must reach it.
@pytest.mark.parametrize('n,dim,seed', [(200, 3, 0), (200, 3, 1), (2048, 2, 2)])
def test_geometric_costs_are_within_the_certified_gap(n, dim, seed):
  rng = np.random.default_rng(seed)
  x0, x1 = rng.normal(size=(2, n, dim)).astype(np.float32)
  x1 = x1 * np.linspace(2.0, 0.5, dim, dtype=np.float32) + 1.0
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


def _with_forbidden(seed, n, density):
  """Random costs [n, n] with a fraction `density` of +inf, one random permutation allowed."""
  rng = np.random.default_rng(seed)
  cost = rng.random((n, n)).astype(np.float32)
  cost[rng.random((n, n)) < density] = np.inf
  cost[np.arange(n), rng.permutation(n)] = rng.random(n)
  return cost


@pytest.mark.parametrize('n,density,seed', [(6, 0.5, 0), (40, 0.9, 1), (120, 0.5, 2),
                                            (120, 0.97, 3)])
def test_forbidden_pairs_are_avoided_at_scipys_optimum(n, density, seed):
  cost = _with_forbidden(seed, n, density)
  best = _optimum(cost)  # SciPy takes +inf as forbidden too.
  low = cost.min()
  for perm, info in (_solve(jnp.asarray(cost)), auction_assignment(cost, with_info=True)):
    total = _cost_of(cost, perm)
    assert np.isfinite(total)
    assert int(info['status']) == auction.CERTIFIED and float(info['gap']) <= 1e-4
    # The certificate is relative to the cost above n * min(cost).
    assert 0 <= total - best <= float(info['gap']) * (total - n * low) + 1e-5


def test_not_finite_costs_are_refused_eagerly_and_flagged_under_jit():
  cost = np.random.default_rng(0).random((8, 8)).astype(np.float32)
  for bad in (np.nan, -np.inf):
    cost[3, 5] = bad
    with pytest.raises(errors.BadInput, match=r'1 NaN or -inf entries'):
      auction_assignment(cost)
    perm, info = _solve(jnp.asarray(cost))
    np.testing.assert_array_equal(perm, np.arange(8))  # Paired as given, and flagged.
    assert int(info['status']) == auction.NOT_FINITE and np.isnan(info['gap'])
    assert int(info['phases']) == 0


@pytest.mark.parametrize('forbid', ['row', 'hall'])
def test_infeasible_costs_are_refused_eagerly_and_flagged_under_jit(forbid):
  cost = np.random.default_rng(1).random((10, 10)).astype(np.float32)
  if forbid == 'row':
    cost[4] = np.inf
  else:  # Three rows share two allowed columns: no row or column is all +inf.
    cost[:3, 2:] = np.inf
  with pytest.raises(errors.BadInput, match=r'Every assignment .* forbidden \(\+inf\) pair'):
    auction_assignment(cost)
  perm, info = _solve(jnp.asarray(cost))
  _cost_of(cost, perm)
  assert int(info['status']) == auction.INFEASIBLE and float(info['gap']) == np.inf


def test_price_war_between_forbidden_pairs_ends():
  # Two rows with one allowed column between them: the penalty prices climb beyond the float
  # spacing of the smallest eps, where a plain `price + eps` stops rising.
  cost = np.random.default_rng(2).random((300, 300)).astype(np.float32)
  cost[:2] = np.inf
  cost[:2, 0] = 1.0
  _, info = _solve(jnp.asarray(cost), tol=0.0)
  assert int(info['status']) == auction.INFEASIBLE


@pytest.mark.parametrize('n', [0, 1])
def test_empty_and_single_pair_are_exact(n):
  cost = np.full((n, n), 3.5, np.float32)
  for perm, info in (_solve(jnp.asarray(cost), tol=0.0),
                     auction_assignment(cost, tol=0.0, with_info=True)):
    np.testing.assert_array_equal(perm, np.arange(n))
    assert perm.dtype == jnp.int32
    assert float(info['gap']) == 0.0 and int(info['status']) == auction.CERTIFIED
  if n:
    _, info = _solve(jnp.full((1, 1), jnp.inf))
    assert int(info['status']) == auction.INFEASIBLE


def test_gap_above_tol_is_flagged_never_hidden():
  rng = np.random.default_rng(3)
  x0, x1 = rng.normal(size=(2, 100, 2)).astype(np.float32)
  cost = ((x1[:, None] - x0[None])**2).sum(-1)
  # One coarse phase cannot certify 1e-9.
  solve = jax.jit(functools.partial(auction_assignment, tol=1e-9, min_eps=0.05, with_info=True))
  perm, info = solve(jnp.asarray(cost))
  assert int(info['status']) == auction.ABOVE_TOL and float(info['gap']) > 1e-9
  true_gap = (_cost_of(cost, perm) - _optimum(cost)) / (_cost_of(cost, perm) - 100 * cost.min())
  assert true_gap <= float(info['gap']) + 1e-6
  with pytest.warns(RuntimeWarning, match=r'certified relative gap of .* above tol=1e-09'):
    auction_assignment(cost, tol=1e-9, min_eps=0.05)


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
