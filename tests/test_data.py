"""Tests of the image loaders and the batch iterator (numpy only; no TensorFlow)."""

import gzip
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from flowdistill.data import images as images_lib
from flowdistill.data import pipeline

_DEFAULT_MNIST = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'mnist'


def _mnist_dir():
  path = os.environ.get(images_lib.env_var('mnist')) or None
  if path is None and _DEFAULT_MNIST.is_dir():
    path = str(_DEFAULT_MNIST)
  return path


@pytest.fixture(scope='module')
def mnist():
  """{'train': (images, labels), 'test': (images, labels)}, loaded once for the module."""
  path = _mnist_dir()
  if path is None:
    pytest.skip(f'MNIST idx files not found: set {images_lib.env_var("mnist")} to a folder '
                f'holding them (CI uses ../shared/data/mnist).')
  return {split: images_lib.load('mnist', split, path) for split in images_lib.SPLITS}


def _idx_bytes(array):
  """MNIST idx encoding of a uint8 array."""
  header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, '>u4').tobytes()
  return header + np.ascontiguousarray(array, np.uint8).tobytes()


def _write_idx_folder(folder, images, labels, split='train', gz=True):
  prefix = {'train': 'train', 'test': 't10k'}[split]
  suffix = '.gz' if gz else ''
  write = gzip.compress if gz else bytes
  folder.mkdir(parents=True, exist_ok=True)
  (folder / f'{prefix}-images-idx3-ubyte{suffix}').write_bytes(write(_idx_bytes(images)))
  (folder / f'{prefix}-labels-idx1-ubyte{suffix}').write_bytes(write(_idx_bytes(labels)))


def _random_images(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# --- MNIST from the shared idx files ------------------------------------------------------


@pytest.mark.parametrize('split, n', [('train', 60000), ('test', 10000)])
def test_mnist_shapes_and_dtypes(mnist, split, n):
  images, labels = mnist[split]
  assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (n,) and labels.dtype == np.int32


@pytest.mark.parametrize('split, lo, hi', [('train', 5000, 7000), ('test', 850, 1200)])
def test_mnist_labels_balanced(mnist, split, lo, hi):
  counts = np.bincount(mnist[split][1], minlength=10)
  assert len(counts) == 10
  assert np.all((counts >= lo) & (counts <= hi)), counts


def test_mnist_known_values(mnist):
  # The first training digit is a 5 and the first test digit a 7; MNIST's mean pixel is ~33.3.
  assert mnist['train'][1][0] == 5 and mnist['test'][1][0] == 7
  images = mnist['train'][0]
  assert images.min() == 0 and images.max() == 255
  assert 32.0 < images.mean() < 35.0


def test_mnist_to_float_range(mnist):
  x = images_lib.to_float(mnist['test'][0][:256])
  assert x.dtype == np.float32 and x.min() == -1.0 and x.max() == 1.0


# --- Local file formats -------------------------------------------------------------------


@pytest.mark.parametrize('gz', [True, False])
def test_idx_folder_round_trip(tmp_path, gz):
  images = _random_images((7, 5, 4))
  labels = np.arange(7, dtype=np.uint8) % 3
  _write_idx_folder(tmp_path, images, labels, split='test', gz=gz)
  got_images, got_labels = images_lib.load('fashion_mnist', 'test', tmp_path)
  np.testing.assert_array_equal(got_images, images[..., None])
  np.testing.assert_array_equal(got_labels, labels)
  assert got_labels.dtype == np.int32


def test_idx_missing_split_names_file(tmp_path):
  _write_idx_folder(tmp_path, _random_images((3, 2, 2)), np.zeros(3, np.uint8), split='train')
  with pytest.raises(FileNotFoundError, match='t10k-images-idx3-ubyte'):
    images_lib.load('mnist', 'test', tmp_path)


@pytest.mark.parametrize('corrupt', ['bad_magic', 'truncated_data', 'truncated_gzip', 'count'])
def test_idx_malformed_raises_value_error(tmp_path, corrupt):
  images, labels = _random_images((6, 4, 4)), np.arange(6, dtype=np.uint8)
  _write_idx_folder(tmp_path, images, labels)
  images_file = tmp_path / 'train-images-idx3-ubyte.gz'
  raw = _idx_bytes(images)
  if corrupt == 'bad_magic':
    images_file.write_bytes(gzip.compress(b'\x00\x00\x0d\x03' + raw[4:]))
  elif corrupt == 'truncated_data':
    images_file.write_bytes(gzip.compress(raw[:-5]))
  elif corrupt == 'truncated_gzip':
    packed = gzip.compress(raw)
    images_file.write_bytes(packed[:len(packed) // 2])
  else:  # labels and images disagree on N
    images_file.write_bytes(gzip.compress(_idx_bytes(images[:5])))
  with pytest.raises(ValueError, match='train-images-idx3-ubyte.gz'):
    images_lib.load('mnist', 'train', tmp_path)


@pytest.mark.parametrize('shape', [(5, 6, 7), (5, 6, 7, 3)])
def test_npz_round_trip(tmp_path, shape):
  file = tmp_path / 'data.npz'
  x_train, x_test = _random_images(shape, 1), _random_images((2,) + shape[1:], 2)
  y_train = np.arange(5).reshape(5, 1)  # Keras layout [N, 1]
  np.savez(file, x_train=x_train, y_train=y_train, x_test=x_test, y_test=np.array([1, 0]))
  images, labels = images_lib.load('custom', 'train', file)
  expected = x_train if x_train.ndim == 4 else x_train[..., None]
  np.testing.assert_array_equal(images, expected)
  np.testing.assert_array_equal(labels, np.arange(5))
  images, labels = images_lib.load_npz(file, 'test')
  assert images.shape[0] == 2 and labels.tolist() == [1, 0]


def test_npz_malformed_raises_value_error(tmp_path):
  missing_key = tmp_path / 'missing.npz'
  np.savez(missing_key, x_train=_random_images((2, 3, 3)))
  with pytest.raises(ValueError, match='missing.npz.*y_train'):
    images_lib.load_npz(missing_key, 'train')
  garbage = tmp_path / 'garbage.npz'
  garbage.write_bytes(b'not a zip file at all')
  with pytest.raises(ValueError, match='garbage.npz'):
    images_lib.load('mnist', 'train', garbage)
  floats = tmp_path / 'floats.npz'
  np.savez(floats, x_train=np.zeros((2, 3, 3)), y_train=np.zeros(2, int))
  with pytest.raises(ValueError, match='floats.npz.*integer'):
    images_lib.load_npz(floats, 'train')


def _write_image_folder(root, split, grey):
  """Writes 2 classes x 3 images; returns the expected (images, labels)."""
  expected, labels = [], []
  for label, name in enumerate(['cat', 'dog']):  # sorted order = label order
    (root / split / name).mkdir(parents=True)
    for i in range(3):
      pixels = _random_images((4, 5) if grey else (4, 5, 3), seed=10 * label + i)
      Image.fromarray(pixels).save(root / split / name / f'{i}.png')
      expected.append(pixels.reshape(4, 5, -1))
      labels.append(label)
  return np.stack(expected), np.array(labels)


@pytest.mark.parametrize('grey', [True, False])
def test_image_folder_round_trip(tmp_path, grey):
  expected, expected_labels = _write_image_folder(tmp_path, 'train', grey)
  images, labels, class_names = images_lib.load_image_folder(tmp_path, 'train')
  assert class_names == ['cat', 'dog']
  np.testing.assert_array_equal(images, expected)
  np.testing.assert_array_equal(labels, expected_labels)
  images, labels = images_lib.load('custom', 'train', tmp_path)
  np.testing.assert_array_equal(images, expected)


def test_image_folder_bad_image_names_file(tmp_path):
  _write_image_folder(tmp_path, 'train', grey=True)
  (tmp_path / 'train' / 'dog' / 'broken.png').write_bytes(b'not a png')
  with pytest.raises(ValueError, match='broken.png'):
    images_lib.load_image_folder(tmp_path, 'train')


def test_missing_path_names_path_and_fix(tmp_path):
  missing = tmp_path / 'no_such_mnist'
  with pytest.raises(FileNotFoundError) as info:
    images_lib.load('mnist', 'train', missing)
  assert str(missing) in str(info.value)
  assert 'config.data.path' in str(info.value) and 'FLOWDISTILL_MNIST_DIR' in str(info.value)


def test_unrecognised_folder_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    images_lib.load('mnist', 'train', tmp_path)


def test_bad_split_raises():
  with pytest.raises(ValueError, match='split'):
    images_lib.load('digits', 'validation')


# --- Built-in digits and tfds ------------------------------------------------------------


def test_digits():
  train_images, train_labels = images_lib.load('digits', 'train')
  test_images, test_labels = images_lib.load_digits('test')
  assert train_images.shape == (1500, 8, 8, 1) and test_images.shape == (297, 8, 8, 1)
  assert train_images.dtype == np.uint8 and train_labels.dtype == np.int32
  assert train_images.min() == 0 and train_images.max() == 255
  assert set(train_labels.tolist()) == set(range(10)) == set(test_labels.tolist())
  np.testing.assert_array_equal(images_lib.load_digits('test')[0], test_images)


def test_import_does_not_load_tensorflow():
  code = ('import sys; import flowdistill.data.images, flowdistill.data.pipeline; '
          'assert "tensorflow_datasets" not in sys.modules and "tensorflow" not in sys.modules')
  subprocess.run([sys.executable, '-c', code], check=True)


def test_tfds_not_prepared_raises_clear_error(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  with pytest.raises(FileNotFoundError, match='tfds build mnist --file_format=array_record'):
    images_lib.load('mnist', 'train', data_dir=tmp_path)


def test_tfds_array_record_round_trip(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  pixels = _random_images((5, 4, 4, 1))
  pngs = []
  for p in pixels:
    buffer = tmp_path / 'tmp.png'
    Image.fromarray(p[..., 0]).save(buffer)
    pngs.append(buffer.read_bytes())

  class TinyDigits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(4, 4, 1)),
          'label': tfds.features.ClassLabel(num_classes=5)}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for i, png in enumerate(pngs):
        yield i, {'image': png, 'label': i}

  TinyDigits(data_dir=tmp_path, file_format='array_record').download_and_prepare()
  images, labels = images_lib.load_tfds('tiny_digits', 'train', tmp_path)
  assert images.dtype == np.uint8 and labels.dtype == np.int32
  np.testing.assert_array_equal(images, pixels[labels])  # tfds stores records shuffled


# --- Pixel conversions --------------------------------------------------------------------


def test_to_float_to_uint8_round_trip():
  pixels = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
  x = images_lib.to_float(pixels)
  assert x.dtype == np.float32 and x.min() == -1.0 and x.max() == 1.0
  np.testing.assert_array_equal(images_lib.to_uint8(x), pixels)
  np.testing.assert_array_equal(images_lib.to_uint8(np.array([-3.0, 0.0, 2.0])), [0, 128, 255])


# --- Batch iterator -----------------------------------------------------------------------


def _arrays(n=50):
  return {'x': np.arange(n * 3, dtype=np.float32).reshape(n, 3), 'label': np.arange(n)}


def test_iterator_same_seed_and_step_same_batch():
  a = pipeline.BatchIterator(_arrays(), 8, seed=3)
  b = pipeline.BatchIterator(_arrays(), 8, seed=3, start_step=17)
  first = [next(a) for _ in range(18)][-1]
  np.testing.assert_array_equal(first['x'], next(b)['x'])
  np.testing.assert_array_equal(first['label'], a.batch(17)['label'])
  other = pipeline.BatchIterator(_arrays(), 8, seed=4, start_step=17)
  assert not np.array_equal(first['label'], next(other)['label'])


def test_iterator_resume_reproduces_sequence():
  full = pipeline.BatchIterator(_arrays(), 8, seed=1)
  uninterrupted = [next(full)['label'] for _ in range(20)]
  head = pipeline.BatchIterator(_arrays(), 8, seed=1)
  labels = [next(head)['label'] for _ in range(9)]
  state = head.state()
  assert state == {'step': 9}
  resumed = pipeline.BatchIterator(_arrays(), 8, seed=1, start_step=state['step'])
  labels += [batch['label'] for _, batch in zip(range(11), resumed)]
  np.testing.assert_array_equal(np.stack(labels), np.stack(uninterrupted))


def test_iterator_epoch_covers_each_example_once():
  it = pipeline.BatchIterator(_arrays(48), 8, seed=0)
  assert it.steps_per_epoch == 6
  epochs = [np.concatenate([next(it)['label'] for _ in range(6)]) for _ in range(2)]
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(48))
  assert not np.array_equal(epochs[0], epochs[1])


def test_iterator_drops_remainder():
  it = pipeline.BatchIterator(_arrays(50), 8, seed=0)
  assert it.steps_per_epoch == 6
  epoch = np.concatenate([next(it)['label'] for _ in range(6)])
  assert len(np.unique(epoch)) == 48
  for epoch in range(2):  # the documented order: default_rng([seed, epoch]).permutation(N)
    order = np.random.default_rng([0, epoch]).permutation(50)
    np.testing.assert_array_equal(it.batch(6 * epoch + 1)['label'], order[8:16])


def test_iterator_rows_stay_aligned():
  batch = pipeline.BatchIterator(_arrays(), 8, seed=5).batch(3)
  np.testing.assert_array_equal(batch['x'][:, 0], 3 * batch['label'])


def test_iterator_processes_union_equals_global_batch():
  single = pipeline.BatchIterator(_arrays(), 16, seed=2)
  parts = [pipeline.BatchIterator(_arrays(), 16, seed=2, process_index=p, process_count=4)
           for p in range(4)]
  for _ in range(7):  # crosses an epoch boundary (3 steps per epoch)
    expected = next(single)
    local = [next(part) for part in parts]
    assert all(batch['x'].shape == (4, 3) for batch in local)
    for name in expected:
      np.testing.assert_array_equal(np.concatenate([b[name] for b in local]), expected[name])


@pytest.mark.parametrize('kwargs, message', [
    ({'global_batch_size': 10, 'process_count': 4}, 'multiple of process_count'),
    ({'global_batch_size': 64}, 'exceeds the 50 examples'),
    ({'global_batch_size': 0}, 'positive'),
    ({'global_batch_size': 8, 'process_index': 2, 'process_count': 2}, 'process_index'),
    ({'global_batch_size': 8, 'start_step': -1}, 'non-negative'),
])
def test_iterator_validation(kwargs, message):
  with pytest.raises(ValueError, match=message):
    pipeline.BatchIterator(_arrays(), **kwargs)


def test_iterator_mismatched_arrays():
  with pytest.raises(ValueError, match='same leading dimension'):
    pipeline.BatchIterator({'x': np.zeros((5, 2)), 'label': np.zeros(4)}, 2)
