"""The on-disk cache: fingerprints, the manifest written last, and entries that are incomplete or
changed on disk rebuilt with one warning."""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from flowdistill import cache, files


def test_fingerprint_is_that_of_the_existing_caches():
  images = np.linspace(-1, 1, 2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4, 1)
  labels = np.array([0, 1], np.int64)
  # The value `eval/feature_net.data_fingerprint` gave before it moved here: caches keep names.
  assert cache.data_fingerprint(images, labels, '300') == 'de53bcb8dfde8128'
  assert cache.data_fingerprint(images, labels, '301') != 'de53bcb8dfde8128'


class Entry:
  """An entry of a small Orbax checkpoint (a folder of files) and a JSON file; counts builds."""

  def __init__(self):
    self.builds = 0
    self.tree = {'w': jnp.arange(6.0).reshape(2, 3), 'b': jnp.ones(3)}

  def build(self, folder):
    self.builds += 1
    assert not os.path.exists(os.path.join(folder, cache.MANIFEST))  # written after the files
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(files.join(folder, 'params'), self.tree)
    checkpointer.wait_until_finished()
    files.write_json(files.join(folder, 'info.json'), {'builds': self.builds})
    return 'built'

  def load(self, folder):
    restored = ocp.StandardCheckpointer().restore(files.join(folder, 'params'), self.tree)
    np.testing.assert_array_equal(restored['w'], self.tree['w'])
    return files.read_json(files.join(folder, 'info.json'))['builds']


def _largest_file(folder):
  """Relative path of the biggest file of the Orbax checkpoint (its array data)."""
  return max(files.walk(os.path.join(folder, 'params')),
             key=lambda name: os.path.getsize(os.path.join(folder, 'params', name)))


def test_manifest_is_written_last_and_lists_every_file(tmp_path, caplog):
  entry, folder = Entry(), str(tmp_path / 'entry')
  assert cache.load_or_build(folder, None, entry.load) is None  # nothing yet, nothing to say
  assert cache.load_or_build(folder, entry.build, entry.load) == 'built'
  manifest = json.loads((tmp_path / 'entry' / cache.MANIFEST).read_text())['files']
  assert set(manifest) == set(files.walk(folder)) - {cache.MANIFEST}
  assert 'info.json' in manifest and any(name.startswith('params/') for name in manifest)
  newest = max(os.path.getmtime(os.path.join(folder, name)) for name in manifest)
  assert os.path.getmtime(os.path.join(folder, cache.MANIFEST)) >= newest
  assert cache.load_or_build(folder, entry.build, entry.load) == 1  # loaded, not rebuilt
  assert cache.load_or_build(folder, None, entry.load) == 1
  assert entry.builds == 1 and not caplog.records


def _warnings(caplog):
  return [r for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize('damage', ['flip', 'truncate', 'delete', 'no_manifest'])
def test_damaged_entry_is_rebuilt_with_one_warning(tmp_path, caplog, damage):
  entry, folder = Entry(), str(tmp_path / 'entry')
  cache.load_or_build(folder, entry.build, entry.load)
  path = os.path.join(folder, 'params', _largest_file(folder))
  data = bytearray(open(path, 'rb').read())
  if damage == 'flip':  # same size, one byte changed
    data[len(data) // 2] ^= 0x01
    open(path, 'wb').write(bytes(data))
  elif damage == 'truncate':
    open(path, 'wb').write(bytes(data[:-1]))
  elif damage == 'delete':
    os.remove(path)
  else:  # cut short before the manifest, or made before manifests existed
    os.remove(os.path.join(folder, cache.MANIFEST))
  reason = {'flip': 'sha256 mismatch', 'truncate': 'bytes where', 'delete': 'is missing',
            'no_manifest': 'no manifest.json'}[damage]

  with caplog.at_level(logging.WARNING):
    assert cache.load_or_build(folder, None, entry.load) is None  # read-only: left alone
  (warning,) = _warnings(caplog)
  assert folder in warning.getMessage() and reason in warning.getMessage()
  assert 'ignoring it' in warning.getMessage()

  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert cache.load_or_build(folder, entry.build, entry.load) == 'built'
  (warning,) = _warnings(caplog)
  assert folder in warning.getMessage() and reason in warning.getMessage()
  assert 'rebuilding it' in warning.getMessage()
  assert entry.builds == 2 and cache.check(folder) is None

  caplog.clear()
  assert cache.load_or_build(folder, entry.build, entry.load) == 2 and not _warnings(caplog)


def test_build_that_fails_leaves_no_entry(tmp_path, caplog):
  entry, folder = Entry(), str(tmp_path / 'entry')

  def broken(folder):
    files.write_json(files.join(folder, 'info.json'), {'builds': 0})
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    cache.load_or_build(folder, broken, entry.load)
  assert cache.check(folder) is not None
  with caplog.at_level(logging.WARNING):
    assert cache.load_or_build(folder, entry.build, entry.load) == 'built'
  assert len(_warnings(caplog)) == 1 and entry.builds == 1
  assert files.read_json(files.join(folder, 'info.json')) == {'builds': 1}


def test_files_beside_an_entry_are_not_checked_and_go_with_a_rebuild(tmp_path):
  entry, folder = Entry(), str(tmp_path / 'entry')
  cache.load_or_build(folder, entry.build, entry.load)
  files.save_npz(files.join(folder, 'statistics.npz'), x=np.zeros(2))  # derived later
  assert cache.load_or_build(folder, entry.build, entry.load) == 1
  os.remove(os.path.join(folder, 'info.json'))
  cache.load_or_build(folder, entry.build, entry.load)
  assert entry.builds == 2 and not os.path.exists(os.path.join(folder, 'statistics.npz'))


def test_vae_cache_detects_a_changed_checkpoint_and_retrains_the_same_vae(tmp_path, caplog):
  from flowdistill.condense import frozen_vae
  from flowdistill.data import images

  x, y = images.load('digits', 'train')
  train = {'x': images.to_float(x)[:200], 'label': y[:200]}
  config = frozen_vae.VAEConfig(steps=3, batch_size=16, widths=(4, 4, 8))
  folder = str(tmp_path / 'vae')
  first = frozen_vae.load_or_train(train, config, cache_dir=folder)
  assert cache.check(folder) is None and os.path.exists(os.path.join(folder, 'info.json'))
  path = os.path.join(folder, 'params', _largest_file(folder))
  data = bytearray(open(path, 'rb').read())
  data[-1] ^= 0xFF
  open(path, 'wb').write(bytes(data))
  with caplog.at_level(logging.WARNING):
    assert frozen_vae.load_cached(train, config, cache_dir=folder) is None
    again = frozen_vae.load_or_train(train, config, cache_dir=folder)
  assert len(_warnings(caplog)) == 2 and all(folder in r.getMessage() for r in caplog.records)
  np.testing.assert_array_equal(again.latents(train['x']), first.latents(train['x']))
  cached = frozen_vae.load_cached(train, config, cache_dir=folder)
  assert cached.scale == first.scale


def _damage(path, how):
  """Changes one byte of the file `path` in its middle ('flip', same size) or drops its last
  ('truncate')."""
  data = bytearray(open(path, 'rb').read())
  if how == 'flip':
    data[len(data) // 2] ^= 0x01
  else:
    data = data[:-1]
  open(path, 'wb').write(bytes(data))


class OneFile:
  """A one-file entry (an .npz); counts builds."""

  def __init__(self):
    self.builds = 0

  def build(self, path):
    self.builds += 1
    assert not os.path.exists(cache.file_manifest(path))  # written after the file
    files.save_npz(path, x=np.arange(100.0))
    return 'built'

  def load(self, path):
    return float(files.load_npz(path)['x'].sum())


@pytest.mark.parametrize('damage', ['flip', 'truncate', 'delete', 'no_manifest', 'bad_manifest'])
def test_damaged_one_file_entry_is_rebuilt_with_one_warning(tmp_path, caplog, damage):
  entry, path = OneFile(), str(tmp_path / 'entry.npz')
  assert cache.load_or_build_file(path, None, entry.load) is None
  assert cache.load_or_build_file(path, entry.build, entry.load) == 'built'
  assert cache.load_or_build_file(path, entry.build, entry.load) == 4950.0  # loaded
  assert entry.builds == 1 and not caplog.records
  if damage in ('flip', 'truncate'):
    _damage(path, damage)
  elif damage == 'delete':
    os.remove(path)
  elif damage == 'no_manifest':
    os.remove(cache.file_manifest(path))
  else:
    open(cache.file_manifest(path), 'w').write('{"files": {}}')
  reason = {'flip': 'sha256 mismatch', 'truncate': 'bytes where', 'delete': 'is missing',
            'no_manifest': 'no entry.npz.manifest.json',
            'bad_manifest': 'does not list entry.npz'}[damage]

  with caplog.at_level(logging.WARNING):
    assert cache.load_or_build_file(path, None, entry.load) is None
    assert cache.load_or_build_file(path, entry.build, entry.load) == 'built'
  first, second = _warnings(caplog)
  for warning, action in ((first, 'ignoring it'), (second, 'rebuilding it')):
    assert path in warning.getMessage() and reason in warning.getMessage()
    assert action in warning.getMessage()
  assert entry.builds == 2 and cache.check_file(path) is None
  caplog.clear()
  assert cache.load_or_build_file(path, entry.build, entry.load) == 4950.0
  assert entry.builds == 2 and not _warnings(caplog)


class FakeVAE:
  """What `latents.load_or_encode` uses of a FrozenVAE; counts the chunks it encodes."""
  fingerprint, scale = 'fake', 0.5

  def __init__(self, fail_after=None):
    self.calls, self.fail_after = 0, fail_after

  def latents(self, x, *, mode, key):
    if self.calls == self.fail_after:
      raise KeyboardInterrupt
    self.calls += 1
    return self.scale * (x + jax.random.normal(key, x.shape))


def _latent_splits():
  x = np.linspace(-1, 1, 16 * 2 * 2 * 4, dtype=np.float32).reshape(16, 2, 2, 4)
  labels = np.arange(16) % 3
  return {'x': x[:10], 'label': labels[:10]}, {'x': x[10:], 'label': labels[10:]}


def _encode(vae, path):
  from flowdistill.condense import latents
  return latents.load_or_encode(vae, *_latent_splits(), mode='sample', path=path, chunk=4)


def _assert_same_latents(a, b):
  for split in ('train', 'test'):
    np.testing.assert_array_equal(a[split]['x'], b[split]['x'])
    np.testing.assert_array_equal(a[split]['label'], b[split]['label'])


@pytest.mark.parametrize('damage', ['flip', 'truncate'])
def test_latent_cache_is_verified_and_rebuilt_with_one_warning(tmp_path, caplog, damage):
  from flowdistill.condense import latents
  vae, path = FakeVAE(), str(tmp_path / 'latents.npz')
  fresh = _encode(FakeVAE(), str(tmp_path / 'fresh.npz'))
  _assert_same_latents(_encode(vae, path), fresh)
  assert vae.calls == 5 and cache.check_file(path) is None  # 3 + 2 chunks
  _assert_same_latents(_encode(vae, path), fresh)
  assert vae.calls == 5 and not caplog.records  # loaded, not encoded again
  _damage(path, damage)
  with pytest.raises(ValueError, match=f'latent cache {path} is not usable: .*; delete it'):
    latents.load(path)  # read-only callers refuse it
  with caplog.at_level(logging.WARNING):
    _assert_same_latents(_encode(vae, path), fresh)
  (warning,) = _warnings(caplog)
  assert path in warning.getMessage() and 'latents' in warning.getMessage()
  assert vae.calls == 10 and cache.check_file(path) is None
  _assert_same_latents(latents.load(path), fresh)


def test_latent_file_without_manifest_is_refused_in_one_line_when_unreadable(tmp_path):
  from flowdistill.condense import latents
  path = str(tmp_path / 'latents.npz')
  _encode(FakeVAE(), path)
  os.remove(cache.file_manifest(path))  # e.g. made elsewhere: read as it is
  assert latents.load(path)['fingerprint'] == 'fake'
  _damage(path, 'truncate')
  with pytest.raises(ValueError, match=f'latent cache {path} cannot be read .*; delete it'):
    latents.load(path)


def test_damaged_latent_chunk_is_encoded_again_on_resume(tmp_path, caplog):
  path = str(tmp_path / 'latents.npz')
  with pytest.raises(KeyboardInterrupt):
    _encode(FakeVAE(fail_after=2), path)
  chunk = os.path.join(path + '.parts', 'fake-train-000001.npy')
  _damage(chunk, 'flip')
  vae = FakeVAE()
  with caplog.at_level(logging.WARNING):
    resumed = _encode(vae, path)
  (warning,) = _warnings(caplog)
  assert chunk in warning.getMessage() and 'sha256 mismatch' in warning.getMessage()
  assert vae.calls == 4  # the damaged chunk and the three never made
  _assert_same_latents(resumed, _encode(FakeVAE(), str(tmp_path / 'fresh.npz')))


@pytest.mark.parametrize('damage', ['flip', 'truncate'])
def test_teacher_pair_chunks_are_verified_and_made_again(tmp_path, caplog, damage):
  from flowdistill.data import teacher_pairs
  calls = []

  def trajectory_fn(x0, labels):
    calls.append(len(x0))
    return jnp.stack([x0, 2.0 + 0.5 * x0])

  folder = str(tmp_path / 'pairs')
  kwargs = {'num': 10, 'chunk': 4, 'shape': (2,), 'seed': 0, 'identity': {'teacher': 'affine'}}
  teacher_pairs.generate(folder, trajectory_fn, **kwargs)
  fresh = teacher_pairs.load(folder, 10)
  teacher_pairs.generate(folder, trajectory_fn, **kwargs)
  assert len(calls) == 3 and not caplog.records  # good chunks are reused
  chunk = os.path.join(folder, 'chunk_00001.npz')
  _damage(chunk, damage)
  with pytest.raises(ValueError, match='chunk_00001.npz is not usable: .*generate'):
    teacher_pairs.load(folder, 10)
  with caplog.at_level(logging.WARNING):
    teacher_pairs.generate(folder, trajectory_fn, **kwargs)
  (warning,) = _warnings(caplog)
  assert chunk in warning.getMessage() and 'teacher pairs' in warning.getMessage()
  assert len(calls) == 4
  np.testing.assert_array_equal(teacher_pairs.load(folder, 10)['states'], fresh['states'])
  open(os.path.join(folder, teacher_pairs.MANIFEST), 'w').write('{"chunk": 4')
  with pytest.raises(ValueError, match='cannot be read .*delete that folder'):
    teacher_pairs.load(folder, 10)


class FakeBackbone:
  """What `sfm_setup.statistics` uses of a frozen backbone."""
  fingerprint = 'fake-backbone'

  def features(self, x):
    return np.asarray(x).reshape(len(x), -1)


@pytest.mark.parametrize('damage', ['flip', 'truncate'])
def test_sfm_statistics_are_verified_and_rebuilt_with_one_warning(tmp_path, monkeypatch,
                                                                   caplog, damage):
  import types

  from flowdistill.condense import linear_probe, sfm_setup, ssl
  from flowdistill.experiments import load_config_file

  monkeypatch.setenv('FLOWDISTILL_CACHE', str(tmp_path / 'cache'))
  rng = np.random.default_rng(0)
  labels = np.arange(300) % 3
  x = (rng.normal(size=(300, 2, 2, 1)) + labels[:, None, None, None]).astype(np.float32)
  dataset = types.SimpleNamespace(train={'x': x[:256], 'label': labels[:256]},
                                  test={'x': x[256:], 'label': labels[256:]}, num_classes=3)
  config = load_config_file(os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs',
                                         'sfm.py'), 'digits')
  config.sfm.golden_epochs = 2
  heads = []
  train_head = linear_probe.train_golden_head
  monkeypatch.setattr(linear_probe, 'train_golden_head',
                      lambda *a, **k: heads.append(1) or train_head(*a, **k))
  fresh = sfm_setup.statistics(FakeBackbone(), dataset, config)
  assert sfm_setup.statistics(FakeBackbone(), dataset, config)['golden_accuracy'] == (
      fresh['golden_accuracy'])
  assert len(heads) == 1 and not caplog.records  # loaded, not recomputed
  folder = ssl.cache_folder(dataset.train, sfm_setup.ssl_settings(config)['distill'])[1]
  path = files.join(folder, 'statistics_golden2.npz')
  _damage(path, damage)
  with caplog.at_level(logging.WARNING):
    again = sfm_setup.statistics(FakeBackbone(), dataset, config)
  (warning,) = _warnings(caplog)
  assert path in warning.getMessage() and 'SFM statistics' in warning.getMessage()
  assert len(heads) == 2
  for key in ('mu', 'nu', 'flow'):
    np.testing.assert_array_equal(again[key], fresh[key])
  np.testing.assert_array_equal(again['golden'].weight, fresh['golden'].weight)
  config.sfm.golden_epochs = 3  # another golden head: not the one cached
  sfm_setup.statistics(FakeBackbone(), dataset, config)
  assert len(heads) == 3
