"""Load a trained model (e.g. a distillation teacher) from another run's workdir."""

import dataclasses
import json
import logging

import jax
import ml_collections

from flowdistill import files
from flowdistill.errors import MissingInput, UserError
from flowdistill.models.factory import build_model
from flowdistill.train.checkpoint import (
  Checkpointer,
  CheckpointMismatchError,
  UnreadableCheckpointsError,
)
from flowdistill.train.state import ema_key, init_state, make_optimizer

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class Trained:
  """A model read back from a workdir: its config, `(apply_fn, params)` and data facts."""
  config: ml_collections.ConfigDict
  apply_fn: object
  params: object
  data_shape: tuple[int, ...]
  num_classes: int
  two_time: bool


class MetadataError(UserError, ValueError):
  """A checkpoint's metadata lacks what rebuilding its model needs."""


def _read_step(ckpt: Checkpointer, step: int, directory: str):
  """(config, meta, apply_fn, state) of one checkpoint, its model rebuilt from the stored
  config."""
  meta = ckpt.read_meta(step)
  missing = {'config', 'data_shape', 'num_classes', 'two_time'} - set(meta)
  if missing:
    raise MetadataError(f'The checkpoint in {directory!r} lacks {sorted(missing)} in its '
                        'metadata (written by an older flowdistill); retrain that run.')
  config = ml_collections.ConfigDict(json.loads(meta['config']))
  apply_fn, params = build_model(config.model, tuple(meta['data_shape']),
                                 num_classes=meta['num_classes'], two_time=meta['two_time'],
                                 seed=config.seed)
  template = init_state(params, make_optimizer(config), jax.random.key(0),
                        config.train.ema_rates)
  return config, meta, apply_fn, ckpt.restore(step, template)[0]


def load_trained(workdir: str, *, ema: float | None = None) -> Trained:
  """Rebuilds the model of `workdir`'s newest checkpoint from the config stored beside it.

  Args:
    workdir: the other run's --workdir.
    ema: which EMA to return (None: that run's `train.eval_ema`; 0: the raw params).
  """
  directory = files.join(workdir, 'checkpoints')
  if not files.isdir(directory):
    raise MissingInput(f'No checkpoints in {directory!r}: set config.teacher.workdir to the '
                       '--workdir of a finished training run.')
  ckpt = Checkpointer(directory, async_save=False)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise MissingInput(f'{directory!r} holds no checkpoint yet; train the teacher first.')
    for step in reversed(steps):  # as resume does, without touching the teacher's files
      try:
        config, meta, apply_fn, state = _read_step(ckpt, step, directory)
        break
      except (CheckpointMismatchError, MetadataError):
        raise
      except Exception as e:  # noqa: BLE001 — any read failure means "try the older one".
        _log.warning('Teacher checkpoint at step %d in %s is unreadable (%s: %s); skipping it '
                     'for the previous one.', step, directory, type(e).__name__, e)
    else:
      raise UnreadableCheckpointsError(
          f'None of the teacher checkpoints in {directory} (steps {steps}) reads back; retrain '
          'the teacher or point config.teacher.workdir at another run.')
  finally:
    ckpt.close()
  rate = config.train.eval_ema if ema is None else ema
  params = state.ema[ema_key(rate)] if rate else state.params
  return Trained(config, apply_fn, params, tuple(meta['data_shape']), meta['num_classes'],
                 meta['two_time'])
