"""Experiment `reflow`: reflow or piecewise reflow of a trained teacher, with optional marginal
alignment; reports quality, NLL and moment drift vs NFE for student and teacher side by side,
and the per-window KL estimates with their telescoping bound."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from flowdistill import files, ode
from flowdistill.config import check_choice, check_positive
from flowdistill.data import sources, teacher_pairs
from flowdistill.data.pipeline import BatchIterator
from flowdistill.errors import BadInput
from flowdistill.eval import report
from flowdistill.experiments import common
from flowdistill.fewstep import reflow
from flowdistill.models.factory import build_model
from flowdistill.train import configured, identity

DEFAULTS = dict(            # reflow, piecewise reflow, marginal alignment (METHODS.md section 2)
    windows=1,                         # K windows on [0, 1] (1: vanilla reflow)
    num_pairs=50_000,                  # teacher trajectories to train on
    pairs_dir='',                      # where they are cached ('' = WORKDIR/pairs); reusable
    pair_chunk=5000, pair_solver='dopri5', pair_rtol=1e-5, pair_atol=1e-5,
    align_weight=0.0,                  # λ of the marginal-alignment regulariser (0: off)
    align_warmup=0,                    # steps of λ's linear warm-up (0: constant)
    align_steps=1,                     # Euler steps of the student's window map
    align_logdet='exact',              # 'exact' | 'trace' (low dimension) | 'hutchinson'
    align_probes=1,                    # Hutchinson probes
    score_eps=0.01,                    # teacher-score time clipped to [eps, 1 - eps]
    align_time='consistent',           # 'consistent': last window's map stops at 1 - eps too;
                                       # 'clipped': maps to 1, scores at 1 - eps (earlier form)
    kl_samples=1000,                   # teacher states for the per-window KL report
    warm_start=True,                   # start the student from the teacher's parameters
)


def validate(config) -> None:
  flat = identity.flatten(config)
  if not flat['teacher.workdir']:
    raise BadInput('config.method="reflow" distils a teacher: set config.teacher.workdir to '
                   'a trained run (method "fm" or "reflow").')
  check_choice(flat, 'reflow.pair_solver', ode.SOLVERS)
  check_choice(flat, 'reflow.align_logdet', reflow.LOGDETS)
  check_choice(flat, 'reflow.align_time', reflow.ALIGN_TIMES)
  check_positive(flat, ints=('reflow.windows', 'reflow.pair_chunk', 'reflow.align_steps',
                             'reflow.align_probes', 'reflow.kl_samples'))
  if flat['reflow.num_pairs'] < flat['data.batch_size']:
    raise BadInput(f'config.reflow.num_pairs={flat["reflow.num_pairs"]} is below '
                   f'config.data.batch_size={flat["data.batch_size"]}; raise it.')
  if flat['reflow.align_weight'] < 0 or flat['reflow.align_warmup'] < 0:
    raise BadInput('config.reflow.align_weight and config.reflow.align_warmup must be >= 0.')
  if not 0.0 <= flat['reflow.score_eps'] < 0.5:
    raise BadInput(f'config.reflow.score_eps={flat["reflow.score_eps"]} must be in [0, 0.5).')
  if (flat['reflow.align_weight'] > 0 and flat['reflow.align_time'] == 'consistent'
      and flat['reflow.score_eps'] * flat['reflow.windows'] >= 1):
    raise BadInput(f'config.reflow.score_eps={flat["reflow.score_eps"]} is not below the '
                   f'window length 1/{flat["reflow.windows"]}: align_time="consistent" stops '
                   'the alignment map of the last window at 1 - score_eps. Lower score_eps or '
                   'the number of windows, or set config.reflow.align_time="clipped".')
  if flat['reflow.align_logdet'] != 'hutchinson' and flat['data.source'] in sources.IMAGE_SOURCES:
    raise BadInput(f'config.reflow.align_logdet={flat["reflow.align_logdet"]!r} needs a '
                   'full Jacobian per image; use "hutchinson" for image data.')
  if not any(n % flat['reflow.windows'] == 0 for n in flat['eval.euler_steps']):
    raise BadInput(f'No entry of config.eval.euler_steps={flat["eval.euler_steps"]} is a '
                   f'multiple of config.reflow.windows={flat["reflow.windows"]}: the student '
                   'takes whole steps inside each window.')


def make_pairs(config, teacher, teacher_apply, dataset, times, workdir: str) -> dict:
  """Generates (or reuses) the teacher trajectories and loads `config.reflow.num_pairs`."""
  rc = config.reflow
  directory = rc.pairs_dir or os.path.join(workdir, 'pairs')
  identity = {
      'teacher_workdir': (config.teacher.workdir if files.is_url(config.teacher.workdir)
                          else os.path.abspath(config.teacher.workdir)),
      'teacher_fingerprint': teacher_pairs.fingerprint(teacher.params),
      'cfg_scale': config.eval.cfg_scale if config.data.conditional else None,
      'times': [round(float(t), 6) for t in times],
      'solver': rc.pair_solver, 'rtol': rc.pair_rtol, 'atol': rc.pair_atol,
  }

  @jax.jit
  def trajectory(params, x0, labels):
    v = ode.velocity_fn(teacher_apply, params, cond=labels)
    return reflow.teacher_trajectory(v, x0, times, solver=rc.pair_solver, rtol=rc.pair_rtol,
                                     atol=rc.pair_atol)[0]

  teacher_pairs.generate(directory, lambda x0, labels: trajectory(teacher.params, x0, labels),
                         num=rc.num_pairs, chunk=rc.pair_chunk, shape=tuple(dataset.shape),
                         seed=config.seed, identity=identity,
                         num_classes=configured.num_classes(config, dataset))
  return teacher_pairs.load(directory, rc.num_pairs)


def student_samplers(apply_fn, params, times, steps_list):
  """[(label, sampler, params)]: Euler with whole steps in each window, per NFE in
  `steps_list` that is a multiple of the number of windows."""
  num_windows = len(times) - 1

  @jax.jit
  def run(params, x0, cond, grid):
    x1, info = ode.solve(ode.velocity_fn(apply_fn, params, cond=cond), x0, solver='euler',
                         grid=grid)
    return x1, jnp.asarray(info['nfe'])

  def make(nfe):
    grid = reflow.window_grid(times, nfe // num_windows)
    return lambda params, x0, cond: run(params, x0, cond, grid)

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


def alignment_report(config, apply_fn, params, teacher, teacher_apply, dataset,
                     times) -> report.Section:
  """Per-window KL estimates of the student's window maps on fresh teacher states, and the
  telescoping TV bound."""
  rc, n = config.reflow, config.reflow.kl_samples
  # Rows past the training pairs: teacher states the student has not seen.
  x0, labels = teacher_pairs.row_inputs(
      config.seed, rc.num_pairs + rc.pair_chunk, n, tuple(dataset.shape),
      configured.num_classes(config, dataset))
  states, _ = jax.jit(lambda p, x, c: reflow.teacher_trajectory(
      ode.velocity_fn(teacher_apply, p, cond=c), x, times, solver=rc.pair_solver,
      rtol=rc.pair_rtol, atol=rc.pair_atol))(teacher.params, x0, labels)
  k_logp, k_probe = jax.random.split(jax.random.key(config.seed + 3))
  logp = teacher_log_density(teacher_apply, teacher.params, config.eval, k_logp, labels)
  probes = (ode.divergence_probes(k_probe, rc.align_probes, x0)
            if rc.align_logdet == 'hutchinson' else None)
  kls = reflow.window_kls(apply_fn, params, logp, states, np.asarray(times),
                          steps=rc.align_steps, cond=labels, logdet=rc.align_logdet,
                          probes=probes)
  values = {'window_kl': [float(k) for k in kls], 'tv_bound': float(reflow.tv_bound(kls))}
  text = ('Per-window KL(student map of p_t_k || teacher p_t_k+1), nats: '
          + ', '.join(f'{kl:.4f}' for kl in values['window_kl'])
          + f'; telescoping bound sum_k sqrt(KL_k / 2) on TV: {values["tv_bound"]:.4f}')
  if rc.align_logdet != 'exact':
    # A KL is >= 0; the continuous form sum_j dt tr J misses log|det(I + dt J)| by O(dt^2 J^2).
    text += (f' (log-det in the ODE\'s continuous form, {rc.align_logdet}: a proxy of the '
             f'{rc.align_steps}-step map\'s, biased for long steps; a negative estimate is '
             'that bias or Monte-Carlo noise, not a negative KL)')
  return report.Section(values, text)


def few_step_nll(apply_fn, params, dataset, config, times) -> dict:
  """{'student euler-n': {'nll', 'nll_inverse_error'}} of each few-step sampler (2-D data)."""
  x = jnp.asarray(dataset.reference(jax.random.key(config.seed + 2), config.eval.nll_samples))
  log_likelihood = jax.jit(lambda p, x, g: reflow.euler_log_likelihood(apply_fn, p, x, g))
  out = {}
  for nfe in config.eval.euler_steps:
    if nfe % (len(times) - 1):
      continue
    logp, info = log_likelihood(params, x, reflow.window_grid(times, nfe // (len(times) - 1)))
    out[f'student euler-{nfe}'] = {'nll': float(-jnp.mean(logp)),
                                   'nll_inverse_error': float(info['inverse_error'])}
  return out


def run(config, workdir: str) -> dict:
  dataset = sources.load(config.data)
  teacher = common.matching_teacher(config, dataset)
  if teacher.two_time:
    raise BadInput('config.method="reflow" needs a velocity teacher (a method "fm" or '
                   '"reflow" run); to distil a flow map use method "flow_map".')
  teacher_apply = common.teacher_velocity(config, teacher, dataset)
  rc = config.reflow
  times = reflow.window_times(rc.windows)
  pairs = make_pairs(config, teacher, teacher_apply, dataset, times, workdir)

  apply_fn, params = build_model(config.model, dataset.shape,
                                 num_classes=configured.num_classes(config, dataset),
                                 seed=config.seed)
  if rc.warm_start:
    params = common.warm_start(params, teacher.params)
  loss_fn = reflow.make_loss(
      apply_fn, times, teacher_apply_fn=teacher_apply,
      teacher_path=configured.build_path(teacher.config.path), align_weight=rc.align_weight,
      align_warmup=rc.align_warmup, align_steps=rc.align_steps, logdet=rc.align_logdet,
      num_probes=rc.align_probes, score_eps=rc.score_eps or None, align_time=rc.align_time)

  def batches(start):
    return BatchIterator(pairs, config.data.batch_size, seed=config.seed, start_step=start,
                         process_index=jax.process_index(),
                         process_count=jax.process_count())

  state = configured.fit(config, params, loss_fn, batches, workdir,
                         meta=configured.checkpoint_meta(config, dataset, two_time=False),
                         extras={'teacher_params': teacher.params} if rc.align_weight > 0 else {},
                         pass_step=True)
  if jax.process_index() != 0:
    return {}
  apply_fn = common.eval_apply_fn(config, dataset, apply_fn)
  params = common.eval_params(config, state)
  samplers = student_samplers(apply_fn, params, times, config.eval.euler_steps)
  samplers += report.velocity_samplers(teacher_apply, teacher.params, config.eval,
                                       prefix='teacher ')
  return common.write_report(
      config, dataset, samplers, workdir, step=int(state.step), velocity_model=(apply_fn, params),
      sections=[alignment_report(config, apply_fn, params, teacher, teacher_apply, dataset,
                                 times)],
      row_extra=few_step_nll(apply_fn, params, dataset, config, times) if dataset.toy else {},
      moments_reference=f'teacher {config.eval.adaptive_solver}')


METHOD = common.Method('reflow', run, defaults=DEFAULTS, validate=validate)
