"""Classifier: shapes, and that training separates a simple synthetic image set."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flowdistill.eval.classifier import accuracy, train_classifier
from flowdistill.models import Classifier


def _patches(n, seed):
  """8x8 noise images; class 0 has a bright 3x3 patch top-left, class 1 bottom-right."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, n)
  images = 0.3 * rng.standard_normal((n, 8, 8, 1)).astype(np.float32)
  images[labels == 0, 1:4, 1:4] += 1.0
  images[labels == 1, 4:7, 4:7] += 1.0
  return images, labels


@pytest.mark.parametrize('image_shape', [(28, 28, 1), (32, 32, 3), (8, 8, 1)])
def test_logits_and_features_shapes(image_shape):
  model = Classifier(image_shape, 10, feature_dim=48, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (3, *image_shape))
  assert model(x).shape == (3, 10)
  feats = model.features(x)
  assert feats.shape == (3, 48) and feats.dtype == jnp.float32


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match='divisible by 4'):
    Classifier((30, 30, 1), rngs=nnx.Rngs(0))
  model = Classifier((28, 28, 1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'\(28, 28, 1\)'):
    model(jnp.zeros((2, 32, 32, 1)))


def test_learns_bright_patch_location():
  images, labels = _patches(512, seed=0)
  model, metrics = train_classifier(images, labels, jax.random.key(0), steps=40, batch_size=32,
                                    lr=3e-3, channels=(8, 16), feature_dim=32)
  assert metrics['loss'].shape == metrics['accuracy'].shape == (40,)
  assert metrics['loss'][-10:].mean() < metrics['loss'][:10].mean()
  test_images, test_labels = _patches(300, seed=1)
  assert accuracy(model, test_images, test_labels, batch_size=128) > 0.95
  assert model(jnp.asarray(test_images[:4])).shape == (4, 2)
