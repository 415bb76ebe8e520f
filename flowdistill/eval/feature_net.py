"""The small classifier whose features define the image Fréchet distance, trained once and
cached on disk (no Inception weights can be downloaded)."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from flowdistill import files
from flowdistill.cache import cache_root, data_fingerprint, load_or_build
from flowdistill.eval.classifier import accuracy, train_classifier
from flowdistill.models.classifier import Classifier


class FeatureNet:
  """A trained classifier with batched, jitted `features(x)` and `predict(x)`.

  Attributes:
    test_accuracy: accuracy on the held-out split it was checked on.
  """

  def __init__(self, classifier: Classifier, test_accuracy: float):
    graphdef, state = nnx.split(classifier)
    self._params = nnx.to_pure_dict(state)
    self.test_accuracy = test_accuracy
    self._features = jax.jit(lambda p, x: nnx.merge(graphdef, p).features(x))
    self._logits = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))

  def _batched(self, fn, x, chunk=1000):
    return np.concatenate([np.asarray(fn(self._params, jnp.asarray(x[i:i + chunk])))
                           for i in range(0, len(x), chunk)])

  def features(self, x):
    """Images [N, H, W, C] in [-1, 1] -> features [N, F]."""
    return self._batched(self._features, x)

  def predict(self, x):
    """Images [N, H, W, C] -> predicted labels [N]."""
    return self._batched(self._logits, x).argmax(-1)


def _stages(hw) -> tuple[int, ...]:
  """Conv widths: two halving stages (32, 64), fewer where H or W does not halve twice (the
  2x2 latents of 8x8 digits)."""
  channels = (32, 64)
  while any(n % 2 ** len(channels) for n in hw):
    channels = channels[:-1]
  return channels


def load_or_train(train: dict, test: dict, *, steps: int, seed: int = 0,
                  cache_dir: str | None = None) -> FeatureNet:
  """The feature network for this data set: read from the cache, or trained and cached.

  Args:
    train, test: {'x': float images [N, H, W, C], 'label': int [N]}.
    steps: Adam steps when training.
    cache_dir: defaults to `cache_root()/feature_nets/<fingerprint of the data>`.
  """
  num_classes = int(train['label'].max()) + 1
  channels = _stages(train['x'].shape[1:3])
  folder = cache_dir or files.join(cache_root(), 'feature_nets',
                                   data_fingerprint(train['x'], train['label'], str(steps)))
  template = Classifier(train['x'].shape[1:], num_classes, channels=channels, rngs=nnx.Rngs(0))

  def load(folder):
    graphdef, state = nnx.split(template)
    params = ocp.StandardCheckpointer().restore(files.join(folder, 'params'),
                                                nnx.to_pure_dict(state))
    info = files.read_json(files.join(folder, 'info.json'))
    return FeatureNet(nnx.merge(graphdef, params), info['test_accuracy'])

  def build(folder):
    classifier, _ = train_classifier(train['x'], train['label'], jax.random.key(seed),
                                     steps=steps, num_classes=num_classes, channels=channels)
    acc = accuracy(classifier, test['x'], test['label'])
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(files.join(folder, 'params'),
                      nnx.to_pure_dict(nnx.split(classifier)[1]))
    checkpointer.wait_until_finished()
    files.write_json(files.join(folder, 'info.json'), {'test_accuracy': acc, 'steps': steps})
    return FeatureNet(classifier, acc)

  return load_or_build(folder, build, load, describe='feature network')
