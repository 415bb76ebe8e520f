"""Experiment: train a flow-matching model, then report quality and NLL versus NFE."""

import jax

from flowdistill import fm, paths
from flowdistill.data import sources
from flowdistill.eval import report
from flowdistill.models.factory import build_model
from flowdistill.train import loop, parallel
from flowdistill.train.state import ema_key, init_state, make_optimizer
from flowdistill.train.step import make_train_step


def build_path(path_config) -> paths.AffinePath:
  """The probability path of `config.path`."""
  if path_config.name == 'stochastic':
    return paths.stochastic_path(path_config.noise_scale)
  return paths.get_path(path_config.name)


def build(config, dataset):
  """(apply_fn, loss_fn, optimizer, initial state) for `config` on `dataset`."""
  num_classes = dataset.num_classes if config.data.conditional else 0
  apply_fn, params = build_model(config.model, dataset.shape, num_classes=num_classes,
                                 seed=config.seed)
  path = build_path(config.path)
  coupling = 'independent' if config.fm.ot_on_host else config.fm.coupling
  coupling_kwargs = {}
  if coupling != 'independent':
    coupling_kwargs['block_size'] = config.fm.ot_block_size or None
  if config.fm.coupling == 'sinkhorn':
    coupling_kwargs['epsilon'] = config.fm.sinkhorn_epsilon
  loss_fn = fm.make_loss(apply_fn, path, time_distribution=config.fm.time_distribution,
                         coupling=coupling, coupling_kwargs=coupling_kwargs,
                         label_dropout=config.fm.label_dropout,
                         null_label=num_classes or None)
  optimizer = make_optimizer(config)
  state = init_state(params, optimizer, jax.random.key(config.seed), config.train.ema_rates)
  return apply_fn, loss_fn, optimizer, state


def eval_params(config, state):
  """The parameters to evaluate: the configured EMA, or the raw params."""
  return state.ema[ema_key(config.train.eval_ema)] if config.train.eval_ema else state.params


def evaluate(config, dataset, samplers, velocity_model, workdir: str,
             extra: dict | None = None, *, row_extra: dict | None = None,
             moments_reference: str | None = None) -> dict:
  """Runs the toy or image report on process 0, adds `extra` results (and `row_extra`
  {sampler label: {column: value}} to the rows), writes and prints the results table.
  `moments_reference` names the sampler whose sample moments each row is compared with."""
  if jax.process_index() != 0:
    return {}
  key = jax.random.key(config.seed + 1)
  report_fn = report.toy_report if dataset.toy else report.image_report
  result = report_fn(samplers, dataset, config.eval if dataset.toy else config, key,
                     velocity_model=velocity_model, workdir=workdir,
                     moments_reference=moments_reference)
  result.update(extra or {})
  for row in result['rows']:
    row.update((row_extra or {}).get(row['sampler'], {}))
  table = report.write_report(workdir, result, dataset, config)
  print(f'Results ({workdir}/results.md):\n{table}')
  return result


def checkpoint_meta(config, dataset, *, two_time: bool) -> dict:
  """What a later run needs to rebuild this model from its checkpoints (e.g. as a teacher)."""
  return {'config': config.to_json(), 'data_shape': list(dataset.shape),
          'num_classes': dataset.num_classes if config.data.conditional else 0,
          'two_time': two_time}


def guidance_kwargs(config, dataset) -> dict:
  """Classifier-free guidance settings for sampling (none when w = 1 or unconditional)."""
  if not config.data.conditional or config.eval.guidance == 1.0:
    return {}
  return {'guidance': config.eval.guidance, 'null_label': dataset.num_classes}


def train(config, workdir: str):
  """Trains (resuming from `workdir`) without evaluating; returns (dataset, apply_fn, state).

  The workdir then serves as a teacher for the distillation methods.
  """
  dataset = sources.load(config.data)
  apply_fn, loss_fn, optimizer, state = build(config, dataset)
  mesh = parallel.make_mesh(config.train.num_devices)
  batches = sources.batch_source(dataset, config.data.batch_size, seed=config.seed,
                                 conditional=config.data.conditional)
  if config.fm.ot_on_host:
    batches = sources.with_ot_noise(batches, config.data.batch_size, seed=config.seed,
                                    block_size=config.fm.ot_block_size or None,
                                    within_class=config.data.conditional)
  state = loop.train(
      state, make_train_step(loss_fn, optimizer, config.train.steps_per_call), batches,
      mesh=mesh, workdir=workdir, num_steps=config.train.steps,
      steps_per_call=config.train.steps_per_call, log_every=config.train.log_every,
      ckpt_every=config.train.ckpt_every, keep=config.train.keep,
      meta=checkpoint_meta(config, dataset, two_time=False))
  return dataset, apply_fn, state


def run(config, workdir: str) -> dict:
  """Trains (resuming from `workdir`), evaluates, writes results; returns the results dict."""
  dataset, apply_fn, state = train(config, workdir)
  params = eval_params(config, state)
  samplers = report.velocity_samplers(apply_fn, params, config.eval,
                                      **guidance_kwargs(config, dataset))
  return evaluate(config, dataset, samplers, (apply_fn, params), workdir)
