"""The on-disk cache of things trained once per data set (VAE, SSL backbone, feature and reference
networks): where entries live, the fingerprint that names them, and `load_or_build`, which trusts
an entry only when its manifest matches its files.

An entry is a folder (local or gs://). Its files are written first, by the caller's `build`;
`manifest.json`, the relative name, size and sha256 of each of them, is written last, so a
folder without one was cut short (or predates manifests) and is rebuilt, as is one whose files
no longer match it.
"""

import hashlib
import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from flowdistill import files

MANIFEST = 'manifest.json'
_log = logging.getLogger(__name__)


def cache_root() -> str:
  """`$FLOWDISTILL_CACHE`, else `~/.cache/flowdistill`."""
  return os.environ.get('FLOWDISTILL_CACHE', os.path.expanduser('~/.cache/flowdistill'))


def data_fingerprint(images, labels, settings: str) -> str:
  """16 hex digits naming a labelled data set (its first 2000 images, labels and shape) and the
  `settings` of whatever is trained on it: the key of an on-disk cache."""
  digest = hashlib.sha256()
  digest.update(np.ascontiguousarray(images[:2000]).tobytes())
  digest.update(np.ascontiguousarray(labels).tobytes())
  digest.update(f'{images.shape}-{settings}'.encode())
  return digest.hexdigest()[:16]


def write_manifest(folder: str) -> dict:
  """Writes `folder/manifest.json`: {'files': {relative name: {'size', 'sha256'}}} of every file
  under `folder` (at any depth, the manifest aside). Returns it."""
  listed = {}
  for name in files.walk(folder):
    if name != MANIFEST:
      path = files.join(folder, name)
      listed[name] = {'size': files.size(path), 'sha256': files.sha256(path)}
  manifest = {'files': listed}
  files.write_json(files.join(folder, MANIFEST), manifest)
  return manifest


def check(folder: str) -> str | None:
  """Why `folder` is not a complete entry (a sentence), or None where its manifest lists files
  that are all present with their recorded sizes and hashes. Files the manifest does not list
  (added beside the entry later) are not checked."""
  path = files.join(folder, MANIFEST)
  if not files.exists(path):
    return f'it has no {MANIFEST} (written partly, or before entries had manifests)'
  try:
    listed = files.read_json(path)['files']
  except (ValueError, KeyError, TypeError) as e:
    return f'its {MANIFEST} cannot be read ({e!r})'
  for name, want in sorted(listed.items()):
    file = files.join(folder, name)
    if not files.exists(file):
      return f'{name} is missing'
    if (size := files.size(file)) != want['size']:
      return f'{name} has {size} bytes where {want["size"]} were written'
    if files.sha256(file) != want['sha256']:
      return f'the contents of {name} changed since it was written (sha256 mismatch)'
  return None


def load_or_build(folder: str, build: Callable[[str], Any] | None, load: Callable[[str], Any], *,
                  describe: str = 'cache entry') -> Any:
  """`load(folder)` where `folder` holds a complete entry (`check`); else, with `build`, the
  folder is emptied, `build(folder)` writes the entry's files and returns the value, and the
  manifest is written last. A folder with something in it but no valid entry gets one warning
  naming it and the reason.

  Args:
    folder: the entry's folder; everything in it belongs to the entry (a rebuild removes it).
    build: `folder -> value`, writing the files that `load` reads; None for read-only callers.
    load: `folder -> value`.
    describe: what the entry holds, for the warning ('VAE', 'SSL backbone').

  Returns:
    The loaded or built value; None where there is no complete entry and `build` is None.
  """
  if files.isdir(folder) and files.listdir(folder):
    reason = check(folder)
    if reason is None:
      return load(folder)
    _log.warning('The %s cached in %s is not usable: %s; %s.', describe, folder, reason,
                 'rebuilding it' if build is not None else 'ignoring it')
  if build is None:
    return None
  files.rmtree(folder)
  files.makedirs(folder)
  value = build(folder)
  write_manifest(folder)
  return value
