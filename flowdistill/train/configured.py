"""The flow-matching training a config describes: its path, coupling, model, loss, batches and
train state, and the one wiring of optimizer, jitted step and loop (`fit`) every experiment uses.

`train_fm(config, workdir)` is method 'fm' without its evaluation: what PGFM trains in its
latent space and what the benchmarks time.
"""

import jax

from flowdistill import fm, paths
from flowdistill.data import sources
from flowdistill.models.factory import build_model
from flowdistill.train import loop, parallel
from flowdistill.train.state import TrainState, init_state, make_optimizer
from flowdistill.train.step import make_train_step


def build_path(path_config) -> paths.AffinePath:
  """The probability path of `config.path`."""
  if path_config.name == 'stochastic':
    return paths.stochastic_path(path_config.noise_scale)
  return paths.get_path(path_config.name)


def coupling_args(fm_config) -> dict:
  """`fm.make_loss` coupling keywords of `config.fm`: `coupling` and `coupling_kwargs` (exact
  OT paired in the data pipeline leaves the step's coupling independent)."""
  coupling = 'independent' if fm_config.ot_on_host else fm_config.coupling
  kwargs = {}
  if coupling != 'independent':
    kwargs['block_size'] = fm_config.ot_block_size or None
  if coupling == 'exact':
    kwargs['solver'] = fm_config.ot_solver
  if coupling == 'sinkhorn':
    kwargs['epsilon'] = fm_config.sinkhorn_epsilon
  return {'coupling': coupling, 'coupling_kwargs': kwargs}


def num_classes(config, dataset) -> int:
  """The model's number of classes: the data's when conditional, else 0."""
  return dataset.num_classes if config.data.conditional else 0


def checkpoint_meta(config, dataset, *, two_time: bool) -> dict:
  """What a later run needs to rebuild this model from its checkpoints (e.g. as a teacher)."""
  return {'config': config.to_json(), 'data_shape': list(dataset.shape),
          'num_classes': num_classes(config, dataset), 'two_time': two_time}


def initial_state(config, params, key=None):
  """`(optimizer, fresh TrainState)` of `config.optim` / `config.train` for `params`; the
  state's key is `key` (default `jax.random.key(config.seed)`)."""
  optimizer = make_optimizer(config)
  key = jax.random.key(config.seed) if key is None else key
  return optimizer, init_state(params, optimizer, key, config.train.ema_rates)


def fit(config, params, loss_fn, batches: loop.BatchSource, workdir: str, *, meta: dict,
        extras: dict | None = None, key=None, pass_step: bool = False) -> TrainState:
  """Trains `params` on `loss_fn` to `config.train.steps`, resuming from `workdir`.

  The one wiring of optimizer, state, jitted step and loop that every experiment uses.

  Args:
    params: the initial parameters (a fresh run starts from them; a resumed one restores).
    loss_fn: `loss_fn(params, batch, key, **extras) -> (loss, metrics)` (and `step=` if
      `pass_step`).
    batches: `start_step -> iterator` of this process's numpy batches.
    meta: JSON-able facts stored beside each checkpoint (`checkpoint_meta`).
    extras: frozen loss inputs, e.g. {'teacher_params': ...}.
    key: the run's RNG key (default from `config.seed`).

  Returns:
    The final state, on this process's devices.
  """
  optimizer, state = initial_state(config, params, key)
  train = config.train
  return loop.train(
      state, make_train_step(loss_fn, optimizer, train.steps_per_call, pass_step=pass_step),
      batches, mesh=parallel.make_mesh(train.num_devices, data=train.mesh.data,
                                       fsdp=train.mesh.fsdp), workdir=workdir,
      num_steps=train.steps, steps_per_call=train.steps_per_call, log_every=train.log_every,
      ckpt_every=train.ckpt_every, keep=train.keep, meta=meta, extras=extras)


def fm_loss(config, dataset):
  """(apply_fn, initial params, loss_fn) of `config` on `dataset`."""
  classes = num_classes(config, dataset)
  apply_fn, params = build_model(config.model, dataset.shape, num_classes=classes,
                                 seed=config.seed)
  loss_fn = fm.make_loss(apply_fn, build_path(config.path),
                         time_distribution=config.fm.time_distribution,
                         label_dropout=config.fm.label_dropout, null_label=classes or None,
                         **coupling_args(config.fm))
  return apply_fn, params, loss_fn


def fm_setup(config, dataset):
  """(apply_fn, loss_fn, optimizer, initial state), to drive `train.loop` directly."""
  apply_fn, params, loss_fn = fm_loss(config, dataset)
  return (apply_fn, loss_fn, *initial_state(config, params))


def fm_batches(config, dataset):
  """The training batches, with OT-paired noise from the host when `config.fm.ot_on_host`."""
  source = sources.batch_source(dataset, config.data.batch_size, seed=config.seed,
                                conditional=config.data.conditional)
  if config.fm.ot_on_host:
    source = sources.with_ot_noise(source, config.data.batch_size, seed=config.seed,
                                   block_size=config.fm.ot_block_size or None,
                                   within_class=config.data.conditional)
  return source


def train_fm(config, workdir: str):
  """Trains (resuming from `workdir`) without evaluating; returns (dataset, apply_fn, state)."""
  dataset = sources.load(config.data)
  apply_fn, params, loss_fn = fm_loss(config, dataset)
  state = fit(config, params, loss_fn, fm_batches(config, dataset), workdir,
              meta=checkpoint_meta(config, dataset, two_time=False))
  return dataset, apply_fn, state
