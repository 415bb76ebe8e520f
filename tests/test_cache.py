"""The on-disk cache: fingerprints, the manifest written last, and entries that are incomplete or
changed on disk rebuilt with one warning."""

import json
import logging
import os

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
