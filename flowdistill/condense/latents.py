"""Scaled VAE latents of a labelled image set, encoded once and cached with the VAE's
fingerprint: the data of PGFM's latent flow matching (`config.data.source='latent'` with
`config.data.path` naming the cache file trains any method on it).

A cache file is an `.npz` with `x_train`, `label_train`, `x_test`, `label_test` (latents
[N, h, w, c] = s · mean(x), or s · z with z ~ q(z|x)), `fingerprint` (of the VAE) and `scale`.
"""

import os

import jax
import numpy as np

from flowdistill.condense.vae import FrozenVAE
from flowdistill.eval.feature_net import cache_root

MODES = ('mean', 'sample')
KEYS = ('x_train', 'label_train', 'x_test', 'label_test', 'fingerprint', 'scale')


def cache_path(frozen: FrozenVAE, mode: str) -> str:
  """`cache_root()/latents/<VAE fingerprint>-<mode>.npz`."""
  return os.path.join(cache_root(), 'latents', f'{frozen.fingerprint}-{mode}.npz')


def load(path: str, *, fingerprint: str | None = None) -> dict:
  """{'train': {'x', 'label'}, 'test': {...}, 'fingerprint', 'scale'} from a cache file,
  refusing a file that lacks a key or (when `fingerprint` is given) came from another VAE."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Latent cache {path} does not exist; make it with '
                            'flowdistill.condense.latents.load_or_encode (the pgfm method does).')
  with np.load(path) as f:
    missing = [k for k in KEYS if k not in f.files]
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
                   seed: int = 0, path: str | None = None) -> dict:
  """The scaled latents of both splits: read from `path` (default `cache_path`) or encoded
  and saved there. Returns what `load` returns."""
  if mode not in MODES:
    raise ValueError(f'Latent mode must be one of {MODES}; got {mode!r}.')
  path = path or cache_path(frozen, mode)
  if os.path.isfile(path):
    return load(path, fingerprint=frozen.fingerprint)
  key = jax.random.key(seed)
  arrays = {}
  for i, (split, data) in enumerate((('train', train), ('test', test))):
    arrays[f'x_{split}'] = frozen.latents(data['x'], mode=mode, key=jax.random.fold_in(key, i))
    arrays[f'label_{split}'] = np.asarray(data['label'], np.int32)
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  partial = path + '.partial.npz'
  np.savez(partial, fingerprint=frozen.fingerprint, scale=frozen.scale, **arrays)
  os.replace(partial, path)
  return load(path, fingerprint=frozen.fingerprint)
