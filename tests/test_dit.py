"""The DiT: contract, patch layout, conditioning, bfloat16, and training through the CLI with
flow-map distillation on top."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flowdistill.experiments import flow_map_run, load_config_file, method_config, validate
from flowdistill.models.apply import to_apply_fn
from flowdistill.models.dit import DiT, sincos_2d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dit(depth=2, **kw):
  return to_apply_fn(DiT((8, 8, 3), patch_size=2, hidden=32, depth=depth, heads=4,
                         rngs=nnx.Rngs(0), **kw))


def _perturbed(params, scale=0.2):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return tree.unflatten([p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def _x(b=2):
  return jax.random.normal(jax.random.key(0), (b, 8, 8, 3))


def test_fresh_dit_outputs_zero_in_float32_and_checks_its_input_shape():
  apply_fn, params = _dit()
  out = apply_fn(params, _x(), jnp.array([0.1, 0.9]))
  assert out.shape == (2, 8, 8, 3) and out.dtype == jnp.float32
  assert not np.any(np.asarray(out))
  with pytest.raises(ValueError, match=r'built for inputs of shape \(8, 8, 3\)'):
    apply_fn(params, jnp.zeros((2, 8, 8, 1)), 0.5)
  with pytest.raises(ValueError, match='patch_size=3 needs H and W divisible'):
    DiT((8, 8, 3), patch_size=3, hidden=32, depth=1, heads=4, rngs=nnx.Rngs(0))


def test_patches_map_back_to_where_they_came_from():
  """Without blocks, each token's output depends on its own patch only: a pixel change moves
  the output inside its 2x2 patch and nowhere else (patchify and unpatchify agree)."""
  apply_fn, params = _dit(depth=0)
  params = _perturbed(params)
  x = _x(1)
  base = apply_fn(params, x, 0.5)
  changed = apply_fn(params, x.at[0, 5, 2, 1].add(1.0), 0.5)
  moved = np.abs(np.asarray(changed - base)[0]).sum(-1) > 1e-6
  expected = np.zeros((8, 8), bool)
  expected[4:6, 2:4] = True
  np.testing.assert_array_equal(moved, expected)


def test_position_embedding_tells_every_token_apart():
  pos = sincos_2d(4, 6, 32)
  assert pos.shape == (24, 32)
  distances = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
  assert distances[~np.eye(24, dtype=bool)].min() > 0.1


def test_two_time_and_class_conditioning_change_the_output():
  apply_fn, params = _dit(two_time=True, num_classes=10)
  params = _perturbed(params)
  x, t = _x(), jnp.full(2, 0.8)
  with pytest.raises(ValueError, match='pass `s`'):
    apply_fn(params, x, t, cond=jnp.array([1, 1]))
  out = lambda s, label: apply_fn(params, x, t, s=jnp.full(2, s), cond=jnp.full(2, label))
  assert np.abs(out(0.2, 1) - out(0.5, 1)).max() > 1e-3
  assert np.abs(out(0.2, 1) - out(0.2, 10)).max() > 1e-3


def test_bfloat16_dit_matches_float32_to_bfloat16_precision():
  apply32, params = _dit()
  apply16, params16 = _dit(dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params16))
  params = _perturbed(params)
  ref, out = apply32(params, _x(), 0.3), apply16(params, _x(), 0.3)
  assert out.dtype == jnp.float32
  assert 1e-5 < np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def test_tiny_dit_trains_on_digits_through_the_cli_and_distils_into_a_flow_map(tmp_path):
  env = dict(os.environ, FLOWDISTILL_CACHE=str(tmp_path / 'cache'))
  teacher = tmp_path / 'teacher'
  tiny = ['--config.train.steps=20', '--config.train.ckpt_every=20', '--config.train.log_every=10',
          '--config.data.batch_size=32', '--config.eval.num_samples=40',
          '--config.eval.euler_steps=(2,)', '--config.eval.nll_samples=4',
          '--config.eval.rtol=1e-2', '--config.eval.atol=1e-2',
          '--config.eval.classifier_steps=30', '--config.eval.plot=False']
  result = subprocess.run(
      [sys.executable, '-m', 'flowdistill.main', '--config=configs/digits.py:dit',
       f'--workdir={teacher}', *tiny], cwd=ROOT, capture_output=True, text=True, timeout=900,
      env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads((teacher / 'results.json').read_text())['rows']
  assert [r['sampler'] for r in rows] == ['euler-2', 'dopri5']
  assert all(np.isfinite(r['fd']) for r in rows)

  student = load_config_file(os.path.join(ROOT, 'configs', 'digits.py'), 'dit')
  student.method = 'flow_map'
  student.flow_map.loss = 'lmd'
  student.teacher.workdir = str(teacher)
  student.data.batch_size = 32
  student.train.update(steps=10, ckpt_every=10, log_every=5)
  student.eval.update(num_samples=40, map_steps=(1, 2), nll_samples=4, nll_probes=1,
                      rtol=1e-2, atol=1e-2, classifier_steps=30, plot=False)
  validate(student)
  os.environ['FLOWDISTILL_CACHE'] = env['FLOWDISTILL_CACHE']
  try:
    distilled = flow_map_run.run(student, str(tmp_path / 'student'))
  finally:
    del os.environ['FLOWDISTILL_CACHE']
  samplers = [r['sampler'] for r in distilled['rows']]
  assert {'student 1-jump', 'student 2-jump'} <= set(samplers)
  assert all(np.isfinite(v['nll']) for v in distilled['nll_jumps'].values())
  config = method_config()
  config.update(method='fm')
  config.data.update(source='digits')
  config.model.update(name='dit', dit='huge')
  with pytest.raises(ValueError, match=r"config.model.dit='huge' is not one of"):
    validate(config)
