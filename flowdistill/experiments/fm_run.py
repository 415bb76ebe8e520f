"""Experiment `fm`: train a flow-matching model, then report quality and NLL versus NFE.

Its workdir serves as a teacher for the distillation methods.
"""

import jax

from flowdistill import fm
from flowdistill.data import sources
from flowdistill.eval import report
from flowdistill.experiments import common
from flowdistill.models.factory import build_model


def make_loss(config, dataset):
  """(apply_fn, initial params, loss_fn) of `config` on `dataset`."""
  classes = common.num_classes(config, dataset)
  apply_fn, params = build_model(config.model, dataset.shape, num_classes=classes,
                                 seed=config.seed)
  loss_fn = fm.make_loss(apply_fn, common.build_path(config.path),
                         time_distribution=config.fm.time_distribution,
                         label_dropout=config.fm.label_dropout, null_label=classes or None,
                         **common.coupling_args(config.fm))
  return apply_fn, params, loss_fn


def build(config, dataset):
  """(apply_fn, loss_fn, optimizer, initial state), to drive `train.loop` directly."""
  apply_fn, params, loss_fn = make_loss(config, dataset)
  return (apply_fn, loss_fn, *common.initial_state(config, params))


def batches(config, dataset):
  """The training batches, with OT-paired noise from the host when `config.fm.ot_on_host`."""
  source = sources.batch_source(dataset, config.data.batch_size, seed=config.seed,
                                conditional=config.data.conditional)
  if config.fm.ot_on_host:
    source = sources.with_ot_noise(source, config.data.batch_size, seed=config.seed,
                                   block_size=config.fm.ot_block_size or None,
                                   within_class=config.data.conditional)
  return source


def train(config, workdir: str):
  """Trains (resuming from `workdir`) without evaluating; returns (dataset, apply_fn, state)."""
  dataset = sources.load(config.data)
  apply_fn, params, loss_fn = make_loss(config, dataset)
  state = common.fit(config, params, loss_fn, batches(config, dataset), workdir,
                     meta=common.checkpoint_meta(config, dataset, two_time=False))
  return dataset, apply_fn, state


def run(config, workdir: str) -> dict:
  """Trains (resuming from `workdir`), evaluates, writes results; returns the results dict."""
  dataset, apply_fn, state = train(config, workdir)
  if jax.process_index() != 0:
    return {}
  apply_fn = common.eval_apply_fn(config, dataset, apply_fn)
  params = common.eval_params(config, state)
  samplers = report.velocity_samplers(apply_fn, params, config.eval,
                                      **common.guidance_kwargs(config, dataset))
  return common.evaluate(config, dataset, samplers, workdir, step=int(state.step),
                         velocity_model=(apply_fn, params))


METHOD = common.Method('fm', run)
