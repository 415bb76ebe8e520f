"""The frozen VAE of PGFM: trained once per data set by the library, cached on disk and
fingerprinted like the feature network, with the latent scale of Stable Diffusion's recipe.

Loss per image: `Σ (x − x̂)² + β KL(q(z|x) || N(0, I))`. After training, the scale
`s = 1 / std` of the posterior means over the train split is stored with the weights, so the
latents `s · mean(x)` that flow matching sees have unit standard deviation (SD's 0.18215 is the
same quantity for its autoencoder), and a latent is decoded as `decode(z / s)`.
"""

import dataclasses
import json
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from flowdistill import files, fitting
from flowdistill.cache import cache_root, data_fingerprint, load_or_build
from flowdistill.models.vae import VAE


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Training settings (config `pgfm.vae_*`); all of them key the cache."""
  beta: float = 1e-3
  steps: int = 6000
  batch_size: int = 128
  lr: float = 1e-3
  latent_channels: int = 4
  widths: tuple[int, ...] = (16, 32, 64)
  seed: int = 0


def kl_divergence(mean, logvar):
  """KL(N(mean, exp(logvar)) || N(0, I)) summed over all but the batch axis -> [B]."""
  terms = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return terms.reshape(terms.shape[0], -1).sum(-1)


def vae_loss(model: VAE, x, key, beta: float):
  """(mean loss, metrics) of one batch x [B, H, W, C]: reconstruction of a posterior sample
  (squared error summed over pixels) + β KL."""
  mean, logvar = model.encode(x)
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
  recon = jnp.square(model.decode(z) - x).reshape(x.shape[0], -1).sum(-1)
  kl = kl_divergence(mean, logvar)
  return jnp.mean(recon + beta * kl), {'recon': recon.mean(), 'kl': kl.mean()}


class FrozenVAE:
  """A trained VAE with batched, jitted `encode`, `decode` and `latents`.

  Attributes:
    scale: s = 1 / std of the train posterior means. fingerprint: the cache key (data and
      settings), stored with everything derived from this VAE. latent_shape: (h, w, c).
    info: what was recorded at training time (losses, reconstruction error).
  """

  def __init__(self, model: VAE, scale: float, fingerprint: str, info: dict):
    graphdef, state = nnx.split(model)
    self._params = nnx.to_pure_dict(state)
    self.scale = float(scale)
    self.fingerprint = fingerprint
    self.latent_shape = model.latent_shape
    self.info = info
    self._encode = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode(x))
    self._decode = jax.jit(lambda p, z: nnx.merge(graphdef, p).decode(z))

  @staticmethod
  def _batched(fn, x, chunk):
    outs = [fn(jnp.asarray(x[i:i + chunk])) for i in range(0, len(x), chunk)]
    return jax.tree.map(lambda *a: np.concatenate([np.asarray(b) for b in a]), *outs)

  def encode(self, x, chunk: int = 1000):
    """Images [N, H, W, C] in [-1, 1] -> (mean, logvar), each [N, h, w, c] (unscaled)."""
    return self._batched(lambda b: self._encode(self._params, b), x, chunk)

  def decode(self, z, chunk: int = 1000):
    """Unscaled latents [N, h, w, c] -> images [N, H, W, C] clipped to [-1, 1]."""
    return np.clip(self._batched(lambda b: self._decode(self._params, b), z, chunk), -1, 1)

  def latents(self, x, *, mode: str = 'mean', key=None) -> np.ndarray:
    """Scaled latents `s · mean(x)` ('mean') or `s · z`, z ~ q(z|x) ('sample', needs key)."""
    mean, logvar = self.encode(x)
    if mode == 'mean':
      return self.scale * mean
    if mode != 'sample':
      raise ValueError(f"Latent mode must be 'mean' or 'sample'; got {mode!r}.")
    if key is None:
      raise ValueError("Latent mode 'sample' needs a key.")
    noise = np.asarray(jax.random.normal(key, mean.shape))
    return self.scale * (mean + np.exp(0.5 * logvar) * noise)

  def decode_scaled(self, z) -> np.ndarray:
    """Scaled latents [N, h, w, c] (what flow matching makes) -> images: `decode(z / s)`."""
    return self.decode(np.asarray(z) / self.scale)


def train_vae(images, config: VAEConfig, *,
              on_progress: Callable[[int], None] | None = None,
              state_path: str | None = None) -> tuple[VAE, dict]:
  """Adam (cosine decay) on minibatches drawn with replacement.

  Args:
    images: [N, H, W, C] in [-1, 1].
    on_progress: called with the steps done, every 100 steps.
    state_path: `fitting.fit`'s resume file (written every 100 steps and on a stop signal).

  Returns:
    (model, metrics {'loss', 'recon', 'kl'}: numpy [steps]).
  """
  images = jnp.asarray(images, jnp.float32)
  key = jax.random.key(config.seed)
  model = VAE(images.shape[1:], latent_channels=config.latent_channels,
              widths=config.widths, rngs=nnx.Rngs(jax.random.fold_in(key, 0)))
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  opt = optax.adam(optax.cosine_decay_schedule(config.lr, config.steps, alpha=0.05))
  data_key = jax.random.fold_in(key, 1)

  def loss_fn(params, i, images):
    idx, k = fitting.random_batch(data_key, i, config.batch_size, images.shape[0])
    return vae_loss(nnx.merge(graphdef, params), images[idx], k, config.beta)

  params, metrics = fitting.fit(
      fitting.make_update(loss_fn, opt, has_aux=True), params, opt.init(params),
      steps=config.steps, args=(images,),
      on_progress=None if on_progress is None else lambda done, *_: on_progress(done),
      state_path=state_path)
  return nnx.merge(graphdef, params), metrics


def cache_folder(train: dict, config: VAEConfig) -> tuple[str, str]:
  """(fingerprint, `cache_root()/vaes/<fingerprint>`) of this data set and config."""
  settings = json.dumps(dataclasses.asdict(config), sort_keys=True)
  fingerprint = data_fingerprint(train['x'], train['label'], settings)
  return fingerprint, files.join(cache_root(), 'vaes', fingerprint)


def _restore(folder: str, train: dict, config: VAEConfig, fingerprint: str) -> FrozenVAE:
  template = VAE(train['x'].shape[1:], latent_channels=config.latent_channels,
                 widths=config.widths, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(template)
  params = ocp.StandardCheckpointer().restore(files.join(folder, 'params'),
                                              nnx.to_pure_dict(state))
  info = files.read_json(files.join(folder, 'info.json'))
  return FrozenVAE(nnx.merge(graphdef, params), info['scale'], fingerprint, info)


def load_cached(train: dict, config: VAEConfig, *,
                cache_dir: str | None = None) -> FrozenVAE | None:
  """The cached VAE of this data set and config, or None where none was trained yet (or the
  entry is incomplete).

  Args:
    train: {'x': images [N, H, W, C] in [-1, 1], 'label': int [N]}.
    cache_dir: defaults to `cache_folder(train, config)[1]`.
  """
  fingerprint, folder = cache_folder(train, config)
  return load_or_build(cache_dir or folder, None,
                       lambda f: _restore(f, train, config, fingerprint), describe='VAE')


def load_or_train(train: dict, config: VAEConfig, *, cache_dir: str | None = None,
                  on_progress: Callable[[int], None] | None = None) -> FrozenVAE:
  """The VAE of this data set and config: read from the cache, or trained and cached.

  Args:
    train: {'x': images [N, H, W, C] in [-1, 1], 'label': int [N]}.
    cache_dir: defaults to `cache_folder(train, config)[1]`.
  """
  fingerprint, folder = cache_folder(train, config)

  def build(folder):
    model, metrics = train_vae(train['x'], config, on_progress=on_progress, state_path=partial)
    unscaled = FrozenVAE(model, 1.0, fingerprint, {})
    means = unscaled.encode(train['x'])[0]
    tail = slice(-min(100, config.steps), None)
    info = {'scale': float(1.0 / means.std()), 'config': dataclasses.asdict(config),
            **{f'final_{k}': float(v[tail].mean()) for k, v in metrics.items()}}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(files.join(folder, 'params'), nnx.to_pure_dict(nnx.split(model)[1]))
    checkpointer.wait_until_finished()
    files.write_json(files.join(folder, 'info.json'), info)
    files.remove(partial)
    return FrozenVAE(model, info['scale'], fingerprint, info)

  # the resume file lies beside the entry: a rebuild empties the entry's folder
  partial = f"{(cache_dir or folder).rstrip('/')}.partial.npz"
  return load_or_build(cache_dir or folder, build,
                       lambda f: _restore(f, train, config, fingerprint), describe='VAE')
