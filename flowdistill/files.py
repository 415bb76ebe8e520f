"""Files in a local folder or a gs:// bucket, through etils.epath (gcsfs for gs:// paths).

Every file the library writes outside Orbax goes through here, so a `--workdir`, a cache root
(`FLOWDISTILL_CACHE`) or a latent cache may be a bucket. Writes are atomic: locally a temporary
file is renamed over the target; in an object store an upload becomes visible only once
complete, so the object is written in place. `check_writable` finds a folder that cannot be
written, or a bucket that does not answer, before a run starts.
"""

import hashlib
import io
import json
import os
import socket
import threading

import numpy as np
from etils import epath

from flowdistill.errors import UserError

# A bucket silent this long is out of reach (gcsfs would retry ~90 s); a probe write to a
# reachable bucket takes well under a second.
PROBE_TIMEOUT_S = 10.0
_BUCKET_HINT = ('check the network, the credentials (gcloud auth application-default login, or '
                'GOOGLE_APPLICATION_CREDENTIALS) and that the bucket exists')


class NotWritable(UserError, PermissionError):
  """A folder (a workdir, a cache) that cannot be created or written."""


class Unreachable(UserError, TimeoutError):
  """A folder whose store did not answer in time: a bucket out of reach, a hung mount."""


def is_url(path) -> bool:
  """True for object-store paths (gs://, s3://)."""
  return '://' in str(path)


def join(*parts) -> str:
  """`os.path.join` that keeps a URL's scheme (`gs://b/run`, 'cells' -> `gs://b/run/cells`)."""
  return str(epath.Path(parts[0]).joinpath(*parts[1:]))


def exists(path) -> bool:
  return epath.Path(path).exists()


def isdir(path) -> bool:
  return epath.Path(path).is_dir()


def makedirs(path) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def listdir(path) -> list[str]:
  """Names in the folder `path`."""
  return [p.name for p in epath.Path(path).iterdir()]


def remove(path) -> None:
  epath.Path(path).unlink(missing_ok=True)


def rmtree(path) -> None:
  epath.Path(path).rmtree(missing_ok=True)


def write_bytes(path, data: bytes) -> None:
  """Writes `data` to `path` atomically (a reader sees the old file or the new one)."""
  if is_url(path):
    epath.Path(path).write_bytes(data)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def read_bytes(path) -> bytes:
  return epath.Path(path).read_bytes()


def write_json(path, value) -> None:
  write_bytes(path, json.dumps(value, indent=2).encode())


def read_json(path):
  return json.loads(epath.Path(path).read_text())


def save_npz(path, **arrays) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_bytes(path, buffer.getvalue())


def load_npz(path) -> dict[str, np.ndarray]:
  """All arrays of an `.npz` file (no pickles)."""
  with np.load(io.BytesIO(read_bytes(path)), allow_pickle=False) as f:
    return dict(f)


def save_npy(path, array) -> None:
  buffer = io.BytesIO()
  np.save(buffer, np.asarray(array))
  write_bytes(path, buffer.getvalue())


def load_npy(path) -> np.ndarray:
  return np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)


def walk(folder) -> list[str]:
  """Relative paths ('/'-separated, sorted) of every file under `folder`, at any depth."""
  found = []
  for entry in epath.Path(folder).iterdir():  # not Path.walk: it drops gs:// from its paths
    if entry.is_dir():
      found.extend(f'{entry.name}/{name}' for name in walk(entry))
    else:
      found.append(entry.name)
  return sorted(found)


def size(path) -> int:
  """Size of the file `path` in bytes."""
  return int(epath.Path(path).stat().length)


def sha256(path, chunk: int = 1 << 22) -> str:
  """Hex sha256 of the contents of the file `path`, read in chunks."""
  digest = hashlib.sha256()
  with epath.Path(path).open('rb') as f:
    while block := f.read(chunk):
      digest.update(block)
  return digest.hexdigest()


def _write_probe(folder) -> None:
  """Writes a small file in `folder` (created if local) and removes it."""
  probe = join(folder, f'.write_test.{socket.gethostname()}.{os.getpid()}')
  write_bytes(probe, b'ok')
  remove(probe)


def check_writable(folder, *, what: str, fix: str, timeout_s: float | None = None) -> None:
  """Creates `folder` if local and writes a small file in it, within `timeout_s` seconds.

  Args:
    folder: a local path or a gs:// URL.
    what: how the message names the folder, e.g. '--workdir'.
    fix: what the user can do, e.g. 'choose a writable --workdir'.
    timeout_s: how long to wait for the store to answer (None: `PROBE_TIMEOUT_S`).

  Raises:
    NotWritable: the folder cannot be created or written (for a bucket, the message names the
      network and the credentials too).
    Unreachable: no answer within `timeout_s`.
  """
  timeout_s = PROBE_TIMEOUT_S if timeout_s is None else timeout_s
  failure = []

  def probe():
    try:
      _write_probe(folder)
    except Exception as e:  # noqa: BLE001 — gcsfs and the OS raise many types; all mean "no".
      failure.append(e)

  # a daemon thread, so that a store that never answers does not hold the process at exit
  thread = threading.Thread(target=probe, daemon=True, name='write-probe')
  thread.start()
  thread.join(timeout_s)
  if thread.is_alive():
    hint = _BUCKET_HINT if is_url(folder) else 'check the filesystem (a hung network mount?)'
    raise Unreachable(f'{what} {str(folder)!r} did not answer within {timeout_s:g} s: {hint}; '
                      f'or {fix}.')
  if failure:
    hint = f'{_BUCKET_HINT}, or ' if is_url(folder) else ''
    raise NotWritable(f'Cannot write to {what} {str(folder)!r} ({_cause(failure[0])}): '
                      f'{hint}{fix}.') from failure[0]


def _cause(error: Exception) -> str:
  """The first line of what `error` says, e.g. 'Permission denied'."""
  text = getattr(error, 'strerror', None) or str(error)
  return text.strip().splitlines()[0] if text.strip() else type(error).__name__
