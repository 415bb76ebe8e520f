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
from flowdistill.condense.vae import FrozenVAE
from flowdistill.eval.feature_net import cache_root

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
