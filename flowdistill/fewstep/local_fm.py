"""Local flow matching (Xu, Cheng & Xie, arXiv 2410.02548): a chain of small flow blocks.

The paper runs data -> noise: `p_0` is the data; block `n` (1-based) pairs `x_l ~ p_{n-1}`
with `x_r = e^{-h_n} x_l + sqrt(1 - e^{-2 h_n}) z` (an exact Ornstein–Uhlenbeck step of length
`h_n`, a dependent coupling), learns the flow between them, and the whole training set pushed
through the learned block's ODE is the next block's `p_n`. The last block is *free*: it pairs
`p_{N-1}` with independent `z ~ N(0, I)`. Sampling runs the blocks in reverse, noise -> data.

In this library's convention (t = 0 noise, t = 1 data) every block is an ordinary flow on
`[0, 1]` with its **data side `x_l` at t = 1** and its **noise side `x_r` at t = 0**: the
paper's block time is `tau = 1 - t`, and its velocity is minus ours. Because `x_r` is affine
in `(x_l, z)`, a block's interpolant `alpha(t) x_r + beta(t) x_l` is itself an affine path
from `z` to `x_l` (`block_path`), so a block is trained by the plain flow-matching loss on
that path (`block_loss`), and the closed-form Gaussian tools, ODE solvers and flow-map
losses apply to a block unchanged. A one-block chain (`h = None`) *is* global flow matching.

Chain parameters are the blocks' parameter pytrees stacked on a leading axis `[N, ...]`
(`stack_blocks`), ordered data -> noise (index 0 is the block next to the data); samplers and
likelihoods `lax.scan` over it, so every block must share one architecture (which the warm
start from the previous block needs anyway).
"""

import math

import jax
import jax.numpy as jnp

from flowdistill import fm, ode
from flowdistill.fewstep import flow_map
from flowdistill.paths import AffinePath, ou_transition


def step_sizes(num_blocks: int, h0: float, growth: float) -> tuple[float | None, ...]:
  """OU step lengths `(h0, h0 g, h0 g^2, ..., None)`: geometric, the last block free.

  Example: `step_sizes(4, 0.1, 1.5) == (0.1, 0.15, 0.225, None)`.
  """
  if num_blocks < 1:
    raise ValueError(f'num_blocks must be >= 1, got {num_blocks}.')
  if not (h0 > 0 and growth > 0):
    raise ValueError(f'h0 and growth must be > 0, got h0={h0}, growth={growth}.')
  return tuple(h0 * growth**n for n in range(num_blocks - 1)) + (None,)


def noise_endpoint(x_l, z, h: float | None):
  """The block's noise-side endpoint: `e^{-h} x_l + sqrt(1 - e^{-2h}) z`, or `z` if free.

  Args:
    x_l: data-side points [B, ...] (samples of the previous marginal).
    z: standard normal [B, ...].
    h: OU step length, or None for the free (last) block.
  """
  return z if h is None else ou_transition(x_l, h, z)


def block_path(path: AffinePath, h: float | None) -> AffinePath:
  """The block's interpolant as an affine path from noise `z` (t = 0) to `x_l` (t = 1).

  `alpha(t) x_r + beta(t) x_l` with `x_r = noise_endpoint(x_l, z, h)` equals
  `alpha(t) sqrt(1 - e^{-2h}) z + (beta(t) + alpha(t) e^{-h}) x_l`; the free block (h = None)
  keeps `path`. At t = 1 the point is `x_l`, at t = 0 it is `x_r`.
  """
  if h is None:
    return path
  if not h > 0:
    raise ValueError(f'OU step length h must be > 0 (or None for the free block), got {h}.')
  a, b = math.exp(-h), math.sqrt(-math.expm1(-2.0 * h))
  return AffinePath(f'{path.name}-block(h={h:g})', lambda t: b * path.alpha(t),
                    lambda t: path.beta(t) + a * path.alpha(t), path.gamma)


def block_loss(apply_fn, path: AffinePath, h: float | None, **fm_kwargs):
  """Flow-matching loss of one block: `loss_fn(params, {'x': x_l}, key) -> (loss, metrics)`.

  The batch holds the data-side points `x_l`; the loss draws `z` and trains on the dependent
  pair `(x_r, x_l)` along `path` (see `block_path`). `fm_kwargs` go to `fm.make_loss`; a
  dependent block keeps its OU pairing, so it takes only the independent coupling. With
  `h = None` this is exactly `fm.make_loss(apply_fn, path, **fm_kwargs)`.
  """
  if h is not None and fm_kwargs.get('coupling', 'independent') != 'independent':
    raise ValueError(f'A dependent block (h={h}) is paired by its OU step; the coupling '
                     f'{fm_kwargs["coupling"]!r} applies to the free last block only.')
  return fm.make_loss(apply_fn, block_path(path, h), **fm_kwargs)


def push_forward(apply_fn, params, x, *, solver: str = 'dopri5', steps: int | None = None,
                 rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 4096):
  """Maps data-side points through a trained block's ODE to its noise side (t = 1 -> 0).

  Args:
    apply_fn, params: the block's velocity model.
    x: samples of the block's data-side marginal [B, ...].
    solver, steps, rtol, atol, max_steps: see `ode.solve`.

  Returns:
    (samples of the learned next marginal [B, ...], info with 'nfe').
  """
  return ode.solve(ode.velocity_fn(apply_fn, params), x, solver=solver, steps=steps, t0=1.0,
                   t1=0.0, rtol=rtol, atol=atol, max_steps=max_steps)


def stack_blocks(block_params):
  """Stacks a sequence of N same-structured parameter pytrees (data -> noise) to `[N, ...]`."""
  block_params = list(block_params)
  if not block_params:
    raise ValueError('A chain needs at least one block.')
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *block_params)


def num_blocks(chain_params) -> int:
  """N, the leading axis of stacked chain parameters."""
  return jax.tree.leaves(chain_params)[0].shape[0]


def sample_chain(apply_fn, chain_params, x, **solve_kwargs):
  """Runs noise through the blocks in reverse (block N first), each from t = 0 to 1.

  Args:
    chain_params: stacked block parameters [N, ...], data -> noise (`stack_blocks`).
    x: noise [B, ...] (the free block's t = 0 side, N(0, I)).
    solve_kwargs: `ode.solve` options per block (solver, steps, rtol, atol, max_steps).

  Returns:
    (data samples [B, ...], info with 'nfe' summed over the blocks).
  """

  def block(x, params):
    x, info = ode.solve(ode.velocity_fn(apply_fn, params), x, t0=0.0, t1=1.0, **solve_kwargs)
    return x, jnp.asarray(info['nfe'])

  x, nfes = jax.lax.scan(block, x, chain_params, reverse=True)
  return x, {'nfe': jnp.sum(nfes)}


def chain_log_likelihood(apply_fn, chain_params, x, key=None, **divergence_kwargs):
  """`log p(x)` of the chain's data marginal, composed block by block.

  Block n maps its data side to its noise side (t = 1 -> 0) carrying
  `delta_n = int_1^0 div v_n dt`; then `log p(x) = log N(x_N; 0, I) + sum_n delta_n`.

  Args:
    chain_params: stacked block parameters [N, ...], data -> noise.
    x: data [B, ...]; key: for the Hutchinson estimator (block n uses `fold_in(key, n)`).
    divergence_kwargs: `ode.integrate_with_divergence` options (divergence, num_probes, probe,
      solver, steps, rtol, atol, max_steps).

  Returns:
    (log p [B], info with 'nfe' (summed), 'deltas' [N, B] and 'prior_logp' [B]).
  """
  n = num_blocks(chain_params)
  keys = None if key is None else jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))

  def block(x, inputs):
    params, k = inputs
    y, delta, info = ode.integrate_with_divergence(
        ode.velocity_fn(apply_fn, params), x, k, t0=1.0, t1=0.0, **divergence_kwargs)
    return y, (delta, jnp.asarray(info['nfe']))

  z, (deltas, nfes) = jax.lax.scan(block, x, (chain_params, keys))
  prior = ode.standard_normal_logpdf(z)
  return prior + deltas.sum(0), {'nfe': jnp.sum(nfes), 'deltas': deltas, 'prior_logp': prior}


def distill_loss(map_apply_fn, apply_fn, path: AffinePath, h: float | None, *,
                 loss: str = 'lmd', scheme: str = 'ordered', band: float = 1.0):
  """Distils one trained block into a two-time flow map on the block's own path.

  `loss_fn(params, {'x': x_l}, key, teacher_params)`: Lagrangian ('lmd') or Eulerian ('emd')
  map distillation (`fewstep.flow_map`) with the block's velocity as the teacher and the
  distillation points on the block's dependent interpolant.
  """
  factory = {'lmd': flow_map.lmd_loss, 'emd': flow_map.emd_loss}.get(loss)
  if factory is None:
    raise ValueError(f'Unknown block distillation loss {loss!r}; choose "lmd" or "emd".')
  return factory(map_apply_fn, apply_fn, block_path(path, h), scheme=scheme, band=band)


def jump_chain(map_apply_fn, chain_map_params, x, jumps: int = 1):
  """Samples through distilled blocks in reverse, `jumps` flow-map jumps per block.

  Args:
    chain_map_params: stacked flow-map parameters [N, ...], data -> noise.
    x: noise [B, ...].

  Returns:
    (data samples [B, ...], info with 'nfe' = N * jumps).
  """
  grid = ode.time_grid(jumps)

  def block(x, params):
    return flow_map.jump(map_apply_fn, params, x, grid)[0], None

  x, _ = jax.lax.scan(block, x, chain_map_params, reverse=True)
  return x, {'nfe': num_blocks(chain_map_params) * jumps}
