"""Small CNN classifier: a judge of generated images (accuracy, Fréchet distance of features)."""

from collections.abc import Sequence

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
