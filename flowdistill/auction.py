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
finishes). Rounds are sequential; the bidders of a round are the first `k` rows of a queue of
unassigned rows, with `k` shrinking in tiers as the phase ends (the last rows are long chains
of one bidder each, where a wide round would waste its work).
"""

import functools

import jax
import jax.numpy as jnp

TIERS = (16, 4, 1)  # Bidders per round while more than the next tier's size are unassigned.


def _best_two(values):
  """(lowest value, its first column, second-lowest value) over the last axis of [..., N]."""
  n = values.shape[-1]
  cols = jnp.arange(n, dtype=jnp.int32)
  # Plain min reductions: XLA:CPU runs them vectorised, an argmin ~3x slower.
  w1 = jnp.min(values, axis=-1)
  best = jnp.min(jnp.where(values == w1[..., None], cols, n), axis=-1)
  w2 = jnp.min(jnp.where(cols == best[..., None], jnp.inf, values), axis=-1)
  return w1, best, w2


def _bid_round(c, eps, k, state):
  """One Jacobi round: the `k` rows at the head of the queue of unassigned rows bid.

  State: prices p [N], owner [N] (column -> row or -1), assign [N] (row -> column or -1),
  queue [N] (a ring of the unassigned rows), head, count. Losers and displaced owners join the
  tail, so the round costs O(k N) with no search over all rows.
  """
  p, owner, assign, queue, head, count = state
  n = c.shape[1]
  lanes = jnp.arange(k)
  rows = queue[(head + lanes) % n]
  valid = lanes < count
  w1, best, w2 = _best_two(c[rows] + p)
  bid = p[best] + (w2 - w1) + eps
  # A bid wins unless another bid for the same column is higher (ties: the earlier lane).
  rival = (best[None, :] == best[:, None]) & valid[None, :]
  beaten = rival & ((bid[None, :] > bid[:, None])
                    | ((bid[None, :] == bid[:, None]) & (lanes[None, :] < lanes[:, None])))
  won = valid & ~jnp.any(beaten, axis=1)
  previous = jnp.where(won, owner[best], -1)
  assign = assign.at[jnp.where(previous >= 0, previous, n)].set(-1, mode='drop')
  assign = assign.at[jnp.where(won, rows, n)].set(best, mode='drop')
  column = jnp.where(won, best, n)
  owner = owner.at[column].set(rows, mode='drop')
  p = p.at[column].set(bid, mode='drop')
  joining = jnp.concatenate([jnp.where(valid & ~won, rows, -1), previous])
  keep = joining >= 0
  slot = jnp.where(keep, (head + count + jnp.cumsum(keep) - 1) % n, n)
  queue = queue.at[slot].set(joining, mode='drop')
  taken = jnp.minimum(count, k)
  return p, owner, assign, queue, (head + taken) % n, count - taken + jnp.sum(keep)


def _single_bid(c, eps, state):
  """`_bid_round` with one bidder, which always wins: its displaced owner takes its place at
  the head of the queue (fewer operations; most rounds of a phase's tail are these)."""
  p, owner, assign, queue, head, count = state
  n = c.shape[1]
  row = queue[head]
  w1, best, w2 = _best_two(c[row] + p)
  previous = owner[best]
  assign = assign.at[jnp.where(previous >= 0, previous, n)].set(-1, mode='drop')
  assign = assign.at[row].set(best)
  owner = owner.at[best].set(row)
  p = p.at[best].set(p[best] + (w2 - w1) + eps)
  displaced = previous >= 0
  queue = queue.at[head].set(jnp.where(displaced, previous, row))
  step = jnp.where(displaced, 0, 1)
  return p, owner, assign, queue, (head + step) % n, count - step


def _phase(c, p, eps, tiers):
  """Assigns every row at this eps, starting from no assignment and the given prices."""
  n = c.shape[0]
  none = jnp.full(n, -1, jnp.int32)
  state = (p, none, none, jnp.arange(n, dtype=jnp.int32), jnp.int32(0), jnp.int32(n))
  sizes = tuple(k for k in tiers if 1 < k < n) + (1,)
  for k, below in zip(sizes, sizes[1:] + (0,)):
    bid = functools.partial(_bid_round, c, eps, k) if k > 1 else functools.partial(
        _single_bid, c, eps)
    state = jax.lax.while_loop(lambda s, below=below: s[5] > below, bid, state)
  return state[0], state[2]


def _certified_gap(c, p, assign):
  """`(P - D) / |P|` of an assignment and the dual bound of prices `p` (see module docstring)."""
  primal = jnp.sum(jnp.take_along_axis(c, assign[:, None], 1))
  dual = jnp.sum(jnp.min(c + p, axis=1)) - jnp.sum(p)
  return (primal - dual) / jnp.maximum(jnp.abs(primal), jnp.finfo(c.dtype).tiny)


def auction_assignment(cost, *, tol: float = 1e-4, scale=None, first_eps: float = 0.05,
                       eps_factor: float = 5.0, min_eps: float = 1e-6,
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
