"""Teacher trajectories on disk: noise and the teacher's ODE states at fixed times (reflow).

A pairs folder holds `manifest.json` (the teacher's identity, the solver settings, the times,
the seed) and `chunk_00000.npz`, ... each with `'states'` float32 [chunk, T, ...] and, for a
class-conditional teacher, `'label'` int32 [chunk]. Row `i` starts from the noise of
`fold_in(key(seed), i)`, so the folder is the same whoever writes it: generation resumes
after an interruption (each chunk is written atomically), more rows
can be added later, and any run with the same teacher and settings reuses it. Each chunk is a
one-file cache entry (`flowdistill.cache`: `chunk_00000.npz.manifest.json` records its size and
sha256), so a chunk changed or cut short on disk is made again by `generate` and never loaded.
"""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from flowdistill import cache, files
from flowdistill.errors import BadInput, MissingInput

MANIFEST = 'manifest.json'


def fingerprint(params) -> str:
  """sha256 of a parameter pytree's paths, shapes and values (identifies a teacher)."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    value = np.asarray(leaf)
    digest.update(f'{jax.tree_util.keystr(path)}{value.shape}{value.dtype}'.encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def row_inputs(seed: int, start: int, num: int, shape: tuple[int, ...], num_classes: int = 0):
  """Noise [num, *shape] (and labels [num], or None) of rows `start .. start + num - 1`."""
  key = jax.random.key(seed)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(start + jnp.arange(num))
  x0 = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape))(keys)
  if not num_classes:
    return x0, None
  labels = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 1), (), 0,
                                                 num_classes))(keys)
  return x0, labels


def _chunk_path(directory, index):
  return files.join(directory, f'chunk_{index:05d}.npz')


def _identity(directory: str) -> dict:
  """The stored `manifest.json` of the pairs in `directory`, refused where it cannot be read."""
  path = files.join(directory, MANIFEST)
  try:
    stored = files.read_json(path)
    if isinstance(stored, dict) and isinstance(stored.get('chunk'), int):
      return stored
    problem = 'it does not describe teacher pairs'
  except (OSError, ValueError) as e:
    problem = repr(e)
  raise BadInput(f'{path} cannot be read ({problem}), so the teacher pairs in {directory!r} '
                   'cannot be trusted: delete that folder to make them again.')


def _check_manifest(directory: str, manifest: dict) -> None:
  if not files.exists(files.join(directory, MANIFEST)):
    files.write_json(files.join(directory, MANIFEST), manifest)
    return
  stored = _identity(directory)
  differ = sorted(k for k in set(stored) | set(manifest) if stored.get(k) != manifest.get(k))
  if differ:
    details = '; '.join(f'{k}: stored {stored.get(k)!r}, now {manifest.get(k)!r}'
                        for k in differ)
    raise BadInput(f'The teacher pairs in {directory!r} were made differently ({details}). '
                     'Point config.reflow.pairs_dir to a new folder, or delete that one.')


def generate(directory: str, trajectory_fn, *, num: int, chunk: int, shape: tuple[int, ...],
             seed: int, identity: dict, num_classes: int = 0) -> None:
  """Writes the chunks of rows `0 .. num - 1` that are missing (round-robin over processes).

  Args:
    trajectory_fn: `(x0 [chunk, ...], labels [chunk] or None) -> states [T, chunk, ...]`
      (e.g. a jitted `reflow.teacher_trajectory`).
    num, chunk: rows wanted (rounded up to whole chunks) and rows per file.
    identity: JSON-able facts that must match for reuse (teacher, solver, times, ...).
  """
  files.makedirs(directory)
  manifest = dict(identity, seed=seed, chunk=chunk, shape=list(shape), num_classes=num_classes)
  if jax.process_index() == 0:
    _check_manifest(directory, manifest)
  for index in range(jax.process_index(), -(-num // chunk), jax.process_count()):

    def write(path, start=index * chunk):
      x0, labels = row_inputs(seed, start, chunk, shape, num_classes)
      arrays = {'states': np.asarray(jnp.moveaxis(trajectory_fn(x0, labels), 0, 1), np.float32)}
      if labels is not None:
        arrays['label'] = np.asarray(labels, np.int32)
      files.save_npz(path, **arrays)

    cache.load_or_build_file(_chunk_path(directory, index), write, lambda path: None,
                             describe='chunk of teacher pairs')
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'teacher_pairs:{directory}')
  if jax.process_index() != 0:
    _check_manifest(directory, manifest)


def load(directory: str, num: int) -> dict[str, np.ndarray]:
  """The first `num` rows: {'states': [num, T, ...], 'label': [num] if conditional}; a chunk
  that is missing or differs from its manifest is refused (`generate` makes it again)."""
  chunk = _identity(directory)['chunk']
  parts = []
  for index in range(-(-num // chunk)):
    path = _chunk_path(directory, index)
    if not files.exists(path):
      raise MissingInput(f'{path} is missing: run teacher_pairs.generate for {num} rows.')
    if reason := cache.check_file(path):
      raise BadInput(f'{path} is not usable: {reason}; run teacher_pairs.generate (a reflow '
                       'run does) to make it again, or delete it.')
    parts.append(files.load_npz(path))
  return {k: np.concatenate([p[k] for p in parts])[:num] for k in parts[0]}
