"""Experiment: local flow matching — train a chain of flow blocks one after another, push the
training set through each, optionally distil every block into a one-jump flow map, and report
quality and NLL versus NFE for the chain (and the distilled chain).

Workdir layout (every piece resumable; rerunning the command continues where it stopped):

    WORKDIR/chain.json                  the chain's schedule; a rerun with another is refused
    WORKDIR/block_{n}/checkpoints/      block n's training run (n = 0 is next to the data)
    WORKDIR/block_{n}/pushforward.npy   the training set pushed through blocks 0..n
    WORKDIR/block_{n}/pushforward_parts_c{chunk}/   chunks of an unfinished push-forward
    WORKDIR/block_{n}/distill/checkpoints/          block n's flow-map student
    WORKDIR/results.json, results.md    the report

A finished block restores from its last checkpoint without training and its cached
push-forward is read back, so an interrupted chain resumes at the block (and the chunk of the
push-forward) where it stopped. Block 0 draws its batches exactly as global flow matching does
(fresh samples for 2-D toys, the training set otherwise); blocks n > 0 draw theirs from the
pushed-forward training set (for toys a fixed draw of `config.local_fm.train_size` points).
"""

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from flowdistill import ode, paths
from flowdistill.data import pipeline, sources, tabular, toy
from flowdistill.eval import feature_net, metrics, plots, report
from flowdistill.experiments.flow_map import warm_start
from flowdistill.experiments.flow_matching import checkpoint_meta, eval_params
from flowdistill.fewstep import local_fm as lfm
from flowdistill.models.factory import build_model
from flowdistill.train import loop, parallel
from flowdistill.train.state import init_state, make_optimizer
from flowdistill.train.step import make_train_step

# The settings that decide what a chain's blocks are; a workdir keeps one chain.
_CHAIN_KEYS = ('data', 'model', 'path', 'local_fm.num_blocks', 'local_fm.h0', 'local_fm.growth',
               'local_fm.warm_start', 'local_fm.train_size', 'train.steps', 'seed')


def _chain_spec(config) -> dict:
  spec = {}
  for key in _CHAIN_KEYS:
    value = config
    for part in key.split('.'):
      value = value[part]
    spec[key] = json.loads(value.to_json()) if hasattr(value, 'to_json') else value
  return spec


def check_workdir(config, workdir: str) -> None:
  """Writes `chain.json`, or refuses a workdir whose existing chain differs from `config`."""
  spec, file = _chain_spec(config), os.path.join(workdir, 'chain.json')
  if os.path.exists(file):
    with open(file) as f:
      old = json.load(f)
    changed = [k for k in spec if json.dumps(old.get(k), sort_keys=True) != json.dumps(
        spec[k], sort_keys=True)]
    if changed:
      raise ValueError(f'{workdir} holds a chain trained with other settings '
                       f'(config.{", config.".join(changed)} differ): use a new --workdir, or '
                       'the settings of that chain to resume it.')
    return
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(file + '.tmp', 'w') as f:
      json.dump(spec, f, indent=2)
    os.replace(file + '.tmp', file)


def training_set(config, dataset) -> np.ndarray:
  """The points pushed through the chain: the training split, or a fixed draw for a toy."""
  if dataset.toy:
    key = jax.random.fold_in(jax.random.key(config.seed), 2**20)
    return np.asarray(toy.sample(dataset.toy, key, config.local_fm.train_size))
  return dataset.train['x']


def cached_push_forward(directory: str, push_fn, x: np.ndarray, chunk: int) -> np.ndarray:
  """`push_fn(rows) -> (pushed rows, nfe)` over x [N, ...] in chunks, cached on disk.

  Each chunk goes to its own `.npz` by an atomic rename, so an interrupted push-forward
  restarts at the first missing chunk; the last chunk is padded to the chunk size (one compiled
  shape). The result is `directory/pushforward.npy`, with `pushforward.json` holding the
  velocity evaluations spent (`evaluations`: sum over points of the NFE). Returns [N, ...].
  """
  final = os.path.join(directory, 'pushforward.npy')
  if not os.path.exists(final):
    parts = os.path.join(directory, f'pushforward_parts_c{chunk}')
    os.makedirs(parts, exist_ok=True)
    starts = range(0, len(x), chunk)
    for i, start in enumerate(starts):
      part = os.path.join(parts, f'{i:06d}.npz')
      if os.path.exists(part):
        continue
      rows = x[start:start + chunk]
      padded = np.concatenate([rows, x[:chunk - len(rows)]]) if len(rows) < chunk else rows
      out, nfe = push_fn(padded)
      np.savez(part + '.tmp.npz', x=np.asarray(out)[:len(rows)], nfe=np.asarray(nfe))
      os.replace(part + '.tmp.npz', part)
    loaded = [np.load(os.path.join(parts, f'{i:06d}.npz')) for i in range(len(starts))]
    with open(os.path.join(directory, 'pushforward.json'), 'w') as f:
      json.dump({'evaluations': int(sum(int(p['nfe']) * len(p['x']) for p in loaded)),
                 'chunk': chunk}, f)
    np.save(final + '.tmp.npy', np.concatenate([p['x'] for p in loaded]))
    os.replace(final + '.tmp.npy', final)
    shutil.rmtree(parts)
  pushed = np.load(final)
  if pushed.shape != x.shape:
    raise ValueError(f'{final} holds {pushed.shape[0]} points of shape {pushed.shape[1:]}, but '
                     f'the training set has {x.shape}; delete it (or use a new --workdir).')
  return pushed


def _nfe_pair(solved):
  x, info = solved
  return x, info['nfe']


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


class Chain:
  """Trains the blocks of `config` in `workdir` (resuming), caching each push-forward."""

  def __init__(self, config, dataset, workdir: str):
    self.config, self.dataset, self.workdir = config, dataset, workdir
    lf = config.local_fm
    self.step_sizes = lfm.step_sizes(lf.num_blocks, lf.h0, lf.growth)
    self.path = (paths.stochastic_path(config.path.noise_scale)
                 if config.path.name == 'stochastic' else paths.get_path(config.path.name))
    self.apply_fn, self.init_params = build_model(config.model, dataset.shape, seed=config.seed)
    self.mesh = parallel.make_mesh(config.train.num_devices)
    self._train_set = None
    self._data = {}  # block index -> its data-side training points (n > 0)

  def block_dir(self, n: int) -> str:
    return os.path.join(self.workdir, f'block_{n}')

  def data(self, n: int) -> np.ndarray:
    """The data side of block n: the training set (n = 0) or block n-1's push-forward."""
    if n == 0:
      if self._train_set is None:
        self._train_set = training_set(self.config, self.dataset)
      return self._train_set
    if n not in self._data:
      self._data[n] = np.load(os.path.join(self.block_dir(n - 1), 'pushforward.npy'))
    return self._data[n]

  def batches(self, n: int):
    """Block n's batch source (`start_step -> iterator`), see the module docstring."""
    config = self.config
    if n == 0:
      return sources.batch_source(self.dataset, config.data.batch_size, seed=config.seed,
                                  conditional=False)
    data = self.data(n)
    return lambda start: pipeline.BatchIterator(
        {'x': data}, config.data.batch_size, seed=config.seed + n, start_step=start,
        process_index=jax.process_index(), process_count=jax.process_count())

  def _fm_kwargs(self, h):
    fm_config = self.config.fm
    coupling, coupling_kwargs = 'independent', {}
    if h is None and fm_config.coupling != 'independent':
      coupling = fm_config.coupling
      coupling_kwargs['block_size'] = fm_config.ot_block_size or None
      if coupling == 'sinkhorn':
        coupling_kwargs['epsilon'] = fm_config.sinkhorn_epsilon
    return {'time_distribution': fm_config.time_distribution, 'coupling': coupling,
                'coupling_kwargs': coupling_kwargs}

  def train_block(self, n: int, init_params):
    """Trains (or restores) block n from `init_params`; returns its evaluation params."""
    config, h = self.config, self.step_sizes[n]
    loss_fn = lfm.block_loss(self.apply_fn, self.path, h, **self._fm_kwargs(h))
    optimizer = make_optimizer(config)
    key = jax.random.key(config.seed)
    state = init_state(init_params, optimizer, key if n == 0 else jax.random.fold_in(key, n),
                       config.train.ema_rates)
    meta = dict(checkpoint_meta(config, self.dataset, two_time=False), block=n, h=h)
    state = loop.train(
        state, make_train_step(loss_fn, optimizer, config.train.steps_per_call), self.batches(n),
        mesh=self.mesh, workdir=self.block_dir(n), num_steps=config.train.steps,
        steps_per_call=config.train.steps_per_call, log_every=config.train.log_every,
        ckpt_every=config.train.ckpt_every, keep=config.train.keep, meta=meta)
    return parallel.host_local(eval_params(config, state))

  def push_forward(self, n: int, params) -> None:
    """Caches block n's push-forward of its data side (process 0 computes, all wait)."""
    lf = self.config.local_fm
    if jax.process_index() == 0:
      solve = {'solver': lf.pushforward_solver, 'rtol': lf.pushforward_tol,
                   'atol': lf.pushforward_tol}
      if lf.pushforward_solver in ode.FIXED_SOLVERS:
        solve = {'solver': lf.pushforward_solver, 'steps': lf.pushforward_steps}
      push = jax.jit(lambda p, x: lfm.push_forward(self.apply_fn, p, x, **solve))
      cached_push_forward(self.block_dir(n), lambda x: _nfe_pair(push(params, x)),
                          self.data(n), lf.pushforward_chunk)
    _sync(f'local_fm_pushforward_{n}')

  def train(self) -> list:
    """Every block's evaluation params, data -> noise, training and pushing as needed."""
    blocks, init = [], self.init_params
    for n in range(len(self.step_sizes)):
      params = self.train_block(n, init)
      blocks.append(params)
      if n + 1 < len(self.step_sizes):
        self.push_forward(n, params)
      if self.config.local_fm.warm_start:
        init = params
    return blocks

  def distill(self, blocks) -> tuple:
    """Distils every block into a two-time flow map; returns (map apply_fn, [params])."""
    config, lf = self.config, self.config.local_fm
    map_apply_fn, map_init = build_model(config.model, self.dataset.shape, two_time=True,
                                         seed=config.seed)
    distill_config = config.copy_and_resolve_references()
    distill_config.train.steps = lf.distill_steps
    optimizer = make_optimizer(distill_config)
    students = []
    for n, (h, teacher) in enumerate(zip(self.step_sizes, blocks)):
      loss_fn = lfm.distill_loss(map_apply_fn, self.apply_fn, self.path, h,
                                 loss=lf.distill_loss, scheme=lf.distill_scheme)
      state = init_state(warm_start(map_init, teacher), optimizer,
                         jax.random.fold_in(jax.random.key(config.seed + 1), n),
                         config.train.ema_rates)
      meta = dict(checkpoint_meta(distill_config, self.dataset, two_time=True), block=n, h=h)
      state = loop.train(
          state, make_train_step(loss_fn, optimizer, config.train.steps_per_call),
          self.batches(n), mesh=self.mesh, workdir=os.path.join(self.block_dir(n), 'distill'),
          num_steps=lf.distill_steps, steps_per_call=config.train.steps_per_call,
          log_every=config.train.log_every, ckpt_every=config.train.ckpt_every,
          keep=config.train.keep, meta=meta, extras={'teacher_params': teacher})
      students.append(parallel.host_local(eval_params(config, state)))
    return map_apply_fn, students


def num_params(params) -> int:
  return int(sum(np.prod(np.shape(p)) for p in jax.tree.leaves(params)))


def chain_samplers(chain: Chain, chain_params, eval_config, distilled=None) -> list:
  """[(label, jitted sampler(params, x0) -> (x, nfe), params)]: Euler with each
  `eval.euler_steps` per block, the adaptive solver, and `eval.map_steps` jumps per distilled
  block."""
  apply_fn, out = chain.apply_fn, []
  settings = [(f'chain euler-{k}/block', {'solver': 'euler', 'steps': k})
              for k in eval_config.euler_steps]
  adaptive = {'solver': eval_config.adaptive_solver, 'rtol': eval_config.rtol,
              'atol': eval_config.atol}
  settings.append((f'chain {eval_config.adaptive_solver}', adaptive))
  for label, kwargs in settings:
    fn = jax.jit(lambda p, x, kw=kwargs: lfm.sample_chain(apply_fn, p, x, **kw))
    out.append((label, fn, chain_params))
  if distilled is not None:
    map_apply_fn, map_params = distilled
    for k in eval_config.map_steps:
      fn = jax.jit(lambda p, x, k=k: lfm.jump_chain(map_apply_fn, p, x, k))
      out.append((f'distilled {k}-jump/block', fn, map_params))
  return out


def _run_sampler(sampler, params, x0, chunk: int = 1000):
  jax.block_until_ready(sampler(params, x0[:min(chunk, len(x0))]))  # compile outside timing
  outs, nfe, start = [], 0.0, time.perf_counter()
  for i in range(0, len(x0), chunk):
    x, info = sampler(params, x0[i:i + chunk])
    outs.append(np.asarray(x))
    nfe = float(info['nfe'])
  return np.concatenate(outs), nfe, (time.perf_counter() - start) / len(x0)


def reference_nll(config, dataset, x) -> float | None:
  """-mean log p(x) under the true density where it is known (the best achievable NLL)."""
  if config.data.source == 'tabular':
    return float(-jnp.mean(tabular.log_density(config.data.name, x)))
  if dataset.toy in ('8gaussians', 'gaussian'):
    return float(-jnp.mean(toy.log_density(dataset.toy, x)))
  if dataset.toy == 'checkerboard':
    return toy.entropy('checkerboard')
  return None


def evaluate(chain: Chain, blocks, workdir: str, distilled=None, extra: dict | None = None):
  """W2 (vectors) or Fréchet distance (images) vs NFE, and the chain NLL; writes results."""
  config, dataset, ev = chain.config, chain.dataset, chain.config.eval
  chain_params = lfm.stack_blocks(blocks)
  if distilled is not None:
    distilled = (distilled[0], lfm.stack_blocks(distilled[1]))
  key = jax.random.key(config.seed + 1)
  k_ref, k_noise, k_nll, k_sw, k_fresh = jax.random.split(key, 5)
  images = len(dataset.shape) == 3
  n = min(ev.num_samples, dataset.test['x'].shape[0]) if dataset.test else ev.num_samples
  reference = dataset.reference(k_ref, n)
  x0 = np.asarray(ode.noise(k_noise, n, dataset.shape))
  rows, panels = [], {'data': reference}
  if images:
    judge = feature_net.load_or_train(dataset.train, dataset.test, steps=ev.classifier_steps,
                                      seed=config.seed)
    real_features = judge.features(reference)
  else:
    fresh = (dataset.reference(k_fresh, n) if dataset.toy
             else dataset.test['x'][n:2 * n] if len(dataset.test['x']) >= 2 * n else None)
    if fresh is not None:
      rows.append({'sampler': 'data (a second sample: the finite-sample floor)', 'nfe': 0.0,
                   'w2': metrics.w2(fresh, reference),
                   'sliced_w2': float(metrics.sliced_w2(fresh, reference, k_sw)),
                   's_per_sample': 0.0})
  for label, sampler, params in chain_samplers(chain, chain_params, ev, distilled):
    samples, nfe, per_sample = _run_sampler(sampler, params, x0)
    row = {'sampler': label, 'nfe': nfe, 's_per_sample': per_sample}
    if images:
      row['fd'] = metrics.frechet_distance(judge.features(samples), real_features)
    else:
      row['w2'] = metrics.w2(samples, reference)
      row['sliced_w2'] = float(metrics.sliced_w2(samples, reference, k_sw))
    rows.append(row)
    panels[f'{label} (NFE {nfe:.0f})'] = samples
  nll_x = (dataset.test['x'][:ev.nll_samples] if dataset.test
           else dataset.reference(k_nll, ev.nll_samples))
  logp, info = jax.jit(lambda p, x: lfm.chain_log_likelihood(
      chain.apply_fn, p, x, k_nll, divergence=ev.nll_divergence, num_probes=ev.nll_probes,
      solver=ev.adaptive_solver, rtol=ev.rtol, atol=ev.atol))(chain_params, jnp.asarray(nll_x))
  result = {'rows': rows, 'nll': float(-jnp.mean(logp)), 'nll_nfe': float(info['nfe']),
            'step_sizes': list(chain.step_sizes)}
  if images:
    result['bpd'] = float(jnp.mean(ode.bits_per_dim(logp, int(np.prod(dataset.shape)))))
  else:
    result['nll_target'] = reference_nll(config, dataset, nll_x)
  result.update(extra or {})
  if ev.plot and dataset.shape == (2,):
    plots.scatter_panels(os.path.join(workdir, 'samples.png'), panels)
  elif ev.plot and images:
    for label, samples in panels.items():
      if label != 'data':
        name = label.split(' (')[0].replace(' ', '_').replace('/', '_per_')
        plots.image_grid(os.path.join(workdir, f'samples_{name}.png'), samples[:100])
  table = format_result(result, config)
  report.save_results(workdir, result, table)
  print(f'Results ({workdir}/results.md):\n{table}')
  return result


def format_result(result: dict, config) -> str:
  """Markdown: the samplers' table, then NLL and the chain's cost."""
  images = 'bpd' in result
  columns = ['sampler', 'nfe'] + (['fd'] if images else ['w2', 'sliced_w2']) + ['s_per_sample']
  table = report.markdown_table(result['rows'], columns)
  steps = ', '.join('free' if h is None else f'{h:g}' for h in result['step_sizes'])
  if images:
    table += f'\n\nNLL: {result["bpd"]:.4f} bits/dim ({config.eval.nll_divergence} divergence).'
  else:
    target = result.get('nll_target')
    table += (f'\n\nNLL (nats, {config.eval.nll_divergence} divergence through the chain): '
              f'{result["nll"]:.4f}' + (f'; under the true density: {target:.4f}'
                                        if target is not None else ''))
  table += (f'\n\nChain: {len(result["step_sizes"])} blocks, OU steps ({steps}); '
            f'{result["params_per_block"]} parameters per block; training compute '
            f'{result["train_compute"]:.4g} steps x parameters, plus about '
            f'{result["pushforward_compute"]:.3g} for the push-forward '
            f'({result["pushforward_evaluations"]} velocity evaluations).')
  return table


def pushforward_evaluations(chain: Chain) -> int:
  """Velocity evaluations (points x NFE) spent pushing the training set through the chain."""
  total = 0
  for n in range(len(chain.step_sizes) - 1):
    with open(os.path.join(chain.block_dir(n), 'pushforward.json')) as f:
      total += json.load(f)['evaluations']
  return total


def run(config, workdir: str) -> dict:
  """Trains the chain (resuming), distils it if asked, evaluates; returns the results."""
  dataset = sources.load(config.data)
  check_workdir(config, workdir)
  chain = Chain(config, dataset, workdir)
  blocks = chain.train()
  distilled = chain.distill(blocks) if config.local_fm.distill_steps else None
  if jax.process_index() != 0:
    return {}
  per_block = num_params(blocks[0])
  evaluations = pushforward_evaluations(chain)
  extra = {'params_per_block': per_block,
           'train_compute': float(len(blocks) * config.train.steps * per_block),
           'pushforward_evaluations': evaluations,
           # A forward pass costs about a third of a training step per example.
           'pushforward_compute': evaluations / (3.0 * config.data.batch_size) * per_block}
  return evaluate(chain, blocks, workdir, distilled, extra)
