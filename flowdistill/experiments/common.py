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
import ml_collections

from flowdistill import ode
from flowdistill.data import sources
from flowdistill.errors import BadInput
from flowdistill.eval import report
from flowdistill.models.factory import build_model
from flowdistill.train import configured
from flowdistill.train.state import TrainState, ema_key
from flowdistill.train.teacher import Trained, load_trained


@dataclasses.dataclass(frozen=True)
class Method:
  """One entry of the method registry (`flowdistill.experiments.REGISTRY`).

  Attributes:
    name: the value of `config.method`.
    run: `run(config, workdir) -> results dict`: trains (resuming), evaluates, writes results.
    defaults: the method's own config section `config.<name>` with every key and its default
      (None: the method has no section); `experiments.method_config()` adds it.
    validate: `validate(config)` raises `BadInput` naming a bad key of this method; called
      only when the method is selected, after the shared checks.
    sources: the `config.data.source` values the method accepts.
  """
  name: str
  run: Callable
  defaults: dict | None = None
  validate: Callable[[ml_collections.ConfigDict], None] = lambda config: None
  sources: tuple[str, ...] = sources.TOY_SOURCES + sources.IMAGE_SOURCES + sources.LATENT_SOURCES


def eval_apply_fn(config, dataset, apply_fn, *, two_time: bool = False):
  """The network's `apply_fn` for sampling and likelihoods: `apply_fn` (the trained one) when
  it computes in `config.eval.dtype` already, else the same network rebuilt in that dtype
  (float32 by default, whatever `config.model.dtype` trained in; the params are the same)."""
  if config.eval.dtype == config.model.dtype:
    return apply_fn
  return build_model(config.model, dataset.shape,
                     num_classes=configured.num_classes(config, dataset), two_time=two_time,
                     dtype=config.eval.dtype)[0]


def eval_params(config, state: TrainState):
  """The parameters to evaluate: the configured EMA, or the raw params."""
  return state.ema[ema_key(config.train.eval_ema)] if config.train.eval_ema else state.params


def cfg_kwargs(config, dataset) -> dict:
  """Classifier-free guidance settings for sampling (none when w = 1 or unconditional)."""
  if not config.data.conditional or config.eval.cfg_scale == 1.0:
    return {}
  return {'cfg_scale': config.eval.cfg_scale, 'null_label': dataset.num_classes}


def data_identity(data_config) -> dict:
  """What names a data set: its source, and for generated sets also their name."""
  named = data_config.source in sources.TOY_SOURCES + sources.TABULAR_SOURCES
  return {'source': data_config.source, **({'name': data_config.name} if named else {})}


def matching_teacher(config, dataset) -> Trained:
  """The model in `config.teacher.workdir`, checked against this run's data set, shape and
  classes."""
  teacher = load_trained(config.teacher.workdir,
                         ema=None if config.teacher.ema < 0 else config.teacher.ema)
  classes = configured.num_classes(config, dataset)
  if teacher.data_shape != tuple(dataset.shape) or teacher.num_classes != classes:
    raise BadInput(
        f'The teacher in {config.teacher.workdir} was trained on samples of shape '
        f'{teacher.data_shape} with {teacher.num_classes} classes; this config has '
        f'{tuple(dataset.shape)} with {classes}. Use the teacher of this data set.')
  theirs, mine = data_identity(teacher.config.data), data_identity(config.data)
  if theirs != mine:
    raise BadInput(f'The teacher in {config.teacher.workdir} was trained on {theirs}; this '
                   f'config distils {mine}. Use a teacher of this data set, or set '
                   'config.data to the teacher\'s.')
  return teacher


def teacher_velocity(config, teacher: Trained, dataset):
  """A velocity teacher as its students see it: classifier-free guided with
  `config.eval.cfg_scale` when conditional (the teacher rows of the report use the same)."""
  cfg = cfg_kwargs(config, dataset)
  if cfg:
    return ode.guided_apply_fn(teacher.apply_fn, cfg['cfg_scale'], cfg['null_label'])
  return teacher.apply_fn


def warm_start(params, teacher_params):
  """Copies every teacher array whose path and shape the student shares (a two-time student
  has an extra `gap` embedding, which keeps its initialisation)."""
  flat_teacher = dict(jax.tree_util.tree_flatten_with_path(teacher_params)[0])
  return jax.tree_util.tree_map_with_path(
      lambda path, p: flat_teacher[path] if path in flat_teacher and jnp.shape(
          flat_teacher[path]) == jnp.shape(p) else p, params)


def write_report(config, dataset, samplers, workdir: str, *, step: int | None = None,
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
