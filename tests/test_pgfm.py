"""PGFM: the guided sampler against its closed forms, prototypes, and the guidance checks."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowdistill import closed_form as cf
from flowdistill import experiments, ode, paths
from flowdistill.condense import coverage, pgfm, pgfm_workdir
from flowdistill.condense import mode_guided_diffusion as mgd
from flowdistill.experiments import load_config_file, pgfm_run, validate
from flowdistill.fewstep import flow_map
from flowdistill.train.teacher import load_trained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (2, 2, 1)


def _latents(n=16, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, *SHAPE))


def _field(seed=3):
  """A smooth nonlinear time-dependent velocity with no closed form."""
  a = jax.random.normal(jax.random.key(seed), (4, 4))
  return lambda z, t: (jnp.tanh(z.reshape(len(z), -1) @ a).reshape(z.shape) * (1 + t)
                       - 0.5 * z)


@pytest.mark.parametrize('solver,delta', [('euler', 0.0), ('euler', 0.2), ('heun', 0.2)])
@pytest.mark.parametrize('steps', [1, 3, 8])
def test_straight_full_weight_lands_on_the_exact_endpoint(solver, delta, steps):
  """dz/dt = (p - z)/(1 - t + δ) ends at p + (z0 - p) δ/(1 + δ). Euler's step factors
  (1 - t + δ - dt)/(1 - t + δ) telescope to that number for any N (δ = 0 lands on p); the
  solution is linear in t, so Heun (δ > 0: it evaluates t = 1) is exact too."""
  z0, p = _latents(), _latents(seed=1)
  g = pgfm.PrototypeGuidance(form='straight', w0=1.0, schedule='constant', t_stop=1.0, delta=delta)
  z1, info = ode.solve(pgfm.guided_velocity(_field(), p, g), z0, solver=solver, steps=steps)
  np.testing.assert_allclose(z1, p + (z0 - p) * delta / (1 + delta), atol=2e-6)
  assert info['nfe'] == steps * (2 if solver == 'heun' else 1)


def test_heun_with_zero_delta_stays_finite_when_guidance_stops_before_one():
  z0, p = _latents(), _latents(seed=1)
  g = pgfm.PrototypeGuidance(form='denoiser', w0=1.0, schedule='constant', t_stop=0.75, delta=0.0)
  z1, _ = ode.solve(pgfm.guided_velocity(_field(), p, g), z0, solver='heun', steps=4)
  assert np.isfinite(np.asarray(z1)).all()


@pytest.mark.parametrize('guidance', [
    pgfm.PrototypeGuidance(form='denoiser', w0=0.0),
    pgfm.PrototypeGuidance(form='straight', w0=0.7, t_stop=0.0),
    pgfm.PrototypeGuidance(form='denoiser', w0=2.0, schedule='cosine', t_stop=0.0)])
@pytest.mark.parametrize('solver', ['euler', 'heun'])
def test_zero_guidance_is_unguided_sampling_bit_for_bit(guidance, solver):
  z0, p = _latents(), _latents(seed=1)
  guided, _ = ode.solve(pgfm.guided_velocity(_field(), p, guidance), z0, solver=solver,
                        steps=5)
  plain, _ = ode.solve(_field(), z0, solver=solver, steps=5)
  np.testing.assert_array_equal(guided, plain)


@pytest.mark.parametrize('steps', [1, 4, 16])
def test_denoiser_form_on_point_mass_data_lands_on_the_shifted_point(steps):
  """With data at m the velocity is (m - z)/(1 - t) and ẑ1 = m, so the denoiser pull with
  constant w turns it into the point-mass velocity of m + w (p - m)."""
  m, p, w = _latents(seed=4), _latents(seed=1), 0.6
  apply_fn = lambda params, z, t, cond=None: (m - z) / (1.0 - t)[:, None, None, None]
  labels = jnp.zeros(len(m), jnp.int32)
  g = pgfm.PrototypeGuidance(form='denoiser', w0=w, schedule='constant', t_stop=1.0, delta=0.0)
  z1, info = pgfm.sample(apply_fn, {}, jax.random.key(0), labels, p, g, steps=steps)
  np.testing.assert_allclose(z1, m + w * (p - m), atol=1e-5)
  assert info['nfe'] == steps


@pytest.mark.parametrize('form', pgfm.FORMS)
def test_guided_heun_on_gaussian_data_converges_to_dopri5(form):
  path = paths.linear_path()
  params = {'mean': jnp.full(SHAPE, 0.5), 'std': jnp.full(SHAPE, 0.7)}
  v = ode.velocity_fn(cf.make_apply_fn(path), params)
  z0, p = _latents(), _latents(seed=1)
  g = pgfm.PrototypeGuidance(form=form, w0=0.5, schedule='cosine', t_stop=1.0, delta=0.1)
  ref, _ = ode.solve(pgfm.guided_velocity(v, p, g), z0, solver='dopri5', rtol=1e-7, atol=1e-7)
  errors = [float(jnp.abs(ode.solve(pgfm.guided_velocity(v, p, g), z0, solver='heun',
                                    steps=n)[0] - ref).max()) for n in (16, 32, 64)]
  rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
  assert np.all(rates > 1.6), (errors, rates)


@pytest.mark.parametrize('form', pgfm.FORMS)
def test_trust_region_bounds_the_pull_and_keeps_its_direction(form):
  """||v_g − v|| <= ρ ||v|| per sample, the pull parallel to the unbounded one, and a large ρ
  leaves the field unchanged."""
  z, p, t = _latents(), 3.0 * _latents(seed=1), jnp.float32(0.3)
  u = _field()(z, t)
  free = pgfm.PrototypeGuidance(form=form, w0=0.8, t_stop=1.0, delta=0.05)
  g_free = pgfm.guided_velocity(_field(), p, free)(z, t) - u
  for rho in (0.1, 0.5):
    g = pgfm.guided_velocity(_field(), p, dataclasses.replace(free, trust=rho))(z, t) - u
    norm = lambda a: jnp.sqrt(jnp.sum(jnp.square(a.reshape(len(a), -1)), -1))
    assert bool(jnp.all(norm(g) <= rho * norm(u) * (1 + 1e-5)))
    assert bool(jnp.any(norm(g) < 0.99 * norm(g_free)))  # the bound binds somewhere
    cos = jnp.sum((g * g_free).reshape(len(g), -1), -1) / (norm(g) * norm(g_free))
    np.testing.assert_allclose(cos, 1.0, atol=1e-5)
  wide = pgfm.guided_velocity(_field(), p, dataclasses.replace(free, trust=1e6))(z, t) - u
  np.testing.assert_allclose(wide, g_free, atol=1e-6)


def test_warm_start_without_pull_is_the_exact_flow_map_from_t0():
  """On Gaussian data the velocity is exact, so the unguided warm-started sampler is the
  closed-form flow map X((1 − t0) z0 + t0 p, t0, 1)."""
  path = paths.linear_path()
  params = {'mean': jnp.full(SHAPE, 0.5), 'std': jnp.full(SHAPE, 0.7)}
  apply_fn = cf.make_apply_fn(path)
  labels, p, t0 = jnp.zeros(16, jnp.int32), _latents(seed=1), 0.6
  pull = pgfm.PrototypeGuidance(w0=0.0, warm_start=t0)
  z1, info = pgfm.sample(lambda prm, z, t, cond=None: apply_fn(prm, z, t), params,
                         jax.random.key(0), labels, p, pull, solver='heun', steps=64)
  z0 = ode.noise(jax.random.key(0), 16, SHAPE)
  start = (1 - t0) * z0 + t0 * p
  exact = cf.flow_map(path, start, t0, 1.0, params['mean'], params['std'])
  np.testing.assert_allclose(z1, exact, atol=1e-4)
  assert info['nfe'] == 128


@pytest.mark.parametrize('steps', [1, 3])
def test_warm_start_with_the_straight_pull_lands_on_the_prototype(steps):
  """From (1 − t0) z0 + t0 p the straight pull at w = 1, δ = 0 is the straight line to p."""
  p, labels = _latents(seed=1), jnp.zeros(16, jnp.int32)
  pull = pgfm.PrototypeGuidance(form='straight', w0=1.0, t_stop=1.0, delta=0.0, warm_start=0.5)
  z1, info = pgfm.sample(lambda prm, z, t, cond=None: _field()(z, t[0]), {},
                         jax.random.key(0), labels, p, pull, steps=steps)
  np.testing.assert_allclose(z1, p, atol=1e-5)
  assert info['nfe'] == steps


def _gaussian_samples(mean: float, pull):
  """Guided samples of the exact flow of N(mean, 0.3²) data toward fixed prototypes."""
  path = paths.linear_path()
  params = {'mean': jnp.full(SHAPE, mean), 'std': jnp.full(SHAPE, 0.3)}
  apply_fn = lambda prm, z, t, cond=None: cf.make_apply_fn(path)(prm, z, t)
  return pgfm.sample(apply_fn, params, jax.random.key(0), jnp.zeros(64, jnp.int32),
                     jnp.broadcast_to(_latents(1, seed=1), (64, *SHAPE)), pull, steps=8)[0]


def test_default_samples_are_made_by_the_flow_not_only_by_the_prototype():
  """With the default guidance, two flows (data around -1 and +1) give samples that differ by
  at least a quarter of what their unguided samples differ by, and the samples keep at least
  a quarter of the unguided spread around their prototype: the flow, not the prototype alone,
  makes the set (at w ≡ 1 to t = 1 both ratios are ≈ δ / (1 + δ) = 0.05)."""
  default, unguided = pgfm.PrototypeGuidance(), pgfm.PrototypeGuidance(w0=0.0)
  dist = lambda a, b: float(jnp.mean(jnp.sqrt(jnp.sum(jnp.square(a - b), axis=(1, 2, 3)))))
  guided = [_gaussian_samples(m, default) for m in (-1.0, 1.0)]
  free = [_gaussian_samples(m, unguided) for m in (-1.0, 1.0)]
  assert dist(*guided) >= 0.25 * dist(*free)
  spread = lambda z: dist(z, jnp.mean(z, 0, keepdims=True))
  assert spread(guided[1]) >= 0.25 * spread(free[1])
  legacy = pgfm.PrototypeGuidance(w0=1.0, t_stop=1.0, delta=0.05)
  collapsed = [_gaussian_samples(m, legacy) for m in (-1.0, 1.0)]
  assert dist(*collapsed) < 0.1 * dist(*free)  # the check fails for the prototype-only sampler


def test_the_two_forms_are_one_field_at_zero_delta():
  """(p - ẑ1)/(1 - t) = (p - z)/(1 - t) - v, so with δ = 0 the denoiser pull is the straight
  blend; δ > 0 tells them apart."""
  z, p, t = _latents(), _latents(seed=1), jnp.float32(0.3)
  fields = {(form, d): pgfm.guided_velocity(_field(), p, pgfm.PrototypeGuidance(
      form=form, w0=0.7, schedule='constant', t_stop=1.0, delta=d))(z, t)
      for form in pgfm.FORMS for d in (0.0, 0.1)}
  np.testing.assert_allclose(fields['straight', 0.0], fields['denoiser', 0.0], atol=1e-6)
  assert float(jnp.abs(fields['straight', 0.1] - fields['denoiser', 0.1]).max()) > 1e-3


def test_weight_schedules_start_at_w0_and_switch_off_at_t_stop():
  t = jnp.array([0.0, 0.25, 0.5, 0.79, 0.8, 1.0])
  for schedule, mid in (('constant', 0.4), ('linear', 0.4 * (1 - 0.5 / 0.8)),
                        ('cosine', 0.4 * 0.5 * (1 + np.cos(np.pi * 0.5 / 0.8)))):
    w = np.asarray(pgfm.weight(pgfm.PrototypeGuidance(w0=0.4, schedule=schedule, t_stop=0.8), t))
    assert w[0] == pytest.approx(0.4) and w[2] == pytest.approx(mid, rel=1e-6)
    assert w[4] == 0 and w[5] == 0


def test_class_prototypes_recover_well_separated_blob_centres():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(2, 3, *SHAPE)) * 10
  latents = (centres[:, :, None] + 0.01 * rng.normal(size=(2, 3, 20, *SHAPE))).reshape(
      -1, *SHAPE)
  labels = np.repeat([0, 1], 60)
  protos = pgfm.class_prototypes(latents, labels, 3, seed=0, n_init=2)
  assert protos.shape == (2, 3, *SHAPE)
  for c in range(2):
    found = protos[c].reshape(3, -1)
    truth = centres[c].reshape(3, -1)
    gaps = np.linalg.norm(found[:, None] - truth[None], axis=-1)
    assert np.all(gaps.min(0) < 0.05)


@pytest.mark.parametrize('kwargs,match', [
    (dict(t_stop=1.5), 't_stop'), (dict(delta=-0.1), 'delta'),
    (dict(form='straight', w0=1.5), 'w0'), (dict(form='curved'), 'form'),
    (dict(schedule='step'), 'schedule')])
def test_bad_guidance_is_refused_by_name(kwargs, match):
  with pytest.raises(ValueError, match=match):
    pgfm.PrototypeGuidance(**kwargs)


def test_ipc_above_a_class_count_is_refused():
  with pytest.raises(ValueError, match='class 1 has 2'):
    pgfm.class_prototypes(np.zeros((5, *SHAPE)), np.array([0, 0, 0, 1, 1]), 3)


# The diffusion counterpart on the same network.

GAUSS = {'mean': jnp.array([0.5, -1.0, 2.0, 0.0]), 'std': jnp.array([0.7, 0.3, 1.2, 1.0])}


@pytest.mark.parametrize('sampler', mgd.SAMPLERS)
def test_unguided_counterpart_reproduces_gaussian_data_moments(sampler):
  n = 4000
  apply_fn = cf.make_apply_fn(paths.linear_path())
  x, info = mgd.sample(apply_fn, GAUSS, jax.random.key(0), jnp.zeros(n, jnp.int32), (4,),
                       paths.linear_path(), steps=1000, sampler=sampler)
  assert info['nfe'] == 1000
  se_mean, se_std = GAUSS['std'] / np.sqrt(n), GAUSS['std'] / np.sqrt(2 * n)
  np.testing.assert_array_less(np.abs(x.mean(0) - GAUSS['mean']), 4 * se_mean)
  np.testing.assert_array_less(np.abs(x.std(0) - GAUSS['std']), 4 * se_std + 0.01)


def test_mode_guidance_pulls_toward_the_prototype_and_stops_bit_for_bit():
  n, path = 512, paths.linear_path()
  apply_fn = cf.make_apply_fn(path)
  labels, p = jnp.zeros(n, jnp.int32), jnp.full((n, 4), 3.0)
  run = lambda **kw: mgd.sample(apply_fn, GAUSS, jax.random.key(1), labels, (4,), path,
                                steps=50, prototypes=p, **kw)[0]
  plain, off, guided = run(lam=0.0), run(lam=0.1, stop_step=0), run(lam=0.1, stop_step=25)
  np.testing.assert_array_equal(off, plain)
  gap = lambda x: float(jnp.linalg.norm(x - p, axis=1).mean())
  assert gap(guided) < gap(plain) - 0.1


def test_ancestral_step_reaches_the_data_estimate_at_t_one():
  path, x, x1 = paths.linear_path(), _latents(), _latents(seed=2)
  mean, std = mgd.ancestral_step(path, x, x1, jnp.float32(0.9), jnp.float32(1.0))
  np.testing.assert_allclose(mean, x1, atol=1e-6)
  np.testing.assert_allclose(std, 0.0, atol=1e-7)


# Mode coverage, landing rate and diversity.

def _modes(k, dim=12):
  return [10.0 * np.eye(dim)[:k]]


def test_uniform_draws_cover_one_minus_one_minus_one_over_k_to_the_k():
  k, classes = 10, 400
  rng = np.random.default_rng(0)
  modes = _modes(k) * classes
  picks = rng.integers(k, size=(classes, k))
  points = modes[0][picks].reshape(classes * k, -1) + 0.1 * rng.normal(size=(classes * k, 12))
  result = coverage.mode_coverage(points, np.repeat(np.arange(classes), k), modes)
  se = np.std(result['per_class']) / np.sqrt(classes)
  assert abs(result['mc'] - coverage.uniform_coverage(k)) < 3 * se
  assert coverage.uniform_coverage(10) == pytest.approx(0.6513, abs=1e-4)


def test_coverage_is_one_for_one_sample_per_mode_and_one_over_k_for_a_single_mode():
  modes = _modes(5)
  labels = np.zeros(5, int)
  assert coverage.mode_coverage(modes[0] + 0.5, labels, modes)['mc'] == 1.0
  assert coverage.mode_coverage(np.repeat(modes[0][:1], 5, 0), labels, modes)['mc'] == 0.2


def test_class_modes_are_the_real_clusters():
  rng = np.random.default_rng(1)
  real = np.concatenate([_modes(3)[0][rng.integers(3, size=60)] + 0.01 * rng.normal(size=(60, 12))
                         for _ in range(2)])
  modes = coverage.class_modes(real, np.repeat([0, 1], 60), 3)
  assert len(modes) == 2 and modes[1].shape == (3, 12)
  assert coverage.mode_coverage(_modes(3)[0], np.zeros(3, int), modes[:1])['mc'] == 1.0


def test_landing_rate_counts_samples_nearest_their_assigned_prototype():
  protos = np.stack([_modes(3)[0], -_modes(3)[0]])  # [C=2, K=3, 12]
  samples = np.concatenate([protos[0] + 0.1, protos[1][::-1] + 0.1])
  labels, assigned = np.repeat([0, 1], 3), np.array([0, 1, 2, 0, 1, 2])
  assert coverage.landing_rate(samples, labels, assigned, protos) == pytest.approx(4 / 6)


def test_diversity_is_one_for_real_points_and_zero_for_a_collapsed_set():
  rng = np.random.default_rng(2)
  real = rng.normal(size=(200, 5))
  labels = np.repeat([0, 1], 100)
  assert coverage.diversity(real, labels, real, labels) == pytest.approx(1.0)
  assert coverage.diversity(np.zeros((4, 5)), np.array([0, 0, 1, 1]), real, labels) == 0.0


# The experiment end to end on the built-in digits.

def test_pgfm_experiment_runs_end_to_end_and_resumes(tmp_path, monkeypatch):
  monkeypatch.setenv('FLOWDISTILL_CACHE', str(tmp_path / 'cache'))
  config = load_config_file(os.path.join(ROOT, 'configs', 'pgfm.py'), 'digits,cpu')
  config.dd.update(ipcs=(2,), runs=2, epochs=(2,), width=8, epochs_per_call=3)
  config.pgfm.update(check_samples=20, steps=2)
  config.pgfm.vae.steps = 20
  config.model.update(channels=(8, 8), time_dim=8)
  config.train.update(steps=4, ckpt_every=4, log_every=2)
  config.eval.classifier_steps = 20
  validate(config)
  result = experiments.get('pgfm').run(config, str(tmp_path / 'run'))
  cells = {c['set']: c for c in result['cells']}
  assert set(cells) == set(pgfm_run.DEFAULTS['sets'])
  assert cells['pgfm']['nfe'] == 2 and cells['prototypes']['landing_rate'] == 1.0
  assert all(0 < c['mc_feature'] <= 1 and len(c['accs']) == len(c['val_accs']) == 2
             for c in cells.values())
  assert 0 <= result['flow_label_accuracy'] <= 1
  saved = np.load(tmp_path / 'run' / 'sets' / 'pgfm_ipc2.npz')
  assert saved['x'].shape == (20, 8, 8, 1) and np.abs(saved['x']).max() <= 1
  assert '| pgfm | 2 |' in (tmp_path / 'run' / 'results.md').read_text()
  again = experiments.get('pgfm').run(config, str(tmp_path / 'run'))
  assert [c['accs'] for c in again['cells']] == [c['accs'] for c in result['cells']]

  student = load_config_file(os.path.join(ROOT, 'configs', 'pgfm_student.py'),
                             str(tmp_path / 'run'))
  student.train.update(steps=2, ckpt_every=2, log_every=1)
  student.eval.update(num_samples=20, nll_samples=4, classifier_steps=20, map_steps=(1,),
                      euler_steps=(1,), plot=False)
  validate(student)
  experiments.get('flow_map').run(student, str(tmp_path / 'student'))
  done = pgfm_workdir.load_finished(str(tmp_path / 'run'))
  jumps = load_trained(str(tmp_path / 'student'))
  assert jumps.two_time and jumps.data_shape == done.flow.data_shape
  task = done.scoring(2, runs=1, epochs=1)
  z, info = pgfm.jump_sample(jumps.apply_fn, jumps.params, jax.random.key(0),
                             jnp.asarray(task['labels']), task['targets'],
                             pgfm_workdir.prototype_guidance(config), steps=2)
  assert z.shape == task['targets'].shape and bool(jnp.isfinite(z).all()) and info['nfe'] == 2


def test_pgfm_config_refuses_bad_guidance_and_unconditional_flows():
  config = load_config_file(os.path.join(ROOT, 'configs', 'pgfm.py'), 'digits')
  config.pgfm.prototype_guidance.t_stop = 1.2
  with pytest.raises(ValueError, match='t_stop'):
    validate(config)
  config.pgfm.prototype_guidance.t_stop = 0.9
  config.data.conditional, config.fm.label_dropout = False, 0.0
  with pytest.raises(ValueError, match='class-conditional'):
    validate(config)
  with pytest.raises(ValueError, match='unknown preset'):
    load_config_file(os.path.join(ROOT, 'configs', 'pgfm.py'), 'mnist,fast')


def _gaussian_flow_map():
  path = paths.linear_path()
  params = {'mean': jnp.full(SHAPE, 0.5), 'std': jnp.full(SHAPE, 0.7)}
  return cf.make_apply_fn(path), params


def test_unguided_jumps_are_the_flow_map_jumps_bit_for_bit():
  apply_fn, params = _gaussian_flow_map()
  labels, p = jnp.zeros(16, jnp.int32), _latents(seed=1)
  guided, info = pgfm.jump_sample(apply_fn, params, jax.random.key(0), labels, p,
                                  pgfm.PrototypeGuidance(w0=0.0, warm_start=0.0), steps=3)
  plain, _ = flow_map.jump(apply_fn, params, ode.noise(jax.random.key(0), 16, SHAPE),
                           ode.time_grid(3), labels)
  np.testing.assert_array_equal(guided, plain)
  assert info['nfe'] == 3


@pytest.mark.parametrize('steps', [1, 2, 4])
def test_straight_full_weight_jumps_land_on_the_exact_endpoint(steps):
  apply_fn, params = _gaussian_flow_map()
  labels, p = jnp.zeros(16, jnp.int32), _latents(seed=1)
  g = pgfm.PrototypeGuidance(form='straight', w0=1.0, schedule='constant', t_stop=1.0, delta=0.1,
                             warm_start=0.0)
  z1, _ = pgfm.jump_sample(apply_fn, params, jax.random.key(0), labels, p, g, steps=steps)
  z0 = ode.noise(jax.random.key(0), 16, SHAPE)
  np.testing.assert_allclose(z1, p + (z0 - p) * 0.1 / 1.1, atol=2e-6)


def test_per_class_frechet_is_zero_for_the_real_features_and_none_at_one_per_class():
  rng = np.random.default_rng(3)
  real = rng.normal(size=(60, 3))
  labels = np.repeat([0, 1], 30)
  assert coverage.per_class_frechet(real, labels, real, labels) == pytest.approx(0, abs=1e-9)
  assert coverage.per_class_frechet(real[:2], np.array([0, 1]), real, labels) is None
  shifted = coverage.per_class_frechet(real + np.array([2.0, 0, 0]), labels, real, labels)
  assert shifted == pytest.approx(4.0, rel=1e-6)


def test_prototypes_file_is_reused_only_for_its_own_recipe(tmp_path, caplog):
  """The saved k-means prototypes are reused for the same VAE and k-means recipe; a file of
  the old format (no manifest), of another recipe or with flipped bytes is replaced by a fresh
  k-means with one warning naming it."""
  rng = np.random.default_rng(0)
  lat = {'train': {'x': rng.normal(size=(40, 2, 2, 1)).astype(np.float32),
                   'label': np.repeat(np.arange(2), 20)}}
  config = experiments.method_config('pgfm')
  want = pgfm.class_prototypes(lat['train']['x'], lat['train']['label'], 3, seed=config.dd.seed,
                               n_init=config.pgfm.prototype_n_init)
  path = tmp_path / 'prototypes_ipc3.npz'
  np.savez(path, prototypes=np.zeros_like(want), fingerprint='vae')  # the old format
  got = pgfm_workdir.load_or_make_prototypes(str(tmp_path), lat, 3, config, 'vae')
  np.testing.assert_array_equal(got, want)
  assert str(path) in caplog.text and 'manifest' in caplog.text

  caplog.clear()
  other = pgfm_workdir.load_or_make_prototypes(str(tmp_path), lat, 3, config, 'another vae')
  np.testing.assert_array_equal(other, want)
  assert str(path) in caplog.text and 'another VAE or k-means recipe' in caplog.text

  pgfm_workdir.load_or_make_prototypes(str(tmp_path), lat, 3, config, 'vae')
  caplog.clear()
  mtime = os.path.getmtime(path)
  again = pgfm_workdir.load_or_make_prototypes(str(tmp_path), lat, 3, config, 'vae')
  np.testing.assert_array_equal(again, want)
  assert os.path.getmtime(path) == mtime and not caplog.text

  data = bytearray(path.read_bytes())
  data[-30] ^= 0xFF
  path.write_bytes(bytes(data))
  again = pgfm_workdir.load_or_make_prototypes(str(tmp_path), lat, 3, config, 'vae')
  np.testing.assert_array_equal(again, want)
  assert 'k-means prototypes' in caplog.text and 'sha256' in caplog.text
