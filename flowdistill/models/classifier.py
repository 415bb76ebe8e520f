"""Small CNN classifier: a judge of generated images (accuracy, Fréchet distance of features)."""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


class Classifier(nnx.Module):
  """Conv-SiLU-maxpool stages, then a dense feature layer and a linear head; no BatchNorm.

  Args:
    image_shape: (H, W, C); H and W must be divisible by `2**len(channels)` (28, 32 and 8
      with two stages).
    num_classes: number of output logits.
    channels: width of each conv stage (each halves the resolution).
    feature_dim: width of the penultimate layer returned by `features`.
  """

  def __init__(self, image_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10, *,
               channels: Sequence[int] = (32, 64), feature_dim: int = 128, rngs: nnx.Rngs):
    height, width, in_ch = image_shape
    factor = 2 ** len(channels)
    if height % factor or width % factor:
      raise ValueError(
          f'Classifier with {len(channels)} stages halves the image {len(channels)} times, so H '
          f'and W must be divisible by {factor}; got image_shape={tuple(image_shape)}. Use fewer '
          'stages in `channels` or pad the images.')
    self.image_shape = tuple(image_shape)
    widths = [in_ch] + list(channels)
    self.convs = nnx.List(
        [nnx.Conv(a, b, (3, 3), rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
    flat = (height // factor) * (width // factor) * channels[-1]
    self.hidden = nnx.Linear(flat, feature_dim, rngs=rngs)
    self.head = nnx.Linear(feature_dim, num_classes, rngs=rngs)

  def features(self, x):
    """x: [B, H, W, C] -> penultimate activations [B, feature_dim]."""
    if x.shape[1:] != self.image_shape:
      raise ValueError(f'Classifier was built for images of shape {self.image_shape} (H, W, C); '
                       f'got input of shape {x.shape} (expected [B, H, W, C]).')
    h = x
    for conv in self.convs:
      h = nnx.max_pool(nnx.silu(conv(h)), (2, 2), strides=(2, 2))
    return nnx.silu(self.hidden(h.reshape(h.shape[0], -1)))

  def __call__(self, x):
    """x: [B, H, W, C] -> logits [B, num_classes]."""
    return self.head(self.features(x))


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

  def loss_fn(params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)

  @jax.jit
  def step(params, opt_state, images, labels, i):
    idx = jax.random.randint(jax.random.fold_in(data_key, i), (batch_size,), 0, images.shape[0])
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images[idx], labels[idx])
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, acc

  opt_state = opt.init(params)
  losses, accs = [], []
  for i in range(steps):
    params, opt_state, loss, acc = step(params, opt_state, images, labels, jnp.int32(i))
    losses.append(loss)
    accs.append(acc)
  metrics = {'loss': np.asarray(jnp.stack(losses)), 'accuracy': np.asarray(jnp.stack(accs))}
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
