"""Experiment `local_fm`: local flow matching — train a chain of flow blocks one after another,
push the training set through each, optionally distil every block into a one-jump flow map,
and report quality and NLL versus NFE for the chain (and the distilled chain).

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

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from flowdistill import cache, files, ode
from flowdistill.config import check_choice, check_positive
from flowdistill.data import pipeline, sources, toy
from flowdistill.errors import BadInput
from flowdistill.eval import report
from flowdistill.experiments import common
from flowdistill.fewstep import flow_map, local_fm
from flowdistill.models.factory import build_model
from flowdistill.train import configured, identity

DEFAULTS = dict(            # local flow matching: a chain of blocks (METHODS.md section 3)
    num_blocks=4, h0=0.1, growth=1.5,  # OU steps h0 * growth^n, the last block free
    warm_start=True,                   # block n+1 starts from block n's parameters
    train_size=100_000,                # points pushed through the chain (toy data)
    pushforward_solver='dopri5', pushforward_tol=1e-5, pushforward_steps=100,
    pushforward_chunk=4096,            # points per cached push-forward chunk
    distill_steps=0, distill_loss='lmd', distill_scheme='ordered',  # per-block flow maps
)


def validate(config) -> None:
  flat = identity.flatten(config)
  check_choice(flat, 'local_fm.pushforward_solver', ode.SOLVERS)
  check_choice(flat, 'local_fm.distill_loss', ('lmd', 'emd'))
  check_choice(flat, 'local_fm.distill_scheme', flow_map.TIME_SCHEMES)
  check_positive(flat, ints=('local_fm.num_blocks', 'local_fm.pushforward_chunk',
                             'local_fm.pushforward_steps', 'local_fm.train_size'),
                        floats=('local_fm.h0', 'local_fm.growth', 'local_fm.pushforward_tol'))
  if flat['local_fm.distill_steps'] < 0:
    raise BadInput(f'config.local_fm.distill_steps={flat["local_fm.distill_steps"]} must be '
                   '>= 0 (0: no distillation).')
  if flat['data.conditional']:
    raise BadInput('config.method="local_fm" trains unconditional chains; set '
                   'config.data.conditional=False.')
  if flat['data.source'] == 'toy' and flat['local_fm.train_size'] < flat['data.batch_size']:
    raise BadInput(f'config.local_fm.train_size={flat["local_fm.train_size"]} is below '
                   f'config.data.batch_size={flat["data.batch_size"]}; the later blocks draw '
                   'their batches from that many pushed points: raise it.')

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
  spec, file = _chain_spec(config), files.join(workdir, 'chain.json')
  if files.exists(file):
    old = files.read_json(file)
    changed = [k for k in spec if json.dumps(old.get(k), sort_keys=True) != json.dumps(
        spec[k], sort_keys=True)]
    if changed:
      raise BadInput(f'{workdir} holds a chain trained with other settings '
                     f'(config.{", config.".join(changed)} differ): use a new --workdir, or '
                     'the settings of that chain to resume it.')
    return
  if jax.process_index() == 0:
    files.write_json(file, spec)


def training_set(config, dataset) -> np.ndarray:
  """The points pushed through the chain: the training split, or a fixed draw for a toy."""
  if dataset.toy:
    key = jax.random.fold_in(jax.random.key(config.seed), 2**20)
    return np.asarray(toy.sample(dataset.toy, key, config.local_fm.train_size))
  return dataset.train['x']


def cached_push_forward(directory: str, push_fn, x: np.ndarray, chunk: int) -> np.ndarray:
  """`push_fn(rows) -> (pushed rows, nfe)` over x [N, ...] in chunks, cached on disk.

  Each chunk goes to its own `.npz`, written atomically with its manifest (`flowdistill.cache`),
  so an interrupted push-forward restarts at the first missing or damaged chunk; the last chunk
  is padded to the chunk size (one compiled shape). The result is `directory/pushforward.npy`
  (a one-file cache entry: a changed or truncated file is pushed again, with one warning), with
  `pushforward.json` holding the velocity evaluations spent (`evaluations`: sum over points of
  the NFE). Returns [N, ...].
  """
  parts = files.join(directory, f'pushforward_parts_c{chunk}')

  def push_chunk(i: int, part: str) -> dict:
    rows = x[i * chunk:(i + 1) * chunk]
    padded = np.concatenate([rows, x[:chunk - len(rows)]]) if len(rows) < chunk else rows
    out, nfe = push_fn(padded)
    pushed = {'x': np.asarray(out)[:len(rows)], 'nfe': np.asarray(nfe)}
    files.save_npz(part, **pushed)
    return pushed

  def build(final: str) -> np.ndarray:
    files.makedirs(parts)
    loaded = [cache.load_or_build_file(files.join(parts, f'{i:06d}.npz'),
                                       functools.partial(push_chunk, i), files.load_npz,
                                       describe='push-forward chunk')
              for i in range(-(-len(x) // chunk))]
    files.write_json(files.join(directory, 'pushforward.json'),
                     {'evaluations': int(sum(int(p['nfe']) * len(p['x']) for p in loaded)),
                      'chunk': chunk})
    pushed = np.concatenate([p['x'] for p in loaded])
    files.save_npy(final, pushed)
    return pushed

  final = files.join(directory, 'pushforward.npy')
  pushed = cache.load_or_build_file(final, build, files.load_npy, describe='push-forward')
  files.rmtree(parts)
  if pushed.shape != x.shape:
    raise BadInput(f'{final} holds {pushed.shape[0]} points of shape {pushed.shape[1:]}, but '
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
    self.step_sizes = local_fm.step_sizes(lf.num_blocks, lf.h0, lf.growth)
    self.path = configured.build_path(config.path)
    self.apply_fn, self.init_params = build_model(config.model, dataset.shape, seed=config.seed)
    self._train_set = None
    self._data = {}  # block index -> its data-side training points (n > 0)
    solve = {'solver': lf.pushforward_solver, 'rtol': lf.pushforward_tol,
             'atol': lf.pushforward_tol}
    if lf.pushforward_solver in ode.FIXED_SOLVERS:
      solve = {'solver': lf.pushforward_solver, 'steps': lf.pushforward_steps}
    self._push = jax.jit(lambda p, x: local_fm.push_forward(self.apply_fn, p, x, **solve))

  def block_dir(self, n: int) -> str:
    return files.join(self.workdir, f'block_{n}')

  def data(self, n: int) -> np.ndarray:
    """The data side of block n: the training set (n = 0) or block n-1's push-forward."""
    if n == 0:
      if self._train_set is None:
        self._train_set = training_set(self.config, self.dataset)
      return self._train_set
    if n not in self._data:
      self._data[n] = files.load_npy(files.join(self.block_dir(n - 1), 'pushforward.npy'))
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

  def meta(self, config, n: int, *, two_time: bool) -> dict:
    return dict(configured.checkpoint_meta(config, self.dataset, two_time=two_time), block=n,
                h=self.step_sizes[n])

  def train_block(self, n: int, init_params):
    """Trains (or restores) block n from `init_params`; returns its evaluation params."""
    config, h = self.config, self.step_sizes[n]
    # Dependent blocks keep their OU pairing; the configured coupling pairs the free block.
    coupling = (configured.coupling_args(config.fm) if h is None
                else {'coupling': 'independent', 'coupling_kwargs': {}})
    loss_fn = local_fm.block_loss(self.apply_fn, self.path, h,
                                  time_distribution=config.fm.time_distribution, **coupling)
    key = jax.random.key(config.seed)
    state = configured.fit(config, init_params, loss_fn, self.batches(n), self.block_dir(n),
                           meta=self.meta(config, n, two_time=False),
                           key=key if n == 0 else jax.random.fold_in(key, n))
    return common.eval_params(config, state)

  def push_forward(self, n: int, params) -> None:
    """Caches block n's push-forward of its data side (process 0 computes, all wait)."""
    if jax.process_index() == 0:
      cached_push_forward(self.block_dir(n), lambda x: _nfe_pair(self._push(params, x)),
                          self.data(n), self.config.local_fm.pushforward_chunk)
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
    students = []
    for n, (h, teacher) in enumerate(zip(self.step_sizes, blocks)):
      loss_fn = local_fm.distill_loss(map_apply_fn, self.apply_fn, self.path, h,
                                      loss=lf.distill_loss, scheme=lf.distill_scheme)
      state = configured.fit(distill_config, common.warm_start(map_init, teacher), loss_fn,
                             self.batches(n), files.join(self.block_dir(n), 'distill'),
                             meta=self.meta(distill_config, n, two_time=True),
                             extras={'teacher_params': teacher},
                             key=jax.random.fold_in(jax.random.key(config.seed + 1), n))
      students.append(common.eval_params(config, state))
    return map_apply_fn, students


def num_params(params) -> int:
  return int(sum(np.prod(np.shape(p)) for p in jax.tree.leaves(params)))


def chain_samplers(apply_fn, chain_params, eval_config, distilled=None) -> list:
  """[(label, sampler, params)]: Euler with each `eval.euler_steps` per block, the adaptive
  solver, and `eval.map_steps` jumps per distilled block (`report`'s sampler contract; the
  chains are unconditional, `cond` is None)."""

  def make(fn, **kwargs):
    return jax.jit(lambda p, x0, cond: fn(p, x0, **kwargs))

  def sample(p, x0, **kwargs):
    x, info = local_fm.sample_chain(apply_fn, p, x0, **kwargs)
    return x, info['nfe']

  out = [(f'chain euler-{k}/block', make(sample, solver='euler', steps=k), chain_params)
         for k in eval_config.euler_steps]
  out.append((f'chain {eval_config.adaptive_solver}',
              make(sample, solver=eval_config.adaptive_solver, rtol=eval_config.rtol,
                   atol=eval_config.atol), chain_params))
  if distilled is not None:
    map_apply_fn, map_params = distilled

    def jumps(p, x0, k):
      x, info = local_fm.jump_chain(map_apply_fn, p, x0, k)
      return x, jnp.asarray(info['nfe'])

    out += [(f'distilled {k}-jump/block', make(jumps, k=k), map_params)
            for k in eval_config.map_steps]
  return out


def chain_log_likelihood(apply_fn, chain_params, eval_config):
  """`report`'s `log_likelihood(x, cond, key)`: the divergence integrals summed over the
  blocks (`local_fm.chain_log_likelihood`), jitted once."""
  ev = eval_config

  @jax.jit
  def log_likelihood(chain_params, x, key):
    return local_fm.chain_log_likelihood(
        apply_fn, chain_params, x, key, divergence=ev.nll_divergence, num_probes=ev.nll_probes,
        solver=ev.adaptive_solver, rtol=ev.rtol, atol=ev.atol)

  return lambda x, cond, key: log_likelihood(chain_params, x, key)


def chain_section(chain: Chain, blocks) -> report.Section:
  """The chain's schedule and cost: parameters, training compute and the push-forward's."""
  config = chain.config
  per_block = num_params(blocks[0])
  evaluations = pushforward_evaluations(chain)
  values = {'step_sizes': list(chain.step_sizes), 'params_per_block': per_block,
            'train_compute': float(len(blocks) * config.train.steps * per_block),
            'pushforward_evaluations': evaluations,
            # A forward pass costs about a third of a training step per example.
            'pushforward_compute': evaluations / (3.0 * config.data.batch_size) * per_block}
  steps = ', '.join('free' if h is None else f'{h:g}' for h in chain.step_sizes)
  text = (f'Chain: {len(blocks)} blocks, OU steps ({steps}); the NLL sums the divergence '
          f'integrals of every block; {per_block} parameters per block; training compute '
          f'{values["train_compute"]:.4g} steps x parameters, plus about '
          f'{values["pushforward_compute"]:.3g} for the push-forward ({evaluations} velocity '
          'evaluations).')
  return report.Section(values, text)


def pushforward_evaluations(chain: Chain) -> int:
  """Velocity evaluations (points x NFE) spent pushing the training set through the chain."""
  total = 0
  for n in range(len(chain.step_sizes) - 1):
    total += files.read_json(files.join(chain.block_dir(n), 'pushforward.json'))['evaluations']
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
  chain_params = local_fm.stack_blocks(blocks)
  if distilled is not None:
    distilled = (distilled[0], local_fm.stack_blocks(distilled[1]))
  return common.write_report(
      config, dataset, chain_samplers(chain.apply_fn, chain_params, config.eval, distilled),
      workdir, log_likelihood=chain_log_likelihood(chain.apply_fn, chain_params, config.eval),
      sections=[chain_section(chain, blocks)])


METHOD = common.Method('local_fm', run, defaults=DEFAULTS, validate=validate,
                       sources=sources.SOURCES)
