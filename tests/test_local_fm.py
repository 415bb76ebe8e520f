"""Local flow matching: OU coupling and block time convention, one free block = global flow
matching, composed likelihood and sampling of exact affine chains on Gaussians, and the
experiment's block-wise resume."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats
from flax import nnx

from flowdistill import cache, fm, ode, paths
from flowdistill import closed_form as cf
from flowdistill.data import sources, tabular
from flowdistill.experiments import load_config_file, local_fm_run, method_config, validate
from flowdistill.fewstep import local_fm
from flowdistill.models.apply import to_apply_fn
from flowdistill.models.mlp import MLP

CONFIGS = os.path.join(os.path.dirname(__file__), '..', 'configs')
MEAN, STD = jnp.array([2.0, -1.0]), jnp.array([0.5, 1.5])


@pytest.fixture(scope='module', params=[paths.linear_path(), paths.trig_path()],
                ids=lambda p: p.name)
def path(request):
  return request.param


def test_step_sizes_are_geometric_with_a_free_last_block():
  np.testing.assert_allclose(local_fm.step_sizes(4, 0.1, 1.5)[:3], [0.1, 0.15, 0.225])
  assert local_fm.step_sizes(4, 0.1, 1.5)[3] is None and local_fm.step_sizes(1, 0.1, 1.5) == (None,)
  with pytest.raises(ValueError, match='num_blocks'):
    local_fm.step_sizes(0, 0.1, 1.5)


def test_ou_transition_is_exact():
  """`e^{-h} x + sqrt(1 - e^{-2h}) z`: N(0, I) is stationary and two steps compose to one."""
  h1, h2 = 0.3, 0.7
  x = jax.random.normal(jax.random.key(0), (5, 3))
  z = jax.random.normal(jax.random.key(1), (5, 3))
  np.testing.assert_allclose(local_fm.noise_endpoint(x, jnp.zeros_like(z), h1), math.exp(-h1) * x,
                             rtol=1e-6)
  np.testing.assert_allclose(local_fm.noise_endpoint(jnp.zeros_like(x), z, h1),
                             math.sqrt(1 - math.exp(-2 * h1)) * z, rtol=1e-6)
  b = lambda h: math.sqrt(1 - math.exp(-2 * h))
  assert math.exp(-2 * h1) + b(h1)**2 == pytest.approx(1.0)  # stationary variance
  # Noise variance of two steps equals that of one step of h1 + h2.
  assert (math.exp(-h2) * b(h1))**2 + b(h2)**2 == pytest.approx(b(h1 + h2)**2)
  np.testing.assert_array_equal(local_fm.noise_endpoint(x, z, None), z)  # the free block


@pytest.mark.parametrize('h', [0.2, None], ids=['dependent', 'free'])
def test_block_time_convention_is_exact_at_the_endpoints(path, h):
  """The block path is data side x_l at t = 1 and the OU endpoint x_r at t = 0, and equals the
  base interpolant between (x_r, x_l) at every t, with the same velocity target."""
  x_l = jax.random.normal(jax.random.key(0), (16, 2)) * STD + MEAN
  z = jax.random.normal(jax.random.key(1), (16, 2))
  x_r = local_fm.noise_endpoint(x_l, z, h)
  block = local_fm.block_path(path, h)
  np.testing.assert_allclose(block.sample(z, x_l, jnp.ones(16))[0], x_l, atol=1e-6)
  np.testing.assert_allclose(block.sample(z, x_l, jnp.zeros(16))[0], x_r, atol=1e-6)
  if h is not None:
    np.testing.assert_allclose(x_r, paths.ou_path(h).sample(z, x_l, jnp.zeros(16))[0],
                               atol=1e-6)
  t = jnp.linspace(0.0, 1.0, 16)
  for got, want in zip(block.sample(z, x_l, t), path.sample(x_r, x_l, t)):
    np.testing.assert_allclose(got, want, atol=1e-5)


def _mlp():
  return to_apply_fn(MLP(2, hidden=32, depth=2, rngs=nnx.Rngs(0)))


def test_block_loss_is_flow_matching_on_the_ou_pairs():
  """`block_loss` on {'x': x_l} equals `fm.make_loss` on {'x': x_l, 'x0': x_r} with the same z."""
  apply_fn, params = _mlp()
  path, h, key = paths.linear_path(), 0.15, jax.random.key(3)
  x_l = jax.random.normal(jax.random.key(0), (64, 2))
  z = jax.random.normal(jax.random.split(key, 5)[0], x_l.shape)  # the loss's own noise draw
  got, _ = local_fm.block_loss(apply_fn, path, h)(params, {'x': x_l}, key)
  batch = {'x': x_l, 'x0': local_fm.noise_endpoint(x_l, z, h)}
  want, _ = fm.make_loss(apply_fn, path)(params, batch, key)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  with pytest.raises(ValueError, match='free last block only'):
    local_fm.block_loss(apply_fn, path, h, coupling='exact')


def test_one_free_block_chain_is_global_flow_matching():
  apply_fn, params = _mlp()
  path, key = paths.linear_path(), jax.random.key(4)
  batch = {'x': jax.random.normal(jax.random.key(0), (64, 2))}
  np.testing.assert_array_equal(local_fm.block_loss(apply_fn, path, None)(params, batch, key)[0],
                                fm.make_loss(apply_fn, path)(params, batch, key)[0])
  chain = local_fm.stack_blocks([params])
  x0 = ode.noise(jax.random.key(5), 128, (2,))
  for kwargs in ({'solver': 'euler', 'steps': 8}, {'solver': 'dopri5'}):
    got, info = local_fm.sample_chain(apply_fn, chain, x0, **kwargs)
    want, want_info = ode.solve(ode.velocity_fn(apply_fn, params), x0, **kwargs)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert int(info['nfe']) == int(want_info['nfe'])
  logp, _ = local_fm.chain_log_likelihood(apply_fn, chain, x0)
  np.testing.assert_allclose(logp, ode.log_likelihood(apply_fn, params, x0)[0], atol=1e-4)


def _affine_chain(path, h_list):
  """Exact blocks for data N(MEAN, STD^2): params {'mean', 'std', 'a', 'b'} per block, the
  block path built from (a, b) = (e^{-h}, sqrt(1 - e^{-2h})), the free block (0, 1)."""

  def block(params):
    return paths.AffinePath('block', lambda t: params['b'] * path.alpha(t),
                            lambda t: path.beta(t) + params['a'] * path.alpha(t))

  def apply_fn(params, x, t, *, s=None, cond=None, train=False):
    del cond, train
    return cf.make_apply_fn(block(params))(params, x, t, s=s)

  blocks, mean, var = [], MEAN, STD**2
  for h in h_list:
    a, b = (0.0, 1.0) if h is None else (math.exp(-h), math.sqrt(-math.expm1(-2 * h)))
    blocks.append({'mean': mean, 'std': jnp.sqrt(var), 'a': jnp.float32(a),
                   'b': jnp.float32(b)})
    mean, var = a * mean, a * a * var + b * b
  return apply_fn, local_fm.stack_blocks(blocks)


def test_affine_chain_likelihood_and_samples_equal_the_closed_form(path):
  """Exact affine blocks on Gaussian data: the composed likelihood is log N(x; m, s^2) (exact
  trace and Rademacher Hutchinson, exact for diagonal Jacobians), the chain sampler maps
  z to m + s z, the push-forward of block 0 is the OU marginal's monotone map, and one flow-map
  jump per block samples exactly."""
  h_list = local_fm.step_sizes(3, 0.2, 1.5)
  apply_fn, chain = _affine_chain(path, h_list)
  x = jax.random.normal(jax.random.key(0), (256, 2)) * STD + MEAN
  exact = cf.log_density(paths.linear_path(), x, 1.0, MEAN, STD)
  tight = {'rtol': 1e-6, 'atol': 1e-6}
  logp, info = local_fm.chain_log_likelihood(apply_fn, chain, x, **tight)
  np.testing.assert_allclose(logp, exact, atol=2e-4)
  assert info['deltas'].shape == (3, 256)
  logp_h, _ = local_fm.chain_log_likelihood(apply_fn, chain, x, jax.random.key(1),
                                       divergence='hutchinson', **tight)
  np.testing.assert_allclose(logp_h, exact, atol=2e-4)

  z = ode.noise(jax.random.key(2), 256, (2,))
  samples, info = local_fm.sample_chain(apply_fn, chain, z, solver='dopri5', **tight)
  np.testing.assert_allclose(samples, MEAN + STD * z, atol=2e-4)
  assert int(info['nfe']) > 3 * 6

  first = jax.tree.map(lambda p: p[0], chain)
  pushed, _ = local_fm.push_forward(apply_fn, first, x, **tight)
  h = h_list[0]
  ou_mean = math.exp(-h) * MEAN
  ou_std = jnp.sqrt(math.exp(-2 * h) * STD**2 + 1 - math.exp(-2 * h))
  np.testing.assert_allclose(pushed, ou_mean + ou_std * (x - MEAN) / STD, atol=2e-4)

  jumped, info = local_fm.jump_chain(apply_fn, chain, z, jumps=1)
  np.testing.assert_allclose(jumped, MEAN + STD * z, atol=1e-4)
  assert info['nfe'] == 3


def test_distillation_loss_vanishes_for_the_exact_block_flow_map(path):
  h_list = local_fm.step_sizes(2, 0.3, 1.0)
  apply_fn, chain = _affine_chain(path, h_list)
  eps = jax.random.normal(jax.random.key(0), (128, 2))
  for n, h in enumerate(h_list):
    params = jax.tree.map(lambda p, n=n: p[n], chain)
    batch = {'x': params['mean'] + params['std'] * eps}  # block n's data side
    for loss_name in ('lmd', 'emd'):
      loss, _ = local_fm.distill_loss(apply_fn, apply_fn, path, h, loss=loss_name)(
          params, batch, jax.random.key(n), params)
      assert float(loss) < 1e-6, (n, loss_name, loss)
  first = jax.tree.map(lambda p: p[0], chain)
  loss, _ = local_fm.distill_loss(apply_fn, apply_fn, path, h_list[0])(
      dict(first, mean=MEAN + 0.5), {'x': MEAN + STD * eps}, jax.random.key(0), first)
  assert float(loss) > 1e-3


def test_tabular_mixture_density_and_samples_match_the_mixture():
  """log p against scipy's Gaussian densities; sample mean and covariance against the
  mixture's (20 000 points)."""
  log_w, means, chol, _ = (np.asarray(a, np.float64) for a in tabular._parameters('mixture16'))
  covs = chol @ np.transpose(chol, (0, 2, 1))
  x = np.asarray(tabular.sample('mixture16', jax.random.key(0), 20_000))
  comps = np.stack([scipy.stats.multivariate_normal(m, c).logpdf(x[:500])
                    for m, c in zip(means, covs)], -1)
  np.testing.assert_allclose(tabular.log_density('mixture16', x[:500]),
                             scipy.special.logsumexp(comps + log_w, -1), rtol=1e-4, atol=1e-3)
  w = np.exp(log_w)
  mean = w @ means
  cov = np.einsum('k,kij->ij', w, covs + means[:, :, None] * means[:, None, :]) - np.outer(
      mean, mean)
  np.testing.assert_allclose(x.mean(0), mean, atol=0.06)
  np.testing.assert_allclose(np.cov(x.T), cov, atol=0.15)


def test_config_files_validate_and_bad_keys_are_named():
  for arg in ('checkerboard', 'tabular,distill', 'mnist', 'digits'):
    validate(load_config_file(os.path.join(CONFIGS, 'local_fm.py'), arg), num_devices=8)
  config = method_config()
  config.data.source = 'tabular'
  with pytest.raises(ValueError, match=r"config.method='fm' does not take config.data.source="
                     r"'tabular'.*methods that do: \['local_fm'\]"):
    validate(config)
  config = load_config_file(os.path.join(CONFIGS, 'local_fm.py'))
  config.local_fm.h0 = 0.0
  with pytest.raises(ValueError, match='config.local_fm.h0'):
    validate(config)
  config = load_config_file(os.path.join(CONFIGS, 'local_fm.py'))
  config.local_fm.train_size = 10
  with pytest.raises(ValueError, match='config.local_fm.train_size'):
    validate(config)


def _tiny_config(**local_fm):
  config = load_config_file(os.path.join(CONFIGS, 'local_fm.py'), '8gaussians')
  config.data.batch_size = 64
  config.model.update(hidden=16, depth=2, time_dim=16)
  config.local_fm.update(num_blocks=2, train_size=300, pushforward_chunk=128,
                         pushforward_solver='heun', pushforward_steps=4, **local_fm)
  config.train.update(steps=8, ckpt_every=4, log_every=4, num_devices=1)
  config.optim.warmup_steps = 2
  config.eval.update(num_samples=64, nll_samples=32, euler_steps=(1,), map_steps=(1,),
                     plot=False)
  validate(config)
  return config


def test_chain_resumes_block_wise_and_push_forward_chunk_wise(tmp_path, monkeypatch):
  """A finished chain reruns without training; a push-forward with missing chunks finishes
  them and gives the same points; a different schedule in the same workdir is refused."""
  config = _tiny_config(distill_steps=4)
  workdir = str(tmp_path / 'run')
  first = local_fm_run.run(config, workdir)
  labels = [r['sampler'] for r in first['rows']]
  assert 'chain euler-1/block' in labels and 'distilled 1-jump/block' in labels
  assert next(r['nfe'] for r in first['rows'] if r['sampler'] == 'chain euler-1/block') == 2
  assert np.isfinite(first['nll']) and first['nll_target'] is not None
  block0 = os.path.join(workdir, 'block_0')
  pushed = np.load(os.path.join(block0, 'pushforward.npy'))
  assert pushed.shape == (300, 2)
  assert not os.path.exists(os.path.join(workdir, 'block_1', 'pushforward.npy'))  # last block
  with open(os.path.join(block0, 'pushforward.json')) as f:
    assert json.load(f)['evaluations'] == 300 * 2 * 4  # Heun: 2 per step, 4 steps

  # The push-forward is the block's ODE from its data side: recompute chunk-wise after
  # removing the cache and leaving one chunk as if interrupted.
  chain = local_fm_run.Chain(config, sources.load(config.data), workdir)
  params = chain.train_block(0, chain.init_params)  # restores; no training
  push = lambda rows: (local_fm.push_forward(chain.apply_fn, params, rows, solver='heun',
                                        steps=4)[0], 8)
  os.remove(os.path.join(block0, 'pushforward.npy'))
  parts = os.path.join(block0, 'pushforward_parts_c128')
  os.makedirs(parts)
  rows = chain.data(0)[:128]
  np.savez(os.path.join(parts, '000000.npz'), x=np.asarray(push(rows)[0]), nfe=8)
  cache.write_file_manifest(os.path.join(parts, '000000.npz'))
  np.savez(os.path.join(parts, '000001.npz'), x=np.zeros((128, 2)), nfe=8)  # no manifest: cut
  calls = []
  again = local_fm_run.cached_push_forward(block0, lambda r: calls.append(1) or push(r),
                                         chain.data(0), 128)
  assert len(calls) == 2  # chunks 1 (cut short) and 2 only
  np.testing.assert_allclose(again, pushed, atol=1e-5)

  # Rerunning restores every block without training and reuses the cached push-forward.
  mtime = os.path.getmtime(os.path.join(block0, 'pushforward.npy'))
  seen = {}
  monkeypatch.setattr(local_fm_run, 'chain_section',
                      lambda chain, blocks: seen.update(blocks=blocks))
  monkeypatch.setattr(local_fm_run.common, 'write_report', lambda *args, **kwargs: {})
  local_fm_run.run(config, workdir)
  assert os.path.getmtime(os.path.join(block0, 'pushforward.npy')) == mtime
  steps = [d for d in os.listdir(os.path.join(block0, 'checkpoints')) if d.isdigit()]
  assert sorted(steps, key=int) == ['4', '8']
  for got, want in zip(jax.tree.leaves(seen['blocks'][0]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(got, want)

  config.local_fm.h0 = 0.2
  with pytest.raises(ValueError, match='config.local_fm.h0'):
    local_fm_run.run(config, workdir)


@pytest.mark.slow
def test_image_chain_on_builtin_digits(tmp_path, monkeypatch):
  """The image path: a 2-block U-Net chain, its cached push-forward of the training images
  equals the block's ODE solve, Fréchet distance per sampler, Hutchinson bits/dim."""
  monkeypatch.setenv('FLOWDISTILL_CACHE', str(tmp_path / 'cache'))
  config = load_config_file(os.path.join(CONFIGS, 'local_fm.py'), 'digits')
  config.data.batch_size = 32
  config.model.update(channels=(8, 8), time_dim=16)
  config.local_fm.update(num_blocks=2, pushforward_solver='heun', pushforward_steps=2,
                         pushforward_chunk=2048)
  config.train.update(steps=2, ckpt_every=2, log_every=2, num_devices=1)
  config.eval.update(num_samples=40, euler_steps=(2,), nll_samples=4, rtol=1e-2, atol=1e-2,
                     classifier_steps=30)
  validate(config)
  workdir = str(tmp_path / 'digits')
  result = local_fm_run.run(config, workdir)
  assert [r['sampler'] for r in result['rows']] == ['chain euler-2/block', 'chain dopri5']
  assert result['rows'][0]['nfe'] == 4 and all(r['fd'] >= 0 for r in result['rows'])
  assert result['bpd'] > 0
  assert os.path.exists(os.path.join(workdir, 'samples_chain_euler-2_per_block.png'))
  chain = local_fm_run.Chain(config, sources.load(config.data), workdir)
  params = chain.train_block(0, chain.init_params)
  pushed = np.load(os.path.join(workdir, 'block_0', 'pushforward.npy'))
  rows = chain.data(0)[:256]
  want, _ = local_fm.push_forward(chain.apply_fn, params, jnp.asarray(rows), solver='heun', steps=2)
  np.testing.assert_allclose(pushed[:256], want, atol=1e-4)
