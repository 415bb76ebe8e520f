"""A small convolutional encoder: the frozen self-supervised backbone φ of SFM.

Images [B, H, W, C] pass conv 3x3 → GroupNorm → ReLU stages (the first at full resolution, each
later one with stride 2), then a global average pool: features [B, widths[-1]] (D = 256 with the
default widths). Any image size works; `lax.conv` via `nnx.Conv`.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class ConvEncoder(nnx.Module):
  """Args: in_channels; widths: channels of each stage (the last is the feature dimension D)."""

  def __init__(self, in_channels: int, *, widths: Sequence[int] = (32, 64, 128, 256),
               rngs: nnx.Rngs):
    chans = [in_channels] + list(widths)
    self.convs = nnx.List([
        nnx.Conv(a, b, (3, 3), strides=1 if i == 0 else 2, padding='SAME', rngs=rngs)
        for i, (a, b) in enumerate(zip(chans[:-1], chans[1:]))])
    self.norms = nnx.List([nnx.GroupNorm(b, num_groups=math.gcd(8, b), rngs=rngs) for b in widths])
    self.feature_dim = widths[-1]

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] -> features [B, D]."""
    for conv, norm in zip(self.convs, self.norms):
      x = jax.nn.relu(norm(conv(x)))
    return jnp.mean(x, axis=(1, 2))


class ProjectionHead(nnx.Module):
  """SimCLR's MLP g: D -> D -> out (ReLU between); dropped after pre-training."""

  def __init__(self, feature_dim: int, out_dim: int = 128, *, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(feature_dim, feature_dim, rngs=rngs)
    self.out = nnx.Linear(feature_dim, out_dim, rngs=rngs)

  def __call__(self, h: jax.Array) -> jax.Array:
    return self.out(jax.nn.relu(self.hidden(h)))
