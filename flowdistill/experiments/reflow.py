"""Experiment: reflow or piecewise reflow of a trained teacher, with optional marginal
alignment; reports quality, NLL and moment drift vs NFE for student and teacher side by side,
and the per-window KL estimates with their telescoping bound."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from flowdistill import ode
from flowdistill.data import sources, teacher_pairs
from flowdistill.data.pipeline import BatchIterator
from flowdistill.eval import report
from flowdistill.experiments.flow_map import matching_teacher, warm_start
from flowdistill.experiments.flow_matching import (
    build_path,
    checkpoint_meta,
    eval_params,
    evaluate,
)
from flowdistill.fewstep import reflow
from flowdistill.models.factory import build_model
from flowdistill.train import loop, parallel
from flowdistill.train.state import init_state, make_optimizer
from flowdistill.train.step import make_train_step


def teacher_velocity_model(config, teacher, dataset):
  """The teacher as the student sees it: classifier-free guided when the config asks."""
  if config.data.conditional and config.eval.guidance != 1.0:
    return ode.guided_apply_fn(teacher.apply_fn, config.eval.guidance, dataset.num_classes)
  return teacher.apply_fn


def make_pairs(config, teacher, teacher_apply, dataset, times, workdir: str) -> dict:
  """Generates (or reuses) the teacher trajectories and loads `config.reflow.num_pairs`."""
  rc = config.reflow
  directory = rc.pairs_dir or os.path.join(workdir, 'pairs')
  identity = {
      'teacher_workdir': os.path.abspath(config.teacher.workdir),
      'teacher_fingerprint': teacher_pairs.fingerprint(teacher.params),
      'guidance': config.eval.guidance if config.data.conditional else None,
      'times': [round(float(t), 6) for t in times],
      'solver': rc.pair_solver, 'rtol': rc.pair_rtol, 'atol': rc.pair_atol,
  }

  @jax.jit
  def trajectory(params, x0, labels):
    v = ode.velocity_fn(teacher_apply, params, cond=labels)
    return reflow.teacher_trajectory(v, x0, times, solver=rc.pair_solver, rtol=rc.pair_rtol,
                                     atol=rc.pair_atol)[0]

  num_classes = dataset.num_classes if config.data.conditional else 0
  teacher_pairs.generate(directory, lambda x0, labels: trajectory(teacher.params, x0, labels),
                         num=rc.num_pairs, chunk=rc.pair_chunk, shape=tuple(dataset.shape),
                         seed=config.seed, identity=identity, num_classes=num_classes)
  return teacher_pairs.load(directory, rc.num_pairs)


def student_samplers(apply_fn, params, times, steps_list):
  """[(label, sampler, params)]: Euler with whole steps in each window, per NFE in
  `steps_list` that is a multiple of the number of windows."""
  num_windows = len(times) - 1

  def make(nfe):
    grid = reflow.window_grid(times, nfe // num_windows)

    @jax.jit
    def run(params, x0, cond):
      v = ode.velocity_fn(apply_fn, params, cond=cond)
      x1, info = ode.solve(v, x0, solver='euler', grid=grid)
      return x1, jnp.asarray(info['nfe'])

    return run

  return [(f'student euler-{n}', make(n), params) for n in steps_list if n % num_windows == 0]


def teacher_log_density(teacher_apply, teacher_params, eval_config, key, cond=None):
  """`logp(x, t)` of the teacher's time-t marginal (its ODE back to noise, with the
  divergence; the standard normal at t = 0)."""

  def logp(x, t):
    if t == 0.0:
      return ode.standard_normal_logpdf(x)
    return ode.log_likelihood(teacher_apply, teacher_params, x, key, cond=cond,
                              divergence=eval_config.nll_divergence,
                              num_probes=eval_config.nll_probes,
                              solver=eval_config.adaptive_solver, rtol=eval_config.rtol,
                              atol=eval_config.atol, t_data=t)[0]

  return logp


def alignment_report(config, apply_fn, params, teacher, teacher_apply, dataset, times):
  """Per-window KL estimates of the student's window maps on fresh teacher states, and the
  telescoping TV bound."""
  rc, n = config.reflow, config.reflow.kl_samples
  num_classes = dataset.num_classes if config.data.conditional else 0
  # Rows past the training pairs: teacher states the student has not seen.
  x0, labels = teacher_pairs.row_inputs(config.seed, rc.num_pairs + rc.pair_chunk, n,
                                        tuple(dataset.shape), num_classes)
  v = ode.velocity_fn(teacher_apply, teacher.params, cond=labels)
  states, _ = jax.jit(lambda x: reflow.teacher_trajectory(
      v, x, times, solver=rc.pair_solver, rtol=rc.pair_rtol, atol=rc.pair_atol))(x0)
  k_logp, k_probe = jax.random.split(jax.random.key(config.seed + 3))
  logp = teacher_log_density(teacher_apply, teacher.params, config.eval, k_logp, labels)
  probes = (ode.divergence_probes(k_probe, rc.align_probes, x0)
            if rc.align_logdet == 'hutchinson' else None)
  kls = reflow.window_kls(apply_fn, params, logp, states, np.asarray(times),
                          steps=rc.align_steps, cond=labels, logdet=rc.align_logdet,
                          probes=probes)
  return {'window_kl': [float(k) for k in kls], 'tv_bound': float(reflow.tv_bound(kls))}


def few_step_nll(apply_fn, params, dataset, config, times) -> dict:
  """{'student euler-n': {'nll', 'inverse_error'}} of each few-step sampler (2-D data)."""
  x = jnp.asarray(dataset.reference(jax.random.key(config.seed + 2), config.eval.nll_samples))
  out = {}
  for nfe in config.eval.euler_steps:
    if nfe % (len(times) - 1):
      continue
    grid = reflow.window_grid(times, nfe // (len(times) - 1))
    logp, info = jax.jit(lambda p, x, g: reflow.euler_log_likelihood(apply_fn, p, x, g))(
        params, x, grid)
    out[f'student euler-{nfe}'] = {'nll': float(-jnp.mean(logp)),
                                   'nll_inverse_error': float(info['inverse_error'])}
  return out


def run(config, workdir: str) -> dict:
  dataset = sources.load(config.data)
  num_classes = dataset.num_classes if config.data.conditional else 0
  teacher = matching_teacher(config, dataset, num_classes)
  if teacher.two_time:
    raise ValueError('config.method="reflow" needs a velocity teacher (a method "fm" or '
                     '"reflow" run); to distil a flow map use method "flow_map".')
  teacher_apply = teacher_velocity_model(config, teacher, dataset)
  rc = config.reflow
  times = reflow.window_times(rc.windows)
  pairs = make_pairs(config, teacher, teacher_apply, dataset, times, workdir)

  apply_fn, params = build_model(config.model, dataset.shape, num_classes=num_classes,
                                 seed=config.seed)
  if rc.warm_start:
    params = warm_start(params, teacher.params)
  loss_fn = reflow.make_loss(
      apply_fn, times, teacher_apply_fn=teacher_apply,
      teacher_path=build_path(teacher.config.path), align_weight=rc.align_weight,
      align_warmup=rc.align_warmup, align_steps=rc.align_steps, logdet=rc.align_logdet,
      num_probes=rc.align_probes, score_eps=rc.score_eps or None)
  optimizer = make_optimizer(config)
  state = init_state(params, optimizer, jax.random.key(config.seed), config.train.ema_rates)

  def batches(start):
    return BatchIterator(pairs, config.data.batch_size, seed=config.seed, start_step=start,
                         process_index=jax.process_index(),
                         process_count=jax.process_count())

  step_fn = make_train_step(loss_fn, optimizer, config.train.steps_per_call, pass_step=True)
  state = loop.train(
      state, step_fn, batches, mesh=parallel.make_mesh(config.train.num_devices),
      workdir=workdir, num_steps=config.train.steps,
      steps_per_call=config.train.steps_per_call, log_every=config.train.log_every,
      ckpt_every=config.train.ckpt_every, keep=config.train.keep,
      meta=checkpoint_meta(config, dataset, two_time=False),
      extras={'teacher_params': teacher.params} if rc.align_weight > 0 else {})
  if jax.process_index() != 0:
    return {}

  params = eval_params(config, state)
  teacher_eval = config.eval.copy_and_resolve_references()
  samplers = student_samplers(apply_fn, params, times, config.eval.euler_steps)
  samplers += report.velocity_samplers(teacher_apply, teacher.params, teacher_eval,
                                       prefix='teacher ')
  extra = alignment_report(config, apply_fn, params, teacher, teacher_apply, dataset, times)
  row_extra = few_step_nll(apply_fn, params, dataset, config, times) if dataset.toy else {}
  return evaluate(config, dataset, samplers, (apply_fn, params), workdir, extra,
                  row_extra=row_extra,
                  moments_reference=f'teacher {config.eval.adaptive_solver}')
