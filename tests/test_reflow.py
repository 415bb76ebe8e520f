"""Reflow, piecewise reflow and marginal alignment against a Gaussian teacher's closed forms."""

import json

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from flowdistill import closed_form as cf
from flowdistill import ode, paths
from flowdistill.data import sources, teacher_pairs
from flowdistill.experiments import load_config_file, method_config, reflow_run, validate
from flowdistill.fewstep import reflow
from flowdistill.train import configured
from flowdistill.train.teacher import load_trained

MEAN, STD = jnp.array([2.0, -1.0]), jnp.array([0.5, 1.5])
TEACHER = {'mean': MEAN, 'std': STD}
PATH = paths.linear_path()
TEACHER_APPLY = cf.make_apply_fn(PATH)


def _marginal(t):
  """Mean and std of the Gaussian teacher's marginal at time t (linear path)."""
  return t * MEAN, jnp.sqrt((1 - t)**2 + (t * STD)**2)


def straight_apply(params, x, t, *, s=None, cond=None, train=False):
  """The exact (piecewise) reflow velocity of the Gaussian teacher on the windows
  `params['times']`: teacher states are `mu_t + sigma_t x0`, joined by straight lines."""
  del s, cond, train
  times = jnp.asarray(params['times'])
  k = jnp.clip(jnp.searchsorted(times, t, side='right') - 1, 0, times.shape[0] - 2)
  t_lo, t_hi = times[k], times[k + 1]
  (m_lo, s_lo), (m_hi, s_hi) = _marginal(t_lo[:, None]), _marginal(t_hi[:, None])
  r = ((t - t_lo) / (t_hi - t_lo))[:, None]
  x0 = (x - (1 - r) * m_lo - r * m_hi) / ((1 - r) * s_lo + r * s_hi)
  return ((m_hi - m_lo) + (s_hi - s_lo) * x0 * params['scale']) / (t_hi - t_lo)[:, None]


def affine_apply(params, x, t, *, s=None, cond=None, train=False):
  """A time-independent affine student `v(x) = A x + b`."""
  del t, s, cond, train
  return x @ params['A'].T + params['b']


def _whitened(key, n, mean, std):
  """n samples whose empirical mean and covariance are exactly `mean`, `diag(std^2)`."""
  z = jax.random.normal(key, (n, mean.shape[0]))
  z = z - z.mean(0)
  cov = z.T @ z / n
  z = z @ jnp.linalg.inv(jnp.linalg.cholesky(cov)).T
  return mean + std * z


def _states(times, n=512, seed=0):
  x0 = jax.random.normal(jax.random.key(seed), (n, 2))
  v = ode.velocity_fn(TEACHER_APPLY, TEACHER)
  states, _ = reflow.teacher_trajectory(v, x0, times, rtol=1e-7, atol=1e-7)
  return states


def test_window_grid_puts_equal_steps_inside_each_window():
  grid = reflow.window_grid(jnp.array([0.0, 0.2, 1.0]), 2)
  np.testing.assert_allclose(grid, [0.0, 0.1, 0.2, 0.6, 1.0], atol=1e-7)
  with pytest.raises(ValueError, match='steps_per_window'):
    reflow.window_grid(jnp.array([0.0, 1.0]), 0)


def test_teacher_trajectory_matches_the_exact_flow():
  times = reflow.window_times(2)
  states = _states(times)
  for k, t in enumerate(times):
    exact = cf.flow_map(PATH, states[0], 0.0, t, MEAN, STD)
    np.testing.assert_allclose(states[k], exact, atol=1e-4)


@pytest.mark.parametrize('num_windows', [1, 2])
def test_reflow_loss_vanishes_at_the_exact_straight_velocity(num_windows):
  times = reflow.window_times(num_windows)
  batch = {'states': jnp.moveaxis(_states(times), 0, 1)}
  loss_fn = reflow.make_loss(straight_apply, times)
  exact, _ = loss_fn({'times': times, 'scale': 1.0}, batch, jax.random.key(1))
  wrong, _ = loss_fn({'times': times, 'scale': 0.5}, batch, jax.random.key(1))
  assert exact < 1e-6 and wrong > 1e-2, (exact, wrong)


def test_one_euler_step_per_window_reproduces_the_teacher_map():
  times = reflow.window_times(2)
  states = _states(times)
  params = {'times': times, 'scale': 1.0}
  x1, info = ode.solve(ode.velocity_fn(straight_apply, params), states[0], solver='euler',
                       grid=reflow.window_grid(times, 1))
  np.testing.assert_allclose(x1, states[-1], atol=1e-4)
  assert info['nfe'] == 2


@pytest.mark.parametrize('path', [paths.linear_path(), paths.trig_path()],
                         ids=['linear', 'trig'])
def test_teacher_score_from_velocity_is_exact(path):
  x = jax.random.normal(jax.random.key(0), (64, 2)) * 2.0
  t = jnp.linspace(0.05, 0.95, 64)
  got = reflow.teacher_score(cf.make_apply_fn(path), TEACHER, path, x, t, eps=None)
  np.testing.assert_allclose(got, cf.score(path, x, t, MEAN, STD), rtol=1e-4, atol=1e-4)
  # At the data end the time is clipped, for the velocity and the conversion alike.
  ends = jnp.ones(64)
  got = reflow.teacher_score(cf.make_apply_fn(path), TEACHER, path, x, ends, eps=0.05)
  np.testing.assert_allclose(got, cf.score(path, x, 0.95 * ends, MEAN, STD), rtol=1e-4,
                             atol=1e-4)


AFFINE = {'A': jnp.array([[0.3, -0.4], [0.2, -0.5]]), 'b': jnp.array([0.5, -0.2])}


@pytest.mark.parametrize('steps', [1, 3])
def test_exact_logdet_tracking_is_the_change_of_variables_of_an_affine_student(steps):
  mean0, std0 = _marginal(0.25)
  x = _whitened(jax.random.key(0), 256, mean0, std0)
  t0, t1 = jnp.full(256, 0.25), jnp.full(256, 0.75)
  y, logdet = reflow.euler_map_logdet(affine_apply, AFFINE, x, t0, t1, steps)
  step = jnp.eye(2) + (0.5 / steps) * AFFINE['A']
  m = jnp.linalg.matrix_power(step, steps)
  np.testing.assert_allclose(logdet, jnp.linalg.slogdet(m)[1], atol=1e-5)
  # log q(Phi x) = log p(x) - logdet is the pushed-forward Gaussian's log-density.
  shift = y[0] - m @ x[0]
  cov = m @ jnp.diag(std0**2) @ m.T
  q = jax.scipy.stats.multivariate_normal.logpdf(y, m @ mean0 + shift, cov)
  log_p = jax.scipy.stats.norm.logpdf(x, mean0, std0).sum(-1)
  np.testing.assert_allclose(log_p - logdet, q, atol=1e-4)


def test_hutchinson_logdet_is_the_continuous_form_within_its_error():
  x = jax.random.normal(jax.random.key(0), (4, 2))
  t0, t1 = jnp.full(4, 0.2), jnp.full(4, 0.7)
  probes = ode.divergence_probes(jax.random.key(1), 4000, x)
  _, logdet = reflow.euler_map_logdet(affine_apply, AFFINE, x, t0, t1, 2, method='hutchinson',
                                      probes=probes)
  per_probe = jax.vmap(lambda p: reflow.euler_map_logdet(
      affine_apply, AFFINE, x, t0, t1, 2, method='hutchinson', probes=p[None])[1])(probes)
  stderr = per_probe.std(0) / np.sqrt(probes.shape[0])
  exact = 0.5 * jnp.trace(AFFINE['A'])
  assert np.all(np.abs(logdet - exact) < 4 * stderr + 1e-6), (logdet, exact, stderr)
  _, traced = reflow.euler_map_logdet(affine_apply, AFFINE, x, t0, t1, 2, method='trace')
  np.testing.assert_allclose(traced, exact, rtol=1e-5)
  # The exact Jacobian log-det of many small Euler steps tends to the same continuous form.
  _, fine = reflow.euler_map_logdet(affine_apply, AFFINE, x, t0, t1, 64)
  np.testing.assert_allclose(fine, exact, atol=5e-3)


def _primitives(jaxpr) -> set:
  """Names of every primitive in `jaxpr`, inner jaxprs (pjit, custom rules) included."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      names |= _primitives(sub)
  return names


@pytest.mark.parametrize('method', ['exact', 'hutchinson'])
def test_alignment_map_gradient_has_no_loop(method):
  # XLA:CPU runs weight-gradient convolutions differentiated through a loop (even of one trip)
  # ~10x slower: the student's window map must stay unrolled.
  x = jax.random.normal(jax.random.key(0), (4, 2))
  t0, t1 = jnp.full(4, 0.2), jnp.full(4, 0.7)
  probes = ode.divergence_probes(jax.random.key(1), 1, x)

  def loss(params):
    y, ld = reflow.euler_map_logdet(affine_apply, params, x, t0, t1, 3, method=method,
                                    probes=probes)
    return jnp.sum(y) + jnp.sum(ld)

  names = _primitives(jax.make_jaxpr(jax.grad(loss))(AFFINE).jaxpr)
  assert not names & {'scan', 'while'}, names


def _gaussian_kl(mean_q, cov_q, mean_p, cov_p):
  inv = jnp.linalg.inv(cov_p)
  d = mean_p - mean_q
  return 0.5 * (jnp.trace(inv @ cov_q) + d @ inv @ d - mean_q.shape[0]
                + jnp.linalg.slogdet(cov_p)[1] - jnp.linalg.slogdet(cov_q)[1])


def _analytic_kl(params, t0, t1, t_teacher=None):
  """KL(q || p_{t_teacher}) for the affine student's one-step map from t0 to t1 of the teacher
  marginal at t0 (t_teacher defaults to t1)."""
  (m0, s0), (m1, s1) = _marginal(t0), _marginal(t1 if t_teacher is None else t_teacher)
  m = jnp.eye(2) + (t1 - t0) * params['A']
  return _gaussian_kl(m @ m0 + (t1 - t0) * params['b'], m @ jnp.diag(s0**2) @ m.T, m1,
                      jnp.diag(s1**2))


def test_alignment_gradient_matches_the_analytic_kl_gradient():
  # With samples whose first two moments are exact, the surrogate's gradient (quadratic in x
  # for a Gaussian teacher and an affine student) equals its expectation exactly.
  t0, t1, n = 0.25, 0.75, 4096
  m0, s0 = _marginal(t0)
  x = _whitened(jax.random.key(0), n, m0, s0)
  score_fn = lambda y, t: reflow.teacher_score(TEACHER_APPLY, TEACHER, PATH, y, t, eps=None)

  def surrogate(params):
    value, _ = reflow.alignment_surrogate(affine_apply, params, score_fn, x, jnp.full(n, t0),
                                          jnp.full(n, t1))
    return jnp.mean(value)

  got = jax.grad(surrogate)(AFFINE)
  want = jax.grad(_analytic_kl)(AFFINE, t0, t1)
  for name in ('A', 'b'):
    np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-4)
  assert float(jnp.abs(want['A']).max()) > 0.1  # a real gradient, not a vanishing one


def _data_end_alignment(align_time, n=4096, eps=0.05):
  """`make_loss`'s alignment term (λ = 1) on one window [0, 1], the data end, with noise
  samples whose first two moments are exact: a function of the affine student's params."""
  x = _whitened(jax.random.key(0), n, jnp.zeros(2), jnp.ones(2))
  batch = {'states': jnp.stack([x, MEAN + STD * x], 1)}
  loss_fn = reflow.make_loss(affine_apply, reflow.window_times(1), teacher_apply_fn=TEACHER_APPLY,
                             teacher_path=PATH, align_weight=1.0, score_eps=eps,
                             align_time=align_time)
  return lambda p: loss_fn(p, batch, jax.random.key(1), TEACHER)[1]['align_surrogate']


def _relative_error(got, want):
  return max(float(jnp.linalg.norm(got[k] - want[k]) / jnp.linalg.norm(want[k])) for k in want)


def test_consistent_alignment_is_the_exact_kl_gradient_at_the_data_end():
  # The student's map stops at the score time 1 - eps: the gradient of KL(q_0.95 || p_0.95).
  got = jax.grad(_data_end_alignment('consistent'))(AFFINE)
  want = jax.grad(_analytic_kl)(AFFINE, 0.0, 0.95)
  assert _relative_error(got, want) < 1e-4, (got, want)
  assert float(jnp.abs(want['A']).max()) > 0.1


def test_clipped_alignment_mixes_times_at_the_data_end():
  # A t = 1 sample scored at 0.95: the gradient of KL(q_1 || p_0.95), not of a KL at one time.
  got = jax.grad(_data_end_alignment('clipped'))(AFFINE)
  assert _relative_error(got, jax.grad(_analytic_kl)(AFFINE, 0.0, 1.0, 0.95)) < 1e-4
  for t in (0.95, 1.0):
    assert _relative_error(got, jax.grad(_analytic_kl)(AFFINE, 0.0, t)) > 0.05
  # At a student whose t = 1 marginal is the teacher's, the clipped form still pulls the mean
  # toward 0.95 * MEAN; the consistent one does not.
  exact = {'A': jnp.diag(STD) - jnp.eye(2), 'b': MEAN}
  assert float(jnp.abs(jax.grad(_data_end_alignment('clipped'))(exact)['b']).max()) > 0.4
  assert float(jnp.abs(jax.grad(_data_end_alignment('consistent'))(exact)['b']).max()) < 1e-5
  with pytest.raises(ValueError, match='align_time'):
    _data_end_alignment('both')
  with pytest.raises(ValueError, match='score_eps'):
    reflow.make_loss(affine_apply, reflow.window_times(4), teacher_apply_fn=TEACHER_APPLY,
                     teacher_path=PATH, align_weight=1.0, score_eps=0.3)


def test_config_validation_names_the_alignment_time_choices():
  config = load_config_file('configs/reflow.py', 'piecewise-ma,moons')
  config.teacher.workdir = 'teacher'
  config.reflow.align_time = 'both'
  with pytest.raises(ValueError, match="'consistent', 'clipped'"):
    validate(config)
  config.reflow.update(align_time='consistent', windows=4, score_eps=0.3)
  config.eval.euler_steps = (4,)
  with pytest.raises(ValueError, match='align_time="clipped"'):
    validate(config)
  config.reflow.align_time = 'clipped'
  validate(config)


def test_alignment_descent_moves_a_mis_scaled_student_toward_the_teacher_marginal():
  surrogate = _data_end_alignment('consistent')
  grad = jax.jit(jax.grad(surrogate))
  target = _marginal(0.95)[1]**2

  def variance_error(params):  # of the pushed-forward N(0, I) at 0.95 (the map is affine)
    m = jnp.eye(2) + 0.95 * params['A']
    return float(jnp.max(jnp.abs(jnp.diag(m @ m.T) / target - 1)))

  params = {'A': jnp.zeros((2, 2)), 'b': MEAN}  # the identity map: variance 1, not the target
  before = variance_error(params)
  for _ in range(20):
    params = jax.tree.map(lambda p, g: p - 0.05 * g, params, grad(params))
  assert variance_error(params) < 0.1 * before, (before, variance_error(params))


def test_window_kl_estimates_match_the_closed_form():
  times = jnp.array([0.25, 0.75])
  m0, s0 = _marginal(0.25)
  x = _whitened(jax.random.key(0), 4096, m0, s0)
  logp = lambda y, t: cf.log_density(PATH, y, t, MEAN, STD)
  kls = reflow.window_kls(affine_apply, AFFINE, logp, x[None], times)
  np.testing.assert_allclose(kls[0], _analytic_kl(AFFINE, 0.25, 0.75), rtol=1e-3)
  exact = reflow.window_kls(straight_apply, {'times': times, 'scale': 1.0}, logp, x[None],
                            times)
  assert abs(float(exact[0])) < 1e-4 and float(kls[0]) > 0.1
  np.testing.assert_allclose(reflow.tv_bound(jnp.array([0.02, 0.08, -1e-3])), 0.1 + 0.2)


def test_zero_alignment_weight_is_plain_reflow():
  times = reflow.window_times(2)
  batch = {'states': jnp.moveaxis(_states(times, n=128), 0, 1)}
  params = {'times': times, 'scale': 0.9}
  plain = reflow.make_loss(straight_apply, times)
  aligned = reflow.make_loss(straight_apply, times, teacher_apply_fn=TEACHER_APPLY,
                             teacher_path=PATH, align_weight=1.0, align_warmup=100)
  grad = lambda fn, step: jax.grad(lambda p: fn(p, batch, jax.random.key(3), TEACHER,
                                                step=step)[0])(params)['scale']
  assert grad(plain, jnp.int32(0)) == grad(aligned, jnp.int32(0))  # λ(0) = 0 in the warm-up
  assert grad(plain, jnp.int32(50)) != grad(aligned, jnp.int32(50))
  with pytest.raises(ValueError, match='teacher_apply_fn'):
    reflow.make_loss(straight_apply, times, align_weight=1.0)


def test_euler_log_likelihood_is_exact_for_straight_paths():
  params = {'times': reflow.window_times(1), 'scale': 1.0}
  x = MEAN + STD * jax.random.normal(jax.random.key(0), (256, 2))
  for steps in (1, 2, 4):
    logp, info = reflow.euler_log_likelihood(straight_apply, params, x,
                                             ode.time_grid(steps))
    np.testing.assert_allclose(logp, cf.log_density(PATH, x, 1.0, MEAN, STD), atol=1e-3)
    assert info['inverse_error'] < 1e-4


def _trajectory_fn(x0, labels):
  del labels
  return jnp.stack([x0, MEAN + STD * x0])


def test_teacher_pairs_resume_reuse_and_refuse_a_different_teacher(tmp_path):
  identity = {'teacher': 'gaussian', 'times': [0.0, 1.0]}
  kwargs = {'chunk': 4, 'shape': (2,), 'seed': 0, 'identity': identity}
  teacher_pairs.generate(str(tmp_path), _trajectory_fn, num=10, **kwargs)
  first = teacher_pairs.load(str(tmp_path), 10)
  assert first['states'].shape == (10, 2, 2)
  np.testing.assert_allclose(first['states'][:, 1], MEAN + STD * first['states'][:, 0],
                             rtol=1e-6)
  (tmp_path / 'chunk_00001.npz').unlink()  # an interrupted run: the missing chunk is redone
  teacher_pairs.generate(str(tmp_path), _trajectory_fn, num=16, **kwargs)
  again = teacher_pairs.load(str(tmp_path), 16)
  np.testing.assert_array_equal(again['states'][:10], first['states'])
  other = tmp_path / 'other'  # rows depend on their index only, not on the chunking
  teacher_pairs.generate(str(other), _trajectory_fn, num=16, **dict(kwargs, chunk=8))
  np.testing.assert_array_equal(teacher_pairs.load(str(other), 16)['states'], again['states'])
  with pytest.raises(ValueError, match='teacher'):
    teacher_pairs.generate(str(tmp_path), _trajectory_fn, num=4,
                           **dict(kwargs, identity=dict(identity, teacher='another')))
  with pytest.raises(FileNotFoundError, match='chunk_00004'):
    teacher_pairs.load(str(tmp_path), 20)


def _tiny(config):
  config.data.update(name='moons', batch_size=64)
  config.model.hidden = 32
  config.train.update(steps=20, ckpt_every=10, log_every=10)
  config.eval.update(num_samples=200, nll_samples=20, euler_steps=(1, 2), plot=False)
  return config


def test_piecewise_reflow_with_alignment_runs_from_a_teacher_workdir(tmp_path):
  configured.train_fm(_tiny(method_config()), str(tmp_path / 'teacher'))
  config = _tiny(load_config_file('configs/reflow.py', 'piecewise-ma,moons'))
  config.teacher.workdir = str(tmp_path / 'teacher')
  config.reflow.update(num_pairs=128, pair_chunk=64, kl_samples=32, align_warmup=5,
                       pairs_dir=str(tmp_path / 'pairs'))
  validate(config)
  result = reflow_run.run(config, str(tmp_path / 'student'))
  rows = {r['sampler']: r for r in result['rows']}
  assert rows['student euler-2']['nfe'] == 2 and 'student euler-1' not in rows  # 2 windows
  assert np.isfinite(rows['student euler-2']['nll'])
  assert rows['teacher dopri5']['mean_drift'] == 0.0
  assert len(result['window_kl']) == 2 and np.isfinite(result['tv_bound'])
  metrics = [json.loads(line) for line in (tmp_path / 'student' / 'metrics.jsonl').open()]
  assert metrics[-1]['align_weight'] == pytest.approx(config.reflow.align_weight)
  # Another run with the same teacher reuses the cached pairs; another teacher (here: the
  # student itself) is refused by the cache with the fix.
  dataset = sources.load(config.data)
  teacher = load_trained(config.teacher.workdir)
  times = reflow.window_times(2)
  before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / 'pairs').iterdir()}
  pairs = reflow_run.make_pairs(config, teacher, teacher.apply_fn, dataset, times,
                                       str(tmp_path / 'other'))
  assert pairs['states'].shape == (128, 3, 2)
  assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / 'pairs').iterdir()} == before
  config.teacher.workdir = str(tmp_path / 'student')
  with pytest.raises(ValueError, match='pairs_dir'):
    reflow_run.run(config, str(tmp_path / 'third'))


@pytest.mark.slow
def test_guided_image_reflow_with_hutchinson_alignment(tmp_path, monkeypatch):
  """Class-conditional U-Net on built-in digits: guided teacher pairs, Hutchinson log-det."""
  monkeypatch.setenv('FLOWDISTILL_CACHE', str(tmp_path / 'cache'))
  teacher = method_config()
  teacher.data.update(source='digits', batch_size=16, conditional=True)
  teacher.model.update(name='unet', channels=(8, 8, 8), attention=False, time_dim=8)
  teacher.fm.label_dropout = 0.2
  teacher.train.update(steps=2, ckpt_every=2, log_every=1)
  teacher.eval.update(num_samples=20, euler_steps=(2,), nll_samples=2, plot=False,
                      nll_divergence='hutchinson', rtol=1e-2, atol=1e-2, classifier_steps=10)
  configured.train_fm(teacher, str(tmp_path / 'teacher'))
  config = load_config_file('configs/reflow.py', 'piecewise-ma,mnist')
  config.data = teacher.data
  config.model = teacher.model
  config.teacher.workdir = str(tmp_path / 'teacher')
  config.train.update(steps=2, ckpt_every=2, log_every=1)
  config.eval = teacher.eval
  config.eval.update(euler_steps=(2, 4), cfg_scale=2.0)
  config.reflow.update(num_pairs=16, pair_chunk=16, kl_samples=4, align_warmup=0,
                       pair_rtol=1e-2, pair_atol=1e-2)
  validate(config)
  result = reflow_run.run(config, str(tmp_path / 'student'))
  rows = {r['sampler']: r for r in result['rows']}
  assert set(rows) == {'student euler-2', 'student euler-4', 'teacher euler-2',
                       'teacher euler-4', 'teacher dopri5'}
  assert all(np.isfinite(r['fd']) and np.isfinite(r['cov_drift']) for r in rows.values())
  assert len(result['window_kl']) == 2 and np.all(np.isfinite(result['window_kl']))
