"""Differentiable Siamese augmentation (DSA), as `ParamDiffAug` of the DC/DSA/DM reference code.

A strategy names families joined by '_'. Each call draws one family (the reference's mode 'S')
and that family's random parameters, either one set per sample or, with `shared=True`, one set
for the whole batch. Everything is drawn from the key, so the same key on two batches gives the
same transform (the Siamese property DSA and DM rely on), and every family is differentiable in
the images: geometric ones by bilinear sampling, the others by masks and affine maps of the
pixel values. Images are [B, H, W, C], in any value range (the evaluator shows the network
standardised images, as the reference does).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

FAMILIES = ('color', 'crop', 'cutout', 'flip', 'scale', 'rotate')
DIGITS = 'color_crop_cutout_scale_rotate'
RGB = 'color_crop_cutout_flip_scale_rotate'


@dataclasses.dataclass(frozen=True)
class DSARatios:
  """Strengths of the families; the defaults are the reference `ParamDiffAug`.

  brightness: added offset in ±brightness/2. saturation: colour spread ×[0, saturation].
  contrast: spread around the image mean ×[1 − contrast, 1 + contrast]. crop: translation by up
  to this fraction of the size, zero fill. cutout: side of the zeroed square as a fraction of the
  size. flip: probability of a left-right flip. scale: per-axis factor in [1/scale, scale].
  rotate: angle in ±rotate degrees.
  """
  brightness: float = 1.0
  saturation: float = 2.0
  contrast: float = 0.5
  crop: float = 0.125
  cutout: float = 0.5
  flip: float = 0.5
  scale: float = 1.2
  rotate: float = 15.0


def parse_strategy(strategy: str) -> tuple[str, ...]:
  """'color_crop_...' -> ('color', 'crop', ...), refusing unknown families by name."""
  families = tuple(strategy.split('_')) if strategy else ()
  unknown = [f for f in families if f not in FAMILIES]
  if unknown or not families:
    raise ValueError(f'Unknown DSA family {unknown or strategy!r} in strategy {strategy!r}; '
                     f'valid families are {FAMILIES}, joined by "_" (digits: {DIGITS!r}, RGB: '
                     f'{RGB!r}).')
  return families


def warp(x: jax.Array, matrix: jax.Array, shift: jax.Array) -> jax.Array:
  """Bilinear resampling with zero fill: out[p] = x[c + matrix @ (p − c) + shift].

  Args:
    x: images [B, H, W, C].
    matrix: [B or 1, 2, 2] acting on (row, column) pixel offsets from the image centre c.
    shift: [B or 1, 2] translation in pixels (row, column).

  Returns:
    [B, H, W, C]. The identity matrix with an integer shift reproduces the pixels exactly.
  """
  batch, height, width, channels = x.shape
  matrix = jnp.broadcast_to(matrix, (batch, 2, 2))
  shift = jnp.broadcast_to(shift, (batch, 2))
  centre = jnp.array([(height - 1) / 2, (width - 1) / 2], x.dtype)
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=x.dtype), jnp.arange(width, dtype=x.dtype),
                            indexing='ij')
  offsets = jnp.stack([rows.ravel(), cols.ravel()], -1) - centre        # [HW, 2]
  src = centre + jnp.einsum('bij,pj->bpi', matrix, offsets) + shift[:, None]   # [B, HW, 2]
  base = jnp.floor(src)
  frac = src - base
  base = base.astype(jnp.int32)
  flat = x.reshape(batch, height * width, channels)
  out = jnp.zeros_like(flat)
  for dr in (0, 1):
    for dc in (0, 1):
      r, c = base[..., 0] + dr, base[..., 1] + dc
      weight = (frac[..., 0] if dr else 1 - frac[..., 0]) * (frac[..., 1] if dc else
                                                              1 - frac[..., 1])
      inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
      index = jnp.clip(r, 0, height - 1) * width + jnp.clip(c, 0, width - 1)
      pixels = jnp.take_along_axis(flat, index[..., None], axis=1)
      out = out + jnp.where(inside, weight, 0)[..., None] * pixels
  return out.reshape(x.shape)


def _uniform(key, n, low, high):
  return jax.random.uniform(key, (n,), minval=low, maxval=high)


def _color(x, key, n, r: DSARatios):
  kb, ks, kc = jax.random.split(key, 3)
  per = lambda v: v[:, None, None, None]
  x = x + per(_uniform(kb, n, -0.5, 0.5) * r.brightness)
  mean = x.mean(-1, keepdims=True)
  x = (x - mean) * per(_uniform(ks, n, 0.0, r.saturation)) + mean
  mean = x.mean((1, 2, 3), keepdims=True)
  return (x - mean) * per(_uniform(kc, n, 1 - r.contrast, 1 + r.contrast)) + mean


def _crop(x, key, n, r: DSARatios):
  _, height, width, _ = x.shape
  limits = jnp.array([int(height * r.crop + 0.5), int(width * r.crop + 0.5)])
  shift = jax.random.randint(key, (n, 2), -limits, limits + 1).astype(x.dtype)
  return warp(x, jnp.broadcast_to(jnp.eye(2, dtype=x.dtype), (n, 2, 2)), shift)


def _cutout(x, key, n, r: DSARatios):
  _, height, width, _ = x.shape
  keys = jax.random.split(key)
  masks = []
  for axis_key, size in zip(keys, (height, width)):
    side = int(size * r.cutout + 0.5)
    start = jax.random.randint(axis_key, (n, 1), 0, size + 1 - side % 2) - side // 2
    pos = jnp.arange(size)
    masks.append((pos >= start) & (pos < start + side))                    # [n, size]
  square = masks[0][:, :, None] & masks[1][:, None, :]
  return x * jnp.where(square, 0.0, 1.0)[..., None].astype(x.dtype)


def _flip(x, key, n, r: DSARatios):
  flipped = jax.random.uniform(key, (n,)) < r.flip
  return jnp.where(flipped[:, None, None, None], x[:, :, ::-1], x)


def _scale(x, key, n, r: DSARatios):
  factors = jax.random.uniform(key, (n, 2), minval=1 / r.scale, maxval=r.scale)
  return warp(x, jax.vmap(jnp.diag)(factors).astype(x.dtype), jnp.zeros((n, 2), x.dtype))


def rotation(degrees: jax.Array) -> jax.Array:
  """[n] angles in degrees -> [n, 2, 2] rotation matrices acting on (row, column)."""
  theta = degrees * (math.pi / 180)
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  return jnp.stack([jnp.stack([cos, -sin], -1), jnp.stack([sin, cos], -1)], -2)


def _rotate(x, key, n, r: DSARatios):
  angles = _uniform(key, n, -r.rotate, r.rotate)
  return warp(x, rotation(angles).astype(x.dtype), jnp.zeros((n, 2), x.dtype))


_FAMILY_FNS = {'color': _color, 'crop': _crop, 'cutout': _cutout, 'flip': _flip,
               'scale': _scale, 'rotate': _rotate}


def augment(x: jax.Array, key: jax.Array, strategy: str = DIGITS, *, shared: bool = False,
            ratios: DSARatios = DSARatios()) -> jax.Array:
  """One DSA transform of a batch: a family drawn from `strategy`, then its parameters.

  Args:
    x: images [B, H, W, C].
    key: jax.random key; it alone fixes the family and the parameters.
    strategy: families joined by '_' (see `FAMILIES`).
    shared: one parameter set for the whole batch (Siamese across batches of any size) instead
      of one per sample.
    ratios: family strengths.

  Returns:
    Augmented images [B, H, W, C], differentiable in `x`.
  """
  families = parse_strategy(strategy)
  family_key, key = jax.random.split(key)
  n = 1 if shared else x.shape[0]

  branches = [lambda x, fn=_FAMILY_FNS[f]: fn(x, key, n, ratios) for f in families]
  index = jax.random.randint(family_key, (), 0, len(families))
  return jax.lax.switch(index, branches, x)
