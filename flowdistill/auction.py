"""Minimum-cost assignment on the device: the auction algorithm with epsilon-scaling.

Bertsekas' auction (Jacobi form). Rows are bidders, columns are objects with prices `p`. An
unassigned row `j` bids for its best column `i1 = argmin_i c[j, i] + p[i]` and raises that
price by `w2 - w1 + eps` (its second-best value minus its best, plus eps); each column goes to
its highest bidder, whose previous owner becomes unassigned. A phase ends when every row has a
column; the assignment then satisfies eps-complementary slackness, so its cost is within
`n * eps` of the optimum. Phases divide eps by `eps_factor` and keep the prices.

The stop test is a certificate, not the worst-case bound: after each phase the prices give the
dual bound `D = sum_j min_i (c[j, i] + p[i]) - sum_i p[i] <= optimum <= P` (P the assignment's
cost), and the solver stops when `(P - D) / |P| <= tol`. With `tol = 0` it runs down to
`min_eps` and is exact whenever `n * eps` is below the gap between the best and second-best
assignment (always for integer costs scaled so that `n * eps < 1`).

Everything is `jax.lax` control flow: no host callback, so it jits, runs inside a training step
on any backend, and `vmap`s over blocks (the blocks then advance in lockstep until the slowest
finishes). Rounds are sequential; the bidders of a round are the first `k` unassigned rows,
with `k` shrinking in tiers as the phase ends (the last rows are long chains of one bidder each,
where a wide round would waste its work).
"""

import jax
import jax.numpy as jnp

TIERS = (128, 16, 1)  # Bidders per round while more than the next tier's size are unassigned.


def _bid_round(c, p, owner, assign, eps, k):
  """One Jacobi round for the first `k` unassigned rows. Returns updated (p, owner, assign)."""
  n = c.shape[1]
  unassigned = assign < 0
  idx = jnp.nonzero(unassigned, size=k, fill_value=0)[0]
  valid = jnp.arange(k) < jnp.sum(unassigned)
  values = c[idx] + p  # [k, n]
  best = jnp.argmin(values, axis=1)
  w1 = jnp.take_along_axis(values, best[:, None], 1)[:, 0]
  w2 = jnp.min(jnp.where(jnp.arange(n) == best[:, None], jnp.inf, values), axis=1)
  bid = jnp.where(valid, p[best] + (w2 - w1) + eps, -jnp.inf)
  top = jnp.full(n, -jnp.inf, bid.dtype).at[best].max(bid)
  contender = valid & (bid == top[best])
  winner = jnp.full(n, n, idx.dtype).at[best].min(jnp.where(contender, idx, n))
  won = contender & (winner[best] == idx)
  column = jnp.where(won, best, n)
  previous = jnp.where(won, owner[best], -1)
  assign = assign.at[jnp.where(previous >= 0, previous, n)].set(-1, mode='drop')
  assign = assign.at[jnp.where(won, idx, n)].set(best.astype(assign.dtype), mode='drop')
  owner = owner.at[column].set(idx.astype(owner.dtype), mode='drop')
  p = p.at[column].set(bid, mode='drop')
  return p, owner, assign


def _chain(c, p, owner, assign, eps):
  """Single bidders until all rows are assigned: each displaced row bids next (Gauss-Seidel).

  Only displacement unassigns a row, and the displaced row bids at once, so the other
  bidders are exactly the rows unassigned when the chain starts: a queue, read in order.
  """
  n = c.shape[1]
  queue = jnp.nonzero(assign < 0, size=n + 1, fill_value=n)[0].astype(jnp.int32)

  def body(state):
    p, owner, assign, j, q = state
    values = c[j] + p  # [n]
    best = jnp.argmin(values)
    w2 = jnp.min(jnp.where(jnp.arange(n) == best, jnp.inf, values))
    bid = p[best] + (w2 - values[best]) + eps
    previous = owner[best]
    assign = assign.at[jnp.where(previous >= 0, previous, n)].set(-1, mode='drop')
    assign = assign.at[j].set(best.astype(assign.dtype))
    owner = owner.at[best].set(j)
    p = p.at[best].set(bid)
    q = jnp.where(previous >= 0, q, q + 1)
    return p, owner, assign, jnp.where(previous >= 0, previous, queue[q]), q

  p, owner, assign, _, _ = jax.lax.while_loop(
      lambda state: state[3] < n, body, (p, owner, assign, queue[0], jnp.int32(0)))
  return p, owner, assign


def _phase(c, p, eps, tiers):
  """Assigns every row at this eps, starting from no assignment and the given prices."""
  n = c.shape[0]
  owner = jnp.full(n, -1, jnp.int32)
  assign = jnp.full(n, -1, jnp.int32)
  sizes = tuple(k for k in tiers if 1 < k < n)
  for k, below in zip(sizes, sizes[1:] + (1,)):
    def body(state, k=k):
      return _bid_round(c, *state, eps, k)
    (p, owner, assign) = jax.lax.while_loop(
        lambda state, below=below: jnp.sum(state[2] < 0) > below, body, (p, owner, assign))
  p, _, assign = _chain(c, p, owner, assign, eps)
  return p, assign


def _certified_gap(c, p, assign):
  """`(P - D) / |P|` of an assignment and the dual bound of prices `p` (see module docstring)."""
  primal = jnp.sum(jnp.take_along_axis(c, assign[:, None], 1))
  dual = jnp.sum(jnp.min(c + p, axis=1)) - jnp.sum(p)
  return (primal - dual) / jnp.maximum(jnp.abs(primal), jnp.finfo(c.dtype).tiny)


def auction_assignment(cost, *, tol: float = 1e-4, scale=None, first_eps: float = 0.05,
                       eps_factor: float = 4.0, min_eps: float = 1e-6,
                       tiers: tuple[int, ...] = TIERS, with_info: bool = False):
  """Assignment of columns to rows minimising the summed cost, by auction (see module doc).

  Jittable and vmappable; `tol`, `first_eps`, `eps_factor`, `min_eps`, `tiers` and
  `with_info` are static.

  Args:
    cost: [N, N] float cost matrix (row j, column i).
    tol: stop once the certified relative gap `(P - D) / |P|` is at most this.
    scale: costs are shifted to a minimum of 0 and divided by this (a positive scalar), so that
      eps is in its units; default the spread `max - min` (1 if that is 0). Pass the spread of
      the meaningful costs when the matrix also holds large penalties.
    first_eps, eps_factor, min_eps: eps of the first phase (scaled units), its divisor per
      phase and its floor.
    tiers: bidders per round, largest first (see `TIERS`).
    with_info: also return `{'gap': certified relative gap, 'phases': int}`; the gap is
      relative to the assignment's cost above `N * min(cost)` (so it bounds the gap relative
      to the cost itself for non-negative costs).

  Returns:
    int32 [N]: `perm` with `perm[j]` the column assigned to row j (a permutation); with
    `with_info`, `(perm, info)`. Costs with a NaN or infinity give the identity (the caller's
    checks report them).
  """
  n = cost.shape[-1]
  if cost.shape != (n, n):
    raise ValueError(f'`cost` must be a square [N, N] matrix; got shape {cost.shape}.')
  cost = jax.lax.stop_gradient(cost).astype(jnp.float32)
  finite = jnp.all(jnp.isfinite(cost))
  cost = jnp.where(finite, cost, 0.0)
  cost = cost - jnp.min(cost)
  if scale is None:
    scale = jnp.max(cost)
  c = cost / jnp.where(scale > 0, scale, 1.0)

  def not_done(state):
    _, _, eps, _, gap = state
    return (gap > tol) & (eps >= min_eps)

  def phase(state):
    p, _, eps, phases, _ = state
    p, assign = _phase(c, p, eps, tiers)
    return p, assign, eps / eps_factor, phases + 1, _certified_gap(c, p, assign)

  init = (jnp.zeros(n, jnp.float32), jnp.arange(n, dtype=jnp.int32), jnp.float32(first_eps),
          jnp.int32(0), jnp.where(finite, jnp.inf, 0.0).astype(jnp.float32))
  _, perm, _, phases, gap = jax.lax.while_loop(not_done, phase, init)
  if with_info:
    return perm, {'gap': gap, 'phases': phases}
  return perm
