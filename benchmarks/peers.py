"""flowdistill against TorchCFM and flow_matching, side by side, as a user of each writes it.

Usage:
  pip install torch==2.13.0 torchcfm==1.0.7 torchdiffeq flow-matching==1.0.10  # benchmark-only
  python benchmarks/peers.py [--train-steps 2000] [--seconds 3] [--repeats 3]
      [--out benchmarks/out/peers.json]

Without `torchcfm` (or `torchdiffeq`) both peers' rows are left out (the flow_matching peer
trains TorchCFM's MLP), without `flow_matching` its rows, and the script says so; the
project's requirements stay free of PyTorch.

All sides: batch 1024 of TorchCFM's own data generator (`torchcfm.utils.sample_moons`:
scikit-learn moons, noise 0.2, times 3 minus 1; here drawn by the same code from one seeded
generator, so all train on identical batches), x0 ~ N(0, I), Adam lr 1e-3.
- flowdistill: `fd.flow_matching_loss` on `MLP(2, hidden=256, depth=3)` (sinusoidal time
  embedding of its default width 16; also at 64, the default before issue 33), optax Adam,
  one `jax.jit` step with donated parameters.
- TorchCFM: `ConditionalFlowMatcher(sigma=0)` / `ExactOptimalTransportConditionalFlowMatcher`
  on its `MLP(2, w=256, time_varying=True)` (3 hidden layers of 256, SELU), torch.optim.Adam,
  eager, `torch.set_num_threads(cpu_count)`.
- flow_matching (facebookresearch), as its 2-D example: `AffineProbPath(CondOTScheduler())`,
  `path.sample(t=t, x_0=x_0, x_1=x_1)` and MSE to `dx_t`, on the same TorchCFM MLP (so the
  step compares the libraries, not the networks) behind a `ModelWrapper`; `ODESolver` for
  sampling and likelihoods (torchdiffeq underneath).

Rows:
- the machine (`benchmarks/machine.py`: CPU model, cores, SIMD width, f32 2048 x 2048 matmul
  rate in XLA and torch); the I-CFM step's FLOPs (XLA cost analysis) at its measured rate as
  a fraction of XLA's matmul rate.
- I-CFM and exact OT-CFM (full batch of 1024; flowdistill also with blocks of 64 and with the
  host solver) steps/s: timed windows of `--seconds`, `--repeats` interleaved, medians.
- the coupling's optimality: the on-device auction's pair cost (at `couple`'s default
  `ot_tol = 1e-3`) against SciPy's optimum on the
  same cost matrices (5 batches).
- W2 versus NFE after `--train-steps` steps (Euler 1/2/4/8/100 steps; W2 by exact OT between
  2000 samples and 2000 fresh data points, the same function for all).
- Dopri5 (rtol = atol = 1e-4) sampling at 2000 and 64 samples (TorchCFM: torchdiffeq `odeint`,
  no grad; flow_matching: `ODESolver.sample`): first call (compile) apart, then the median of
  `--repeats` timed calls, with NFE.
- log-likelihood of 1000 points, Dopri5 at rtol = atol = 1e-5, timed the same way. TorchCFM
  has no likelihood API: an augmented ODE with the exact trace by autograd, the way one would
  write it, on its own model. flow_matching's `ODESolver.compute_likelihood` (exact divergence
  and its one-probe Rademacher Hutchinson estimate) runs on our trained model itself, copied
  into torch (`TorchTwin`, its velocity checked against ours), against our
  `ode.log_likelihood` (exact, and Hutchinson with one Rademacher probe): the NLLs of the
  same weights, so the exact rows must agree.
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
import machine
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
try:
  from flow_matching.path import AffineProbPath
  from flow_matching.path.scheduler import CondOTScheduler
  from flow_matching.solver import ODESolver
  from flow_matching.utils import ModelWrapper
except ImportError:
  ODESolver = None

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


class PeerNet(nnx.Module):
  """TorchCFM's `MLP(2, w=256, time_varying=True)` in NNX: (x, t) as one [B, 3] input, three
  hidden layers of 256 with SELU. The I-CFM step on it compares the libraries on one network."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs)
                            for a, b in ((3, 256), (256, 256), (256, 256), (256, 2))])

  def __call__(self, x, t, *, s=None, cond=None, train=False):
    """x: [B, 2]; t: [B] or [] -> [B, 2]."""
    del s, cond, train
    h = jnp.concatenate([x, jnp.broadcast_to(t, x.shape[:1])[:, None]], axis=-1)
    for layer in self.layers[:-1]:
      h = jax.nn.selu(layer(h))
    return self.layers[-1](h)


class Ours:
  """flowdistill model (its MLP, or `PeerNet` with `peer_net`), loss, optax step, samplers."""

  def __init__(self, coupling='independent', peer_net: bool = False, time_dim: int = 16,
               **coupling_kwargs):
    module = (PeerNet(rngs=nnx.Rngs(0)) if peer_net
              else MLP(2, hidden=256, depth=3, time_dim=time_dim, rngs=nnx.Rngs(0)))
    self.apply_fn, self.params = fd.to_apply_fn(module)
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
    """jitted (params, x [B, 2], key, divergence) -> (log p [B], info); the key is the
    Hutchinson probe's (one Rademacher probe), unused by 'exact'."""
    return jax.jit(lambda params, x, key, divergence: ode.log_likelihood(
        self.apply_fn, params, x, key, divergence=divergence, rtol=1e-5, atol=1e-5),
                   static_argnums=3)


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


# --- flow_matching (facebookresearch), as its examples write it --------------------------


def model_wrapper(model):
  """`model` ([B, 3] = (x, t) -> [B, 2], torchcfm's convention) behind flow_matching's
  `ModelWrapper.forward(x [B, 2], t [B] or [], **extras)`, counting its calls in `.nfe`."""

  class Wrapped(ModelWrapper):
    nfe = 0

    def forward(self, x, t, **extras):
      self.nfe += 1
      return self.model(torch.cat([x, t.reshape(-1, 1).expand(x.shape[0], 1)], dim=-1))

  return Wrapped(model)


class FlowMatchingPeer:
  """flow_matching's affine CondOT path and ODESolver on TorchCFM's MLP, torch Adam."""

  def __init__(self):
    torch.manual_seed(0)
    self.velocity = model_wrapper(TorchMLP(2, w=256, time_varying=True))
    self.opt = torch.optim.Adam(self.velocity.parameters(), lr=1e-3)
    self.path = AffineProbPath(scheduler=CondOTScheduler())
    self.solver = ODESolver(velocity_model=self.velocity)

  @property
  def nfe(self) -> int:
    """Velocity evaluations counted by the wrapper (set to 0 to restart the count)."""
    return self.velocity.nfe

  @nfe.setter
  def nfe(self, value: int):
    self.velocity.nfe = value

  def step(self, x1):
    x0 = torch.randn_like(x1)
    t = torch.rand(x1.shape[0])
    path_sample = self.path.sample(t=t, x_0=x0, x_1=x1)
    loss = torch.pow(self.velocity(path_sample.x_t, path_sample.t) - path_sample.dx_t, 2).mean()
    self.opt.zero_grad()
    loss.backward()
    self.opt.step()
    return loss.detach()

  def euler(self, n, steps, seed=0):
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    return self.solver.sample(x, step_size=1 / steps, method='euler').numpy()

  def dopri5(self, n, seed=0):
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    return self.solver.sample(x, step_size=None, method='dopri5', atol=1e-4, rtol=1e-4)


class TorchTwin:
  """Our `MLP(2, hidden=256, depth=3)` in torch with its (trained) parameters copied: the same
  function, taking [B, 3] = (x, t) -> [B, 2] as torchcfm's MLP does, so that flow_matching's
  solver runs on our weights."""

  def __init__(self, params):
    self.params = jax.tree.map(lambda a: torch.from_numpy(np.array(a)), params)
    half = self.params['time']['t_mlp']['layers'][0]['kernel'].shape[0] // 2
    # `sinusoidal_embedding`'s defaults: highest frequency 10, period ratio 1e4.
    self.freqs = 10.0 * torch.exp(-np.log(1e4) * torch.arange(half) / half)

  def __call__(self, xt):
    dense = lambda p, h: h @ p['kernel'] + p['bias']
    angles = xt[:, 2:] * self.freqs
    t_mlp = self.params['time']['t_mlp']['layers']
    emb = dense(t_mlp[2], torch.nn.functional.silu(
        dense(t_mlp[0], torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1))))
    h = torch.cat([xt[:, :2], emb], dim=-1)
    for i in range(len(self.params['hidden'])):
      h = torch.nn.functional.silu(dense(self.params['hidden'][i], h))
    return dense(self.params['out'], h)


def flow_matching_loglik(solver, x, exact: bool):
  """`solver.compute_likelihood` of x [B, 2] as flow_matching's 2-D example calls it (prior
  N(0, I)), Dopri5 at 1e-5, exact divergence or one Rademacher probe: log p [B]."""
  log_p0 = torch.distributions.Independent(
      torch.distributions.Normal(torch.zeros(2), torch.ones(2)), 1).log_prob
  return solver.compute_likelihood(x_1=x, log_p0=log_p0, step_size=None, method='dopri5',
                                   atol=1e-5, rtol=1e-5, exact_divergence=exact)[1]


# --- measurements ------------------------------------------------------------------------


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


def table(result: dict, out: str) -> str:
  """The printed summary: the machine line, a markdown table with a column per library ('–'
  where a library has no such row), the same-weights likelihood check and the I-CFM step's
  share of the matmul rate."""
  libs = ('TorchCFM', 'flow_matching', 'ours')
  steps, w2s, dopri5, loglik = (result[k] for k in ('steps_per_s', 'w2', 'dopri5', 'loglik'))
  exact_ot = {'TorchCFM': 'TorchCFM exact OT-CFM (full batch)',
              'ours': 'ours exact OT (auction, full batch)'}
  same_net = {'TorchCFM': 'TorchCFM I-CFM', 'flow_matching': 'flow_matching I-CFM',
              'ours': "ours I-CFM, TorchCFM's network"}
  solve = lambda d: f"{d['s']:.3f} ({d['nfe']})"
  likelihood = lambda d: f"{d['s']:.3f} ({d['nfe']}), {d['nll']:.4f}"
  gaps = result['coupling']
  rows = [
      ('I-CFM steps/s', lambda lib: f"{steps[f'{lib} I-CFM']:.1f}"),
      ("I-CFM steps/s on TorchCFM's network (3×256 SELU, t as an input)",
       lambda lib: f'{steps[same_net[lib]]:.1f}'),
      ('I-CFM steps/s, our MLP at time_dim 64 (the default before issue 33)',
       lambda lib: f"{steps[f'{lib} I-CFM, time_dim 64']:.1f}"),
      ('exact OT-CFM steps/s, full batch of 1024 (TorchCFM: POT `emd`; ours: auction)',
       lambda lib: f'{steps[exact_ot[lib]]:.2f}'),
      ('exact OT-CFM steps/s, blocks of 64',
       lambda lib: f"{steps[f'{lib} exact OT (auction, blocks of 64)']:.1f}"),
      ('exact OT-CFM steps/s, full batch, SciPy on the host',
       lambda lib: f"{steps[f'{lib} exact OT (scipy on host, full batch)']:.2f}"),
      ('auction pair cost vs SciPy, 5 full batches: max / mean gap (certified)',
       lambda lib: {'ours': f"{gaps['max_gap']:.1e} / {gaps['mean_gap']:.1e} "
                            f"(≤ {gaps['max_certified_gap']:.1e})"}[lib]),
      (f"W2 after {result['train_steps']} steps, Euler 1 / 2 / 4 / 8 / 100 steps",
       lambda lib: ' / '.join(f"{w2s[lib][f'euler {k}']:.2f}" for k in (1, 2, 4, 8, 100))),
      ('W2, Dopri5 samples', lambda lib: f"{w2s[lib]['dopri5']:.3f}"),
      ('Dopri5 (rtol = atol = 1e-4) 2000 samples: s (NFE)',
       lambda lib: solve(dopri5[f'{lib} 2000'])),
      ('Dopri5 64 samples: s (NFE)', lambda lib: solve(dopri5[f'{lib} 64'])),
      ('first call (compile), Dopri5 2000 / 64 s',
       lambda lib: ' / '.join(f"{dopri5[f'{lib} {n}']['first_s']:.2f}" for n in (2000, 64))),
      ('exact log-likelihood of 1000 points, Dopri5 1e-5: s (NFE), NLL',
       lambda lib: likelihood(loglik[f'{lib} exact'])),
      ('Hutchinson (1 Rademacher probe) log-likelihood: s (NFE), NLL',
       lambda lib: likelihood(loglik[f'{lib} hutchinson'])),
  ]
  lines = [machine.headline(result['machine']), '',
           '| row | ' + ' | '.join('flowdistill' if lib == 'ours' else lib for lib in libs) + ' |',
           '|---|' + '---:|' * len(libs)]
  for label, cell in rows:
    cells = []
    for lib in libs:
      try:
        cells.append(cell(lib))
      except KeyError:
        cells.append('–')
    lines.append(f"| {label} | {' | '.join(cells)} |")
  if 'same_weights' in result:
    same = result['same_weights']
    lines.append(f"\nflow_matching's likelihoods are of our trained model, copied into torch "
                 f"(velocity max |difference| {same['max_velocity_diff']:.1e}): NLL "
                 f"flow_matching - ours {same['delta_nll_exact']:+.5f} exact, "
                 f"{same['delta_nll_hutchinson']:+.4f} Hutchinson (different probes); "
                 "TorchCFM's is of its own model.")
  step = result['icfm_step']
  lines.append(f"I-CFM step: {step['gflop']:.2f} GFLOP (XLA cost analysis) at "
               f"{steps['ours I-CFM']:.1f} steps/s = {step['gflops_achieved']:.0f} GFLOP/s, "
               f"{100 * step['fraction_of_xla_matmul']:.0f} % of XLA's matmul rate.")
  lines.append(f'All figures: {out}')
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--train-steps', type=int, default=2000)
  parser.add_argument('--seconds', type=float, default=3.0)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--out', default='benchmarks/out/peers.json')
  args = parser.parse_args(argv)
  with_fm = torch is not None and ODESolver is not None
  if torch is None:
    print('torchcfm/torchdiffeq not importable: measuring flowdistill only.')
  else:
    torch.set_num_threads(os.cpu_count())
    if not with_fm:
      print('flow_matching not importable: its rows are left out.')
  rng = np.random.RandomState(0)
  batches = [moons(BATCH, rng) for _ in range(args.train_steps)]
  to_jax, to_torch = jnp.asarray, (lambda b: torch.from_numpy(b)) if torch else None
  result = {'train_steps': args.train_steps, 'batch': BATCH,
            'torch': torch.__version__ if torch else None,
            'machine': machine.describe(args.seconds, torch)}

  makers = {'ours I-CFM': lambda: (Ours(), to_jax),
            "ours I-CFM, TorchCFM's network": lambda: (Ours(peer_net=True), to_jax),
            'ours I-CFM, time_dim 64': lambda: (Ours(time_dim=64), to_jax),
            'ours exact OT (auction, full batch)': lambda: (Ours('exact'), to_jax),
            'ours exact OT (auction, blocks of 64)': lambda: (Ours('exact', block_size=64),
                                                               to_jax),
            'ours exact OT (scipy on host, full batch)': lambda: (Ours('exact', solver='scipy'),
                                                                   to_jax)}
  if torch is not None:
    makers['TorchCFM I-CFM'] = lambda: (Peer(), to_torch)
    makers['TorchCFM exact OT-CFM (full batch)'] = lambda: (Peer(exact_ot=True), to_torch)
  if with_fm:
    makers['flow_matching I-CFM'] = lambda: (FlowMatchingPeer(), to_torch)
  result['steps_per_s'] = step_rates(makers, batches, args.seconds, args.repeats)
  result['coupling'] = coupling_gaps(np.random.RandomState(1))

  # Train the I-CFM models on the same batches, then quality and ODE timings.
  models = {'ours': (Ours(), to_jax)}
  if torch is not None:
    models['TorchCFM'] = (Peer(), to_torch)
  if with_fm:
    models['flow_matching'] = (FlowMatchingPeer(), to_torch)
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
  for divergence in ('exact', 'hutchinson'):
    call = lambda d=divergence: ours.loglik(ours.params, jnp.asarray(x_test), jax.random.key(4), d)
    first, steady = latency(call, args.repeats)
    logp, info = call()
    result['loglik'][f'ours {divergence}'] = {'first_s': first, 's': steady,
                                              'nfe': int(info['nfe']),
                                              'nll': float(-jnp.mean(logp))}
  for name, peer in ((name, model) for name, (model, _) in models.items() if name != 'ours'):
    for n in (2000, 64):
      peer.nfe = 0
      first, steady = latency(lambda n=n, peer=peer: peer.dopri5(n), args.repeats)
      result['dopri5'][f'{name} {n}'] = {'first_s': first, 's': steady,
                                         'nfe': peer.nfe // (args.repeats + 1)}
    result['w2'][name]['dopri5'] = w2(peer.dopri5(2000).numpy(), test)
  if torch is not None:
    peer = models['TorchCFM'][0]
    peer.nfe = 0
    first, steady = latency(lambda: peer.loglik(torch.from_numpy(x_test)), args.repeats)
    nfe = peer.nfe // (args.repeats + 1)
    result['loglik']['TorchCFM exact'] = {
        'first_s': first, 's': steady, 'nfe': nfe,
        'nll': float(-peer.loglik(torch.from_numpy(x_test)).mean())}
  if with_fm:
    # flow_matching's likelihood of our own trained weights, copied into torch.
    twin = TorchTwin(ours.params)
    draw = np.random.RandomState(5)
    x = draw.standard_normal((1000, 2)).astype(np.float32)
    t = draw.rand(1000).astype(np.float32)
    ours_v = np.asarray(ours.apply_fn(ours.params, jnp.asarray(x), jnp.asarray(t)))
    twin_v = twin(torch.from_numpy(np.concatenate([x, t[:, None]], axis=-1))).numpy()
    diff = float(np.abs(ours_v - twin_v).max())
    assert diff < 1e-5, f'torch twin of our MLP differs: max |velocity difference| {diff:.2e}'
    velocity = model_wrapper(twin)
    solver = ODESolver(velocity_model=velocity)
    for divergence in ('exact', 'hutchinson'):
      call = lambda exact=divergence == 'exact': flow_matching_loglik(
          solver, torch.from_numpy(x_test), exact)
      velocity.nfe = 0
      first, steady = latency(call, args.repeats)
      result['loglik'][f'flow_matching {divergence}'] = {
          'first_s': first, 's': steady, 'nfe': velocity.nfe // (args.repeats + 1),
          'nll': float(-call().mean())}
    nll = lambda name: result['loglik'][name]['nll']
    result['same_weights'] = {
        'max_velocity_diff': diff,
        'delta_nll_exact': nll('flow_matching exact') - nll('ours exact'),
        'delta_nll_hutchinson': nll('flow_matching hutchinson') - nll('ours hutchinson')}

  flops = Ours().step_flops(to_jax(batches[0]))
  rate = result['steps_per_s']['ours I-CFM']
  result['icfm_step'] = {'gflop': flops / 1e9, 'gflops_achieved': flops * rate / 1e9,
                         'fraction_of_xla_matmul': flops * rate / 1e9
                         / result['machine']['matmul_gflops']['xla']}
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=1)
  print(table(result, args.out))


if __name__ == '__main__':
  main()
