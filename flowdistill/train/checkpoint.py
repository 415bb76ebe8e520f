"""Orbax checkpoints of the train state with a JSON sidecar, and safe resume."""

import contextlib
import logging
import os
import re
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from flowdistill import files
from flowdistill.errors import BadInput, UserError

_log = logging.getLogger(__name__)


class CheckpointMismatchError(UserError, ValueError):
  """The workdir holds a checkpoint of a different model or state layout."""


class UnreadableCheckpointsError(UserError, OSError):
  """The workdir holds checkpoints, and every one of them fails to read."""


class CheckpointWriteError(UserError, OSError):
  """A checkpoint could not be written (disk full, quota, permissions, filesystem gone)."""


# What the OS said, as it appears in Orbax/TensorStore messages, the cause and the fix; the
# first is also what `save` says when it refuses a checkpoint the disk cannot hold.
WRITE_FAILURES = (
    (r'No space left on device|RESOURCE_EXHAUSTED', 'the disk is full',
     'free space there or move the workdir to a larger disk'),
    (r'Disk quota exceeded', 'the disk quota is used up', 'free quota or move the workdir'),
    (r'Permission denied|PERMISSION_DENIED|Read-only file system', 'the workdir is not '
     'writable any more', 'restore write access (chmod, remount) or move the workdir'),
    (r'Transport endpoint is not connected|Stale file handle|Input/output error|'
     r'No such file or directory|NOT_FOUND', 'the filesystem is unreachable or the workdir '
     'was removed', 'remount the shared filesystem'),
)
SAVE_MARGIN_BYTES = 2**20  # metadata, JSON sidecars


def param_shapes(tree) -> dict[str, list[int]]:
  """{'a/b/kernel': [shape], ...} for every array leaf of a pytree."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path, simple=True, separator='/'): list(np.shape(leaf))
          for path, leaf in flat}


def check_workdir(path) -> None:
  """Refuses URLs other than gs:// (Cloud Storage, the one object store that is tested)."""
  if files.is_url(path) and not str(path).startswith('gs://'):
    raise BadInput(f'{str(path)!r}: flowdistill writes to local paths and to gs:// buckets; '
                   'mount this store (e.g. s3fs) and pass its local path as --workdir.')


def _free_bytes(directory: str) -> int | None:
  """Free bytes of a local filesystem; None for an object store (no quota to check)."""
  return None if files.is_url(directory) else shutil.disk_usage(directory).free


class Checkpointer:
  """Saves `TrainState`s every so often, keeps the last K, resumes from the newest good one.

  Args:
    directory: where checkpoints live (created; must be writable).
    keep: how many to keep.
    async_save: let saves run in the background (`wait()` before reading them).
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    check_workdir(directory)
    directory = str(directory if files.is_url(directory) else os.path.abspath(directory))
    try:
      files.makedirs(directory)
      probe = files.join(directory, f'.write_test.{jax.process_index()}')
      files.write_bytes(probe, b'ok')
      files.remove(probe)
    except OSError as e:
      raise files.NotWritable(f'Cannot write checkpoints to {directory!r} ({e.strerror or e}); '
                              'choose a writable --workdir.') from e
    self.directory = directory
    self.manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True))

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, meta: dict) -> None:
    """Saves `state` with `meta` (JSON) plus the state's array shapes at `step`.

    Raises:
      CheckpointWriteError: before writing when the disk cannot hold the checkpoint (and one
        still being written), or when the write fails; naming the cause, the fix and the last
        good checkpoint.
    """
    need = sum(x.nbytes for x in jax.tree.leaves(state)) * (
        2 if self.manager.is_saving_in_progress() else 1) + SAVE_MARGIN_BYTES
    free = _free_bytes(self.directory)
    if free is not None and free < need:
      _, full, fix = WRITE_FAILURES[0]
      raise CheckpointWriteError(self._failure(
          step, f'{full} ({free / 2**20:.1f} MiB free, the checkpoint needs about '
          f'{need / 2**20:.1f} MiB)', fix))
    meta = dict(meta, step=int(step), shapes=param_shapes(state))
    with self._explained(step):
      self.manager.save(int(step), args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def _failure(self, step: int, cause: str, fix: str) -> str:
    good = [s for s in self.all_steps() if s != step]
    last = f'step {good[-1]}' if good else 'none yet'
    return (f'Cannot write the checkpoint of step {step} in {self.directory}: {cause}. Fix: '
            f'{fix}, then rerun the same command; it resumes from the last good checkpoint '
            f'({last}).')

  @contextlib.contextmanager
  def _explained(self, step: int | None):
    """Turns a failed (possibly earlier, asynchronous) write into one `CheckpointWriteError`."""
    try:
      yield
    except Exception as e:  # noqa: BLE001 — Orbax raises several types; the text says why.
      text = str(e)
      for pattern, cause, fix in WRITE_FAILURES:
        if re.search(pattern, text):
          failed = re.search(r'checkpoints/(\d+)', text)
          raise CheckpointWriteError(self._failure(
              int(failed.group(1)) if failed else step, cause, fix)) from e
      raise

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta']

  def restore(self, step: int, target):
    """Restores step `step` onto `target`'s structure, shapes and shardings.

    Raises CheckpointMismatchError, naming the differing arrays, when the checkpoint was made
    by another model or configuration.
    """
    meta = self.read_meta(step)
    expected, stored = param_shapes(target), meta.get('shapes', {})
    if expected != stored:
      diff = sorted((k for k in set(expected) | set(stored) if expected.get(k) != stored.get(k)),
                    key=lambda k: (not k.startswith('params'), k))
      details = ', '.join(f'{k}: checkpoint {stored.get(k)} vs config {expected.get(k)}'
                          for k in diff[:4])
      raise CheckpointMismatchError(
          f'The checkpoint at step {step} in {self.directory} does not match this '
          f'configuration ({len(diff)} arrays differ; {details}). Use a fresh --workdir, or '
          'restore the config that made it.')
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
        target)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored['state'], restored['meta']

  def restore_latest(self, target):
    """(state, meta) from the newest checkpoint that reads back, or None if there is none.

    A checkpoint that fails to read (truncated, corrupted) is skipped with a warning and the
    previous one is tried; once one reads back, the unreadable newer ones are moved aside to
    `unreadable-<step>` (kept for inspection, out of the way of new saves). A mismatched model
    raises at once.

    Raises:
      CheckpointMismatchError: the newest readable checkpoint is of another model.
      UnreadableCheckpointsError: checkpoints exist but none reads back (they are left as they
        are rather than overwritten by a fresh run).
    """
    steps, unreadable = self.all_steps(), []
    for step in reversed(steps):
      try:
        restored = self.restore(step, target)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # noqa: BLE001 — any read failure means "try the older one".
        _log.warning('Checkpoint at step %d in %s is unreadable (%s: %s); falling back to '
                     'the previous one.', step, self.directory, type(e).__name__, e)
        unreadable.append(step)
        continue
      self._move_aside(unreadable)
      return restored
    if steps:
      raise UnreadableCheckpointsError(
          f'None of the checkpoints in {self.directory} (steps {steps}) reads back; they are '
          'left untouched. Move them away to start afresh, or use a fresh --workdir.')
    return None

  def _move_aside(self, steps: list[int]) -> None:
    if not steps:
      return
    if jax.process_index() == 0:
      for step in steps:
        base = aside = files.join(self.directory, f'unreadable-{step}')
        suffix = 0
        while files.exists(aside):
          suffix += 1
          aside = f'{base}.{suffix}'
        epath.Path(files.join(self.directory, str(step))).rename(aside)
        _log.warning('Moved the unreadable checkpoint of step %d to %s.', step, aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('flowdistill: unreadable checkpoints moved aside')
    self.manager.reload()

  def wait(self) -> None:
    with self._explained(None):
      self.manager.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait()
    except CheckpointWriteError:
      with contextlib.suppress(Exception):  # the same failure again; the first says it
        self.manager.close()
      raise
    self.manager.close()
