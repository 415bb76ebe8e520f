"""SFM, LGM, the SimCLR backbone, the linear-probe evaluator and the image parameterisation,
against closed forms: the zero-head cross-entropy gradient, the denominators, NT-Xent at equal
embeddings, the least-squares projector, Adam restarts at pyramid growth."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from flowdistill import experiments
from flowdistill.condense import image_param, linear_probe, sfm, ssl
from flowdistill.experiments import load_config_file, sfm_run, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C, M, D = 4, 6, 5


def _features(key=0, n=C * M):
  """Balanced labelled features: [C·M, D], labels repeat(arange(C), M)."""
  x = jax.random.normal(jax.random.key(key), (n, D)) + jnp.repeat(jnp.eye(C, D) * 3, n // C, 0)
  return x, jnp.repeat(jnp.arange(C), n // C)


def _identity(images, key):
  del key
  return images


def _linear_backbone(params, x):
  return x.reshape(x.shape[0], -1) @ params


def test_zero_head_gradient_is_the_statistical_flow():
  x, y = _features()
  real = sfm.real_statistics(x, y, C)
  g = sfm.head_gradient(x, y, jnp.zeros((D, C)), jnp.zeros((C,)))
  np.testing.assert_allclose(g[:D * C].reshape(D, C), (C - 1) / C**2 * real['flow'].T,
                             atol=1e-6)
  np.testing.assert_allclose(g[D * C:], 0.0, atol=1e-7)


@pytest.mark.parametrize('ipc', [1, 3])
def test_lgm_at_zero_head_on_the_full_real_set_is_the_sfm_loss(ipc):
  x, y = _features()
  real = sfm.real_statistics(x, y, C)
  syn, syn_y = _features(key=1, n=C * ipc)
  zero_w, zero_b = jnp.zeros((D, C)), jnp.zeros((C,))
  lgm = sfm.cosine_distance(sfm.head_gradient(x, y, zero_w, zero_b),
                            sfm.head_gradient(syn, syn_y, zero_w, zero_b))
  loss, _ = sfm.make_sfm_loss(_linear_backbone, real, C, ipc, augment=_identity)(
      syn, jax.random.key(0), jnp.eye(D))
  np.testing.assert_allclose(loss, lgm, rtol=1e-5, atol=1e-6)
  if ipc == 1:
    reference, _ = sfm.make_sfm_loss(_linear_backbone, real, C, ipc, augment=_identity,
                                     denominator='reference')(syn, jax.random.key(0), jnp.eye(D))
    np.testing.assert_allclose(reference, lgm, rtol=1e-5, atol=1e-6)


def test_reference_denominator_scales_the_other_class_mean():
  syn, syn_y = _features(n=C * 3)
  classes = sfm.synthetic_statistics(syn, syn_y, C, 3, 'classes')
  reference = sfm.synthetic_statistics(syn, syn_y, C, 3, 'reference')
  np.testing.assert_allclose(reference['nu'], classes['nu'] * (C - 1) / (C * 3 - 1), rtol=1e-6)
  one, one_y = _features(n=C)
  np.testing.assert_array_equal(sfm.synthetic_statistics(one, one_y, C, 1, 'reference')['nu'],
                                sfm.synthetic_statistics(one, one_y, C, 1, 'classes')['nu'])


def test_sfm_is_zero_at_the_real_means_and_invariant_to_feature_scale():
  x, y = _features()
  real = sfm.real_statistics(x, y, C)
  offsets = jnp.array([[1.0], [-1.0]]) * jnp.ones((1, D))
  syn = (real['mu'][:, None, :] + offsets[None]).reshape(C * 2, D)
  loss_fn = sfm.make_sfm_loss(_linear_backbone, real, C, 2, augment=_identity)
  assert float(loss_fn(syn, jax.random.key(0), jnp.eye(D))[0]) == pytest.approx(0.0, abs=1e-6)
  other, _ = _features(key=2, n=C * 2)
  base = loss_fn(other, jax.random.key(0), jnp.eye(D))[0]
  scaled = sfm.make_sfm_loss(_linear_backbone, sfm.real_statistics(3 * x, y, C), C, 2,
                             augment=_identity)(other, jax.random.key(0), 3 * jnp.eye(D))[0]
  np.testing.assert_allclose(scaled, base, rtol=1e-5)
  assert float(base) > 0.01


def test_decoupled_loss_is_zero_at_the_real_statistics_only():
  x, y = _features()
  real = sfm.real_statistics(x, y, C)
  loss_fn = sfm.make_sfm_decouple_loss(_linear_backbone, real, C, 1, augment=_identity)
  assert float(loss_fn(real['mu'], jax.random.key(0), jnp.eye(D))[0]) == pytest.approx(0, abs=1e-9)
  assert float(loss_fn(real['mu'] + 1, jax.random.key(0), jnp.eye(D))[0]) == pytest.approx(
      0.5 * 1 + 0.5 * 1, rel=1e-5)


def test_lgm_inner_gradient_matches_finite_differences_and_outer_gradient_checks():
  x, y = _features()
  w = 0.3 * jax.random.normal(jax.random.key(3), (D, C))
  b = 0.1 * jnp.arange(C, dtype=jnp.float32)
  g = sfm.head_gradient(x, y, w, b)

  def ce(w):
    return linear_probe.cross_entropy(x @ w + b, y)

  eps = 1e-2
  for i, j in [(0, 0), (2, 3), (4, 1)]:
    bump = jnp.zeros((D, C)).at[i, j].set(eps)
    numeric = (ce(w + bump) - ce(w - bump)) / (2 * eps)
    np.testing.assert_allclose(g[i * C + j], numeric, rtol=2e-2, atol=1e-4)

  loss_fn = sfm.make_lgm_loss(_linear_backbone, C, 1, augment=_identity, copies=2, head_std=0.5)
  index = jnp.asarray(sfm.class_index_table(np.asarray(y), C))
  syn, _ = _features(key=4, n=C)
  check_grads(lambda s: loss_fn(s, jax.random.key(0), jnp.eye(D), x, index)[0], (syn,),
              order=1, modes=('rev',), atol=1e-2, rtol=1e-2)


def test_nt_xent_of_equal_embeddings_is_log_two_n_minus_one():
  n = 5
  z = jnp.ones((n, 3))
  assert float(ssl.nt_xent(z, z, 0.5)) == pytest.approx(math.log(2 * n - 1), rel=1e-6)
  apart = jnp.eye(n, 8)
  assert float(ssl.nt_xent(apart, apart, 0.1)) < 1e-3


def test_ci_projector_reaches_the_least_squares_solution_and_the_identity():
  key = jax.random.key(5)
  images = jax.random.normal(key, (40, D))
  embed = lambda x: x  # noqa: E731
  mix = jnp.eye(D) + 0.3 * jax.random.normal(jax.random.key(6), (D, D))
  teacher = lambda x: x @ mix  # noqa: E731
  golden = linear_probe.Head(jnp.ones((D, C)), jnp.zeros((C,)))
  protocol = linear_probe.ProbeProtocol(runs=1, epochs=3, batch_size=40, mode='ci')
  for target, expected in ((embed, jnp.eye(D)), (teacher, mix)):
    train = linear_probe.make_probe(embed, images, jnp.zeros(40, jnp.int32), C, protocol,
                                    augment=_identity, teacher_embed=target, golden=golden)
    projector = jax.jit(train)(jax.random.key(0))
    lstsq = np.linalg.lstsq(np.asarray(images), np.asarray(target(images)), rcond=None)[0]
    np.testing.assert_allclose(lstsq, expected, atol=1e-5)
    np.testing.assert_allclose(projector, lstsq, atol=1e-4)


def test_golden_head_reads_raw_features_whatever_their_scale():
  x, y = _features(n=C * 50)
  scales = jnp.logspace(-3, 3, D)  # an ill-conditioned problem for plain Adam
  raw = x * scales + 5.0
  head = linear_probe.train_golden_head(np.asarray(raw), np.asarray(y), C, jax.random.key(0),
                                        epochs=30, batch_size=50)
  assert linear_probe.accuracy(head.logits(raw), y) > 0.95
  shifted = linear_probe.train_golden_head(np.asarray(x), np.asarray(y), C, jax.random.key(0),
                                           epochs=30, batch_size=50)
  np.testing.assert_allclose(head.logits(raw), shifted.logits(x), rtol=1e-3, atol=1e-3)


def test_normal_probe_learns_separable_features_and_is_deterministic():
  x, y = _features(n=C * 20)
  x = x / jnp.abs(x).max()  # images lie in [-1, 1]
  protocol = linear_probe.ProbeProtocol(runs=2, epochs=200, lr_per_256=5.0)
  result = linear_probe.evaluate_probe(lambda z: z, x, y, x, y, C, jax.random.key(0), protocol,
                                       augment=_identity)
  again = linear_probe.evaluate_probe(lambda z: z, x, y, x, y, C, jax.random.key(0), protocol,
                                      augment=_identity)
  assert result['mean'] > 0.95 and result['accs'] == again['accs']


def test_pyramid_restarts_adam_at_each_growth_and_renders_in_range():
  assert image_param.pyramid_sizes(28) == (1, 2, 4, 8, 16, 28)
  target = jnp.linspace(-0.5, 0.5, 8 * 8).reshape(1, 8, 8, 1)

  def loss_fn(images, key):
    del key
    return jnp.mean(jnp.square(images - target)), {}

  images, history = image_param.distill(loss_fn, (8, 8, 1), 1, jax.random.key(0), steps=70,
                                        lr=0.05, mode='pyramid', grow_every=20)
  sizes = image_param.pyramid_sizes(8)
  assert sizes == (1, 2, 4, 8)
  np.testing.assert_array_equal(history['adam_count'],
                                np.concatenate([np.arange(1, 21)] * 3 + [np.arange(1, 11)]))
  assert np.abs(images).max() < 1 and history['loss'][-1] < history['loss'][0]


class _Stop(Exception):
  pass


@pytest.mark.parametrize('stop_at', [30, 40])  # inside a phase, and at a growth step
def test_distillation_killed_then_resumed_reaches_the_same_images(tmp_path, stop_at):
  target = jnp.linspace(-0.5, 0.5, 2 * 8 * 8 * 3).reshape(2, 8, 8, 3)
  real = np.asarray(jax.random.uniform(jax.random.key(2), (2, 8, 8, 3), minval=-0.9, maxval=0.9))

  def loss_fn(images, key):
    noise = 0.01 * jax.random.normal(key, images.shape)  # the step's key must match too
    return jnp.mean(jnp.square(images + noise - target)), {}

  def run(state_path=None, on_progress=None):
    return image_param.distill(loss_fn, (8, 8, 3), 2, jax.random.key(0), steps=70, lr=0.05,
                               mode='pyramid', grow_every=20, real=real, progress_every=10,
                               state_path=state_path, on_progress=on_progress)

  whole, whole_history = run()

  def kill(done, loss, images):
    del loss, images
    if done == stop_at:
      raise _Stop

  path = str(tmp_path / 'state.npz')
  with pytest.raises(_Stop):
    run(path, kill)  # the state is saved after on_progress: the last file holds step stop_at - 10
  resumed, history = run(path)
  np.testing.assert_array_equal(resumed, whole)
  np.testing.assert_array_equal(history['loss'], whole_history['loss'])
  np.testing.assert_array_equal(history['adam_count'], whole_history['adam_count'])
  with pytest.raises(ValueError, match='delete it to start over'):
    image_param.distill(loss_fn, (8, 8, 3), 3, jax.random.key(0), steps=70, state_path=path)


def test_real_initialisation_renders_the_real_images():
  real = np.asarray(jax.random.uniform(jax.random.key(0), (2, 8, 8, 3), minval=-0.9,
                                       maxval=0.9))
  levels = image_param.grow([], 8, 2, (8, 8, 3), jax.random.key(1), real=real)
  np.testing.assert_allclose(image_param.render(levels, (8, 8, 3)), real, atol=1e-5)
  pyramid = []
  for size in image_param.pyramid_sizes(8):
    pyramid = image_param.grow(pyramid, size, 2, (8, 8, 3), jax.random.key(1), real=real)
  np.testing.assert_allclose(image_param.render(pyramid, (8, 8, 3)), real, atol=1e-4)


def test_views_keep_shape_and_background_and_are_differentiable():
  x = -jnp.ones((3, 12, 12, 1)).at[:, 4:8, 4:8].set(1.0)
  ratios = ssl.ViewRatios(noise=0.0)
  out = ssl.view(x, jax.random.key(0), ratios)
  assert out.shape == x.shape and float(out[:, 0, 0].max()) == pytest.approx(-1.0)
  grad = jax.grad(lambda x: ssl.view(x, jax.random.key(0), ratios).sum())(x)
  assert float(jnp.abs(grad).sum()) > 0


def test_sfm_experiment_runs_end_to_end_and_resumes(tmp_path, monkeypatch):
  monkeypatch.setenv('FLOWDISTILL_CACHE', str(tmp_path / 'cache'))
  config = load_config_file(os.path.join(ROOT, 'configs', 'sfm.py'), 'digits,cpu')
  config.dd.update(ipcs=(2,))
  config.sfm.ssl.update(steps=3, batch_size=16, widths=(8, 16))
  config.sfm.probe.update(epochs=2, runs=2)
  config.sfm.update(cross_widths=(8, 12), steps=3, golden_epochs=1, lgm_copies=2,
                    snapshot_every=2)
  validate(config)
  result = experiments.get('sfm').run(config, str(tmp_path / 'run'))
  cells = {c['method']: c for c in result['cells']}
  assert set(cells) == set(sfm_run.SETS)
  assert set(cells['sfm']['probes']) == set(sfm_run.PROBES)
  assert set(cells['random']['probes']) == {'normal'}
  assert all(len(r['accs']) == len(r['val_accs']) == 2
             for c in cells.values() for r in c['probes'].values())
  assert cells['lgm']['xla_temp_bytes'] > cells['sfm']['xla_temp_bytes'] > 0
  saved = np.load(tmp_path / 'run' / 'sets' / 'sfm_ipc2.npz')
  assert saved['x'].shape == (20, 8, 8, 1) and np.abs(saved['x']).max() <= 1
  snapshots = dict(np.load(tmp_path / 'run' / 'snapshots' / 'lgm_ipc2.npz'))
  assert snapshots['steps'].tolist() == [2, 3] and snapshots['images'].shape == (2, 20, 8, 8, 1)
  np.testing.assert_array_equal(snapshots['images'][-1], np.load(
      tmp_path / 'run' / 'sets' / 'lgm_ipc2.npz')['x'])
  assert not list((tmp_path / 'run' / 'snapshots').glob('*.*.npz'))  # resumption files gone
  again = experiments.get('sfm').run(config, str(tmp_path / 'run'))
  assert [c['probes'] for c in again['cells']] == [c['probes'] for c in result['cells']]

  evaluate_probe = linear_probe.evaluate_probe

  def killed_while_scoring_lgm(*args, **kwargs):
    if (tmp_path / 'killed' / 'snapshots' / 'lgm_ipc2.partial.npz').exists():
      raise KeyboardInterrupt
    return evaluate_probe(*args, **kwargs)

  config.sfm.sets = ('lgm',)
  monkeypatch.setattr(linear_probe, 'evaluate_probe', killed_while_scoring_lgm)
  with pytest.raises(KeyboardInterrupt):
    experiments.get('sfm').run(config, str(tmp_path / 'killed'))
  assert (tmp_path / 'killed' / 'snapshots' / 'lgm_ipc2.state.npz').exists()
  monkeypatch.setattr(linear_probe, 'evaluate_probe', evaluate_probe)
  resumed = experiments.get('sfm').run(config, str(tmp_path / 'killed'))['cells'][0]['probes']
  assert {k: r['accs'] for k, r in resumed.items()} == {
      k: r['accs'] for k, r in cells['lgm']['probes'].items()}
