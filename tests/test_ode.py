"""Samplers and likelihoods against the exact Gaussian flow and a reference solver."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flowdistill import closed_form as cf
from flowdistill import errors, ode, paths
from flowdistill.eval import report
from flowdistill.models.apply import to_apply_fn
from flowdistill.models.dit import DiT
from flowdistill.models.mlp import MLP
from flowdistill.models.unet import UNet

MEAN, STD = jnp.array([2.0, -1.0]), jnp.array([0.5, 1.5])
PARAMS = {'mean': MEAN, 'std': STD}


@pytest.fixture(scope='module', params=[paths.linear_path(), paths.trig_path()],
                ids=lambda p: p.name)
def path(request):
  return request.param


def test_adaptive_solve_reproduces_the_exact_flow(path):
  apply_fn = cf.make_apply_fn(path)
  x0 = ode.noise(jax.random.key(0), 256, (2,))
  for solver in ode.ADAPTIVE_SOLVERS:
    x1, info = ode.sample(apply_fn, PARAMS, jax.random.key(0), 256, (2,), solver=solver,
                          rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(x1, cf.flow_map(path, x0, 0.0, 1.0, MEAN, STD), atol=2e-4)
    assert info['nfe'] > 6


@pytest.mark.parametrize('solver,order', [('euler', 1), ('midpoint', 2), ('heun', 2)])
def test_fixed_step_solvers_converge_to_diffrax_at_their_order(solver, order):
  """A smooth nonlinear, time-dependent field (no closed form) against a tight Dopri5."""
  a = jax.random.normal(jax.random.key(1), (3, 3))
  v = lambda x, t: jnp.tanh(x @ a) * (1.0 + t) + jnp.sin(3.0 * t) - 0.5 * x
  x = ode.noise(jax.random.key(2), 64, (3,))
  ref, _ = ode.solve(v, x, solver='dopri5', rtol=1e-7, atol=1e-7)
  errors = [float(jnp.abs(ode.solve(v, x, solver=solver, steps=n)[0] - ref).max())
            for n in (4, 8, 16, 32)]
  rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
  assert np.all(rates > order - 0.3), (errors, rates)


def test_reported_nfe_equals_counted_evaluations():
  count = []
  v = ode.velocity_fn(cf.make_apply_fn(paths.linear_path()), PARAMS)

  def counted(x, t):
    jax.debug.callback(lambda: count.append(1))
    return v(x, t)

  x = ode.noise(jax.random.key(0), 16, (2,))
  for solver, kwargs in [('dopri5', {}), ('tsit5', {'rtol': 1e-3, 'atol': 1e-3}),
                         ('euler', {'steps': 7}), ('heun', {'steps': 5}),
                         ('midpoint', {'steps': 3})]:
    count.clear()
    out, info = ode.solve(counted, x, solver=solver, **kwargs)
    jax.block_until_ready(out)
    assert len(count) == info['nfe'], solver


def test_explicit_grid_and_trajectory_and_reverse_direction(path):
  apply_fn = cf.make_apply_fn(path)
  v = ode.velocity_fn(apply_fn, PARAMS)
  x0 = ode.noise(jax.random.key(3), 32, (2,))
  grid = jnp.array([0.0, 0.1, 0.3, 0.6, 1.0])
  _, info = ode.solve(v, x0, solver='heun', grid=grid, return_trajectory=True)
  traj = info['trajectory']
  assert traj.shape == (5, 32, 2) and info['nfe'] == 8
  x1, _ = ode.solve(v, x0, solver='midpoint', steps=200)
  back, _ = ode.solve(v, x1, solver='midpoint', steps=200, t0=1.0, t1=0.0)
  np.testing.assert_allclose(back, x0, atol=1e-3)


def test_noise_depends_on_sample_index_only():
  key = jax.random.key(7)
  np.testing.assert_array_equal(ode.noise(key, 8, (3,))[:5], ode.noise(key, 5, (3,)))


@pytest.mark.parametrize('solver', ['dopri5', 'heun'])
def test_exact_likelihood_matches_closed_form(path, solver):
  apply_fn = cf.make_apply_fn(path)
  x = MEAN + STD * jax.random.normal(jax.random.key(4), (64, 2))
  logp, info = ode.log_likelihood(apply_fn, PARAMS, x, solver=solver, steps=400,
                                  rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(logp, cf.log_density(path, x, 1.0, MEAN, STD), atol=2e-3)
  assert info['nfe'] > 0


def _perturbed(params, seed: int, scale: float):
  """`params` plus N(0, scale^2) noise: a random network (the library's output layers start at
  zero, which would make every velocity and Jacobian trivially zero)."""
  return jax.tree.map(lambda p: p + scale * jax.random.normal(jax.random.key(seed), p.shape),
                      params)


def test_hutchinson_agrees_with_exact_divergence_within_its_error():
  """A random MLP has a dense Jacobian, so Rademacher probes have real variance."""
  apply_fn, params = to_apply_fn(MLP(4, hidden=32, depth=2, rngs=nnx.Rngs(1)))
  params = _perturbed(params, 5, 0.2)
  v = ode.velocity_fn(apply_fn, params)
  x = jax.random.normal(jax.random.key(6), (8, 4))
  exact = ode.exact_divergence(v, x, 0.4)
  probes = ode.divergence_probes(jax.random.key(8), 500, x)
  single = jax.vmap(lambda p: ode.hutchinson_divergence(v, x, 0.4, p[None])[1])(probes)
  vel, est = ode.hutchinson_divergence(v, x, 0.4, probes)
  stderr = single.std(0) / np.sqrt(probes.shape[0])
  assert np.all(np.abs(est - exact) < 4 * stderr + 1e-5), (est, exact, stderr)
  assert np.all(single.std(0) > 1e-3)  # the estimator is genuinely stochastic here
  np.testing.assert_allclose(vel, v(x, 0.4), atol=1e-6)
  logp_exact, _ = ode.log_likelihood(apply_fn, params, x, solver='heun', steps=10)
  logp_h, _ = ode.log_likelihood(apply_fn, params, x, jax.random.key(9), solver='heun',
                                 steps=10, divergence='hutchinson', num_probes=64)
  np.testing.assert_allclose(logp_h, logp_exact, atol=0.5)


def test_velocity_and_exact_divergence_share_one_jvp_and_equal_the_jacobian_trace():
  apply_fn, params = to_apply_fn(MLP(3, hidden=32, depth=2, rngs=nnx.Rngs(2)))
  params = _perturbed(params, 3, 0.2)
  v = ode.velocity_fn(apply_fn, params)
  x = jax.random.normal(jax.random.key(4), (5, 3))
  vel, div = ode.velocity_and_divergence(v, x, 0.3)
  jacobians = jax.vmap(jax.jacfwd(lambda xi: v(xi[None], 0.3)[0]))(x)  # [B, D, D]
  np.testing.assert_allclose(div, jnp.trace(jacobians, axis1=1, axis2=2), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(vel, v(x, 0.3), atol=1e-6)
  assert np.all(np.abs(div) > 1e-3)  # a dense Jacobian, not a trivially zero trace
  # One primal pass (2 time-MLP dots, the first layer's x and time parts, 2 more layers) and
  # one batched tangent dot per layer; a separate velocity call beside `jacfwd` lowers to 13.
  hlo = jax.jit(lambda x: ode.velocity_and_divergence(v, x, 0.3)).lower(x).as_text()
  assert hlo.count('dot_general') <= 6 + 3


@pytest.mark.parametrize('name', ['mlp', 'unet', 'dit'])
def test_a_scalar_time_gives_the_per_sample_output_and_solvers_pass_it(name):
  shape, num_classes = ((3,) if name == 'mlp' else (8, 8, 1)), 4
  if name == 'mlp':
    module = MLP(3, hidden=16, depth=2, num_classes=num_classes, rngs=nnx.Rngs(0))
  elif name == 'unet':
    module = UNet((8, 8, 1), channels=(8, 8), attention_levels=(), time_dim=16,
                  num_classes=num_classes, rngs=nnx.Rngs(0))
  else:
    module = DiT((8, 8, 1), hidden=16, depth=1, heads=2, num_classes=num_classes,
                 rngs=nnx.Rngs(0))
  apply_fn, params = to_apply_fn(module)
  params = _perturbed(params, 1, 0.1)
  x = jax.random.normal(jax.random.key(2), (4, *shape))
  cond = jnp.arange(4) % num_classes
  per_sample = apply_fn(params, x, jnp.full((4,), 0.3), cond=cond)
  np.testing.assert_allclose(apply_fn(params, x, 0.3, cond=cond), per_sample, atol=2e-6)
  assert apply_fn.scalar_time
  seen = []
  spy = lambda params, x, t, **kw: (seen.append(jnp.shape(t)), apply_fn(params, x, t, **kw))[1]
  spy.scalar_time = True
  np.testing.assert_allclose(ode.velocity_fn(spy, params, cond=cond)(x, 0.3), per_sample,
                             atol=2e-6)
  assert seen == [()]


def test_a_model_without_scalar_time_gets_one_time_per_sample():
  apply_fn = lambda params, x, t, **kw: x * t[:, None]  # needs t [B]
  x = jnp.ones((3, 2))
  np.testing.assert_allclose(ode.velocity_fn(apply_fn, None)(x, 0.5), 0.5 * x)


def test_classifier_free_guidance_combines_velocities():
  model = MLP(2, hidden=16, depth=1, num_classes=3, rngs=nnx.Rngs(2))
  apply_fn, params = to_apply_fn(model)
  params = jax.tree.map(lambda p: p + 0.2 * jax.random.normal(jax.random.key(3), p.shape),
                        params)
  x = jax.random.normal(jax.random.key(4), (5, 2))
  cond = jnp.array([0, 1, 2, 0, 1])
  v_c = ode.velocity_fn(apply_fn, params, cond=cond)(x, 0.3)
  v_u = ode.velocity_fn(apply_fn, params, cond=jnp.full(5, 3))(x, 0.3)
  for w in (0.0, 1.0, 2.5):
    v_w = ode.velocity_fn(apply_fn, params, cond=cond, cfg_scale=w, null_label=3)(x, 0.3)
    np.testing.assert_allclose(v_w, v_u + w * (v_c - v_u), atol=1e-5)
  _, info = ode.sample(apply_fn, params, jax.random.key(0), 5, (2,), cond=cond, cfg_scale=2.0,
                       null_label=3, solver='euler', steps=4)
  assert info['nfe'] == 4


def test_bits_per_dim_of_a_uniform_density_is_eight():
  dims = 784
  logp = jnp.full((3,), -dims * jnp.log(2.0))  # uniform on [-1, 1]^784
  np.testing.assert_allclose(ode.bits_per_dim(logp, dims), 8.0, rtol=1e-6)


def test_bad_inputs_name_the_argument():
  v = ode.velocity_fn(cf.make_apply_fn(paths.linear_path()), PARAMS)
  x = jnp.zeros((4, 2))
  with pytest.raises(errors.BadInput, match=r"Unknown solver 'rk45'.*'dopri5'"):
    ode.solve(v, x, solver='rk45')
  with pytest.raises(ValueError, match='needs `steps`'):
    ode.solve(v, x, solver='euler')
  with pytest.raises(ValueError, match='`grid` must lie in'):
    ode.solve(v, x, solver='euler', grid=jnp.array([0.0, 2.0]))
  with pytest.raises(ValueError, match='Unknown divergence'):
    ode.log_likelihood(cf.make_apply_fn(paths.linear_path()), PARAMS, x, divergence='trace')
  with pytest.raises(ValueError, match='`cond` has batch'):
    ode.velocity_fn(lambda p, x, t, cond=None: x, None, cond=jnp.zeros(3, int))(x, 0.5)
  with pytest.raises(ValueError, match='guidance needs'):
    ode.velocity_fn(lambda p, x, t, cond=None: x, None, cfg_scale=2.0)


@pytest.mark.parametrize('solver', ode.ADAPTIVE_SOLVERS)
def test_adaptive_solve_of_a_nan_model_reports_the_nan(solver):
  nan_model = lambda params, x, t, cond=None: x * params
  with pytest.raises(FloatingPointError, match='4 of 4 samples are NaN or infinite'):
    ode.sample(nan_model, jnp.nan, jax.random.key(0), 4, (2,), solver=solver,
               check_finite=True)
  x, _ = ode.sample(nan_model, 1.0, jax.random.key(0), 4, (2,), solver=solver,
                    check_finite=True)
  np.testing.assert_allclose(x, np.e * ode.noise(jax.random.key(0), 4, (2,)), rtol=1e-4)


def test_adaptive_solve_out_of_steps_still_says_so_with_check_finite():
  stiff = lambda params, x, t, cond=None: -1e4 * x
  with pytest.raises(RuntimeError, match='maximum number of solver steps'):
    ode.sample(stiff, None, jax.random.key(0), 4, (2,), solver='dopri5', max_steps=16,
               check_finite=True)


def test_sample_refuses_an_unknown_solver_before_any_work():
  def model(params, x, t, cond=None):
    raise AssertionError('the model ran')

  with pytest.raises(errors.BadInput, match="Unknown solver 'dopri'"):
    ode.sample(model, None, jax.random.key(0), 4, (2,), solver='dopri')


def test_sampler_builder_refuses_an_unknown_solver_before_any_call():
  with pytest.raises(errors.BadInput, match=r"Unknown solver 'eulr'; choose one of"):
    report.make_sampler(lambda params, x, t, cond: x, solver='eulr', steps=4)
