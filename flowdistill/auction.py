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

Forbidden pairs and bad costs: `+inf` marks a forbidden pair. The auction needs finite values,
so it is priced `M`, above anything an assignment of allowed pairs can total: where such an
assignment exists, the optima are the same, and the result is checked to avoid every forbidden
pair; the dual bound exceeding that total proves that none exists. A NaN or -inf cost has no
meaning and is refused. An eager call (concrete costs) raises `errors.BadInput` for these and
warns when the gap stays above `tol`; a traced call cannot raise without a host round-trip, so
it returns the verdict in `info` (`status`, and a gap that is never below the certified one).

Everything is `jax.lax` control flow: no host callback, so it jits, runs inside a training step
on any backend, and `vmap`s over blocks (the blocks then advance in lockstep until the slowest
finishes). Rounds are sequential; the bidders of a round are the first `k` rows of a queue of
unassigned rows, with `k` shrinking in tiers as the phase ends (the last rows are long chains
of one bidder each, where a wide round would waste its work).
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from flowdistill import errors

TIERS = (16, 4, 1)  # Bidders per round while more than the next tier's size are unassigned.
# `info['status']` of `auction_assignment`.
CERTIFIED, ABOVE_TOL, INFEASIBLE, NOT_FINITE = range(4)


def _best_two(values):
  """(lowest value, its first column, second-lowest value) over the last axis of [..., N]."""
  n = values.shape[-1]
  cols = jnp.arange(n, dtype=jnp.int32)
  # Plain min reductions: XLA:CPU runs them vectorised, an argmin ~3x slower.
  w1 = jnp.min(values, axis=-1)
  best = jnp.min(jnp.where(values == w1[..., None], cols, n), axis=-1)
  w2 = jnp.min(jnp.where(cols == best[..., None], jnp.inf, values), axis=-1)
  return w1, best, w2


def _raised(price, step):
  """`price + step`, at least the next float up: a step below the price's float spacing (a
  large price, from a forbidden pair's penalty) would otherwise leave the price unchanged and
  two bidders outbidding each other forever."""
  return jnp.maximum(price + step, jnp.nextafter(price, jnp.inf))


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
  bid = _raised(p[best], w2 - w1 + eps)
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
  p = p.at[best].set(_raised(p[best], w2 - w1 + eps))
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


def _dual(c, p, assign):
  """The dual bound `D = sum_j min_i (c[j, i] + p[i]) - sum_i p[i]` of prices `p` [N], summed
  as `sum_j (min_i (c[j, i] + p[i]) - p[assign[j]])` so that large prices cancel row by row."""
  return jnp.sum(jnp.min(c + p, axis=1) - p[assign])


def _certified_gap(c, p, assign):
  """`(P - D) / |P|` of an assignment and the dual bound of prices `p` (see module docstring)."""
  primal = jnp.sum(jnp.take_along_axis(c, assign[:, None], 1))
  return (primal - _dual(c, p, assign)) / jnp.maximum(jnp.abs(primal), jnp.finfo(c.dtype).tiny)


def _penalised(cost, forbidden, scale):
  """Costs shifted to a minimum of 0 over the allowed pairs, divided by `scale`, and each
  forbidden pair priced `M = 2 * bound + 1`.

  `bound` (the summed row maxima of the allowed costs) is the most an assignment of allowed
  pairs can cost, so where one exists every optimum avoids the forbidden pairs, and a dual bound
  above `bound` proves that none exists.

  Returns:
    (c [N, N] finite, bound []).
  """
  low = jnp.min(jnp.where(forbidden, jnp.inf, cost))
  c = jnp.where(forbidden, 0.0, cost - jnp.where(jnp.isfinite(low), low, 0.0))
  if scale is None:
    scale = jnp.max(c)
  c = c / jnp.where(scale > 0, scale, 1.0)
  bound = jnp.sum(jnp.max(c, axis=1))
  return jnp.where(forbidden, 2 * bound + 1, c), bound


def _solve(cost, skip, tol, scale, first_eps, eps_factor, min_eps, tiers):
  """The auction on a float32 cost [N, N] (N >= 2, no NaN; +inf forbidden), not run if `skip`.

  Returns:
    (perm [N], gap [], phases [], whether perm uses a forbidden pair [], whether the dual bound
    proves that every assignment does []).
  """
  n = cost.shape[0]
  forbidden = cost == jnp.inf
  c, bound = _penalised(cost, forbidden, scale)

  def not_done(state):
    _, _, eps, _, gap = state
    return ~skip & (gap > tol) & (eps >= min_eps)

  def phase(state):
    p, _, eps, phases, _ = state
    p, assign = _phase(c, p, eps, tiers)
    return p, assign, eps / eps_factor, phases + 1, _certified_gap(c, p, assign)

  init = (jnp.zeros(n, jnp.float32), jnp.arange(n, dtype=jnp.int32), jnp.float32(first_eps),
          jnp.int32(0), jnp.float32(jnp.inf))
  p, perm, _, phases, gap = jax.lax.while_loop(not_done, phase, init)
  uses_forbidden = jnp.any(forbidden[jnp.arange(n), perm])
  return perm, gap, phases, uses_forbidden, uses_forbidden & (_dual(c, p, perm) > bound)


def _not_finite(cost):
  """Whether `cost` holds a NaN or -inf (+inf marks a forbidden pair)."""
  return jnp.any(jnp.isnan(cost) | (cost == -jnp.inf))


def _status(not_finite, infeasible, gap, tol):
  return jnp.select([not_finite, infeasible, gap > tol], [NOT_FINITE, INFEASIBLE, ABOVE_TOL],
                    CERTIFIED).astype(jnp.int32)


def _refuse(cost):
  """Eager calls: refuses costs with a NaN or -inf before the solve (BadInput)."""
  bad = int(np.sum(np.isnan(cost) | np.isneginf(cost)))
  if bad:
    raise errors.BadInput(f'`cost` holds {bad} NaN or -inf entries; an assignment needs finite '
                          'costs (+inf marks a forbidden pair). Check the inputs the costs '
                          'were computed from.')


def _report(info, tol, min_eps):
  """Eager calls: an infeasible problem is an error, a gap above `tol` a warning."""
  if int(info['status']) == INFEASIBLE:
    raise errors.BadInput('Every assignment of `cost` uses a forbidden (+inf) pair (e.g. a row '
                          'or column of +inf only); allow more pairs, or give them a large '
                          'finite cost.')
  if int(info['status']) == ABOVE_TOL:
    warnings.warn(f'The auction stopped at min_eps={min_eps} with a certified relative gap of '
                  f'{float(info["gap"]):.3g}, above tol={tol}: the assignment may be that far '
                  'from optimal. Lower `min_eps` or raise `tol`.', RuntimeWarning, stacklevel=3)


def auction_assignment(cost, *, tol: float = 1e-4, scale=None, first_eps: float = 0.05,
                       eps_factor: float = 5.0, min_eps: float = 1e-8,
                       tiers: tuple[int, ...] = TIERS, with_info: bool = False):
  """Assignment of columns to rows minimising the summed cost, by auction (see module doc).

  Jittable and vmappable; `tol`, `first_eps`, `eps_factor`, `min_eps`, `tiers` and
  `with_info` are static.

  `+inf` marks a forbidden pair: it is priced above anything the allowed pairs can total, and
  the result is checked to avoid it. A NaN or -inf cost is refused. Eager calls (concrete
  `cost`) raise `errors.BadInput` for NaN/-inf costs and for a problem whose every assignment
  uses a forbidden pair, and warn (RuntimeWarning) when the certified gap stays above `tol`.
  Traced calls (under `jit` or `vmap`) cannot raise: they flag the result in `info['status']`
  and `info['gap']` (pass `with_info=True` to see them), with no host round-trip.

  Args:
    cost: [N, N] float cost matrix (row j, column i); +inf for a forbidden pair.
    tol: stop once the certified relative gap `(P - D) / |P|` is at most this.
    scale: costs are shifted to a minimum of 0 and divided by this (a positive scalar), so that
      eps is in its units; default the spread `max - min` of the finite costs (1 if that is 0).
      Pass the spread of the meaningful costs when the matrix also holds large penalties.
    first_eps, eps_factor, min_eps: eps of the first phase (scaled units), its divisor per
      phase and its floor. The floor only matters where `tol` is not met sooner: squared
      distances between 2048 Gaussian points in 2-D need eps ~1e-7 to certify 1e-3 (the bound
      is `n * eps`, loose by ~100x here), so 1e-6 stopped above `tol` at that size.
    tiers: bidders per round, largest first (see `TIERS`).
    with_info: also return `{'gap', 'phases', 'status'}`. `gap`: the certified relative gap,
      relative to the assignment's cost above `N * min(cost)` (so it bounds the gap relative
      to the cost itself for non-negative costs); never below the true one: inf where the
      assignment uses a forbidden pair, NaN for NaN/-inf costs. `phases`: int, eps phases run.
      `status`: int, `CERTIFIED` (gap <= tol), `ABOVE_TOL` (stopped at `min_eps` first),
      `INFEASIBLE` (proven: every assignment uses a forbidden pair) or `NOT_FINITE` (a NaN or
      -inf cost; the identity is returned).

  Returns:
    int32 [N]: `perm` with `perm[j]` the column assigned to row j (a permutation); with
    `with_info`, `(perm, info)`. N = 0 and N = 1 are exact (gap 0, no phase).
  """
  n = cost.shape[-1]
  if cost.shape != (n, n):
    raise errors.BadInput(f'`cost` must be a square [N, N] matrix; got shape {cost.shape}.')
  if not isinstance(cost, jax.core.Tracer):
    _refuse(np.asarray(cost))
  cost = jax.lax.stop_gradient(jnp.asarray(cost)).astype(jnp.float32)
  not_finite = _not_finite(cost)
  cost = jnp.where(not_finite, 0.0, cost)
  if n <= 1:  # A single bidder would bid an infinite price (it has no second-best column).
    forbidden = jnp.any(cost == jnp.inf)
    perm, gap, phases, infeasible = (jnp.zeros(n, jnp.int32), jnp.float32(0), jnp.int32(0),
                                     forbidden)
  else:
    perm, gap, phases, forbidden, infeasible = _solve(cost, not_finite, tol, scale, first_eps,
                                                      eps_factor, min_eps, tiers)
  gap = jnp.where(not_finite, jnp.nan, jnp.where(forbidden, jnp.inf, gap))
  info = {'gap': gap, 'phases': phases, 'status': _status(not_finite, infeasible, gap, tol)}
  if not isinstance(info['status'], jax.core.Tracer):
    _report(info, tol, min_eps)
  if with_info:
    return perm, info
  return perm
