"""flowdistill against TorchCFM, side by side in one run, as a user of each would write it.

Usage:
  pip install torch==2.13.0 torchcfm==1.0.7 torchdiffeq   # benchmark-only, CPU wheel
  python benchmarks/peers.py [--train-steps 2000] [--seconds 3] [--repeats 3]
      [--out benchmarks/out/peers.json]

Without `torchcfm` (or `torchdiffeq`) the peer's rows are left out and the script says so; the
project's requirements stay free of PyTorch.

Both sides: batch 1024 of the peer's own data generator (`torchcfm.utils.sample_moons`:
scikit-learn moons, noise 0.2, times 3 minus 1; here drawn by the same code from one seeded
generator, so both train on identical batches), x0 ~ N(0, I), Adam lr 1e-3.
- flowdistill: `fd.flow_matching_loss` on `MLP(2, hidden=256, depth=3)` (sinusoidal time
  embedding), optax Adam, one `jax.jit` step with donated parameters.
- TorchCFM: `ConditionalFlowMatcher(sigma=0)` / `ExactOptimalTransportConditionalFlowMatcher`
  on its `MLP(2, w=256, time_varying=True)` (3 hidden layers of 256, SELU), torch.optim.Adam,
  eager, `torch.set_num_threads(cpu_count)`.

Rows:
- matrix-product rate of this machine (f32 2048 x 2048 matmul, XLA and torch): the physical
  limit; the I-CFM step's FLOPs (XLA cost analysis) at its measured rate as a fraction of it.
- I-CFM and exact OT-CFM (full batch of 1024; flowdistill also with blocks of 64 and with the
  host solver) steps/s: timed windows of `--seconds`, `--repeats` interleaved, medians.
- the coupling's optimality: the on-device auction's pair cost (at `couple`'s default
  `ot_tol = 1e-3`) against SciPy's optimum on the
  same cost matrices (5 batches).
- W2 versus NFE after `--train-steps` steps (Euler 1/2/4/8/100 steps; W2 by exact OT between
  2000 samples and 2000 fresh data points, the same function for both).
- Dopri5 (rtol = atol = 1e-4) sampling at 2000 and 64 samples (peer: torchdiffeq `odeint`,
  no grad), and the exact log-likelihood of 1000 points (rtol = atol = 1e-5; peer: an
  augmented ODE with the exact trace by autograd, the way one would write it): first call
  (compile) apart, then the median of `--repeats` timed calls, with NFE.
"""

import argparse
import functools
import itertools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize
from flax import nnx
from sklearn.datasets import make_moons

import flowdistill as fd
from flowdistill import ode
from flowdistill.models import MLP

try:
  import torch
  import torchdiffeq
  from torchcfm import conditional_flow_matching as tcfm
  from torchcfm.models.models import MLP as TorchMLP
except ImportError:
  torch = None

BATCH = 1024


def moons(n: int, rng: np.random.RandomState) -> np.ndarray:
  """`torchcfm.utils.sample_moons(n)` from a given generator: [n, 2] float32."""
  return (make_moons(n, noise=0.2, random_state=rng)[0] * 3 - 1).astype(np.float32)


def w2(x, y) -> float:
  """W2 between two equal-size point sets by exact OT (SciPy)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  cost = ((x[:, None] - y[None])**2).sum(-1)
  rows, cols = scipy.optimize.linear_sum_assignment(cost)
  return float(np.sqrt(cost[rows, cols].mean()))


def timed(fn, seconds: float) -> float:
  """Calls/s of `fn()` (returns something to block on) over at least `seconds`."""
  fn()  # warm
  count, start = 0, time.perf_counter()
  while True:
    out = fn()
    count += 1
    elapsed = time.perf_counter() - start
    if elapsed >= seconds:
      _block(out)
      return count / (time.perf_counter() - start)


def _block(out):
  if torch is not None and isinstance(out, torch.Tensor):
    return out.item() if out.numel() == 1 else out
  return jax.block_until_ready(out)


def latency(fn, repeats: int) -> tuple[float, float]:
  """(first call s, median of `repeats` further calls s) of `fn()`."""
  start = time.perf_counter()
  _block(fn())
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    _block(fn())
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


# --- flowdistill, as a user writes it ----------------------------------------------------


class Ours:
  """flowdistill model, loss, optax step, samplers."""

  def __init__(self, coupling='independent', **coupling_kwargs):
    self.apply_fn, self.params = fd.to_apply_fn(MLP(2, hidden=256, depth=3, rngs=nnx.Rngs(0)))
    loss_fn = fd.flow_matching_loss(self.apply_fn, fd.linear_path(), coupling=coupling,
                                    coupling_kwargs=coupling_kwargs)
    self.opt = optax.adam(1e-3)
    self.opt_state = self.opt.init(self.params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, x1, i):
      key = jax.random.fold_in(jax.random.key(1), i)
      (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, {'x': x1}, key)
      updates, opt_state = self.opt.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    self.jitted = step
    self.i = 0

  def step(self, x1):
    self.params, self.opt_state, loss = self.jitted(self.params, self.opt_state, x1, self.i)
    self.i += 1
    return loss

  def step_flops(self, x1) -> float:
    cost = self.jitted.lower(self.params, self.opt_state, x1, 0).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost['flops'])

  def euler(self, n, steps, key=0):
    return ode.sample(self.apply_fn, self.params, jax.random.key(key), n, (2,), solver='euler',
                      steps=steps)[0]

  @functools.cached_property
  def dopri5(self):
    return jax.jit(lambda params, key, n: ode.sample(
        self.apply_fn, params, key, n, (2,), solver='dopri5', rtol=1e-4, atol=1e-4),
                   static_argnums=2)

  @functools.cached_property
  def loglik(self):
    return jax.jit(lambda params, x: ode.log_likelihood(
        self.apply_fn, params, x, divergence='exact', rtol=1e-5, atol=1e-5))


# --- TorchCFM, as its examples write it --------------------------------------------------


class Peer:
  """TorchCFM matcher, its MLP, torch Adam, torchdiffeq solves."""

  def __init__(self, exact_ot: bool = False):
    torch.manual_seed(0)
    self.model = TorchMLP(2, w=256, time_varying=True)
    self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
    self.fm = (tcfm.ExactOptimalTransportConditionalFlowMatcher(sigma=0.0) if exact_ot
               else tcfm.ConditionalFlowMatcher(sigma=0.0))
    self.nfe = 0

  def step(self, x1):
    x0 = torch.randn_like(x1)
    t, xt, ut = self.fm.sample_location_and_conditional_flow(x0, x1)
    vt = self.model(torch.cat([xt, t[:, None]], dim=-1))
    loss = torch.mean((vt - ut)**2)
    self.opt.zero_grad()
    loss.backward()
    self.opt.step()
    return loss.detach()

  def velocity(self, t, x):
    self.nfe += 1
    return self.model(torch.cat([x, t.expand(x.shape[0], 1)], dim=-1))

  def euler(self, n, steps, seed=0):
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
      for k in range(steps):
        x = x + self.velocity(torch.tensor(k / steps), x) / steps
    return x.numpy()

  def dopri5(self, n, seed=0):
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
      return torchdiffeq.odeint(self.velocity, x, torch.tensor([0.0, 1.0]), method='dopri5',
                                rtol=1e-4, atol=1e-4)[-1]

  def loglik(self, x):
    def augmented(t, state):
      z = state[:, :2].detach().requires_grad_(True)
      with torch.enable_grad():
        v = self.velocity(t, z)
        trace = sum(torch.autograd.grad(v[:, i].sum(), z, retain_graph=i == 0)[0][:, i]
                    for i in range(2))
      return torch.cat([v.detach(), trace.detach()[:, None]], dim=-1)

    state = torch.cat([x, torch.zeros(x.shape[0], 1)], dim=-1)
    end = torchdiffeq.odeint(augmented, state, torch.tensor([1.0, 0.0]), method='dopri5',
                             rtol=1e-5, atol=1e-5)[-1]
    x0, delta = end[:, :2], end[:, 2]
    return -0.5 * (x0**2).sum(-1) - np.log(2 * np.pi) + delta  # delta = int_1^0 div v dt


# --- measurements ------------------------------------------------------------------------


def matmul_rates(seconds: float) -> dict:
  """GFLOP/s of a float32 2048 x 2048 matrix product in XLA (and torch)."""
  n = 2048
  a = jax.random.normal(jax.random.key(0), (n, n))
  dot = jax.jit(jnp.dot)
  rates = {'xla': timed(lambda: dot(a, a), seconds) * 2 * n**3 / 1e9}
  if torch is not None:
    b = torch.randn(n, n)
    rates['torch'] = timed(lambda: b @ b, seconds) * 2 * n**3 / 1e9
  return rates


def coupling_gaps(rng, num: int = 5) -> dict:
  """Relative pair-cost gap of the on-device auction to SciPy's optimum, full batches."""
  solve = jax.jit(functools.partial(fd.auction.auction_assignment, tol=1e-3, with_info=True))
  gaps, certified = [], []
  for _ in range(num):
    x1, x0 = moons(BATCH, rng), rng.standard_normal((BATCH, 2)).astype(np.float32)
    cost = ((x1[:, None] - x0[None])**2).sum(-1)
    perm, info = solve(jnp.asarray(cost))
    rows, cols = scipy.optimize.linear_sum_assignment(cost.astype(np.float64))
    best = cost.astype(np.float64)[rows, cols].sum()
    gaps.append(float(cost.astype(np.float64)[np.arange(BATCH), np.asarray(perm)].sum() / best
                      - 1))
    certified.append(float(info['gap']))
  return {'max_gap': max(gaps), 'mean_gap': float(np.mean(gaps)),
          'max_certified_gap': max(certified)}


def step_rates(makers: dict, batches, seconds: float, repeats: int) -> dict:
  """Median steps/s of each `makers[name]() -> (object with .step, to_batch)`, interleaved."""
  made = {name: make() for name, make in makers.items()}
  rates = {name: [] for name in makers}
  for _ in range(repeats):
    for name, (obj, convert) in made.items():
      data = itertools.cycle([convert(b) for b in batches[:16]])
      rates[name].append(timed(functools.partial(lambda o, d: o.step(next(d)), obj, data),
                               seconds))
  return {name: statistics.median(r) for name, r in rates.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--train-steps', type=int, default=2000)
  parser.add_argument('--seconds', type=float, default=3.0)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--out', default='benchmarks/out/peers.json')
  args = parser.parse_args(argv)
  if torch is None:
    print('torchcfm/torchdiffeq not importable: measuring flowdistill only.')
  else:
    torch.set_num_threads(os.cpu_count())
  rng = np.random.RandomState(0)
  batches = [moons(BATCH, rng) for _ in range(args.train_steps)]
  to_jax, to_torch = jnp.asarray, (lambda b: torch.from_numpy(b)) if torch else None
  result = {'train_steps': args.train_steps, 'batch': BATCH, 'cpu_count': os.cpu_count(),
            'jax': jax.__version__, 'torch': torch.__version__ if torch else None}

  result['matmul_gflops'] = matmul_rates(args.seconds)
  makers = {'ours I-CFM': lambda: (Ours(), to_jax),
            'ours exact OT (auction, full batch)': lambda: (Ours('exact'), to_jax),
            'ours exact OT (auction, blocks of 64)': lambda: (Ours('exact', block_size=64),
                                                               to_jax),
            'ours exact OT (scipy on host, full batch)': lambda: (Ours('exact', solver='scipy'),
                                                                   to_jax)}
  if torch is not None:
    makers['TorchCFM I-CFM'] = lambda: (Peer(), to_torch)
    makers['TorchCFM exact OT-CFM (full batch)'] = lambda: (Peer(exact_ot=True), to_torch)
  result['steps_per_s'] = step_rates(makers, batches, args.seconds, args.repeats)
  result['coupling'] = coupling_gaps(np.random.RandomState(1))

  # Train both I-CFM models on the same batches, then quality and ODE timings.
  models = {'ours': (Ours(), to_jax)}
  if torch is not None:
    models['TorchCFM'] = (Peer(), to_torch)
  test = moons(2000, np.random.RandomState(2))
  result['w2'], result['dopri5'], result['loglik'] = {}, {}, {}
  for name, (model, convert) in models.items():
    for b in batches:
      loss = model.step(convert(b))
    _block(loss)
    result['w2'][name] = {f'euler {s}': w2(model.euler(2000, s), test) for s in (1, 2, 4, 8, 100)}
  ours = models['ours'][0]
  for n in (2000, 64):
    first, steady = latency(lambda n=n: ours.dopri5(ours.params, jax.random.key(3), n),
                            args.repeats)
    nfe = int(ours.dopri5(ours.params, jax.random.key(3), n)[1]['nfe'])
    samples = ours.dopri5(ours.params, jax.random.key(3), 2000)[0]
    result['dopri5'][f'ours {n}'] = {'first_s': first, 's': steady, 'nfe': nfe}
  result['w2']['ours']['dopri5'] = w2(samples, test)
  x_test = test[:1000]
  first, steady = latency(lambda: ours.loglik(ours.params, jnp.asarray(x_test)), args.repeats)
  logp, info = ours.loglik(ours.params, jnp.asarray(x_test))
  result['loglik']['ours'] = {'first_s': first, 's': steady, 'nfe': int(info['nfe']),
                              'nll': float(-jnp.mean(logp))}
  if torch is not None:
    peer = models['TorchCFM'][0]
    for n in (2000, 64):
      peer.nfe = 0
      first, steady = latency(lambda n=n: peer.dopri5(n), args.repeats)
      result['dopri5'][f'TorchCFM {n}'] = {'first_s': first, 's': steady,
                                           'nfe': peer.nfe // (args.repeats + 1)}
    result['w2']['TorchCFM']['dopri5'] = w2(peer.dopri5(2000).numpy(), test)
    peer.nfe = 0
    first, steady = latency(lambda: peer.loglik(torch.from_numpy(x_test)), args.repeats)
    nfe = peer.nfe // (args.repeats + 1)
    result['loglik']['TorchCFM'] = {'first_s': first, 's': steady, 'nfe': nfe,
                                    'nll': float(-peer.loglik(torch.from_numpy(x_test)).mean())}

  flops = Ours().step_flops(to_jax(batches[0]))
  rate = result['steps_per_s']['ours I-CFM']
  result['icfm_step'] = {'gflop': flops / 1e9, 'gflops_achieved': flops * rate / 1e9,
                         'fraction_of_xla_matmul': flops * rate / 1e9
                         / result['matmul_gflops']['xla']}
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=1)
  print(json.dumps(result, indent=1))


if __name__ == '__main__':
  main()
