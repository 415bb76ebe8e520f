"""The on-disk cache of things computed once and reused (VAE, SSL backbone, feature and reference
networks, latents, teacher pairs, SFM statistics): where entries live, the fingerprint that names
them, and `load_or_build` / `load_or_build_file`, which trust an entry only when its manifest
matches its files.

An entry is a folder (local or gs://) or a single file. Its files are written first, by the
caller's `build`; the manifest, the relative name, size and sha256 of each of them, is written
last (`<folder>/manifest.json`, or `<file>.manifest.json` beside a one-file entry), so an entry
without one was cut short (or predates manifests) and is rebuilt, as is one whose files no longer
match it.
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


def _record(path: str) -> dict:
  return {'size': files.size(path), 'sha256': files.sha256(path)}


def write_manifest(folder: str) -> dict:
  """Writes `folder/manifest.json`: {'files': {relative name: {'size', 'sha256'}}} of every file
  under `folder` (at any depth, the manifest aside). Returns it."""
  manifest = {'files': {name: _record(files.join(folder, name))
                        for name in files.walk(folder) if name != MANIFEST}}
  files.write_json(files.join(folder, MANIFEST), manifest)
  return manifest


def file_manifest(path: str) -> str:
  """The manifest of the one-file entry `path`: `<path>.manifest.json`."""
  return f'{path}.{MANIFEST}'


def write_file_manifest(path: str) -> dict:
  """Writes the manifest of the one-file entry `path` ({'files': {its name: {'size', 'sha256'}}},
  as a folder's). Returns it."""
  manifest = {'files': {os.path.basename(path): _record(path)}}
  files.write_json(file_manifest(path), manifest)
  return manifest


def _listed(manifest: str) -> dict:
  """{name: {'size', 'sha256'}} of the manifest file `manifest`; ValueError where it cannot be
  read or is not one."""
  try:
    listed = files.read_json(manifest)['files']
  except (OSError, KeyError, TypeError) as e:  # OSError: removed while being read
    raise ValueError(repr(e)) from None
  if not isinstance(listed, dict) or not all(
      isinstance(want, dict) and {'size', 'sha256'} <= set(want) for want in listed.values()):
    raise ValueError(f'{listed!r:.80} is not a list of files')
  return listed


def _mismatch(folder: str, manifest: str, required: str | None = None) -> str | None:
  """Why the files under `folder` do not match `manifest` (which must list `required`), or
  None."""
  if not files.exists(manifest):
    return (f'it has no {os.path.basename(manifest)} (written partly, or before entries had '
            'manifests)')
  try:
    listed = _listed(manifest)
  except ValueError as e:
    return f'its {os.path.basename(manifest)} cannot be read ({e})'
  if required is not None and required not in listed:
    return f'its {os.path.basename(manifest)} does not list {required}'
  for name, want in sorted(listed.items()):
    file = files.join(folder, name)
    if not files.exists(file):
      return f'{name} is missing'
    if (size := files.size(file)) != want['size']:
      return f'{name} has {size} bytes where {want["size"]} were written'
    if files.sha256(file) != want['sha256']:
      return f'the contents of {name} changed since it was written (sha256 mismatch)'
  return None


def check(folder: str) -> str | None:
  """Why `folder` is not a complete entry (a sentence), or None where its manifest lists files
  that are all present with their recorded sizes and hashes. Files the manifest does not list
  (added beside the entry later) are not checked."""
  return _mismatch(folder, files.join(folder, MANIFEST))


def check_file(path: str) -> str | None:
  """Why the file `path` is not a complete one-file entry (a sentence), or None where it has
  the size and hash its manifest (`file_manifest`) recorded."""
  return _mismatch(os.path.dirname(path), file_manifest(path), os.path.basename(path))


def _warn(describe: str, where: str, reason: str, rebuild: bool) -> None:
  _log.warning('The %s cached in %s is not usable: %s; %s.', describe, where, reason,
               'rebuilding it' if rebuild else 'ignoring it')


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
    _warn(describe, folder, reason, build is not None)
  if build is None:
    return None
  files.rmtree(folder)
  files.makedirs(folder)
  value = build(folder)
  write_manifest(folder)
  return value


def load_or_build_file(path: str, build: Callable[[str], Any] | None,
                       load: Callable[[str], Any], *, describe: str = 'cache file',
                       writer: bool = True) -> Any:
  """`load_or_build` for an entry that is one file: `load(path)` where `path` matches its
  manifest (`check_file`); else, with `build`, `build(path)` writes the file (atomically, e.g.
  with `files.save_npz`) and returns the value, and the manifest is written after it. A file or
  manifest that is there but does not match gets one warning naming it and the reason.

  Args:
    path: the file.
    build: `path -> value`, writing the file that `load` reads; None for read-only callers.
    load: `path -> value`.
    describe: what the file holds, for the warning ('latent cache').
    writer: whether this process writes the file and its manifest; in a multi-process job the
      other processes pass False, and their `build` waits for the writer's file.

  Returns:
    The loaded or built value; None where there is no complete entry and `build` is None.
  """
  if files.exists(path) or files.exists(file_manifest(path)):
    reason = check_file(path)
    if reason is None:
      return load(path)
    _warn(describe, path, reason, build is not None)
  if build is None:
    return None
  if writer:  # the old manifest goes first: a build cut short leaves no entry that looks whole
    files.remove(file_manifest(path))
  value = build(path)
  if writer:
    write_file_manifest(path)
  return value
