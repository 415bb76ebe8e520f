"""Synthetic sets and test splits the dataset-distillation evaluator would score wrongly are
refused with `BadInput` naming the fix, before any training and before any file is written."""

import os

import jax
import numpy as np
import pytest

from flowdistill.condense import protocol, synset_eval
from flowdistill.errors import BadInput
from flowdistill.experiments import dd_eval_run, method_config

SHAPE = (8, 8, 1)
LABEL = np.array([0, 1, 0, 1])


def _images(low=-1.0, high=1.0, shape=SHAPE, n=4):
  return np.random.default_rng(0).uniform(low, high, (n, *shape)).astype(np.float32)


def _split():
  data = {'x': _images(), 'label': LABEL}
  return synset_eval.test_split(data, data)


def _listing(folder):
  return sorted(os.path.relpath(os.path.join(root, name), folder)
                for root, dirs, names in os.walk(folder) for name in dirs + names)


@pytest.fixture
def no_training(monkeypatch):
  """Fails the test if a set reaches the evaluator's training."""
  def train(*args, **kwargs):
    raise AssertionError('the set was trained on before it was checked')
  monkeypatch.setattr(synset_eval, 'train_networks', train)


BAD_SETS = [
    ('zero-one-floats', _images(0, 1), LABEL,
     r'look like \[0, 1\] images: map them with x \* 2 - 1'),
    ('uint8', (_images(0, 1) * 255).astype(np.uint8), LABEL,
     r'Synthetic images are uint8; .* x / 127\.5 - 1'),
    ('0-255-floats', _images(0, 255), LABEL, r'library range is \[-1, 1\]: map 0\.\.255 pixels '
     r'with x / 127\.5 - 1'),
    ('beyond-range', _images(-1.5, 1), LABEL, r'pixels span \[-1\.\d+, .*: clip or rescale them'),
    ('negative-label', _images(), np.array([0, 1, -1, 1]),
     r'Synthetic label -1 is negative; class indices start at 0'),
    ('float-labels', _images(), LABEL.astype(np.float32),
     r'labels are float32; .* labels\.astype\(np\.int32\)'),
    ('one-hot-labels', _images(), np.eye(2, dtype=np.int32)[LABEL],
     r'labels have shape \(4, 2\) and look one-hot; .*labels\.argmax\(-1\)'),
    ('label-count', _images(), LABEL[:3], r'labels have shape \(3,\); the 4 images need'),
    ('label-out-of-range', _images(), np.array([0, 1, 2, 1]),
     r'Synthetic label 2 is out of range \[0, 2\)'),
    ('channels-first', np.moveaxis(_images(), -1, 1), LABEL,
     r'shape \(4, 1, 8, 8\); .* looks channels-first: transpose to \[N, H, W, C\]'),
]
IDS = [case[0] for case in BAD_SETS]


@pytest.mark.parametrize('name, x, label, message', BAD_SETS, ids=IDS)
def test_score_refuses_a_bad_set_before_writing_or_training(tmp_path, no_training, name, x,
                                                            label, message):
  before = _listing(tmp_path)
  proto = synset_eval.Protocol(runs=1, epochs=1, width=8, depth=1, dsa=False)
  with pytest.raises(BadInput, match=message):
    protocol.score(name, 2, [{'x': x, 'label': label}], _split(), proto, jax.random.key(0),
                   str(tmp_path))
  assert _listing(tmp_path) == before


@pytest.mark.parametrize('name, x, label, message',
                         [c for c in BAD_SETS if c[0] != 'label-out-of-range'],
                         ids=[i for i in IDS if i != 'label-out-of-range'])
def test_saving_and_loading_refuse_a_bad_set(tmp_path, name, x, label, message):
  before = _listing(tmp_path)
  with pytest.raises(BadInput, match=message):
    protocol.save_set(str(tmp_path / name), {'x': x, 'label': label}, 2, 2)
  assert _listing(tmp_path) == before
  path = str(tmp_path / f'{name}.npz')
  np.savez(path, x=x, label=label)
  with pytest.raises(BadInput, match=f'{name}.npz: .*' + message):
    protocol.load_synset(path)


def test_evaluate_synset_refuses_a_bad_set_before_training(no_training):
  with pytest.raises(BadInput, match=r'x \* 2 - 1'):
    synset_eval.evaluate_synset(_images(0, 1), LABEL, _split(), jax.random.key(0),
                                synset_eval.Protocol(runs=1))


def test_a_valid_set_passes_and_is_saved_and_loaded(tmp_path):
  x = _images()
  synset_eval.check_synset(x, LABEL, SHAPE, 2)
  protocol.save_set(str(tmp_path / 'set'), {'x': x, 'label': LABEL}, 2, 2)
  assert _listing(tmp_path) == ['set.npz', 'set.png']
  loaded = protocol.load_synset(str(tmp_path / 'set.npz'))
  np.testing.assert_array_equal(loaded['x'], x)
  np.testing.assert_array_equal(loaded['label'], LABEL)


def test_a_clipped_set_within_rounding_of_the_range_passes():
  x = _images()
  x[0, 0, 0, 0], x[1, 0, 0, 0] = -1.001, 1.001
  synset_eval.check_synset(x, LABEL, SHAPE, 2)


@pytest.mark.parametrize('convert, message', [
    (lambda x: ((x + 1) * 127.5).astype(np.uint8), r'Test images are uint8; .* x / 127\.5 - 1'),
    (lambda x: (x + 1) / 2, r'Test pixels span .* look like \[0, 1\] images: .* x \* 2 - 1'),
    (lambda x: (x + 1) * 127.5, r'Test pixels span .* map 0\.\.255 pixels with x / 127\.5 - 1'),
])
def test_a_test_split_of_unconverted_images_is_refused(convert, message):
  train = {'x': _images(), 'label': LABEL}
  test = dict(train, x=convert(train['x']))
  with pytest.raises(BadInput, match=message):
    synset_eval.test_split(train, test)
  with pytest.raises(BadInput, match=message):
    synset_eval.TestSplit(test['x'], LABEL, np.zeros(1), np.ones(1))
  with pytest.raises(BadInput, match=message.replace('Test', 'Validation')):
    synset_eval.test_split(train, train, test)
  with pytest.raises(BadInput, match=message.replace('Test', 'Train')):
    synset_eval.test_split(test, train)


def test_a_test_split_of_float_labels_is_refused():
  data = {'x': _images(), 'label': LABEL.astype(np.float32)}
  with pytest.raises(BadInput, match=r'Test labels are float32'):
    synset_eval.test_split(dict(data, label=LABEL), data)


@pytest.mark.parametrize('content, message', [
    (b'not an npz', 'cannot be read as an .npz of arrays'),
    ('channels-first', r'looks channels-first: transpose to \[N, H, W, C\]')])
def test_dd_eval_refuses_a_bad_set_file_before_the_workdir_exists(tmp_path, content, message):
  path = tmp_path / 'set.npz'
  if isinstance(content, bytes):
    path.write_bytes(content)
  else:
    np.savez(path, x=np.zeros((10, 1, 8, 8), np.float32) - 1, label=np.arange(10))
  config = method_config('dd_eval')
  config.dd_eval.synsets = (str(path),)
  with pytest.raises(BadInput, match=message):
    dd_eval_run.validate(config)
  assert os.listdir(tmp_path) == ['set.npz']
