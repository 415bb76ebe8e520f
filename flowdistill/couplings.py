"""Couplings of a noise batch x0 with a data batch x1 for flow matching.

`couple` re-pairs the rows of x0 with the rows of x1 and never reorders x1, so the labels of
x1 stay attached to it. The methods:

- 'independent': the pairs as given (x0 and x1 drawn independently).
- 'exact': minibatch optimal transport, the permutation of x0 that minimises the summed squared
  Euclidean distance `sum_j ||x0_perm(j) - x1_j||^2` on the flattened samples. `solver`:
  'auction' (default) solves it on the device inside the step (`auction.auction_assignment`,
  stopped at a certified relative gap `ot_tol`, 1e-3 by default; measured <= 2e-5 at B = 1024);
  'scipy' on the host by `scipy.optimize.linear_sum_assignment` through `jax.pure_callback`
  (one device-to-host round-trip per call, for which a sharded batch is gathered: on a pod
  every chip waits for one host thread). Near-ties (pairings whose float32 costs differ by
  ~1e-6 relative) are resolved arbitrarily. As the pairing does not depend on the model, a
  data pipeline may instead run it ahead of the step on the host (`pair_on_host`) and hand
  over coupled `x0`.
- 'sinkhorn': entropic optimal transport with ott-jax, then for every x1 row an x0 row is drawn
  from that row's conditional of the plan, `i ~ P[:, j] / sum_i P[i, j]` (the multinomial
  pairing of torchcfm, but conditioned on x1 so that x1 and its labels keep their order). x0
  rows may repeat or be left out; since the plan's marginals are uniform, every x0 row is
  drawn once in expectation. Pure JAX (no host round-trip).

`block_size` splits the batch into contiguous blocks of that many rows and solves one OT
problem per block, so the cost grows linearly in the batch size rather than cubically
('exact') or quadratically ('sinkhorn'). Blocks of an unshuffled data batch are not
representative; data loaders shuffle.

Classes: with `labels` (the classes of x1), the OT is solved within each class. x0 row `i`
belongs to class `labels0[i]`; `labels0` defaults to `labels` itself, i.e. the noise row drawn
next to a data row joins that row's class. As x0 is noise independent of x1, this splits the
noise uniformly at random into groups of exactly the class counts, so within-class OT is
exact, and the noise paired with class c is still distributed as the source (which a global OT
would skew toward where class c lies: wrong for a class-conditional model). Pass `labels0`
for a labelled source (e.g. class-conditional data-to-data transport). Pairs across classes
are priced above any within-class pairing; if the class counts of x0 and x1 differ in a
block, 'exact' first minimises the number of cross-class pairs. To ignore classes, pass
`labels=None`: x1 is never reordered, so the caller's labels stay valid.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
from ott.geometry import geometry
from ott.solvers import linear

from flowdistill import errors
from flowdistill.auction import auction_assignment

COUPLINGS = ('independent', 'exact', 'sinkhorn')
SOLVERS = ('auction', 'scipy')


def ot_cost(x0, x1):
  """Mean squared Euclidean distance of the pairs `(x0[i], x1[i])`.

  Args:
    x0, x1: paired batches [B, ...].

  Returns:
    A scalar: `mean_i ||x0[i] - x1[i]||^2` over the flattened samples.
  """
  diff = (x0 - x1).reshape(x0.shape[0], -1).astype(jnp.float32)
  return jnp.mean(jnp.sum(diff**2, axis=-1))


def squared_distances(x0, x1):
  """Pairwise squared Euclidean distances, computed in float32 at full matmul precision.

  Args:
    x0: [..., N, D]; x1: [..., M, D] (same leading dims).

  Returns:
    [..., N, M] with entry `(i, j) = ||x0_i - x1_j||^2` (clipped at 0).
  """
  x0, x1 = x0.astype(jnp.float32), x1.astype(jnp.float32)
  cross = jnp.einsum('...id,...jd->...ij', x0, x1, precision=jax.lax.Precision.HIGHEST)
  sq = jnp.sum(x0**2, -1)[..., :, None] + jnp.sum(x1**2, -1)[..., None, :] - 2 * cross
  return jnp.maximum(sq, 0.0)


def _host_assignment(cost):
  """Host side of `exact_assignment`: one `linear_sum_assignment` per [N, N] matrix."""
  cost = np.asarray(cost, np.float64)
  flat = cost.reshape((-1,) + cost.shape[-2:])
  cols = np.empty(flat.shape[:2], np.int32)
  for k, c in enumerate(flat):
    if np.all(np.isfinite(c)):
      cols[k] = scipy.optimize.linear_sum_assignment(c)[1]
    else:  # Keep NaN/inf inputs paired as given: the loss's NaN guard reports them.
      cols[k] = np.arange(c.shape[0])
  return cols.reshape(cost.shape[:-1])


def exact_assignment(cost):
  """Optimal assignment of columns to rows, solved on the host (jittable, vmappable).

  Args:
    cost: [..., N, N] cost matrices (float32); leading dims are independent problems.

  Returns:
    int32 [..., N]: `perm` with `perm[j]` the column assigned to row `j`, minimising
    `sum_j cost[j, perm[j]]`.
  """
  out = jax.ShapeDtypeStruct(cost.shape[:-1], jnp.int32)
  return jax.pure_callback(_host_assignment, out, jax.lax.stop_gradient(cost),
                           vmap_method='expand_dims')


def pair_on_host(x0, x1, *, labels=None, block_size: int | None = None) -> np.ndarray:
  """The 'exact' coupling in NumPy, for a data pipeline that pairs ahead of the step.

  Same problem as `couple(x0, x1, key, method='exact', solver='scipy', labels=labels,
  block_size=block_size)` (costs in float64, so near-ties may resolve differently), without a
  device round-trip: run it on the host while the previous step computes.

  Args:
    x0: noise [B, ...]; x1: data [B, ...], never reordered; labels: optional int [B], the
      classes of x1 (OT within each class); block_size: None or a divisor of B.

  Returns:
    x0 [B, ...] re-paired (rows of the input x0).
  """
  x0, x1 = np.asarray(x0), np.asarray(x1)
  block = _check(x0, x1, labels, None, 'exact', block_size)
  batch, num_blocks = x1.shape[0], x1.shape[0] // block
  flat0 = x0.reshape(num_blocks, block, -1).astype(np.float64)
  flat1 = x1.reshape(num_blocks, block, -1).astype(np.float64)
  cost = (np.sum(flat1**2, -1)[:, :, None] + np.sum(flat0**2, -1)[:, None, :]
          - 2 * flat1 @ flat0.transpose(0, 2, 1))  # [blocks, j (x1), i (x0)]
  if labels is not None:
    lab = np.asarray(labels).reshape(num_blocks, block)
    spread = np.ptp(cost, axis=(1, 2), keepdims=True)
    unit = np.where(spread > 0, spread, 1.0)
    cost = cost + np.where(lab[:, :, None] != lab[:, None, :], 2 * (block + 1) * unit, 0)
  perm = _host_assignment(cost)
  return x0[(perm + block * np.arange(num_blocks)[:, None]).reshape(batch)]


def _sinkhorn_pairing(key, cost, epsilon, num_iters):
  """Draws, for each column j of `cost` [N, N], a row from column j of the entropic plan."""
  geom = geometry.Geometry(cost_matrix=cost, epsilon=epsilon)
  out = linear.solve(geom, max_iterations=num_iters)
  logits = (out.f[:, None] - cost) / epsilon  # log P[i, j] up to a per-column constant.
  return jax.random.categorical(key, logits, axis=0)


def check_names(method: str, solver: str = 'auction') -> None:
  """Refuses an unknown coupling `method` or exact-OT `solver` (errors.BadInput), so that a
  builder (e.g. `fm.make_loss`) can fail before the first step."""
  if method not in COUPLINGS:
    raise errors.BadInput(f'Unknown coupling `method`={method!r}; valid options are '
                          f'{COUPLINGS}.')
  if solver not in SOLVERS:
    raise errors.BadInput(f'Unknown exact-OT `solver`={solver!r}; valid options are '
                          f'{SOLVERS}.')


def _check(x0, x1, labels, labels0, method, block_size, solver='auction'):
  """Validates the static arguments and shapes of `couple`; returns the block size."""
  check_names(method, solver)
  if x0.shape != x1.shape:
    raise ValueError(f'x0 and x1 must have the same shape [B, ...]; got x0 {x0.shape} and '
                     f'x1 {x1.shape}.')
  batch = x1.shape[0]
  for name, lab in (('labels', labels), ('labels0', labels0)):
    if lab is not None and lab.shape != (batch,):
      raise ValueError(f'`{name}` must have shape [B] = ({batch},); got {lab.shape}.')
  if labels0 is not None and labels is None:
    raise ValueError('`labels0` (classes of x0) needs `labels` (classes of x1).')
  if block_size is None:
    return batch
  if block_size <= 0 or batch % block_size:
    raise ValueError(f'`block_size`={block_size} must be a positive divisor of the batch '
                     f'size {batch}; pick a divisor or block_size=None (one block).')
  return block_size


def couple(x0, x1, key, *, method: str = 'independent', labels=None, labels0=None,
           epsilon: float = 0.01, relative_epsilon: bool = True, num_iters: int = 500,
           block_size: int | None = None, solver: str = 'auction', ot_tol: float = 1e-3):
  """Re-pairs the noise rows x0 with the data rows x1 (see the module docstring).

  Jittable: `method`, `relative_epsilon`, `num_iters`, `block_size`, `solver` and `ot_tol`
  are static Python values; `epsilon` and the label arrays may be traced.

  Args:
    x0: source batch [B, ...] (noise).
    x1: data batch [B, ...]; never reordered.
    key: PRNG key (used by 'sinkhorn').
    method: 'independent', 'exact' or 'sinkhorn'.
    labels: optional int [B], classes of x1: OT within each class.
    labels0: optional int [B], classes of x0; defaults to `labels` (see module docstring).
    epsilon: entropic regularisation of 'sinkhorn'.
    relative_epsilon: if True, `epsilon` is a fraction of the mean squared distance between
      the rows of a block; else absolute.
    num_iters: maximum number of Sinkhorn iterations (stops earlier at marginal error 1e-3).
    block_size: None (one OT problem over the batch) or a divisor of B: independent OT
      problems on contiguous blocks of that many rows.
    solver: 'exact' on the device ('auction') or on the host ('scipy').
    ot_tol: the auction's certified relative optimality gap (see `auction_assignment`).

  Returns:
    `(x0, x1, labels)`: x0 [B, ...] re-paired (rows of the input x0), x1 and labels unchanged.

  Raises:
    ValueError: unknown `method` or `solver` (errors.BadInput), x0/x1 shape mismatch, bad
      label shape, a `block_size` that does not divide B, or (eager 'exact' with the auction
      only) NaN costs from non-finite samples. Under `jit` non-finite samples are paired as
      given and a block whose auction stops above `ot_tol` is used as found: no host
      round-trip (call `auction_assignment` with `with_info=True` to see its status).
  """
  block = _check(x0, x1, labels, labels0, method, block_size, solver)
  if method == 'independent':
    return x0, x1, labels
  batch, num_blocks = x1.shape[0], x1.shape[0] // block
  flat0 = jax.lax.stop_gradient(x0).reshape(num_blocks, block, -1)
  flat1 = jax.lax.stop_gradient(x1).reshape(num_blocks, block, -1)
  base = squared_distances(flat0, flat1)  # [blocks, i (x0), j (x1)]
  cost = base
  spread = jnp.max(base, axis=(1, 2)) - jnp.min(base, axis=(1, 2))
  unit = jnp.where(spread > 0, spread, 1.0)  # [blocks]
  if labels is not None:
    lab1 = labels.reshape(num_blocks, 1, block)
    lab0 = (labels if labels0 is None else labels0).reshape(num_blocks, block, 1)
    # Above the base-cost gap of any two pairings of a block (at most block * spread).
    cost = base + jnp.where(lab0 != lab1, 2 * (block + 1) * unit[:, None, None], 0.0)
  if method == 'exact' and solver == 'scipy':
    perm = exact_assignment(jnp.swapaxes(cost, 1, 2))
  elif method == 'exact':
    solve = functools.partial(auction_assignment, tol=ot_tol)
    cost = jnp.swapaxes(cost, 1, 2)
    if num_blocks == 1:  # A vmapped loop would select over its whole state every round.
      perm = solve(cost[0], scale=unit[0])[None]
    else:
      perm = jax.vmap(lambda c, s: solve(c, scale=s))(cost, unit)
  else:
    scale = jnp.mean(base, axis=(1, 2)) if relative_epsilon else jnp.ones(num_blocks)
    keys = jax.random.split(key, num_blocks)
    perm = jax.vmap(_sinkhorn_pairing, in_axes=(0, 0, 0, None))(keys, cost, epsilon * scale,
                                                                num_iters)
  index = (perm + block * jnp.arange(num_blocks)[:, None]).reshape(batch)
  return x0[index], x1, labels
