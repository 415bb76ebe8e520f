"""Load a trained model (e.g. a distillation teacher) from another run's workdir."""

import dataclasses
import json
import os

import jax
import ml_collections

from flowdistill.models.factory import build_model
from flowdistill.train.checkpoint import Checkpointer
from flowdistill.train.state import ema_key, init_state, make_optimizer


@dataclasses.dataclass
class Trained:
  """A model read back from a workdir: its config, `(apply_fn, params)` and data facts."""
  config: ml_collections.ConfigDict
  apply_fn: object
  params: object
  data_shape: tuple[int, ...]
  num_classes: int
  two_time: bool


def load_trained(workdir: str, *, ema: float | None = None) -> Trained:
  """Rebuilds the model of `workdir`'s newest checkpoint from the config stored beside it.

  Args:
    workdir: the other run's --workdir.
    ema: which EMA to return (None: that run's `train.eval_ema`; 0: the raw params).
  """
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'No checkpoints in {directory!r}: set config.teacher.workdir to '
                            'the --workdir of a finished training run.')
  ckpt = Checkpointer(directory, async_save=False)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f'{directory!r} holds no checkpoint yet; train the teacher first.')
    meta = ckpt.read_meta(steps[-1])
    missing = {'config', 'data_shape', 'num_classes', 'two_time'} - set(meta)
    if missing:
      raise ValueError(f'The checkpoint in {directory!r} lacks {sorted(missing)} in its '
                       'metadata (written by an older flowdistill); retrain that run.')
    config = ml_collections.ConfigDict(json.loads(meta['config']))
    apply_fn, params = build_model(config.model, tuple(meta['data_shape']),
                                   num_classes=meta['num_classes'], two_time=meta['two_time'],
                                   seed=config.seed)
    template = init_state(params, make_optimizer(config), jax.random.key(0),
                          config.train.ema_rates)
    state, _ = ckpt.restore_latest(template)
  finally:
    ckpt.close()
  rate = config.train.eval_ema if ema is None else ema
  params = state.ema[ema_key(rate)] if rate else state.params
  return Trained(config, apply_fn, params, tuple(meta['data_shape']), meta['num_classes'],
                 meta['two_time'])
