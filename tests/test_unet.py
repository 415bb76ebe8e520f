"""UNet: shapes, zero start, (s, t) and label conditioning, compute dtype, jit behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flowdistill.models import UNet, to_apply_fn

SMALL = dict(channels=(8, 16, 16), time_dim=32, norm_groups=4, num_heads=2)


def _unet(image_shape=(28, 28, 1), **kwargs):
  return UNet(image_shape, rngs=nnx.Rngs(0), **SMALL, **kwargs)


def _jitted(model):
  apply_fn, params = to_apply_fn(model)
  return jax.jit(apply_fn), params


def _perturbed(params, seed=1):
  """Adds noise to every parameter, so the zero-initialised output layer no longer hides inputs."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: (p + 0.1 * rng.standard_normal(p.shape)).astype(p.dtype), params)


def _inputs(image_shape=(28, 28, 1), batch=2, seed=0):
  kx, kt = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(kx, (batch, *image_shape)), jax.random.uniform(kt, (batch,)))


@pytest.fixture(scope='module')
def plain():
  """One-time, unconditional, float32: (jitted apply_fn, initial params)."""
  return _jitted(_unet())


@pytest.fixture(scope='module')
def flow_map():
  """Two-time, class-conditional: (jitted apply_fn, perturbed params)."""
  apply_fn, params = _jitted(_unet(two_time=True, num_classes=10))
  return apply_fn, _perturbed(params)


@pytest.mark.parametrize('image_shape', [(28, 28, 1), (32, 32, 3)])
def test_output_shape_dtype_and_zero_start(image_shape, plain):
  apply_fn, params = plain if image_shape == (28, 28, 1) else _jitted(_unet(image_shape))
  x, t = _inputs(image_shape)
  out = apply_fn(params, x, t)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert np.all(np.asarray(out) == 0.0)


def test_one_sgd_step_moves_output_off_zero(plain):
  apply_fn, params = plain
  x, t = _inputs()
  target = jax.random.normal(jax.random.key(3), x.shape)
  grads = jax.grad(lambda p: jnp.mean((apply_fn(p, x, t) - target) ** 2))(params)
  params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
  out = apply_fn(params, x, t)
  assert np.all(np.isfinite(out)) and np.abs(out).max() > 0.0


def test_depends_on_x_and_t_and_accepts_scalar_t(plain):
  apply_fn, params = plain
  params = _perturbed(params)
  x, t = _inputs()
  out = apply_fn(params, x, t)
  assert np.abs(out - apply_fn(params, x + 0.5, t)).max() > 1e-3
  assert np.abs(out - apply_fn(params, x, 1.0 - t)).max() > 1e-3
  np.testing.assert_allclose(apply_fn(params, x, 0.25), apply_fn(params, x, jnp.full(2, 0.25)))


def test_one_time_model_rejects_s(plain):
  apply_fn, params = plain
  x, t = _inputs()
  with pytest.raises(ValueError, match='two_time=True'):
    apply_fn(params, x, t, s=t)


def test_two_time_model_needs_s_and_depends_on_it(flow_map):
  apply_fn, params = flow_map
  x, t = _inputs()
  cond = jnp.array([1, 2])
  with pytest.raises(ValueError, match='pass `s`'):
    apply_fn(params, x, t, cond=cond)
  out = apply_fn(params, x, t, s=jnp.zeros(2), cond=cond)
  assert out.shape == x.shape
  assert np.abs(out - apply_fn(params, x, t, s=t, cond=cond)).max() > 1e-3


def test_conditional_model_uses_labels_and_needs_them(flow_map):
  apply_fn, params = flow_map
  x, t = _inputs()
  s = jnp.zeros(2)
  with pytest.raises(ValueError, match='pass `cond`'):
    apply_fn(params, x, t, s=s)
  out = apply_fn(params, x, t, s=s, cond=jnp.array([3, 3]))
  assert np.abs(out - apply_fn(params, x, t, s=s, cond=jnp.array([7, 7]))).max() > 1e-3
  assert np.abs(out - apply_fn(params, x, t, s=s, cond=jnp.array([10, 10]))).max() > 1e-3


def test_bfloat16_compute_matches_float32(plain):
  apply32, params = plain
  apply16, params16 = _jitted(_unet(dtype=jnp.bfloat16))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params16))
  params = _perturbed(params)
  x, t = _inputs()
  ref = apply32(params, x, t)
  out = apply16(params, x, t)
  assert out.dtype == jnp.float32 and out.shape == x.shape
  assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def test_apply_fn_traces_once_per_shape():
  apply_fn, params = to_apply_fn(_unet(two_time=True, num_classes=10))
  traces = []

  def f(params, x, t, s, cond):
    traces.append(None)
    return apply_fn(params, x, t, s=s, cond=cond)

  f = jax.jit(f)
  x, t = _inputs()
  cond = jnp.array([1, 10])
  first = f(params, x, t, jnp.zeros(2), cond)
  second = f(_perturbed(params), x + 1.0, t / 2, t / 4, cond[::-1])
  assert len(traces) == 1
  assert first.shape == second.shape == x.shape


def test_bad_image_shapes_raise(plain):
  with pytest.raises(ValueError, match='divisible by 4'):
    _unet((30, 30, 1))
  with pytest.raises(ValueError, match='divisible by 8'):
    UNet((28, 28, 1), channels=(8, 8, 8, 8), norm_groups=4, rngs=nnx.Rngs(0))
  apply_fn, params = plain
  x, t = _inputs((32, 32, 1))
  with pytest.raises(ValueError, match=r'\(28, 28, 1\)'):
    apply_fn(params, x, t)
