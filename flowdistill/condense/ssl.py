"""The frozen self-supervised backbone φ of SFM, trained by the library with SimCLR.

No installable package ships self-supervised vision weights and none can be downloaded, so the
backbone is pre-trained here on the train split without labels: two random views of each image
(`view`), a `ConvEncoder` and an MLP projection head, the NT-Xent loss at temperature τ. The head
is dropped afterwards; the encoder is cached and fingerprinted like the other trained networks
(`flowdistill.cache`, `cache_root()/ssl/<fingerprint>`), and used frozen, in eval mode only (it
has no train-time state: GroupNorm, no dropout).
"""

import dataclasses
import json
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from flowdistill import files, fitting
from flowdistill.cache import cache_root, data_fingerprint, load_or_build
from flowdistill.condense.augment import rotation, warp
from flowdistill.models.encoder import ConvEncoder, ProjectionHead


@dataclasses.dataclass(frozen=True)
class ViewRatios:
  """A random view (MNIST defaults; no flips): a resized crop of `min_scale`..1 of the area
  (aspect 3/4..4/3), a rotation in ±`rotate` degrees, a translation by up to `translate` of the
  size, background filled with -1, then Gaussian noise of std `noise`."""
  min_scale: float = 0.6
  rotate: float = 15.0
  translate: float = 0.1
  noise: float = 0.1


def view(x: jax.Array, key: jax.Array, ratios: ViewRatios = ViewRatios()) -> jax.Array:
  """One random view of each image. x: [B, H, W, C] in [-1, 1] -> [B, H, W, C]; differentiable
  in x (bilinear sampling), parameters drawn per sample from `key`."""
  n, h, w = x.shape[:3]
  k_area, k_aspect, k_centre, k_angle, k_shift, k_noise = jax.random.split(key, 6)
  area = jax.random.uniform(k_area, (n,), minval=ratios.min_scale, maxval=1.0)
  log_aspect = jax.random.uniform(k_aspect, (n,), minval=math.log(3 / 4), maxval=math.log(4 / 3))
  rows = jnp.minimum(jnp.sqrt(area / jnp.exp(log_aspect)), 1.0)
  cols = jnp.minimum(jnp.sqrt(area * jnp.exp(log_aspect)), 1.0)
  size = jnp.array([h, w], x.dtype)
  room = (1.0 - jnp.stack([rows, cols], -1)) * size / 2
  centre = jax.random.uniform(k_centre, (n, 2), minval=-1.0, maxval=1.0) * room
  shift = centre + jax.random.uniform(k_shift, (n, 2), minval=-1.0, maxval=1.0) * (
      ratios.translate * size)
  angles = jax.random.uniform(k_angle, (n,), minval=-ratios.rotate, maxval=ratios.rotate)
  matrix = rotation(angles) @ jax.vmap(jnp.diag)(jnp.stack([rows, cols], -1))
  out = warp(x + 1.0, matrix.astype(x.dtype), shift.astype(x.dtype)) - 1.0
  return out + ratios.noise * jax.random.normal(k_noise, x.shape, x.dtype)


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float = 0.5) -> jax.Array:
  """SimCLR's NT-Xent loss of two views' projections z1, z2 [N, d] (row i of each is the same
  image): cross-entropy of each of the 2N embeddings picking its partner among the other 2N − 1
  by cosine similarity / τ, averaged."""
  z = jnp.concatenate([z1, z2])
  z = z / jnp.linalg.norm(z, axis=-1, keepdims=True).clip(1e-12)
  n2 = z.shape[0]
  sim = jnp.where(jnp.eye(n2, dtype=bool), -jnp.inf, z @ z.T / temperature)
  partner = (jnp.arange(n2) + n2 // 2) % n2
  return -jnp.mean(jax.nn.log_softmax(sim, axis=-1)[jnp.arange(n2), partner])


@dataclasses.dataclass(frozen=True)
class SSLConfig:
  """SimCLR settings (config `sfm.ssl_*`); all of them key the cache."""
  widths: tuple[int, ...] = (32, 64, 128, 256)
  temperature: float = 0.5
  steps: int = 3000
  batch_size: int = 256
  lr: float = 1e-3
  views: ViewRatios = ViewRatios()
  seed: int = 0

  def __post_init__(self):
    if self.temperature <= 0 or self.lr <= 0 or self.steps < 1 or self.batch_size < 2:
      raise ValueError('SSLConfig needs temperature > 0, lr > 0, steps >= 1 and batch_size >= 2 '
                       f'(NT-Xent needs negatives); got {self}.')


class _SimCLR(nnx.Module):
  def __init__(self, in_channels: int, widths, *, rngs: nnx.Rngs):
    self.encoder = ConvEncoder(in_channels, widths=widths, rngs=rngs)
    self.head = ProjectionHead(widths[-1], rngs=rngs)


def train_ssl(images, config: SSLConfig, *,
              on_progress: Callable[[int], None] | None = None,
              state_path: str | None = None) -> tuple[ConvEncoder, dict]:
  """SimCLR pre-training: Adam (cosine decay) on minibatches drawn with replacement.

  Args:
    images: [N, H, W, C] in [-1, 1] (labels are never seen).
    on_progress: called with the steps done, every 100 steps.
    state_path: `fitting.fit`'s resume file (written every 100 steps and on a stop signal).

  Returns:
    (encoder with the head dropped, metrics {'loss': numpy [steps]}).
  """
  images = jnp.asarray(images, jnp.float32)
  key = jax.random.key(config.seed)
  model = _SimCLR(images.shape[-1], config.widths, rngs=nnx.Rngs(jax.random.fold_in(key, 0)))
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  opt = optax.adam(optax.cosine_decay_schedule(config.lr, config.steps, alpha=0.05))
  data_key = jax.random.fold_in(key, 1)

  def loss_fn(params, i, images):
    idx, k = fitting.random_batch(data_key, i, config.batch_size, images.shape[0])
    x = images[idx]
    k1, k2 = jax.random.split(k)
    m = nnx.merge(graphdef, params)
    embed = lambda v: m.head(m.encoder(v))  # noqa: E731
    return nt_xent(embed(view(x, k1, config.views)), embed(view(x, k2, config.views)),
                   config.temperature)

  params, metrics = fitting.fit(
      fitting.make_update(loss_fn, opt), params, opt.init(params), steps=config.steps,
      args=(images,),
      on_progress=None if on_progress is None else lambda done, *_: on_progress(done),
      state_path=state_path)
  return nnx.merge(graphdef, params).encoder, metrics


class FrozenBackbone:
  """A pre-trained encoder φ used frozen: `apply(params, x) -> [B, D]` (pure, for use inside
  jitted losses), `params`, batched `features(x)`, `feature_dim`, `fingerprint` (the cache key
  that statistics and golden heads made with it carry) and `info` (training record).

  φ's features are standardised per dimension with the train split's mean and std
  (`standardise`: (mean [D], scale [D]); none: identity), as the affine-free BatchNorm that
  MAE-style linear probes put before the head. SimCLR's average-pooled ReLU features share a
  large positive mean, and the linear-probe protocol's small Adam steps (lr 1e-3·bs/256, i.e.
  4e-5 on a 10-image set) cannot remove it: on MNIST every IPC-1 probe stayed below 32 %.
  """

  def __init__(self, encoder: ConvEncoder, fingerprint: str, info: dict,
               standardise: tuple[np.ndarray, np.ndarray] | None = None):
    graphdef, state = nnx.split(encoder)
    dim = encoder.feature_dim
    mean, scale = standardise if standardise is not None else (np.zeros(dim), np.ones(dim))
    self.params = {'encoder': nnx.to_pure_dict(state), 'mean': jnp.asarray(mean, jnp.float32),
                   'scale': jnp.asarray(scale, jnp.float32)}
    self.apply = lambda params, x: (nnx.merge(graphdef, params['encoder'])(x)
                                    - params['mean']) / params['scale']
    self.feature_dim = dim
    self.fingerprint = fingerprint
    self.info = info
    self._features = jax.jit(self.apply)

  def features(self, x, chunk: int = 1000) -> np.ndarray:
    """Images [N, H, W, C] -> features [N, D] (no augmentation)."""
    return np.concatenate([np.asarray(self._features(self.params, jnp.asarray(x[i:i + chunk])))
                           for i in range(0, len(x), chunk)])


def standardised(encoder: ConvEncoder, images: np.ndarray, fingerprint: str,
                 info: dict) -> FrozenBackbone:
  """The frozen backbone of `encoder` with features standardised over `images` [N, H, W, C]."""
  raw = FrozenBackbone(encoder, fingerprint, info).features(images)
  return FrozenBackbone(encoder, fingerprint, info, (raw.mean(0), raw.std(0) + 1e-6))


def cache_folder(train: dict, config: SSLConfig) -> tuple[str, str]:
  """(fingerprint, `cache_root()/ssl/<fingerprint>`) of this data set and config."""
  settings = json.dumps(dataclasses.asdict(config), sort_keys=True)
  fingerprint = data_fingerprint(train['x'], train['label'], settings)
  return fingerprint, files.join(cache_root(), 'ssl', fingerprint)


def _restore(folder: str, train: dict, config: SSLConfig, fingerprint: str) -> FrozenBackbone:
  graphdef, state = nnx.split(ConvEncoder(train['x'].shape[-1], widths=config.widths,
                                          rngs=nnx.Rngs(0)))
  params = ocp.StandardCheckpointer().restore(files.join(folder, 'params'),
                                              nnx.to_pure_dict(state))
  info = files.read_json(files.join(folder, 'info.json'))
  f = files.load_npz(files.join(folder, 'standardise.npz'))
  return FrozenBackbone(nnx.merge(graphdef, params), fingerprint, info, (f['mean'], f['scale']))


def load_cached(train: dict, config: SSLConfig) -> FrozenBackbone | None:
  """The cached backbone of this data set and config, or None where none was trained yet (or
  the entry is incomplete)."""
  fingerprint, folder = cache_folder(train, config)
  return load_or_build(folder, None, lambda f: _restore(f, train, config, fingerprint),
                       describe='SSL backbone')


def load_or_train(train: dict, config: SSLConfig, *,
                  on_progress: Callable[[int], None] | None = None) -> FrozenBackbone:
  """The backbone of this data set and config: read from the cache, or pre-trained and cached
  (the encoder, its training record and the standardisation over `train`).

  Args:
    train: {'x': images [N, H, W, C] in [-1, 1], 'label': int [N]} (labels only name the
      data set in the fingerprint).
  """
  fingerprint, folder = cache_folder(train, config)

  def build(folder):
    start = time.perf_counter()
    encoder, metrics = train_ssl(train['x'], config, on_progress=on_progress,
                                 state_path=partial)
    info = {'config': dataclasses.asdict(config), 'train_seconds': time.perf_counter() - start,
            'final_loss': float(metrics['loss'][-min(100, config.steps):].mean())}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(files.join(folder, 'params'), nnx.to_pure_dict(nnx.split(encoder)[1]))
    checkpointer.wait_until_finished()
    files.write_json(files.join(folder, 'info.json'), info)
    backbone = standardised(encoder, train['x'], fingerprint, info)
    files.save_npz(files.join(folder, 'standardise.npz'), mean=backbone.params['mean'],
                   scale=backbone.params['scale'])
    files.remove(partial)
    return _restore(folder, train, config, fingerprint)

  partial = f'{folder}.partial.npz'  # beside the entry: a rebuild empties the folder
  return load_or_build(folder, build, lambda f: _restore(f, train, config, fingerprint),
                       describe='SSL backbone')
