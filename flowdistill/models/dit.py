"""DiT/SiT-style transformer velocity / flow-map network for images and VAE latents."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowdistill.models.embedding import LabelEmbedding, TimeEmbedding, embed_conditions

# (hidden width, depth, heads) of the DiT paper's models; 'tiny' is for tests and this CPU.
PRESETS = {'tiny': (64, 2, 4), 'S': (384, 12, 6), 'B': (768, 12, 12), 'L': (1024, 24, 16),
           'XL': (1152, 28, 16)}


def sincos_2d(height: int, width: int, dim: int) -> np.ndarray:
  """Fixed 2-D sine-cosine position embedding of a `height x width` grid: [H * W, dim].

  Half the channels encode the row, half the column (MAE/DiT layout); `dim` must be divisible
  by 4.
  """
  quarter = dim // 4
  omega = 1.0 / 10_000 ** (np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')

  def encode(pos):
    angles = pos.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  return np.concatenate([encode(rows), encode(cols)], axis=1).astype(np.float32)


def _modulate(x, shift, scale):
  """x: [B, N, D]; shift, scale: [B, D]."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nnx.Module):
  """Pre-norm attention and MLP, each scaled, shifted and gated by the conditioning vector
  (adaLN-Zero: the modulation is zero-initialised, so a fresh block is the identity)."""

  def __init__(self, hidden: int, heads: int, mlp_ratio: float, *, dtype, rngs: nnx.Rngs):
    self.heads = heads
    norm = dict(use_scale=False, use_bias=False, epsilon=1e-6, dtype=dtype, rngs=rngs)
    self.norm1 = nnx.LayerNorm(hidden, **norm)
    self.qkv = nnx.Linear(hidden, 3 * hidden, dtype=dtype, rngs=rngs)
    self.proj = nnx.Linear(hidden, hidden, dtype=dtype, rngs=rngs)
    self.norm2 = nnx.LayerNorm(hidden, **norm)
    width = int(hidden * mlp_ratio)
    self.fc1 = nnx.Linear(hidden, width, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(width, hidden, dtype=dtype, rngs=rngs)
    self.modulation = nnx.Linear(hidden, 6 * hidden, dtype=dtype, rngs=rngs,
                                 kernel_init=nnx.initializers.zeros)

  def __call__(self, x, c):
    """x: [B, N, D] tokens; c: [B, D] conditioning -> [B, N, D]."""
    b, n, d = x.shape
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(
        self.modulation(nnx.silu(c)), 6, axis=-1)
    qkv = self.qkv(_modulate(self.norm1(x), shift1, scale1)).reshape(
        b, n, 3, self.heads, d // self.heads)
    y = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    x = x + gate1[:, None, :] * self.proj(y.reshape(b, n, d))
    h = jax.nn.gelu(self.fc1(_modulate(self.norm2(x), shift2, scale2)), approximate=True)
    return x + gate2[:, None, :] * self.fc2(h)


class DiT(nnx.Module):
  """`f(x, t[, s][, cond])` for images or latents [B, H, W, C], as a transformer over
  `patch_size x patch_size` patches (Peebles & Xie's DiT; SiT is the same network trained on a
  flow-matching path).

  The final layer and every block's modulation are zero-initialised, so a fresh model outputs
  exactly 0 (as the U-Net does).

  Args:
    image_shape: (H, W, C); H and W divisible by `patch_size`.
    patch_size: side of a patch p; the sequence has (H / p) * (W / p) tokens.
    hidden, depth, heads: width, number of blocks and attention heads (`PRESETS`).
    mlp_ratio: MLP width over `hidden`.
    two_time: take `(s, t)` (flow maps) instead of `t`.
    num_classes: if > 0, condition on labels in [0, num_classes] (num_classes = null label,
      for classifier-free guidance).
    dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32, the output is float32.
  """

  def __init__(self, image_shape: Sequence[int], *, patch_size: int = 2, hidden: int = 384,
               depth: int = 12, heads: int = 6, mlp_ratio: float = 4.0, two_time: bool = False,
               num_classes: int = 0, dtype=jnp.float32, rngs: nnx.Rngs):
    height, width, channels = image_shape
    if height % patch_size or width % patch_size:
      raise ValueError(f'DiT with patch_size={patch_size} needs H and W divisible by it; got '
                       f'image_shape={tuple(image_shape)}. Choose a patch size that divides '
                       'both (e.g. 2 for 28x28 or 32x32).')
    if hidden % heads or hidden % 4:
      raise ValueError(f'DiT hidden={hidden} must be divisible by heads={heads} and by 4.')
    self.image_shape, self.patch_size, self.dtype = tuple(image_shape), patch_size, dtype
    self.hidden = hidden
    self.time = TimeEmbedding(hidden, two_time=two_time, rngs=rngs)
    self.label = LabelEmbedding(num_classes, hidden, rngs=rngs) if num_classes else None
    patch_dim = patch_size * patch_size * channels
    self.embed = nnx.Linear(patch_dim, hidden, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([DiTBlock(hidden, heads, mlp_ratio, dtype=dtype, rngs=rngs)
                            for _ in range(depth)])
    self.norm_out = nnx.LayerNorm(hidden, use_scale=False, use_bias=False, epsilon=1e-6,
                                  dtype=dtype, rngs=rngs)
    zeros = nnx.initializers.zeros
    self.modulation_out = nnx.Linear(hidden, 2 * hidden, dtype=dtype, kernel_init=zeros,
                                     rngs=rngs)
    self.out = nnx.Linear(hidden, patch_dim, dtype=dtype, kernel_init=zeros, rngs=rngs)

  scalar_time = True  # a scalar t is embedded once per batch (see `to_apply_fn`)

  def __call__(self, x, t, *, s=None, cond=None, train=False):
    """x: [B, H, W, C]; t, s: [B] or scalar; cond: int [B] -> [B, H, W, C] float32."""
    del train
    if x.shape[1:] != self.image_shape:
      raise ValueError(f'DiT was built for inputs of shape {self.image_shape} (H, W, C); got '
                       f'{x.shape} (expected [B, H, W, C]).')
    b, (height, width, channels), p = x.shape[0], self.image_shape, self.patch_size
    gh, gw = height // p, width // p
    c = embed_conditions(self.time, self.label, b, t, s, cond).astype(self.dtype)
    patches = x.reshape(b, gh, p, gw, p, channels).transpose(0, 1, 3, 2, 4, 5)
    h = self.embed(patches.reshape(b, gh * gw, p * p * channels).astype(self.dtype))
    h = h + jnp.asarray(sincos_2d(gh, gw, self.hidden), self.dtype)
    for block in self.blocks:
      h = block(h, c)
    shift, scale = jnp.split(self.modulation_out(nnx.silu(c)), 2, axis=-1)
    h = self.out(_modulate(self.norm_out(h), shift, scale))
    h = h.reshape(b, gh, gw, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return h.reshape(b, height, width, channels).astype(jnp.float32)
