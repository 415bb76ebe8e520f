"""bfloat16 compute: float32 parameters, optimizer state, loss and ODE state; float32 sampling
by default."""

import jax
import jax.numpy as jnp
import numpy as np

from flowdistill import ode
from flowdistill.data import sources
from flowdistill.experiments import common, method_config
from flowdistill.models.factory import build_model
from flowdistill.train import configured
from flowdistill.train.step import make_train_step


def _config(dtype):
  config = method_config()
  config.data.name = 'moons'
  config.data.batch_size = 64
  config.model.update(hidden=64, depth=2, time_dim=16, dtype=dtype)
  return config


def _perturbed(params):
  """Params with the zero-initialised output layer made nonzero, so outputs differ from 0."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return tree.unflatten([p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def test_bfloat16_mlp_computes_in_bfloat16_and_returns_float32():
  apply32, params = build_model(_config('float32').model, (2,), num_classes=3, two_time=True)
  apply16, params16 = build_model(_config('bfloat16').model, (2,), num_classes=3, two_time=True)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params16))
  params = _perturbed(params)
  x = jax.random.normal(jax.random.key(0), (32, 2))
  t, s, cond = jnp.full(32, 0.7), jnp.full(32, 0.2), jnp.arange(32) % 3
  ref = apply32(params, x, t, s=s, cond=cond)
  out = apply16(params, x, t, s=s, cond=cond)
  assert out.dtype == jnp.float32
  error = np.abs(out - ref).max()
  # bfloat16 keeps 8 significant bits: an error of ~2^-8 relative, not float32's ~1e-7.
  assert 1e-5 < error < 0.03 * np.abs(ref).max(), error
  hlo = jax.jit(lambda p: apply16(p, x, t, s=s, cond=cond)).lower(params).as_text()
  assert 'bf16' in hlo


def test_bfloat16_training_keeps_float32_state_and_sampling_defaults_to_float32():
  config = _config('bfloat16')
  dataset = sources.load(config.data)
  apply_fn, loss_fn, optimizer, state = configured.fm_setup(config, dataset)
  step = jax.jit(make_train_step(loss_fn, optimizer))
  batch = next(configured.fm_batches(config, dataset)(0))
  state, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
  for leaf in jax.tree.leaves((state.params, state.opt_state, state.ema, metrics['loss'])):
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
  sampling = common.eval_apply_fn(config, dataset, apply_fn)
  x0 = jax.random.normal(jax.random.key(2), (16, 2))
  hlo = jax.jit(lambda p: ode.solve(ode.velocity_fn(sampling, p), x0, solver='euler',
                                    steps=4)[0]).lower(state.params).as_text()
  assert 'bf16' not in hlo
  config.eval.dtype = 'bfloat16'
  assert common.eval_apply_fn(config, dataset, apply_fn) is apply_fn  # nothing rebuilt
  assert 'bf16' in jax.jit(lambda p: common.eval_apply_fn(config, dataset, apply_fn)(
      p, x0, jnp.zeros(16))).lower(state.params).as_text()
  assert apply_fn is not sampling
