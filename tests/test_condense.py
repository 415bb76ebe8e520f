"""The dataset-distillation protocol: DSA, ConvNet-3, evaluate_synset, subsets and DM against
closed forms and exact properties."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.test_util import check_grads

from flowdistill import experiments
from flowdistill.condense import augment, dm, protocol, subsets, synset_eval
from flowdistill.condense.kmeans import kmeans
from flowdistill.data import images
from flowdistill.experiments import load_config_file, validate
from flowdistill.models.convnet import ConvNet, InstanceNorm
from flowdistill.train import stop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEOMETRIC = ('crop', 'scale', 'rotate', 'flip', 'cutout')


def _batch(n=4, size=12, channels=1, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, size, size, channels))


# DSA


def test_identity_warp_and_zero_shift_return_the_input_exactly():
  x = _batch()
  eye = jnp.eye(2)[None]
  np.testing.assert_array_equal(augment.warp(x, eye, jnp.zeros((1, 2))), x)
  shifted = augment.warp(x, eye, jnp.array([[0.0, 2.0]]))   # out[i, j] = x[i, j + 2]
  np.testing.assert_array_equal(shifted[:, :, :-2], x[:, :, 2:])
  np.testing.assert_array_equal(shifted[:, :, -2:], 0)


def test_flipping_twice_is_the_identity():
  x = _batch()
  always = augment.DSARatios(flip=1.0)
  once = augment.augment(x, jax.random.key(0), 'flip', ratios=always)
  np.testing.assert_array_equal(once, x[:, :, ::-1])
  np.testing.assert_array_equal(augment.augment(once, jax.random.key(1), 'flip', ratios=always),
                                x)


def test_a_quarter_turn_is_rot90():
  x = _batch(size=9)
  turned = augment.warp(x, augment.rotation(jnp.array([90.0])), jnp.zeros((1, 2)))
  np.testing.assert_allclose(turned, jnp.rot90(x, -1, axes=(1, 2)), atol=1e-5)


@pytest.mark.parametrize('family', GEOMETRIC + ('color',))
def test_the_same_key_gives_the_same_transform_on_two_batches(family):
  a, b = _batch(seed=1), _batch(seed=2)
  key = jax.random.key(7)
  # Shared parameters: every image of any batch gets the transform of the first.
  both = augment.augment(jnp.concatenate([a, b]), key, family, shared=True)
  np.testing.assert_allclose(both[:4], augment.augment(a, key, family, shared=True), atol=1e-6)
  np.testing.assert_allclose(both[4:], augment.augment(b, key, family, shared=True), atol=1e-6)
  if family in GEOMETRIC:  # and per-sample parameters repeat: a linear map of the images
    lhs = augment.augment(a + 2 * b, key, family)
    rhs = augment.augment(a, key, family) + 2 * augment.augment(b, key, family)
    np.testing.assert_allclose(lhs, rhs, atol=1e-5)


def test_one_family_per_call_and_parameters_within_their_ranges():
  x = jnp.ones((64, 8, 8, 1))
  bright = augment.augment(x, jax.random.key(0), 'color',
                           ratios=augment.DSARatios(saturation=1.0, contrast=0.0))
  offsets = np.asarray(bright[:, 0, 0, 0]) - 1   # constant images: only brightness shows
  assert offsets.min() >= -0.5 and offsets.max() <= 0.5 and offsets.std() > 0.1
  cut = np.asarray(augment.augment(x, jax.random.key(0), 'cutout'))
  zeros = (cut == 0).sum((1, 2, 3))
  assert zeros.max() <= 16 and zeros.min() >= 4   # a 4x4 square, clipped at most to 2x2
  strategy = augment.augment(x, jax.random.key(3), augment.DIGITS)
  assert strategy.shape == x.shape


def test_augmentation_is_differentiable_in_the_images():
  x = _batch(n=2, size=6)
  for family in ('scale', 'rotate', 'color', 'cutout', 'crop'):
    f = lambda x, family=family: jnp.sum(augment.augment(x, jax.random.key(5), family) ** 2)
    check_grads(f, (x,), order=1, modes=('rev',), atol=1e-2, rtol=1e-2)


# ConvNet-3


@pytest.mark.parametrize('shape,count', [((28, 28, 1), 317_706), ((32, 32, 3), 320_010)])
def test_convnet3_size_and_features(shape, count):
  net = ConvNet(shape, 10, rngs=nnx.Rngs(0))
  assert sum(p.size for p in jax.tree.leaves(nnx.state(net, nnx.Param))) == count
  x = jnp.zeros((2, *shape))
  assert net.features(x).shape == (2, 2048) and net(x).shape == (2, 10)


def test_instance_norm_standardises_each_sample_and_channel():
  x = 3 + 2 * _batch(n=3, size=5, channels=4)
  h = InstanceNorm(4)(x, affine=False)
  np.testing.assert_allclose(h.mean((1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(h.var((1, 2)), 1, atol=1e-3)


def test_patch_convolution_matches_lax_conv():
  net = ConvNet((9, 9, 3), 4, depth=1, rngs=nnx.Rngs(0))
  conv = net.convs[0]
  x = _batch(n=2, size=9, channels=3)
  ref = jax.lax.conv_general_dilated(x, conv.kernel[...], (1, 1), [(1, 1), (1, 1)],
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(conv(x), ref + conv.bias[...], atol=1e-5)


@pytest.mark.parametrize('channels', [1, 3])
def test_first_block_statistics_from_the_patch_covariance_equal_conv_then_norm(channels):
  """The fused first block (instance norm from the [9C, 9C] patch covariance) is conv -> norm:
  same values and same parameter gradients (the conv bias, which the norm cancels, gets 0)."""
  net = ConvNet((12, 12, channels), 3, width=8, depth=2, rngs=nnx.Rngs(1))
  conv, norm = net.convs[0], net.norms[0]
  norm.scale[...] = jnp.linspace(0.5, 1.5, 8)
  x = 0.5 + _batch(n=3, size=12, channels=channels)
  np.testing.assert_allclose(conv.instance_normalised(x, norm), norm(conv(x)), atol=2e-5)
  graphdef, params = nnx.split(net)
  r = jax.random.normal(jax.random.key(4), (3, 3))

  def loss(params, fused):
    model = nnx.merge(graphdef, params)
    if fused:
      return jnp.sum(model(x) * r)
    h = x
    for conv, norm in zip(model.convs, model.norms):
      h = nnx.avg_pool(nnx.relu(norm(conv(h))), (2, 2), strides=(2, 2))
    return jnp.sum(model.head(h.reshape(3, -1)) * r)

  fused, plain = (jax.grad(loss)(params, flag) for flag in (True, False))
  assert float(jnp.abs(fused['convs'][0]['bias']).max()) == 0.0
  for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(plain)):
    np.testing.assert_allclose(a, b, atol=2e-4 * float(jnp.abs(b).max()) + 1e-6)
  logits = net(x)
  np.testing.assert_allclose(net(x, inference=True), logits, rtol=1e-4, atol=1e-5)


# evaluate_synset


def _patches(n, size=8, seed=0):
  """Two linearly separable classes: a bright 3x3 patch top-left (0) or bottom-right (1)."""
  rng = np.random.default_rng(seed)
  labels = np.repeat([0, 1], n // 2)
  x = 0.1 * rng.standard_normal((n, size, size, 1)).astype(np.float32) - 0.5
  x[labels == 0, 1:4, 1:4] += 1.0
  x[labels == 1, 4:7, 4:7] += 1.0
  return x, labels.astype(np.int32)


def _tiny(**kw):
  return synset_eval.Protocol(**{**dict(runs=2, epochs=20, width=16, depth=2, dsa=False), **kw})


def test_training_fits_a_separable_set_exactly():
  x, y = _patches(32)
  split = synset_eval.test_split({'x': x, 'label': y}, {'x': x, 'label': y})
  result = synset_eval.evaluate_synset(x, y, split, jax.random.key(0), _tiny(lr=0.05))
  np.testing.assert_array_equal(result['accs'], 1.0)


def test_sgd_step_and_the_single_lr_drop_after_epoch_e_over_2_plus_1():
  x, y = _patches(8)
  proto = _tiny(epochs=6, momentum=0.0, weight_decay=0.0, lr=0.1)
  graphdef, params = synset_eval.make_net(x.shape[1:], 2, proto, jax.random.key(0))
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      nnx.merge(graphdef, p)(jnp.asarray(x)), y).mean()
  key = jax.random.key(3)
  state = synset_eval.train_network(x, y, key, proto, 2, epochs=(0, 0))
  lrs = []
  for epoch in range(proto.epochs + 2):    # one past the end: a no-op
    grads = jax.grad(loss)(state[0])
    new = synset_eval.train_network(x, y, key, proto, 2, epochs=(epoch, 1), state=state)
    g = jnp.concatenate([v.ravel() for v in jax.tree.leaves(grads)])
    step = jnp.concatenate([(a - b).ravel() for a, b in zip(jax.tree.leaves(state[0]),
                                                             jax.tree.leaves(new[0]))])
    lrs.append(float(jnp.vdot(step, g) / jnp.vdot(g, g)))
    state = new
  expected = [0.1] * (proto.lr_drop_epoch + 1) + [0.01] * (proto.epochs - proto.lr_drop_epoch)
  np.testing.assert_allclose(lrs, expected + [0.0], rtol=1e-3, atol=1e-7)


def _digits(ipc):
  split = {}
  for name in ('train', 'test'):
    x, y = images.load('digits', name)
    split[name] = {'x': images.to_float(x), 'label': y}
  index = subsets.select('random', None, split['train']['label'], ipc, seed=0)
  return split, split['train']['x'][index], split['train']['label'][index]


def test_evaluate_synset_on_digits_is_seeded_and_batches_runs():
  split, x, y = _digits(ipc=5)
  test = synset_eval.test_split(split['train'], split['test'])
  proto = _tiny(runs=3, epochs=30, width=32, dsa=True)
  first = synset_eval.evaluate_synset(x, y, test, jax.random.key(1), proto)
  assert first['accs'].shape == (3,) and first['mean'] > 0.5    # chance is 0.1
  again = synset_eval.evaluate_synset(x, y, test, jax.random.key(1),
                                   _tiny(runs=3, epochs=30, width=32, dsa=True, runs_per_call=3,
                                         epochs_per_call=7))
  np.testing.assert_array_equal(first['accs'], again['accs'])


# the validation split: what every setting is chosen on


def test_validation_is_class_balanced_disjoint_and_seeded():
  split, _, _ = _digits(ipc=1)
  train = split['train']
  rest, val = protocol.hold_out(train, 0.1, seed=3)
  counts, val_counts = np.bincount(train['label']), np.bincount(val['label'])
  np.testing.assert_array_equal(val_counts, np.maximum(1, np.round(0.1 * counts)))
  np.testing.assert_array_equal(np.bincount(rest['label']) + val_counts, counts)
  rows = {r.tobytes() for r in train['x']}
  assert len(rows) == len(train['x'])  # digits has no duplicate images, so bytes name rows
  rest_rows, val_rows = ({r.tobytes() for r in part['x']} for part in (rest, val))
  test_rows = {r.tobytes() for r in split['test']['x']}
  assert not rest_rows & val_rows and not val_rows & test_rows
  assert rest_rows | val_rows == rows
  again, other = protocol.hold_out(train, 0.1, seed=3)[1], protocol.hold_out(train, 0.1, seed=4)[1]
  np.testing.assert_array_equal(again['x'], val['x'])
  assert not np.array_equal(other['x'], val['x'])
  assert protocol.hold_out(train, 0.0, seed=3) == (train, None)
  with pytest.raises(ValueError, match='leaves class 0 .* with none to distil'):
    protocol.hold_out({'x': np.zeros((3, 1)), 'label': np.array([0, 1, 1])}, 0.5, seed=0)


def test_selection_reads_only_the_validation_split():
  """Two candidate sets scored with the same networks against the true test labels and against
  shuffled ("poisoned") ones: the validation accuracies and the chosen set do not change."""
  split, x, y = _digits(ipc=5)
  rest, val = protocol.hold_out(split['train'], 0.1, seed=0)
  noise = np.random.default_rng(0).uniform(-1, 1, x.shape).astype(np.float32)
  candidates = [(noise, y), (x, y)]
  poisoned = dict(split['test'], label=np.random.default_rng(1).permutation(
      split['test']['label']))
  choices, val_accs = [], []
  for test in (split['test'], poisoned):
    held_out = synset_eval.test_split(rest, test, val)
    results = [synset_eval.evaluate_synset(cx, cy, held_out, jax.random.key(0),
                                           _tiny(runs=1, epochs=10, width=16))
               for cx, cy in candidates]
    choices.append(protocol.choose(results))
    val_accs.append([r['val_mean'] for r in results])
  assert choices == [1, 1] and val_accs[0] == val_accs[1]
  with pytest.raises(ValueError, match='no .val_mean.'):
    protocol.choose([{'mean': 0.9}])


# real-image baselines


def test_herding_first_pick_is_nearest_the_mean_and_tracks_it():
  points = np.random.default_rng(0).standard_normal((50, 3))
  order = subsets.herding_order(points, 5)
  assert order[0] == np.linalg.norm(points - points.mean(0), axis=1).argmin()
  gaps = [np.linalg.norm(points[order[:k]].mean(0) - points.mean(0)) for k in (1, 5)]
  assert gaps[1] < gaps[0] and len(set(order)) == 5


def test_k_center_on_a_line_starts_at_the_mean_then_picks_the_extremes():
  points = np.array([[0.5], [-2.0], [0.1], [5.0], [1.0], [-0.5]])   # mean 0.68
  np.testing.assert_array_equal(subsets.k_center_order(points, 3), [0, 3, 1])


def test_random_subsets_are_per_class_and_seeded():
  labels = np.repeat(np.arange(3), [5, 7, 9])
  a = subsets.select('random', None, labels, 4, seed=1)
  np.testing.assert_array_equal(labels[a], np.repeat(np.arange(3), 4))
  np.testing.assert_array_equal(a, subsets.select('random', None, labels, 4, seed=1))
  assert not np.array_equal(a, subsets.select('random', None, labels, 4, seed=2))


def test_kmeans_finds_separated_clusters_and_nearest_real_points():
  rng = np.random.default_rng(0)
  centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
  points = np.concatenate([c + 0.1 * rng.standard_normal((20, 2)) for c in centres])
  found, assignment, _ = kmeans(points, 3, seed=0, n_init=2)
  distance = np.linalg.norm(found[:, None] - centres[None], axis=-1)   # [found, true]
  assert sorted(distance.argmin(1)) == [0, 1, 2] and distance.min(1).max() < 0.1
  assert len(set(assignment[:20])) == 1 and len(set(assignment)) == 3
  picks = subsets.kmeans_nearest_order(points, 3, seed=0)
  assert sorted(p // 20 for p in picks) == [0, 1, 2]


# DM


def test_dm_loss_is_zero_when_the_sets_agree_under_a_shared_key():
  real = _batch(n=6, size=8).reshape(2, 3, 8, 8, 1)
  net = ConvNet((8, 8, 1), 2, width=8, depth=2, rngs=nnx.Rngs(0))
  loss = dm.dm_loss(real, real, jax.random.key(0), net.features)
  assert float(loss) == 0.0
  assert float(dm.dm_loss(real + 0.1, real, jax.random.key(0), net.features)) > 0


def test_dm_gradient_for_a_linear_embedding():
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((5, 16)), jnp.float32)
  embed = lambda x: x.reshape(x.shape[0], -1) @ a.T
  syn = jnp.asarray(rng.standard_normal((2, 3, 4, 4, 1)), jnp.float32)
  real = jnp.asarray(rng.standard_normal((2, 7, 4, 4, 1)), jnp.float32)
  grad = jax.grad(dm.dm_loss)(syn, real, jax.random.key(0), embed, dsa=False)
  gap = real.reshape(2, 7, 16).mean(1) - syn.reshape(2, 3, 16).mean(1)    # [C, 16]
  expected = -(2 / 3) * (gap @ a.T @ a)                                    # per image of class c
  np.testing.assert_allclose(grad.reshape(2, 3, 16), np.repeat(expected[:, None], 3, 1),
                             rtol=1e-4, atol=1e-5)


def test_distribution_matching_lowers_its_loss_on_digits():
  split, _, _ = _digits(ipc=1)
  proto = _tiny(width=16)
  out = dm.distribution_matching(split['train'], 2, jax.random.key(0),
                                 dm.DMConfig(iterations=30, batch_real=32), proto)
  assert out['x'].shape == (20, 8, 8, 1) and out['x'].min() >= -1 and out['x'].max() <= 1
  np.testing.assert_array_equal(out['label'], np.repeat(np.arange(10), 2))
  assert out['loss'][-10:].mean() < out['loss'][:10].mean()


def test_a_stopped_dm_resumes_to_the_images_of_a_run_that_never_stopped(tmp_path):
  """A stop signal at iteration 20 of 30 keeps DM's images, momentum, losses and batch generator
  in its state file; the rerun continues to the same bits, and the finished state (kept until
  `run_cells` stores the cell) returns them at once."""
  split, _, _ = _digits(ipc=1)
  settings, proto = dm.DMConfig(iterations=30, batch_real=16), _tiny(width=8)
  run = lambda **kw: dm.distribution_matching(split['train'], 1, jax.random.key(3), settings,
                                              proto, **kw)
  state = str(tmp_path / 'dm_ipc1.state.npz')

  def signal_at_20(done):
    if done == 20:
      signal.raise_signal(signal.SIGTERM)

  with stop.watch(), pytest.raises(stop.Stopped):
    run(state_path=state, on_progress=signal_at_20)
  assert int(np.load(state)['step']) == 20
  resumed, fresh = run(state_path=state), run()
  np.testing.assert_array_equal(resumed['x'], fresh['x'])
  np.testing.assert_array_equal(resumed['loss'], fresh['loss'])
  assert int(np.load(state)['step']) == 30
  np.testing.assert_array_equal(run(state_path=state)['x'], fresh['x'])
  # the runner removes the file of a cell once the cell is stored
  identity = {'set': 'dm', 'seed': 0}
  cell_state = protocol.state_path(str(tmp_path / 'cells'), 'dm', 1, identity)
  os.makedirs(tmp_path / 'cells')
  os.replace(state, cell_state)
  protocol.run_cells(str(tmp_path / 'cells'), [protocol.Cell('dm', 1, identity,
                                                             lambda: {'mean': 0.5})])
  assert not os.path.exists(cell_state)


# the dd_eval experiment


def _tiny_dd(config):
  config.dd.update(runs=2, epochs=(3,), width=8, whole_data_epochs=1, epochs_per_call=2)
  config.dd_eval.dm.update(iterations=3, batch_real=8)
  return config


def test_dd_eval_scores_baselines_writes_the_table_and_resumes(tmp_path, monkeypatch):
  monkeypatch.setenv('FLOWDISTILL_CACHE', str(tmp_path / 'cache'))
  config = _tiny_dd(load_config_file(os.path.join(ROOT, 'configs', 'dd_protocol.py'),
                                     'digits,cpu'))
  config.dd.ipcs = (2,)
  validate(config)
  result = experiments.get('dd_eval').run(config, str(tmp_path))
  cells = {(c['set'], c['ipc']) for c in result['cells']}
  assert cells == {(b, 2) for b in protocol.BASELINES}
  assert 0 < result['whole_data']['test_accuracy'] <= 1
  table = (tmp_path / 'results.md').read_text()
  assert '| herding |' in table and "preset `cpu`" in table and '`dd.runs`: 2 (paper 20)' in table
  assert (tmp_path / 'sets' / 'dm_ipc2.png').exists()
  saved = np.load(tmp_path / 'sets' / 'k_center_ipc2.npz')
  np.testing.assert_array_equal(np.bincount(saved['label']), [2] * 10)
  # The random baseline draws one subset per run, as the published figures average subsets.
  first, second = (np.load(tmp_path / 'sets' / f'random_ipc2_subset{r}.npz')['x'] for r in (0, 1))
  assert not np.array_equal(first, second)
  # A rerun reads the finished cells back; a saved set is scored as a synset.
  config.dd_eval.update(synsets=(str(tmp_path / 'sets' / 'k_center_ipc2.npz'),))
  again = experiments.get('dd_eval').run(config, str(tmp_path))
  old = {(c['set'], c['ipc']): c['accs'] for c in result['cells']}
  for cell in again['cells']:
    if cell['set'] == 'k_center_ipc2':
      assert cell['ipc'] == 2
    else:
      assert cell['accs'] == old[(cell['set'], cell['ipc'])]


def test_cifar10_config_builds_and_runs_on_a_tiny_rgb_set(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {f'{k}_{s}': v for s, n in (('train', 40), ('test', 20)) for k, v in (
      ('x', rng.integers(0, 256, (n, 32, 32, 3), np.uint8)), ('y', np.arange(n) % 10))}
  np.savez(tmp_path / 'cifar.npz', **arrays)
  config = _tiny_dd(load_config_file(os.path.join(ROOT, 'configs', 'dd_protocol.py'),
                                     'cifar10'))
  config.data.path = str(tmp_path / 'cifar.npz')
  config.dd.update(ipcs=(1,), depth=1)
  config.dd_eval.update(baselines=('random', 'dm'), whole_data=False)
  validate(config)
  result = experiments.get('dd_eval').run(config, str(tmp_path / 'run'))
  assert result['preset']['protocol']['strategy'] == augment.RGB
  assert len(result['cells']) == 2 and all(len(c['accs']) == 2 for c in result['cells'])
