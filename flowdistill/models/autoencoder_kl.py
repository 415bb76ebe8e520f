"""Stable Diffusion's autoencoder (diffusers' `AutoencoderKL`) in NNX, and a loader from its
public `safetensors` weights (`vae/diffusion_pytorch_model.safetensors`).

The attribute names follow diffusers' module names, so a parameter's path in the NNX state is
its key in the weight file: `encoder.down_blocks.0.resnets.1.conv2.weight` is
`params['encoder']['down_blocks'][0]['resnets'][1]['conv2']['kernel']` (PyTorch's
[out, in, kh, kw] transposed to [kh, kw, in, out]; GroupNorm's `weight` is NNX's `scale`).
Images are [B, H, W, 3] in [-1, 1]; latents are [B, H/8, W/8, 4] for SD's four levels.
"""

import dataclasses
import hashlib
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowdistill import files


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
  """The fields of diffusers' `vae/config.json` that shape the network (SD 1.x/2.x defaults;
  SDXL differs only in `scaling_factor`, 0.13025)."""
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215


def _norm(ch: int, groups: int, rngs):
  return nnx.GroupNorm(ch, num_groups=groups, epsilon=1e-6, rngs=rngs)


def _conv(in_ch: int, out_ch: int, rngs, size: int = 3, **kw):
  return nnx.Conv(in_ch, out_ch, (size, size), rngs=rngs, **kw)


class ResnetBlock2D(nnx.Module):
  def __init__(self, in_ch: int, out_ch: int, groups: int, rngs):
    self.norm1, self.conv1 = _norm(in_ch, groups, rngs), _conv(in_ch, out_ch, rngs)
    self.norm2, self.conv2 = _norm(out_ch, groups, rngs), _conv(out_ch, out_ch, rngs)
    self.conv_shortcut = _conv(in_ch, out_ch, rngs, 1) if in_ch != out_ch else None

  def __call__(self, x):
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.conv2(nnx.silu(self.norm2(h)))
    return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class Attention(nnx.Module):
  """Single-head self-attention over the H * W positions, with a residual connection."""

  def __init__(self, ch: int, groups: int, rngs):
    self.group_norm = _norm(ch, groups, rngs)
    self.to_q, self.to_k, self.to_v = (nnx.Linear(ch, ch, rngs=rngs) for _ in range(3))
    self.to_out = nnx.List([nnx.Linear(ch, ch, rngs=rngs)])

  def __call__(self, x):
    b, h, w, c = x.shape
    y = self.group_norm(x).reshape(b, h * w, 1, c)
    y = jax.nn.dot_product_attention(self.to_q(y), self.to_k(y), self.to_v(y))
    return x + self.to_out[0](y.reshape(b, h, w, c))


class MidBlock(nnx.Module):
  def __init__(self, ch: int, groups: int, rngs):
    self.resnets = nnx.List([ResnetBlock2D(ch, ch, groups, rngs) for _ in range(2)])
    self.attentions = nnx.List([Attention(ch, groups, rngs)])

  def __call__(self, x):
    return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nnx.Module):
  """Stride-2 3x3 convolution after padding one row and column at the bottom and right."""

  def __init__(self, ch: int, rngs):
    self.conv = _conv(ch, ch, rngs, strides=2, padding='VALID')

  def __call__(self, x):
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
  """Nearest-neighbour 2x, then a 3x3 convolution."""

  def __init__(self, ch: int, rngs):
    self.conv = _conv(ch, ch, rngs)

  def __call__(self, x):
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Level(nnx.Module):
  """A down (encoder) or up (decoder) block: resnets, then an optional resampler."""

  def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, resample, rngs):
    self.resnets = nnx.List([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, groups, rngs)
                             for i in range(layers)])
    name = 'downsamplers' if resample is Downsample else 'upsamplers'
    setattr(self, name, nnx.List([resample(out_ch, rngs)]) if resample else None)
    self._resample = name

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    resample = getattr(self, self._resample)
    return x if resample is None else resample[0](x)


class Encoder(nnx.Module):
  def __init__(self, c: AutoencoderKLConfig, rngs):
    widths, groups = c.block_out_channels, c.norm_num_groups
    self.conv_in = _conv(c.in_channels, widths[0], rngs)
    self.down_blocks = nnx.List([
        Level(widths[max(i - 1, 0)], w, c.layers_per_block, groups,
              Downsample if i < len(widths) - 1 else None, rngs) for i, w in enumerate(widths)])
    self.mid_block = MidBlock(widths[-1], groups, rngs)
    self.conv_norm_out = _norm(widths[-1], groups, rngs)
    self.conv_out = _conv(widths[-1], 2 * c.latent_channels, rngs)

  def __call__(self, x):
    h = self.conv_in(x)
    for block in self.down_blocks:
      h = block(h)
    return self.conv_out(nnx.silu(self.conv_norm_out(self.mid_block(h))))


class Decoder(nnx.Module):
  def __init__(self, c: AutoencoderKLConfig, rngs):
    widths, groups = tuple(reversed(c.block_out_channels)), c.norm_num_groups
    self.conv_in = _conv(c.latent_channels, widths[0], rngs)
    self.mid_block = MidBlock(widths[0], groups, rngs)
    self.up_blocks = nnx.List([
        Level(widths[max(i - 1, 0)], w, c.layers_per_block + 1, groups,
              Upsample if i < len(widths) - 1 else None, rngs) for i, w in enumerate(widths)])
    self.conv_norm_out = _norm(widths[-1], groups, rngs)
    self.conv_out = _conv(widths[-1], c.out_channels, rngs)

  def __call__(self, z):
    h = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      h = block(h)
    return self.conv_out(nnx.silu(self.conv_norm_out(h)))


class AutoencoderKL(nnx.Module):
  """`encode(x) -> (mean, logvar)` and `decode(z) -> x`; the interface of `models.vae.VAE`,
  so `condense.frozen_vae.FrozenVAE` wraps either (with `scale = config.scaling_factor`).

  Args:
    config: the architecture (`AutoencoderKLConfig`).
    image_shape: (H, W, C) of the images it will see, H and W divisible by 2**(levels - 1).
  """

  def __init__(self, config: AutoencoderKLConfig, image_shape: Sequence[int], *, rngs):
    factor = 2 ** (len(config.block_out_channels) - 1)
    height, width, _ = image_shape
    if height % factor or width % factor:
      raise ValueError(f'AutoencoderKL with {len(config.block_out_channels)} levels needs H and W '
                       f'divisible by {factor}; got image_shape={tuple(image_shape)}. Resize or '
                       'crop the images.')
    self.encoder, self.decoder = Encoder(config, rngs), Decoder(config, rngs)
    lat = config.latent_channels
    self.quant_conv = _conv(2 * lat, 2 * lat, rngs, 1)
    self.post_quant_conv = _conv(lat, lat, rngs, 1)
    self.latent_shape = (height // factor, width // factor, lat)

  def encode(self, x):
    """x: [B, H, W, C] in [-1, 1] -> (mean, logvar), each [B, H/f, W/f, latent_channels]."""
    mean, logvar = jnp.split(self.quant_conv(self.encoder(x)), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z):
    """Unscaled latents [B, h, w, latent_channels] -> images [B, H, W, C]."""
    return self.decoder(self.post_quant_conv(z))


def read_config(weights_path: str) -> AutoencoderKLConfig:
  """The architecture of the weights at `weights_path`: from the diffusers `config.json` in the
  same folder when there is one, else SD's defaults."""
  file = files.join(os.path.dirname(weights_path), 'config.json')
  if not files.exists(file):
    return AutoencoderKLConfig()
  stored = files.read_json(file)
  fields = {f.name for f in dataclasses.fields(AutoencoderKLConfig)}
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if k in fields}
  return AutoencoderKLConfig(**values)


def weight_layout(params) -> dict[str, tuple[tuple[str | int, ...], tuple[int, ...]]]:
  """{file key: (path in `params`, PyTorch shape)} for every parameter of an AutoencoderKL's
  state (`nnx.to_pure_dict`)."""
  layout = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = tuple(k.key for k in path)
    *module, kind = names
    shape = np.shape(leaf)
    if kind == 'kernel':
      torch_shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
      kind = 'weight'
    elif kind == 'scale':
      torch_shape, kind = shape, 'weight'
    else:
      torch_shape = shape
    layout['.'.join(map(str, (*module, kind)))] = (names, tuple(torch_shape))
  return layout


def _to_nnx(array: np.ndarray) -> np.ndarray:
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  return array.T if array.ndim == 2 else array


def read_safetensors(data: bytes) -> dict[str, np.ndarray]:
  """{key: float32 array} of a `.safetensors` file's bytes (float16/bfloat16 weights are
  widened)."""
  try:
    from safetensors.flax import load  # bfloat16 needs the JAX reader, not NumPy's
  except ImportError as e:
    raise ImportError('Reading .safetensors weights needs the safetensors package: pip install '
                      '"flowdistill[sd]" (or safetensors).') from e

  return {k: np.asarray(v, np.float32) for k, v in load(data).items()}


def load_autoencoder_kl(path: str, image_shape: Sequence[int],
                        config: AutoencoderKLConfig = AutoencoderKLConfig()):
  """(module, fingerprint) of the weights in `path`, a diffusers `AutoencoderKL` safetensors
  file; the fingerprint (16 hex digits of the file's SHA-256) keys what is derived from it.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: a parameter is missing from the file or has another shape (named, with both
      shapes); the file is then of another architecture or `config` does not match it.
  """
  if not files.exists(path):
    raise FileNotFoundError(f'No AutoencoderKL weights at {path}; download '
                            'vae/diffusion_pytorch_model.safetensors of the model (e.g. '
                            'stabilityai/sd-vae-ft-mse) and pass its path.')
  module = AutoencoderKL(config, image_shape, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(module)
  params = nnx.to_pure_dict(state)
  data = files.read_bytes(path)  # a local path or gs://
  weights = read_safetensors(data)
  for key, (names, torch_shape) in weight_layout(params).items():
    if key not in weights:
      raise ValueError(f'{path} has no weight {key!r} (shape {list(torch_shape)}): not a '
                       'diffusers AutoencoderKL file, or AutoencoderKLConfig does not match it '
                       f'(block_out_channels={config.block_out_channels}, layers_per_block='
                       f'{config.layers_per_block}).')
    if weights[key].shape != torch_shape:
      raise ValueError(f'{path}: weight {key!r} has shape {list(weights[key].shape)}, but this '
                       f'AutoencoderKLConfig needs {list(torch_shape)}; use the config.json '
                       'that came with the weights.')
    node = params
    for name in names[:-1]:
      node = node[name]
    node[names[-1]] = jnp.asarray(_to_nnx(weights[key]))
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state), hashlib.sha256(data).hexdigest()[:16]
