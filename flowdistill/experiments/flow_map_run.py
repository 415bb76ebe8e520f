"""Experiment `flow_map`: flow map matching — distil a trained teacher (LMD, EMD, PFMM) or learn
a flow map from scratch (FMM), then report quality vs NFE for student and teacher side by
side, and the NLL of the k-jump sampler."""

import jax
import jax.numpy as jnp
import numpy as np

from flowdistill import ode
from flowdistill.config import check_choice, check_positive
from flowdistill.data import sources
from flowdistill.errors import BadInput
from flowdistill.eval import report
from flowdistill.experiments import common
from flowdistill.fewstep import flow_map
from flowdistill.models.factory import build_model
from flowdistill.train import configured, identity
from flowdistill.train.teacher import Trained

LOSSES = ('lmd', 'emd', 'fmm', 'pfmm')

DEFAULTS = dict(
    loss='lmd',               # lmd | emd (velocity teacher), pfmm (flow-map teacher), fmm (none)
    scheme='ordered',         # (s, t) sampling: uniform | ordered | band
    band=1.0,                 # half-width of the 'band' scheme
    teacher_jumps=2,          # PFMM: jumps of the teacher map per student jump
    invertibility_weight=1.0,  # FMM: weight of the invertibility term
    warm_start=True,          # start the student from the teacher's parameters
)


def validate(config) -> None:
  flat = identity.flatten(config)
  check_choice(flat, 'flow_map.loss', LOSSES)
  check_choice(flat, 'flow_map.scheme', flow_map.TIME_SCHEMES)
  check_positive(flat, ints=('flow_map.teacher_jumps',))
  if flat['flow_map.loss'] != 'fmm' and not flat['teacher.workdir']:
    raise BadInput(f'config.flow_map.loss={flat["flow_map.loss"]!r} distils a teacher: set '
                   'config.teacher.workdir to a trained run (fmm needs none).')


def load_teacher(config, dataset) -> Trained | None:
  """The teacher named by `config.teacher` (None for FMM), checked against this run's data
  and the loss."""
  if not config.teacher.workdir:
    return None
  teacher = common.matching_teacher(config, dataset)
  if config.flow_map.loss == 'pfmm' and not teacher.two_time:
    raise BadInput('config.flow_map.loss="pfmm" needs a flow-map teacher (the workdir of a '
                   'method="flow_map" run); for a velocity teacher use "lmd" or "emd".')
  if config.flow_map.loss in ('lmd', 'emd') and teacher.two_time:
    raise BadInput(f'config.flow_map.loss={config.flow_map.loss!r} needs a velocity teacher '
                   '(a method="fm" run); to distil a flow map further use "pfmm".')
  return teacher


def make_loss(config, apply_fn, teacher, dataset):
  """The configured flow-map loss; LMD and EMD distil the teacher velocity as it is sampled
  (classifier-free guided with `config.eval.cfg_scale`)."""
  fc, path = config.flow_map, configured.build_path(config.path)
  times = {'scheme': fc.scheme, 'band': fc.band}
  if fc.loss == 'fmm':
    return flow_map.fmm_loss(apply_fn, path, invertibility_weight=fc.invertibility_weight)
  if fc.loss == 'pfmm':
    return flow_map.pfmm_loss(apply_fn, teacher.apply_fn, path,
                              teacher_jumps=fc.teacher_jumps, **times)
  factory = flow_map.lmd_loss if fc.loss == 'lmd' else flow_map.emd_loss
  return factory(apply_fn, common.teacher_velocity(config, teacher, dataset), path, **times)


def map_samplers(apply_fn, params, steps_list, prefix: str):
  """[(label, sampler, params)] for k-jump sampling at each k in `steps_list`."""

  @jax.jit
  def run(params, x0, cond, grid):
    x1, info = flow_map.jump(apply_fn, params, x0, grid, cond)
    return x1, jnp.asarray(info['nfe'])

  def make(k):
    grid = ode.time_grid(k)
    return lambda params, x0, cond: run(params, x0, cond, grid)

  return [(f'{prefix}{k}-jump', make(k), params) for k in steps_list]


def jump_nll(apply_fn, params, dataset, config) -> report.Section:
  """{k: {'nll' (nats; bits/dim for images), 'inverse_error'}} by the change of variables
  through k jumps: exact log-det for 2-D data, the Hutchinson power series for images."""
  key = jax.random.key(config.seed + 2)
  images = len(dataset.shape) == 3
  x, cond = report.nll_points(dataset, key, config.eval.nll_samples, config.data.conditional)
  x = jnp.asarray(x)
  cond = None if cond is None else jnp.asarray(cond)
  kwargs = ({'logdet': 'series', 'probes': ode.divergence_probes(key, config.eval.nll_probes, x)}
            if images else {})
  log_likelihood = jax.jit(lambda p, x, c, g: flow_map.log_likelihood_jumps(
      apply_fn, p, x, g, cond=c, **kwargs))
  out = {}
  for k in config.eval.map_steps:
    logp, info = log_likelihood(params, x, cond, ode.time_grid(k))
    nll = (float(jnp.mean(ode.bits_per_dim(logp, int(np.prod(dataset.shape))))) if images
           else float(-jnp.mean(logp)))
    out[str(k)] = {'nll': nll, 'inverse_error': float(info['inverse_error'])}
  unit = 'bits/dim, Hutchinson power-series log-det' if images else 'nats, exact log-det'
  text = f'NLL of the k-jump sampler ({unit}): ' + ', '.join(
      f'{k} jumps: {v["nll"]:.4f} (inverse error {v["inverse_error"]:.1e})'
      for k, v in out.items())
  return report.Section({'nll_jumps': out}, text)


def run(config, workdir: str) -> dict:
  dataset = sources.load(config.data)
  teacher = load_teacher(config, dataset)
  apply_fn, params = build_model(config.model, dataset.shape,
                                 num_classes=configured.num_classes(config, dataset),
                                 two_time=True, seed=config.seed)
  if teacher is not None and config.flow_map.warm_start:
    params = common.warm_start(params, teacher.params)
  state = configured.fit(config, params, make_loss(config, apply_fn, teacher, dataset),
                         sources.batch_source(dataset, config.data.batch_size, seed=config.seed,
                                          conditional=config.data.conditional),
                     workdir, meta=configured.checkpoint_meta(config, dataset, two_time=True),
                     extras={} if teacher is None else {'teacher_params': teacher.params})
  if jax.process_index() != 0:
    return {}
  apply_fn = common.eval_apply_fn(config, dataset, apply_fn, two_time=True)
  params = common.eval_params(config, state)
  samplers = map_samplers(apply_fn, params, config.eval.map_steps, 'student ')
  if teacher is not None and not teacher.two_time:
    teacher_eval = config.eval.copy_and_resolve_references()
    teacher_eval.euler_steps = tuple(config.eval.map_steps) + (100,)
    samplers += report.velocity_samplers(teacher.apply_fn, teacher.params, teacher_eval,
                                         prefix='teacher ',
                                         **common.cfg_kwargs(config, dataset))
  elif teacher is not None:
    samplers += map_samplers(teacher.apply_fn, teacher.params, config.eval.map_steps,
                             'teacher ')
  return common.write_report(config, dataset, samplers, workdir, step=int(state.step),
                             velocity_model=(flow_map.tangent_velocity(apply_fn), params),
                             sections=[jump_nll(apply_fn, params, dataset, config)])


METHOD = common.Method('flow_map', run, defaults=DEFAULTS, validate=validate)
