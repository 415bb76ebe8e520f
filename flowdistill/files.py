"""Files in a local folder or a gs:// bucket, through etils.epath (gcsfs for gs:// paths).

Every file the library writes outside Orbax goes through here, so a `--workdir`, a cache root
(`FLOWDISTILL_CACHE`) or a latent cache may be a bucket. Writes are atomic: locally a temporary
file is renamed over the target; in an object store an upload becomes visible only once
complete, so the object is written in place.
"""

import hashlib
import io
import json
import os

import numpy as np
from etils import epath


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
