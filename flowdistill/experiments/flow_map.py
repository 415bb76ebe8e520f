"""Experiment: flow map matching — distil a trained teacher (LMD, EMD, PFMM) or learn a flow
map from scratch (FMM), then report quality vs NFE for student and teacher side by side."""

import jax
import jax.numpy as jnp
import numpy as np

from flowdistill import ode
from flowdistill.data import sources
from flowdistill.eval import report
from flowdistill.experiments.flow_matching import (
  build_path,
  checkpoint_meta,
  eval_params,
  evaluate,
  guidance_kwargs,
)
from flowdistill.fewstep import flow_map as fmap
from flowdistill.models.factory import build_model
from flowdistill.train import loop, parallel
from flowdistill.train.state import init_state, make_optimizer
from flowdistill.train.step import make_train_step
from flowdistill.train.teacher import Trained, load_trained


def matching_teacher(config, dataset, num_classes: int) -> Trained:
  """The model in `config.teacher.workdir`, checked against this run's data."""
  teacher = load_trained(config.teacher.workdir,
                         ema=None if config.teacher.ema < 0 else config.teacher.ema)
  if teacher.data_shape != tuple(dataset.shape) or teacher.num_classes != num_classes:
    raise ValueError(
        f'The teacher in {config.teacher.workdir} was trained on samples of shape '
        f'{teacher.data_shape} with {teacher.num_classes} classes; this config has '
        f'{tuple(dataset.shape)} with {num_classes}. Use the teacher of this data set.')
  return teacher


def load_teacher(config, dataset, num_classes: int) -> Trained | None:
  """The teacher named by `config.teacher` (None for FMM), checked against this run's data
  and the loss."""
  if not config.teacher.workdir:
    return None
  teacher = matching_teacher(config, dataset, num_classes)
  if config.flow_map.loss == 'pfmm' and not teacher.two_time:
    raise ValueError('config.flow_map.loss="pfmm" needs a flow-map teacher (the workdir of a '
                     'method="flow_map" run); for a velocity teacher use "lmd" or "emd".')
  if config.flow_map.loss in ('lmd', 'emd') and teacher.two_time:
    raise ValueError(f'config.flow_map.loss={config.flow_map.loss!r} needs a velocity teacher '
                     '(a method="fm" run); to distil a flow map further use "pfmm".')
  return teacher


def warm_start(params, teacher_params):
  """Copies every teacher array whose path and shape the student shares (the two-time
  student has an extra `gap` embedding, which keeps its initialisation)."""
  flat_teacher = dict(jax.tree_util.tree_flatten_with_path(teacher_params)[0])
  return jax.tree_util.tree_map_with_path(
      lambda path, p: flat_teacher[path] if path in flat_teacher and jnp.shape(
          flat_teacher[path]) == jnp.shape(p) else p, params)


def make_loss(config, apply_fn, teacher, path):
  fm_config = config.flow_map
  times = {'scheme': fm_config.scheme, 'band': fm_config.band}
  if fm_config.loss == 'fmm':
    return fmap.fmm_loss(apply_fn, path, invertibility_weight=fm_config.invertibility_weight)
  if fm_config.loss == 'lmd':
    return fmap.lmd_loss(apply_fn, teacher.apply_fn, path, **times)
  if fm_config.loss == 'emd':
    return fmap.emd_loss(apply_fn, teacher.apply_fn, path, **times)
  return fmap.pfmm_loss(apply_fn, teacher.apply_fn, path,
                        teacher_jumps=fm_config.teacher_jumps, **times)


def map_samplers(apply_fn, params, steps_list, prefix: str):
  """[(label, sampler, params)] for k-jump sampling at each k in `steps_list`."""

  def make(k):
    grid = jnp.linspace(0.0, 1.0, k + 1)

    @jax.jit
    def run(params, x0, cond):
      x1, info = fmap.jump(apply_fn, params, x0, grid, cond)
      return x1, jnp.asarray(info['nfe'])

    return run

  return [(f'{prefix}{k}-jump', make(k), params) for k in steps_list]


def run(config, workdir: str) -> dict:
  dataset = sources.load(config.data)
  num_classes = dataset.num_classes if config.data.conditional else 0
  teacher = load_teacher(config, dataset, num_classes)
  apply_fn, params = build_model(config.model, dataset.shape, num_classes=num_classes,
                                 two_time=True, seed=config.seed)
  if teacher is not None and config.flow_map.warm_start:
    params = warm_start(params, teacher.params)
  path = build_path(config.path)
  loss_fn = make_loss(config, apply_fn, teacher, path)
  optimizer = make_optimizer(config)
  state = init_state(params, optimizer, jax.random.key(config.seed), config.train.ema_rates)
  batches = sources.batch_source(dataset, config.data.batch_size, seed=config.seed,
                                 conditional=config.data.conditional)
  state = loop.train(
      state, make_train_step(loss_fn, optimizer, config.train.steps_per_call), batches,
      mesh=parallel.make_mesh(config.train.num_devices), workdir=workdir,
      num_steps=config.train.steps, steps_per_call=config.train.steps_per_call,
      log_every=config.train.log_every, ckpt_every=config.train.ckpt_every,
      keep=config.train.keep, meta=checkpoint_meta(config, dataset, two_time=True),
      extras={} if teacher is None else {'teacher_params': teacher.params})
  params = eval_params(config, state)
  samplers = map_samplers(apply_fn, params, config.eval.map_steps, 'student ')
  if teacher is not None and not teacher.two_time:
    teacher_eval = config.eval.copy_and_resolve_references()
    teacher_eval.euler_steps = tuple(config.eval.map_steps) + (100,)
    samplers += report.velocity_samplers(teacher.apply_fn, teacher.params, teacher_eval,
                                         prefix='teacher ', **guidance_kwargs(config, dataset))
  elif teacher is not None:
    samplers += map_samplers(teacher.apply_fn, teacher.params, config.eval.map_steps,
                             'teacher ')
  velocity = (fmap.tangent_velocity(apply_fn), params)
  extra = {}
  if jax.process_index() == 0:
    extra['nll_jumps'] = jump_nll(apply_fn, params, dataset, config)
  return evaluate(config, dataset, samplers, velocity, workdir, extra=extra)


def jump_nll(apply_fn, params, dataset, config) -> dict:
  """{k: {'nll' (nats; bits/dim for images), 'inverse_error'}} by the change of variables
  through k jumps: exact log-det for 2-D data, the Hutchinson power series for images."""
  key = jax.random.key(config.seed + 2)
  if dataset.toy:
    x, cond = jnp.asarray(dataset.reference(key, config.eval.nll_samples)), None
    kwargs = {}
  else:
    x = jnp.asarray(dataset.test['x'][:config.eval.nll_samples])
    cond = (jnp.asarray(dataset.test['label'][:config.eval.nll_samples])
            if config.data.conditional else None)
    kwargs = {'logdet': 'series', 'probes': ode.divergence_probes(key, config.eval.nll_probes,
                                                                    x)}
  out = {}
  for k in config.eval.map_steps:
    logp, info = jax.jit(lambda p, x, c, g: fmap.log_likelihood_jumps(
        apply_fn, p, x, g, cond=c, **kwargs))(params, x, cond, jnp.linspace(0.0, 1.0, k + 1))
    nll = (float(-jnp.mean(logp)) if dataset.toy else
           float(jnp.mean(ode.bits_per_dim(logp, int(np.prod(dataset.shape))))))
    out[str(k)] = {'nll': nll, 'inverse_error': float(info['inverse_error'])}
  return out
