"""ConvNet-D, the fixed evaluator network of the dataset-distillation protocol (DC/DSA/DM).

Each of `depth` blocks is conv 3x3 (`width` channels) -> norm -> ReLU -> avg-pool 2x2, then one
linear head on the flattened features. Grey images get 3 pixels of padding on the first conv,
so a 28x28 digit is seen at 32x32 as in the reference code, and the default ConvNet-3 has a
128 * 4 * 4 = 2048-dimensional feature vector on MNIST and CIFAR-10 alike.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

NORMS = ('instance', 'batch', 'none')


def feature_hw(image_shape: Sequence[int], depth: int) -> tuple[int, int]:
  """Spatial size (H, W) of the features of a depth-`depth` ConvNet on `image_shape`."""
  height, width, channels = image_shape
  pad = 3 if channels == 1 else 1
  height, width = height + 2 * pad - 2, width + 2 * pad - 2
  return height // 2 ** depth, width // 2 ** depth


def torch_uniform(fan_in: int):
  """PyTorch's default init of conv and linear weights and biases: U(±1 / sqrt(fan_in)).
  The protocol's published figures were trained from it."""
  bound = fan_in ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                  bound)


class Conv3x3(nnx.Module):
  """3x3 convolution (stride 1, zero padding `pad`) as one matrix product of image patches.

  Same parameters as `nnx.Conv(in_ch, out_ch, (3, 3))` (kernel [3, 3, in, out], bias [out]).
  On XLA:CPU the patch product trains ConvNet-3 2.0-2.4x faster than `lax.conv` (batch 100 and
  256, 2 cores); see benchmarks/RESULTS.md.
  """

  def __init__(self, in_ch: int, out_ch: int, *, pad: int, rngs: nnx.Rngs):
    init = torch_uniform(9 * in_ch)
    self.kernel = nnx.Param(init(rngs.params(), (3, 3, in_ch, out_ch)))
    self.bias = nnx.Param(init(rngs.params(), (out_ch,)))
    self.pad = pad

  def patches(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, in] -> 3x3 patches [B, H + 2 pad - 2, W + 2 pad - 2, 9 in]."""
    p = self.pad
    x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    height, width = x.shape[1] - 2, x.shape[2] - 2
    return jnp.concatenate([x[:, i:i + height, j:j + width] for i in range(3)
                            for j in range(3)], axis=-1)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, in] -> [B, H + 2 pad - 2, W + 2 pad - 2, out]."""
    kernel = self.kernel[...]
    return self.patches(x) @ kernel.reshape(-1, kernel.shape[-1]) + self.bias[...]

  def direct(self, x: jax.Array) -> jax.Array:
    """The same convolution by `lax.conv`: faster without a backward pass (inference)."""
    p = self.pad
    return jax.lax.conv_general_dilated(x, self.kernel[...], (1, 1), [(p, p), (p, p)],
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + \
        self.bias[...]

  def instance_normalised(self, x: jax.Array, norm: 'InstanceNorm') -> jax.Array:
    """`norm(self(x))` without a pass over the wide output for its statistics.

    A channel's output is a linear map of the patches, so its per-sample mean and variance
    over positions are `w·mean(P) + bias` and `wᵀ Cov(P) w`, from the [9 in, 9 in] patch
    covariance; the normalisation then folds into per-sample weights. The same function as
    conv -> instance norm (the conv bias cancels). The first block's [B, 32, 32, 128] output is
    memory-bound on a CPU; this makes the ConvNet-3 training step 1.9x faster at batch 10 and
    1.1x at 100 (benchmarks/RESULTS.md). Cheap only for few input channels.
    """
    patches = self.patches(x)
    b, height, width, k = patches.shape
    flat = patches.reshape(b, height * width, k)
    centred = flat - flat.mean(1, keepdims=True)
    cov = jnp.einsum('bpk,bpl->bkl', centred, centred) / (height * width)
    kernel = self.kernel[...].reshape(k, -1)
    var = jnp.einsum('kc,bkl,lc->bc', kernel, cov, kernel)
    factor = jax.lax.rsqrt(var + norm.epsilon) * norm.scale[...]
    out = jnp.einsum('bpk,bkc->bpc', centred, kernel[None] * factor[:, None]) + norm.bias[...]
    return out.reshape(b, height, width, -1)


class InstanceNorm(nnx.Module):
  """Per-sample, per-channel normalisation over H and W with a learned affine: GroupNorm with
  one group per channel, written out (about 10 % faster than `nnx.GroupNorm` in ConvNet-3)."""

  def __init__(self, channels: int, *, epsilon: float = 1e-5):
    self.scale = nnx.Param(jnp.ones((channels,)))
    self.bias = nnx.Param(jnp.zeros((channels,)))
    self.epsilon = epsilon

  def __call__(self, x: jax.Array, *, affine: bool = True) -> jax.Array:
    """x: [B, H, W, C] -> zero mean, unit variance per (sample, channel), then the affine."""
    mean = x.mean((1, 2), keepdims=True)
    inv_std = jax.lax.rsqrt(jnp.square(x - mean).mean((1, 2), keepdims=True) + self.epsilon)
    if not affine:
      return (x - mean) * inv_std
    # Folding the scale into the [B, 1, 1, C] factor saves one pass over the activations.
    return (x - mean) * (inv_std * self.scale[...]) + self.bias[...]


class ConvNet(nnx.Module):
  """ConvNet-D classifier.

  Args:
    image_shape: (H, W, C) of the input images.
    num_classes: number of logits.
    width: channels of every conv.
    depth: number of conv-norm-ReLU-pool blocks.
    norm: 'instance' (GroupNorm with one group per channel, eps 1e-5, affine), 'batch' or
      'none'.
  """

  def __init__(self, image_shape: Sequence[int], num_classes: int, *, width: int = 128,
               depth: int = 3, norm: str = 'instance', rngs: nnx.Rngs):
    if norm not in NORMS:
      raise ValueError(f'ConvNet norm must be one of {NORMS}; got {norm!r}.')
    if depth < 1 or min(feature_hw(image_shape, depth)) < 1:
      fits = max((d for d in range(1, 16) if min(feature_hw(image_shape, d)) >= 1), default=0)
      raise ValueError(f'ConvNet depth {depth} halves images of shape {tuple(image_shape)} '
                       f'below 1x1 pixel; the largest depth that fits is {fits}.')
    self.image_shape = tuple(image_shape)
    self.norm = norm
    first_pad = 3 if image_shape[2] == 1 else 1
    self.convs = nnx.List([
        Conv3x3(image_shape[2] if d == 0 else width, width, pad=first_pad if d == 0 else 1,
                rngs=rngs)
        for d in range(depth)])
    if norm == 'instance':
      self.norms = nnx.List([InstanceNorm(width) for _ in range(depth)])
    elif norm == 'batch':
      self.norms = nnx.List([nnx.BatchNorm(width, momentum=0.9, epsilon=1e-5, rngs=rngs)
                             for _ in range(depth)])
    else:
      self.norms = nnx.List([])
    height, width_px = feature_hw(image_shape, depth)
    self.feature_dim = height * width_px * width
    init = torch_uniform(self.feature_dim)
    self.head = nnx.Linear(self.feature_dim, num_classes, kernel_init=init, bias_init=init,
                           rngs=rngs)

  def _block(self, i: int, h: jax.Array, *, train: bool, inference: bool) -> jax.Array:
    conv = self.convs[i]
    if self.norm == 'instance' and i == 0 and not inference:
      h = conv.instance_normalised(h, self.norms[0])
    else:
      h = conv.direct(h) if inference else conv(h)
      if self.norm == 'batch':
        h = self.norms[i](h, use_running_average=not train)
      elif self.norm == 'instance':
        h = self.norms[i](h)
    return nnx.avg_pool(nnx.relu(h), (2, 2), strides=(2, 2))

  def features(self, x: jax.Array, *, train: bool = False,
               inference: bool = False) -> jax.Array:
    """Images [B, H, W, C] -> flattened features [B, feature_dim] (the input of the head).

    `train` only matters for batch norm (batch statistics, running averages updated).
    `inference=True` computes the same function with `lax.conv`, which is faster when nothing
    is differentiated (testing); the default patch products are faster to train.
    """
    if x.shape[1:] != self.image_shape:
      raise ValueError(f'ConvNet was built for images of shape {self.image_shape} (H, W, C); '
                       f'got input of shape {x.shape} (expected [B, H, W, C]).')
    h = x
    for i in range(len(self.convs)):
      h = self._block(i, h, train=train, inference=inference)
    return h.reshape(h.shape[0], -1)

  def __call__(self, x: jax.Array, *, train: bool = False, inference: bool = False) -> jax.Array:
    """Images [B, H, W, C] -> logits [B, num_classes]."""
    return self.head(self.features(x, train=train, inference=inference))
