"""U-Net velocity / flow-map network for small images (28x28, 32x32)."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flowdistill.models.embedding import LabelEmbedding, TimeEmbedding, embed_conditions


class ResBlock(nnx.Module):
  """GroupNorm-SiLU-conv twice, with the embedding as a scale-shift (FiLM) on the second norm."""

  def __init__(self, in_ch: int, out_ch: int, emb_dim: int, *, groups: int, dtype,
               rngs: nnx.Rngs):
    self.norm1 = nnx.GroupNorm(in_ch, num_groups=groups, dtype=dtype, rngs=rngs)
    self.conv1 = nnx.Conv(in_ch, out_ch, (3, 3), dtype=dtype, rngs=rngs)
    self.film = nnx.Linear(emb_dim, 2 * out_ch, dtype=dtype, rngs=rngs)
    self.norm2 = nnx.GroupNorm(out_ch, num_groups=groups, dtype=dtype, rngs=rngs)
    self.conv2 = nnx.Conv(out_ch, out_ch, (3, 3), dtype=dtype, rngs=rngs)
    self.skip = nnx.Conv(in_ch, out_ch, (1, 1), dtype=dtype, rngs=rngs) if in_ch != out_ch else None

  def __call__(self, x, emb):
    """x: [B, H, W, in_ch]; emb: [B, emb_dim] -> [B, H, W, out_ch]."""
    h = self.conv1(nnx.silu(self.norm1(x)))
    scale, shift = jnp.split(self.film(nnx.silu(emb))[:, None, None, :], 2, axis=-1)
    h = self.conv2(nnx.silu(self.norm2(h) * (1 + scale) + shift))
    return h + (x if self.skip is None else self.skip(x))


class SelfAttention(nnx.Module):
  """Multi-head self-attention over the H * W positions, with a residual connection."""

  def __init__(self, ch: int, *, heads: int, groups: int, dtype, rngs: nnx.Rngs):
    self.heads = heads
    self.norm = nnx.GroupNorm(ch, num_groups=groups, dtype=dtype, rngs=rngs)
    self.qkv = nnx.Linear(ch, 3 * ch, dtype=dtype, rngs=rngs)
    self.out = nnx.Linear(ch, ch, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    """x: [B, H, W, C] -> [B, H, W, C]."""
    b, h, w, c = x.shape
    qkv = self.qkv(self.norm(x)).reshape(b, h * w, 3, self.heads, c // self.heads)
    y = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    return x + self.out(y.reshape(b, h, w, c))


class Block(nnx.Module):
  """A residual block, optionally followed by self-attention."""

  def __init__(self, in_ch: int, out_ch: int, emb_dim: int, *, attention: bool, heads: int,
               groups: int, dtype, rngs: nnx.Rngs):
    self.res = ResBlock(in_ch, out_ch, emb_dim, groups=groups, dtype=dtype, rngs=rngs)
    self.attn = (SelfAttention(out_ch, heads=heads, groups=groups, dtype=dtype, rngs=rngs)
                 if attention else None)

  def __call__(self, x, emb):
    """x: [B, H, W, in_ch]; emb: [B, emb_dim] -> [B, H, W, out_ch]."""
    h = self.res(x, emb)
    return h if self.attn is None else self.attn(h)


class UNet(nnx.Module):
  """`f(x, t[, s][, cond])` for images, channels last.

  Level `i` works at resolution `H / 2**i` with `channels[i]` channels; `H` and `W` must be
  divisible by `2**(len(channels) - 1)` (28 -> 14 -> 7 and 32 -> 16 -> 8 with three levels).
  The final convolution is zero-initialised, so a fresh model outputs exactly 0.

  Args:
    image_shape: (H, W, C) of the inputs and outputs.
    channels: width of each resolution level, highest resolution first.
    num_res_blocks: residual blocks per level on the way down (one more on the way up).
    attention_levels: levels (indices into `channels`, negative counts from the lowest) that
      get self-attention after each residual block; the middle block has attention when the
      lowest level is listed.
    num_heads: attention heads; must divide the channels of the attention levels.
    norm_groups: GroupNorm groups; must divide every entry of `channels`.
    time_dim: width of the time (and label) embedding.
    two_time: take `(s, t)` (flow maps) instead of `t`.
    num_classes: if > 0, condition on labels in [0, num_classes] (num_classes = null label).
    dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32, the output is float32.
  """

  def __init__(self, image_shape: Sequence[int] = (28, 28, 1), *,
               channels: Sequence[int] = (16, 32, 64), num_res_blocks: int = 1,
               attention_levels: Sequence[int] = (-1,), num_heads: int = 4,
               norm_groups: int = 8, time_dim: int = 128, two_time: bool = False,
               num_classes: int = 0, dtype=jnp.float32, rngs: nnx.Rngs):
    height, width, in_ch = image_shape
    factor = 2 ** (len(channels) - 1)
    if height % factor or width % factor:
      raise ValueError(
          f'UNet with {len(channels)} levels halves the image {len(channels) - 1} times, so H and '
          f'W must be divisible by {factor}; got image_shape={tuple(image_shape)}. Use fewer '
          'levels in `channels` or pad the images (e.g. 28x28 or 32x32 with three levels).')
    if any(c % norm_groups for c in channels):
      raise ValueError(f'Every entry of channels={tuple(channels)} must be divisible by '
                       f'norm_groups={norm_groups}.')
    levels = len(channels)
    if any(not -levels <= i < levels for i in attention_levels):
      raise ValueError(f'attention_levels={tuple(attention_levels)} must index channels='
                       f'{tuple(channels)} (0 to {levels - 1}, or negative from the lowest).')
    attn = {i % levels for i in attention_levels}
    if any(channels[i] % num_heads for i in attn):
      raise ValueError(f'num_heads={num_heads} must divide the channels of attention levels '
                       f'{sorted(attn)} (channels={tuple(channels)}).')

    self.image_shape = tuple(image_shape)
    self.dtype = dtype
    self.time = TimeEmbedding(time_dim, two_time=two_time, rngs=rngs)
    self.label = LabelEmbedding(num_classes, time_dim, rngs=rngs) if num_classes else None
    kw = dict(heads=num_heads, groups=norm_groups, dtype=dtype, rngs=rngs)
    self.conv_in = nnx.Conv(in_ch, channels[0], (3, 3), dtype=dtype, rngs=rngs)

    ch, skips, down, downsample = channels[0], [channels[0]], [], []
    for level, width in enumerate(channels):
      blocks = []
      for _ in range(num_res_blocks):
        blocks.append(Block(ch, width, time_dim, attention=level in attn, **kw))
        ch = width
        skips.append(ch)
      down.append(nnx.List(blocks))
      if level < levels - 1:
        downsample.append(nnx.Conv(ch, ch, (3, 3), strides=2, dtype=dtype, rngs=rngs))
        skips.append(ch)
    self.down = nnx.List(down)
    self.downsample = nnx.List(downsample)

    self.mid = nnx.List([Block(ch, ch, time_dim, attention=levels - 1 in attn, **kw),
                         Block(ch, ch, time_dim, attention=False, **kw)])

    up, upsample = [], []
    for level in reversed(range(levels)):
      blocks = []
      for _ in range(num_res_blocks + 1):
        blocks.append(Block(ch + skips.pop(), channels[level], time_dim,
                            attention=level in attn, **kw))
        ch = channels[level]
      up.append(nnx.List(blocks))
      if level > 0:
        upsample.append(nnx.Conv(ch, ch, (3, 3), dtype=dtype, rngs=rngs))
    self.up = nnx.List(up)
    self.upsample = nnx.List(upsample)

    self.norm_out = nnx.GroupNorm(ch, num_groups=norm_groups, dtype=dtype, rngs=rngs)
    self.conv_out = nnx.Conv(ch, in_ch, (3, 3), dtype=dtype, kernel_init=nnx.initializers.zeros,
                             rngs=rngs)

  scalar_time = True  # a scalar t is embedded once per batch (see `to_apply_fn`)

  def __call__(self, x, t, *, s=None, cond=None, train=False):
    """x: [B, H, W, C]; t, s: [B] or scalar; cond: int [B] -> [B, H, W, C] float32."""
    del train
    if x.shape[1:] != self.image_shape:
      raise ValueError(f'UNet was built for images of shape {self.image_shape} (H, W, C); got '
                       f'input of shape {x.shape} (expected [B, H, W, C]).')
    emb = embed_conditions(self.time, self.label, x.shape[0], t, s, cond)

    h = self.conv_in(x.astype(self.dtype))
    hs = [h]
    for level, blocks in enumerate(self.down):
      for block in blocks:
        h = block(h, emb)
        hs.append(h)
      if level < len(self.downsample):
        h = self.downsample[level](h)
        hs.append(h)
    for block in self.mid:
      h = block(h, emb)
    for level, blocks in enumerate(self.up):
      for block in blocks:
        h = block(jnp.concatenate([h, hs.pop()], axis=-1), emb)
      if level < len(self.upsample):
        h = self.upsample[level](jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2))
    return self.conv_out(nnx.silu(self.norm_out(h))).astype(jnp.float32)
