"""Scaled VAE latents of a labelled image set, encoded once and cached with the VAE's
fingerprint: the data of PGFM's latent flow matching (`config.data.source='latent'` with
`config.data.path` naming the cache file trains any method on it).

A cache file is an `.npz` with `x_train`, `label_train`, `x_test`, `label_test` (latents
[N, h, w, c] = s · mean(x), or s · z with z ~ q(z|x)), `fingerprint` (of the VAE) and `scale`.
"""

import jax
import numpy as np
from jax.experimental import multihost_utils

from flowdistill import files
from flowdistill.cache import cache_root
from flowdistill.condense.frozen_vae import FrozenVAE
from flowdistill.data import sources
from flowdistill.models import autoencoder_kl

MODES = ('mean', 'sample')
KEYS = ('x_train', 'label_train', 'x_test', 'label_test', 'fingerprint', 'scale')


def cache_path(frozen: FrozenVAE, mode: str) -> str:
  """`cache_root()/latents/<VAE fingerprint>-<mode>.npz`."""
  return files.join(cache_root(), 'latents', f'{frozen.fingerprint}-{mode}.npz')


def load(path: str, *, fingerprint: str | None = None) -> dict:
  """{'train': {'x', 'label'}, 'test': {...}, 'fingerprint', 'scale'} from a cache file,
  refusing a file that lacks a key or (when `fingerprint` is given) came from another VAE."""
  if not files.exists(path):
    raise FileNotFoundError(f'Latent cache {path} does not exist; make it with '
                            'flowdistill.condense.latents.load_or_encode (the pgfm method does).')
  f = files.load_npz(path)
  missing = [k for k in KEYS if k not in f]
  if missing:
    raise ValueError(f'{path} lacks {missing}; a latent cache holds {list(KEYS)} '
                     '(written by flowdistill.condense.latents.load_or_encode).')
  out = {split: {'x': f[f'x_{split}'].astype(np.float32),
                 'label': f[f'label_{split}'].astype(np.int32)} for split in ('train', 'test')}
  out.update(fingerprint=str(f['fingerprint']), scale=float(f['scale']))
  if fingerprint is not None and out['fingerprint'] != fingerprint:
    raise ValueError(f'{path} holds latents of VAE {out["fingerprint"]}, but the VAE in use is '
                     f'{fingerprint}; delete the file (or point config.data.path elsewhere) to '
                     're-encode with this VAE.')
  return out


def load_or_encode(frozen: FrozenVAE, train: dict, test: dict, *, mode: str = 'mean',
                   seed: int = 0, path: str | None = None, chunk: int = 1000) -> dict:
  """The scaled latents of both splits: read from `path` (default `cache_path`) or encoded
  and saved there. Returns what `load` returns.

  Encoding goes `chunk` images at a time into `<path>.parts/` (one atomic file per chunk, the
  chunks split over processes), so a killed run resumes at the first missing chunk; process 0
  then joins the chunks into `path` and removes the parts. Chunk c of a split uses the key
  `fold_in(fold_in(key(seed), split), c)`, so 'sample' latents do not depend on how often the
  run was interrupted.
  """
  if mode not in MODES:
    raise ValueError(f'Latent mode must be one of {MODES}; got {mode!r}.')
  path = path or cache_path(frozen, mode)
  if files.exists(path):
    return load(path, fingerprint=frozen.fingerprint)
  parts = path + '.parts'
  files.makedirs(parts)
  key = jax.random.key(seed)
  splits = (('train', train), ('test', test))
  for i, (split, data) in enumerate(splits):
    for c in range(jax.process_index(), -(-len(data['x']) // chunk), jax.process_count()):
      file = files.join(parts, f'{frozen.fingerprint}-{split}-{c:06d}.npy')
      if not files.exists(file):
        files.save_npy(file, frozen.latents(
            data['x'][c * chunk:(c + 1) * chunk], mode=mode,
            key=jax.random.fold_in(jax.random.fold_in(key, i), c)))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'flowdistill: latents of {path} encoded')
  if jax.process_index() == 0:
    arrays = {}
    for split, data in splits:
      names = sorted(f for f in files.listdir(parts)
                     if f.startswith(f'{frozen.fingerprint}-{split}-') and f.endswith('.npy'))
      arrays[f'x_{split}'] = np.concatenate([files.load_npy(files.join(parts, f))
                                             for f in names])
      arrays[f'label_{split}'] = np.asarray(data['label'], np.int32)
    files.save_npz(path, fingerprint=frozen.fingerprint, scale=frozen.scale, **arrays)
    files.rmtree(parts)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'flowdistill: latents of {path} written')
  return load(path, fingerprint=frozen.fingerprint)


def load_source(data_config) -> sources.Dataset:
  """The data of `config.data.source='latent'`: the latent cache `config.data.path`, encoded
  first with the AutoencoderKL weights `config.data.encode.vae` where it is missing."""
  path = sources.data_path(data_config)
  if not path:
    raise ValueError("config.data.source='latent' needs config.data.path: the latent cache "
                     '(.npz) written by flowdistill.condense.latents.load_or_encode.')
  if data_config.encode.vae and not files.exists(path):
    splits = encode_with_autoencoder_kl(data_config.encode, path)
  else:
    splits = load(path)
  num_classes = sources.check_labels(splits, path)
  return sources.Dataset(shape=splits['train']['x'].shape[1:], num_classes=num_classes,
                         train=splits['train'], test=splits['test'])


def encode_with_autoencoder_kl(encode_config, path: str) -> dict:
  """Encodes `config.data.encode.source` with the AutoencoderKL weights `encode.vae` (and the
  `config.json` beside them, if any) into the latent cache `path`; resumable, split over
  processes (`load_or_encode`). Returns what `load` returns."""
  if not encode_config.source:
    raise ValueError(f'config.data.encode.vae is set and the latent cache {path} does not exist '
                     'yet, so config.data.encode.source must name the images to encode (e.g. '
                     "'cifar10', or 'imagenet' with encode.path an image folder).")
  splits = sources.image_splits(encode_config.source, encode_config.path or None)
  config = autoencoder_kl.read_config(encode_config.vae)
  if splits['train']['x'].shape[-1] == 1 and config.in_channels == 3:  # grey as RGB
    for split in splits.values():
      split['x'] = np.repeat(split['x'], 3, axis=-1)
  module, fingerprint = autoencoder_kl.load_autoencoder_kl(
      encode_config.vae, splits['train']['x'].shape[1:], config)
  frozen = FrozenVAE(module, config.scaling_factor, fingerprint, {'weights': encode_config.vae})
  return load_or_encode(frozen, splits['train'], splits['test'], path=path, chunk=256)
