"""Exact assignment time against N: the on-device auction, SciPy and POT, on the same matrices.

Usage (idle machine; POT is optional, `pip install pot`):
  python benchmarks/auction_scaling.py [--sizes 256 512 1024 2048 4096] [--repeats 3]
      [--tol 1e-3] [--out benchmarks/out/auction_scaling.json]

Costs, float32 [N, N], a fresh seed per repeat:
- geometric: squared distances between N standard-normal points in 2-D and N others (the
  exact OT-CFM case: many near-ties, the auction's hard case);
- uniform: i.i.d. U(0, 1).
Solvers: `auction.auction_assignment` under `jax.jit` (compile apart; stops at a certified
relative gap `--tol`), `scipy.optimize.linear_sum_assignment` (float64 copy, exact), POT's
`ot.emd` with uniform weights (float64, network simplex; the plan's argmax per row is the
assignment). Reported per (cost, N): median seconds of each, the auction's certified gap and
its true gap to SciPy's optimum (max over repeats), auction / SciPy time.
"""

import argparse
import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import machine
import numpy as np
import scipy.optimize

from flowdistill import auction

try:
  import ot
except ImportError:
  ot = None


def costs(kind: str, n: int, seed: int) -> np.ndarray:
  """[n, n] float32 cost matrix of the given kind (see the module docstring)."""
  rng = np.random.default_rng(seed)
  if kind == 'uniform':
    return rng.random((n, n), dtype=np.float32)
  x, y = rng.standard_normal((2, n, 2), dtype=np.float32)
  return ((x[:, None] - y[None])**2).sum(-1)


def seconds(fn, *args, **kwargs):
  """(result, wall seconds) of one call of `fn(*args, **kwargs)`."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args, **kwargs))
  return out, time.perf_counter() - start


def measure(kind: str, n: int, repeats: int, tol: float) -> dict:
  """One table row: medians over `repeats` seeds (see the module docstring)."""
  solve = jax.jit(functools.partial(auction.auction_assignment, tol=tol, with_info=True))
  jax.block_until_ready(solve(jnp.asarray(costs(kind, n, -1 % 2**31))))  # compile
  times = {'auction': [], 'scipy': [], 'pot': []}
  certified, true_gap = [], []
  for seed in range(repeats):
    cost = costs(kind, n, seed)
    device_cost = jax.block_until_ready(jnp.asarray(cost))
    (perm, info), t = seconds(solve, device_cost)
    times['auction'].append(t)
    cost64 = cost.astype(np.float64)
    (rows, cols), t = seconds(scipy.optimize.linear_sum_assignment, cost64)
    times['scipy'].append(t)
    if ot is not None:
      weights = np.full(n, 1.0 / n)
      _, t = seconds(ot.emd, weights, weights, cost64, numItermax=10**8)
      times['pot'].append(t)
    best = cost64[rows, cols].sum()
    true_gap.append(float(cost64[np.arange(n), np.asarray(perm)].sum() / best - 1))
    certified.append(float(info['gap']))
  row = {name: statistics.median(t) for name, t in times.items() if t}
  row.update(certified_gap=max(certified), true_gap=max(true_gap),
             auction_over_scipy=row['auction'] / row['scipy'])
  return row


def table(rows: dict, headline: str) -> str:
  lines = [f'Machine: {headline}', '',
           '| cost | N | auction s | SciPy s | POT emd s | auction / SciPy | certified gap | '
           'true gap |', '|---|---|---|---|---|---|---|---|']
  for (kind, n), r in rows.items():
    pot = f"{r['pot']:.3f}" if 'pot' in r else '–'
    lines.append(f"| {kind} | {n} | {r['auction']:.3f} | {r['scipy']:.3f} | {pot} | "
                 f"{r['auction_over_scipy']:.2f} | {r['certified_gap']:.1e} | "
                 f"{r['true_gap']:.1e} |")
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sizes', type=int, nargs='+', default=[256, 512, 1024, 2048, 4096])
  parser.add_argument('--kinds', nargs='+', default=['geometric', 'uniform'])
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--tol', type=float, default=1e-3)
  parser.add_argument('--out', default='benchmarks/out/auction_scaling.json')
  args = parser.parse_args(argv)
  if ot is None:
    print('POT not importable: its column is left out.')
  info = machine.describe()
  rows = {(kind, n): measure(kind, n, args.repeats, args.tol)
          for kind in args.kinds for n in args.sizes}
  print(table(rows, machine.headline(info)))
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'machine': info, 'tol': args.tol, 'repeats': args.repeats,
               'rows': [dict(cost=k, n=n, **r) for (k, n), r in rows.items()]}, f, indent=1)


if __name__ == '__main__':
  main()
