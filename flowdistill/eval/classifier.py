"""Training and scoring the `Classifier` network: the judge of generated images (feature
network of the Fréchet distance), and the protocol that evaluates distilled data sets."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flowdistill import fitting
from flowdistill.models.classifier import Classifier


def train_classifier(images, labels, key, *, steps: int = 2000, batch_size: int = 128,
                     lr: float = 1e-3, num_classes: int | None = None,
                     channels: Sequence[int] = (32, 64), feature_dim: int = 128):
  """Trains a `Classifier` with Adam on random minibatches (drawn with replacement).

  Args:
    images: [N, H, W, C] float images, in the range the classifier will later be shown.
    labels: int [N] in [0, num_classes).
    key: jax.random key (initialisation and minibatches).
    steps: number of Adam steps.
    batch_size: minibatch size.
    lr: Adam learning rate.
    num_classes: number of classes; `max(labels) + 1` if None.
    channels, feature_dim: architecture, as in `Classifier`.

  Returns:
    (classifier, metrics): the trained module, and numpy arrays `loss` and `accuracy` [steps]
    of each minibatch.
  """
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  if images.ndim != 4 or labels.shape != images.shape[:1]:
    raise ValueError(f'Expected images [N, H, W, C] and labels [N]; got {images.shape} and '
                     f'{labels.shape}.')
  num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
  init_key, data_key = jax.random.split(key)
  graphdef, state = nnx.split(Classifier(images.shape[1:], num_classes, channels=channels,
                                         feature_dim=feature_dim, rngs=nnx.Rngs(init_key)))
  params = nnx.to_pure_dict(state)
  opt = optax.adam(lr)

  def loss_fn(params, i, images, labels):
    idx, _ = fitting.random_batch(data_key, i, batch_size, images.shape[0])
    logits, y = nnx.merge(graphdef, params)(images[idx]), labels[idx]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, {'accuracy': jnp.mean(jnp.argmax(logits, -1) == y)}

  # One dispatch per step: the same step under a `lax.scan` over the steps, with the training
  # set as an argument, took 117 s for 20 steps of MNIST on this CPU (cause not yet found).
  params, metrics = fitting.fit(fitting.make_update(loss_fn, opt, has_aux=True), params,
                                opt.init(params), steps=steps, args=(images, labels))
  return nnx.merge(graphdef, params), metrics


def accuracy(classifier: Classifier, images, labels, *, batch_size: int = 500) -> float:
  """Fraction of `images` [N, H, W, C] that `classifier` assigns their `labels` int [N]."""
  graphdef, state = nnx.split(classifier)

  @jax.jit
  def predict(params, images):
    logits = jax.lax.map(lambda x: nnx.merge(graphdef, params)(x[None])[0], images,
                         batch_size=batch_size)
    return jnp.argmax(logits, -1)

  pred = predict(nnx.to_pure_dict(state), jnp.asarray(images, jnp.float32))
  return float(jnp.mean(pred == jnp.asarray(labels)))
