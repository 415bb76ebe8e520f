"""What every experiment shares: the method record of the registry, building the configured
path and coupling, one training wiring (`fit`), teachers, and the evaluation step.

An experiment module (`*_run.py`) holds one method's `run(config, workdir) -> results` and a
`METHOD` record; it imports this module and the library, never another experiment.
"""

import dataclasses
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp

from flowdistill import ode, paths
from flowdistill.data import sources
from flowdistill.eval import report
from flowdistill.models.factory import build_model
from flowdistill.train import loop, parallel
from flowdistill.train.state import TrainState, ema_key, init_state, make_optimizer
from flowdistill.train.step import make_train_step
from flowdistill.train.teacher import Trained, load_trained


@dataclasses.dataclass(frozen=True)
class Method:
  """One entry of the method registry (`flowdistill.experiments.METHODS`).

  Attributes:
    name: the value of `config.method`.
    run: `run(config, workdir) -> results dict`: trains (resuming), evaluates, writes results.
    defaults: the method's own config section `config.<name>` with every key and its default
      (None: the method has no section); `base_config()` adds it.
    validate: `validate(flat)` raises ValueError naming a bad key of this method, given the
      config flattened to {'section.key': value}; called only when the method is selected.
    sources: the `config.data.source` values the method accepts.
  """
  name: str
  run: Callable
  defaults: dict | None = None
  validate: Callable[[dict], None] = lambda flat: None
  sources: tuple[str, ...] = sources.TOY_SOURCES + sources.IMAGE_SOURCES + sources.LATENT_SOURCES


def check_positive(flat: dict, ints=(), floats=()) -> None:
  """Raises naming the first key of `ints` below 1 or of `floats` not above 0."""
  for key in ints:
    if flat[key] < 1:
      raise ValueError(f'config.{key}={flat[key]} must be >= 1.')
  for key in floats:
    if not flat[key] > 0:
      raise ValueError(f'config.{key}={flat[key]} must be > 0.')


def check_choice(flat: dict, key: str, options) -> None:
  """Raises unless `config.<key>` is one of `options`."""
  if flat[key] not in options:
    raise ValueError(f'config.{key}={flat[key]!r} is not one of {list(options)}.')


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


def eval_apply_fn(config, dataset, apply_fn, *, two_time: bool = False):
  """The network's `apply_fn` for sampling and likelihoods: `apply_fn` (the trained one) when
  it computes in `config.eval.dtype` already, else the same network rebuilt in that dtype
  (float32 by default, whatever `config.model.dtype` trained in; the params are the same)."""
  if config.eval.dtype == config.model.dtype:
    return apply_fn
  return build_model(config.model, dataset.shape, num_classes=num_classes(config, dataset),
                     two_time=two_time, dtype=config.eval.dtype)[0]


def eval_params(config, state: TrainState):
  """The parameters to evaluate: the configured EMA, or the raw params."""
  return state.ema[ema_key(config.train.eval_ema)] if config.train.eval_ema else state.params


def guidance_kwargs(config, dataset) -> dict:
  """Classifier-free guidance settings for sampling (none when w = 1 or unconditional)."""
  if not config.data.conditional or config.eval.guidance == 1.0:
    return {}
  return {'guidance': config.eval.guidance, 'null_label': dataset.num_classes}


def data_identity(data_config) -> dict:
  """What names a data set: its source, and for generated sets also their name."""
  named = data_config.source in sources.TOY_SOURCES + sources.TABULAR_SOURCES
  return {'source': data_config.source, **({'name': data_config.name} if named else {})}


def matching_teacher(config, dataset) -> Trained:
  """The model in `config.teacher.workdir`, checked against this run's data set, shape and
  classes."""
  teacher = load_trained(config.teacher.workdir,
                         ema=None if config.teacher.ema < 0 else config.teacher.ema)
  classes = num_classes(config, dataset)
  if teacher.data_shape != tuple(dataset.shape) or teacher.num_classes != classes:
    raise ValueError(
        f'The teacher in {config.teacher.workdir} was trained on samples of shape '
        f'{teacher.data_shape} with {teacher.num_classes} classes; this config has '
        f'{tuple(dataset.shape)} with {classes}. Use the teacher of this data set.')
  theirs, mine = data_identity(teacher.config.data), data_identity(config.data)
  if theirs != mine:
    raise ValueError(f'The teacher in {config.teacher.workdir} was trained on {theirs}; this '
                     f'config distils {mine}. Use a teacher of this data set, or set '
                     'config.data to the teacher\'s.')
  return teacher


def teacher_velocity(config, teacher: Trained, dataset):
  """A velocity teacher as its students see it: classifier-free guided with
  `config.eval.guidance` when conditional (the teacher rows of the report use the same)."""
  guidance = guidance_kwargs(config, dataset)
  if guidance:
    return ode.guided_apply_fn(teacher.apply_fn, guidance['guidance'], guidance['null_label'])
  return teacher.apply_fn


def warm_start(params, teacher_params):
  """Copies every teacher array whose path and shape the student shares (a two-time student
  has an extra `gap` embedding, which keeps its initialisation)."""
  flat_teacher = dict(jax.tree_util.tree_flatten_with_path(teacher_params)[0])
  return jax.tree_util.tree_map_with_path(
      lambda path, p: flat_teacher[path] if path in flat_teacher and jnp.shape(
          flat_teacher[path]) == jnp.shape(p) else p, params)


def evaluate(config, dataset, samplers, workdir: str, *, step: int | None = None,
             **report_kwargs) -> dict:
  """Runs the report (`eval.report.report`) with this run's evaluation settings, writes
  `results.json` / `results.md` and prints the table. Process 0 only.

  `step`: the training step of the evaluated parameters, recorded as `results.json['step']`.

  `report_kwargs`: `log_likelihood`, `velocity_model`, `sections`, `row_extra`,
  `moments_reference` (see `report.report`).

  Returns:
    The results dict.
  """
  result, table = report.report(
      samplers, dataset, config.eval, jax.random.key(config.seed + 1),
      conditional=config.data.conditional, seed=config.seed, workdir=workdir, **report_kwargs)
  if step is not None:
    result['step'] = step
  report.save_results(workdir, result, table)
  print(f'Results ({os.path.join(workdir, "results.md")}):\n{table}')
  return result
