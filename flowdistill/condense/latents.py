"""Scaled VAE latents of a labelled image set, encoded once and cached with the VAE's
fingerprint: the data of PGFM's latent flow matching (`config.data.source='latent'` with
`config.data.path` naming the cache file trains any method on it).

A cache file is an `.npz` with `x_train`, `label_train`, `x_test`, `label_test` (latents
[N, h, w, c] = s · mean(x), or s · z with z ~ q(z|x)), `fingerprint` (of the VAE) and `scale`;
`<file>.manifest.json` beside it records its size and sha256 (`flowdistill.cache`), so a file
changed or cut short after it was written is never read as latents.
"""

import zipfile

import jax
import numpy as np
from jax.experimental import multihost_utils

from flowdistill import cache, files
from flowdistill.condense.frozen_vae import FrozenVAE
from flowdistill.data import sources
from flowdistill.errors import BadInput, MissingInput
from flowdistill.models import autoencoder_kl

MODES = ('mean', 'sample')
KEYS = ('x_train', 'label_train', 'x_test', 'label_test', 'fingerprint', 'scale')


def cache_path(frozen: FrozenVAE, mode: str) -> str:
  """`cache_root()/latents/<VAE fingerprint>-<mode>.npz`."""
  return files.join(cache.cache_root(), 'latents', f'{frozen.fingerprint}-{mode}.npz')


def _splits(f: dict, path: str, fingerprint: str | None) -> dict:
  """What `load` returns, from the arrays `f` of the cache file `path`."""
  missing = [k for k in KEYS if k not in f]
  if missing:
    raise BadInput(f'{path} lacks {missing}; a latent cache holds {list(KEYS)} '
                     '(written by flowdistill.condense.latents.load_or_encode).')
  out = {split: {'x': f[f'x_{split}'].astype(np.float32),
                 'label': f[f'label_{split}'].astype(np.int32)} for split in ('train', 'test')}
  out.update(fingerprint=str(f['fingerprint']), scale=float(f['scale']))
  if fingerprint is not None and out['fingerprint'] != fingerprint:
    raise BadInput(f'{path} holds latents of VAE {out["fingerprint"]}, but the VAE in use is '
                     f'{fingerprint}; delete the file (or point config.data.path elsewhere) to '
                     're-encode with this VAE.')
  return out


def _read(path: str, fingerprint: str | None = None) -> dict:
  """`load` without the manifest check."""
  try:
    f = files.load_npz(path)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise BadInput(f'The latent cache {path} cannot be read ({e!r}); delete it and make it '
                     'again with flowdistill.condense.latents.load_or_encode.') from None
  return _splits(f, path, fingerprint)


def load(path: str, *, fingerprint: str | None = None) -> dict:
  """{'train': {'x', 'label'}, 'test': {...}, 'fingerprint', 'scale'} from a cache file,
  refusing a file that differs from its manifest (`<path>.manifest.json`, where there is one:
  files made elsewhere have none), cannot be read, lacks a key or (when `fingerprint` is given)
  came from another VAE."""
  if not files.exists(path):
    raise MissingInput(f'Latent cache {path} does not exist; make it with '
                            'flowdistill.condense.latents.load_or_encode (the pgfm method does).')
  if files.exists(cache.file_manifest(path)) and (reason := cache.check_file(path)):
    raise BadInput(f'The latent cache {path} is not usable: {reason}; delete it and make it '
                     'again with flowdistill.condense.latents.load_or_encode.')
  return _read(path, fingerprint)


def load_or_encode(frozen: FrozenVAE, train: dict, test: dict, *, mode: str = 'mean',
                   seed: int = 0, path: str | None = None, chunk: int = 1000) -> dict:
  """The scaled latents of both splits: read from `path` (default `cache_path`) where it
  matches its manifest, else encoded and saved there (with one warning where a damaged or
  unverifiable file is replaced). Returns what `load` returns.

  Encoding goes `chunk` images at a time into `<path>.parts/` (one atomic file per chunk, each
  with its manifest, the chunks split over processes), so a killed run resumes at the first
  missing chunk; process 0 then joins the chunks into `path` and removes the parts. Chunk c of a
  split uses the key `fold_in(fold_in(key(seed), split), c)`, so 'sample' latents do not depend
  on how often the run was interrupted.
  """
  if mode not in MODES:
    raise BadInput(f'Latent mode must be one of {MODES}; got {mode!r}.')
  return cache.load_or_build_file(
      path or cache_path(frozen, mode),
      lambda p: _encode(frozen, (('train', train), ('test', test)), mode, seed, p, chunk),
      lambda p: _read(p, frozen.fingerprint), describe='latents',
      writer=jax.process_index() == 0)


def _encode(frozen: FrozenVAE, splits, mode: str, seed: int, path: str, chunk: int) -> dict:
  """Encodes `splits` ((name, {'x', 'label'}), ...) into the cache file `path` (see
  `load_or_encode`); returns what `load` returns."""
  parts, key = path + '.parts', jax.random.key(seed)

  def part(i: int, c: int) -> np.ndarray:
    """The latents of chunk `c` of split `i`, read from its file or encoded into it."""
    split, data = splits[i]

    def encode(file):
      z = np.asarray(frozen.latents(data['x'][c * chunk:(c + 1) * chunk], mode=mode,
                                    key=jax.random.fold_in(jax.random.fold_in(key, i), c)))
      files.save_npy(file, z)
      return z

    return cache.load_or_build_file(files.join(parts, f'{frozen.fingerprint}-{split}-{c:06d}.npy'),
                                    encode, files.load_npy, describe='latent chunk')

  counts = [-(-len(data['x']) // chunk) for _, data in splits]
  for i, count in enumerate(counts):
    for c in range(jax.process_index(), count, jax.process_count()):
      part(i, c)
  _sync(f'flowdistill: latents of {path} encoded')
  out = None
  if jax.process_index() == 0:
    arrays = {}
    for i, (split, data) in enumerate(splits):
      arrays[f'x_{split}'] = np.concatenate([part(i, c) for c in range(counts[i])])
      arrays[f'label_{split}'] = np.asarray(data['label'], np.int32)
    arrays.update(fingerprint=frozen.fingerprint, scale=frozen.scale)
    files.save_npz(path, **arrays)
    files.rmtree(parts)
    out = _splits(arrays, path, frozen.fingerprint)
  _sync(f'flowdistill: latents of {path} written')
  return out if out is not None else _read(path, frozen.fingerprint)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def load_source(data_config) -> sources.Dataset:
  """The data of `config.data.source='latent'`: the latent cache `config.data.path`, encoded
  first with the AutoencoderKL weights `config.data.encode.vae` where it is missing or does not
  match its manifest (without `encode.vae`, such a file is refused)."""
  path = sources.data_path(data_config)
  if not path:
    raise BadInput("config.data.source='latent' needs config.data.path: the latent cache "
                     '(.npz) written by flowdistill.condense.latents.load_or_encode.')
  if not data_config.encode.vae:
    splits = load(path)
  elif cache.check_file(path) is None:
    splits = _read(path)
  else:  # missing, or replaced with one warning
    splits = encode_with_autoencoder_kl(data_config.encode, path)
  num_classes = sources.check_labels(splits, path)
  return sources.Dataset(shape=splits['train']['x'].shape[1:], num_classes=num_classes,
                         train=splits['train'], test=splits['test'])


def encode_with_autoencoder_kl(encode_config, path: str) -> dict:
  """Encodes `config.data.encode.source` with the AutoencoderKL weights `encode.vae` (and the
  `config.json` beside them, if any) into the latent cache `path`; resumable, split over
  processes (`load_or_encode`). Returns what `load` returns."""
  if not encode_config.source:
    raise BadInput(f'config.data.encode.vae is set and the latent cache {path} does not exist '
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
