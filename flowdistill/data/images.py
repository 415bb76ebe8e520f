"""Labelled image data sets as in-memory numpy arrays.

Every loader returns `images` as uint8 `[N, H, W, C]` (channels last, values 0..255) and
`labels` as int32 `[N]`; `to_float` maps images to float32 in `[-1, 1]` for the models. Splits
are `'train'` and `'test'`.

Sources, in the order `load` tries them:

- local files (`path` given): a folder of MNIST-format idx files, an `.npz` file, or an image
  folder `path/<split>/<class_name>/*.png`;
- `'digits'`: scikit-learn's bundled 8x8 digits (no files, no download);
- anything else: a tensorflow-datasets data set already prepared in the `array_record` format,
  read without TensorFlow through `tfds.data_source`.

Nothing here downloads, and tensorflow_datasets is imported only when a tfds data set is read.
"""

import gzip
import os
import pathlib
import zipfile
import zlib

import numpy as np

from flowdistill.errors import BadInput, MissingInput

SPLITS = ('train', 'test')

_IDX_PREFIX = {'train': 'train', 'test': 't10k'}
_IDX_UBYTE = 0x08
_IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
_GREY_MODES = ('1', 'L', 'I', 'I;16', 'F')
_DIGITS_TEST_SIZE = 297
_DIGITS_MAX = 16.0
_NPZ_READ_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error)


def env_var(source: str) -> str:
  """The environment variable the configs read for a local copy of `source`.

  Args:
    source: data set name, e.g. `'mnist'` or `'fashion_mnist'`.

  Returns:
    The variable's name, e.g. `'FLOWDISTILL_MNIST_DIR'`.
  """
  return f'FLOWDISTILL_{source.upper()}_DIR'


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise BadInput(f'split must be one of {SPLITS}, got {split!r}.')


def _read_idx(file: pathlib.Path) -> np.ndarray:
  """Reads one idx file (gzipped or not) holding unsigned bytes.

  Args:
    file: path of the idx file; a `.gz` suffix means gzip.

  Returns:
    uint8 array with the shape stored in the file's header.

  Raises:
    ValueError: the file is truncated, not gzip where named `.gz`, or has a bad header.
  """
  opener = gzip.open if file.suffix == '.gz' else open
  try:
    with opener(file, 'rb') as f:
      raw = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise BadInput(f'{file}: cannot read idx file ({e}).') from e
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE:
    raise BadInput(f'{file}: bad idx magic number {raw[:4].hex()!r}; expected 000008NN '
                   '(unsigned bytes, NN dimensions).')
  ndim = raw[3]
  header = 4 + 4 * ndim
  if ndim == 0 or len(raw) < header:
    raise BadInput(f'{file}: idx header is truncated or declares {ndim} dimensions.')
  shape = tuple(int(d) for d in np.frombuffer(raw, '>u4', ndim, offset=4))
  size = int(np.prod(shape))
  if len(raw) - header != size:
    raise BadInput(f'{file}: idx header declares shape {shape} ({size} bytes) but the file '
                   f'holds {len(raw) - header} data bytes; the file is truncated or corrupt.')
  return np.frombuffer(raw, np.uint8, size, offset=header).reshape(shape)


def _find_idx(folder: pathlib.Path, split: str, kind: str, ndim: int) -> pathlib.Path:
  """Finds `<prefix>-<kind>-idx<ndim>-ubyte[.gz]` (or `.idx` instead of `-idx`) in `folder`."""
  prefix = _IDX_PREFIX[split]
  names = [f'{prefix}-{kind}{sep}idx{ndim}-ubyte{gz}' for sep in ('-', '.') for gz in ('.gz', '')]
  for name in names:
    if (folder / name).is_file():
      return folder / name
  raise MissingInput(f'No {split} {kind} idx file in {folder}: expected one of {names}.')


def load_idx_folder(path: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Loads MNIST-format idx files (MNIST, Fashion-MNIST, KMNIST copies).

  The folder holds `train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`,
  `t10k-images-idx3-ubyte.gz` and `t10k-labels-idx1-ubyte.gz`, gzipped or not.

  Args:
    path: the folder.
    split: `'train'` or `'test'` (the `t10k` files).

  Returns:
    images: uint8 `[N, H, W, 1]`.
    labels: int32 `[N]`.

  Raises:
    FileNotFoundError: the folder or one of the split's two files is missing.
    ValueError: a file is malformed, or the two files disagree on `N`.
  """
  _check_split(split)
  folder = pathlib.Path(path).expanduser()
  if not folder.is_dir():
    raise MissingInput(f'idx folder {folder} does not exist.')
  images_file = _find_idx(folder, split, 'images', 3)
  labels_file = _find_idx(folder, split, 'labels', 1)
  images = _read_idx(images_file)
  labels = _read_idx(labels_file)
  if images.ndim != 3 or labels.ndim != 1:
    raise BadInput(f'{images_file}, {labels_file}: expected 3-D images and 1-D labels, got '
                   f'shapes {images.shape} and {labels.shape}.')
  if len(images) != len(labels):
    raise BadInput(f'{images_file} holds {len(images)} images but {labels_file} holds '
                   f'{len(labels)} labels.')
  return images[..., None], labels.astype(np.int32)


def _as_images(x: np.ndarray, file: pathlib.Path, key: str) -> np.ndarray:
  """Checks and converts `[N, H, W]` or `[N, H, W, C]` integer pixels to uint8 `[N, H, W, C]`."""
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise BadInput(f'{file}: {key} must have shape [N, H, W] or [N, H, W, C], got {x.shape}.')
  if not np.issubdtype(x.dtype, np.integer):
    raise BadInput(f'{file}: {key} must hold integer pixels 0..255, got dtype {x.dtype}.')
  if x.size and (x.min() < 0 or x.max() > 255):
    raise BadInput(f'{file}: {key} pixels must lie in 0..255, got {x.min()}..{x.max()}.')
  return x.astype(np.uint8)


def _as_labels(y: np.ndarray, n: int, file: pathlib.Path, key: str) -> np.ndarray:
  """Checks and converts `[N]` or `[N, 1]` integer labels to int32 `[N]`."""
  if y.ndim == 2 and y.shape[1] == 1:
    y = y[:, 0]
  if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
    raise BadInput(f'{file}: {key} must be integers of shape [{n}] or [{n}, 1], got '
                   f'{y.dtype} {y.shape}.')
  return y.astype(np.int32)


def load_npz(path: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Loads a split from an `.npz` file with keys `x_train, y_train, x_test, y_test`.

  `x_*` holds integer pixels 0..255 of shape `[N, H, W]` (one channel) or `[N, H, W, C]`;
  `y_*` holds integer labels of shape `[N]` or `[N, 1]` (the Keras layout).

  Args:
    path: the `.npz` file.
    split: `'train'` or `'test'`.

  Returns:
    images: uint8 `[N, H, W, C]`.
    labels: int32 `[N]`.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: the file is not a readable `.npz`, lacks a key, or holds bad arrays.
  """
  _check_split(split)
  file = pathlib.Path(path).expanduser()
  if not file.is_file():
    raise MissingInput(f'npz file {file} does not exist.')
  x_key, y_key = f'x_{split}', f'y_{split}'
  try:
    npz = np.load(file, allow_pickle=False)
  except _NPZ_READ_ERRORS as e:
    raise BadInput(f'{file}: not a readable .npz file ({e}).') from e
  if not isinstance(npz, np.lib.npyio.NpzFile):
    raise BadInput(f'{file}: holds one .npy array, not an .npz archive of x_train, y_train, '
                   'x_test and y_test.')
  with npz:
    missing = [k for k in (x_key, y_key) if k not in npz.files]
    if missing:
      raise BadInput(f'{file}: missing keys {missing}; an npz data set needs x_train, '
                     f'y_train, x_test and y_test (found {npz.files}).')
    try:
      x, y = npz[x_key], npz[y_key]
    except _NPZ_READ_ERRORS as e:
      raise BadInput(f'{file}: cannot read {x_key} and {y_key} ({e}).') from e
  images = _as_images(x, file, x_key)
  return images, _as_labels(y, len(images), file, y_key)


def _open_image(file: pathlib.Path):
  """Reads one image file fully into a PIL image."""
  from PIL import Image  # Imported here: only image folders need PIL.
  try:
    with Image.open(file) as image:
      image.load()
      return image
  except OSError as e:
    raise BadInput(f'{file}: cannot read image ({e}).') from e


def load_image_folder(path: str | os.PathLike,
                      split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Loads `path/<split>/<class_name>/*.png|jpg|jpeg`; class `i` is the `i`-th name sorted.

  Images are read as greyscale (`C = 1`) when all of them are greyscale, else as RGB
  (`C = 3`); all must have the same height and width.

  Args:
    path: the root folder.
    split: `'train'` or `'test'`.

  Returns:
    images: uint8 `[N, H, W, C]`, class by class, files sorted by name within a class.
    labels: int32 `[N]`.
    class_names: the sorted class folder names.

  Raises:
    FileNotFoundError: `path/<split>` is missing or holds no images.
    ValueError: an image cannot be read, or the sizes differ.
  """
  _check_split(split)
  root = pathlib.Path(path).expanduser() / split
  if not root.is_dir():
    raise MissingInput(f'image folder {root} does not exist.')
  class_names = sorted(d.name for d in root.iterdir() if d.is_dir())
  files, labels = [], []
  for label, name in enumerate(class_names):
    found = sorted(f for f in (root / name).iterdir() if f.suffix.lower() in _IMAGE_SUFFIXES)
    files += found
    labels += [label] * len(found)
  if not files:
    raise MissingInput(f'No {"/".join(_IMAGE_SUFFIXES)} images in {root}/<class_name>/.')
  opened = [_open_image(f) for f in files]
  mode = 'L' if all(image.mode in _GREY_MODES for image in opened) else 'RGB'
  images = [np.asarray(image.convert(mode), np.uint8).reshape(image.height, image.width, -1)
            for image in opened]
  for file, image in zip(files, images):
    if image.shape != images[0].shape:
      raise BadInput(f'{file}: size {image.shape} differs from {files[0]}: {images[0].shape}.')
  return np.stack(images), np.asarray(labels, np.int32), class_names


def load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
  """Loads scikit-learn's bundled 8x8 digits (1797 images, 10 classes; no download).

  Pixels 0..16 are scaled to 0..255. The last 297 images are the test split, the first 1500
  the train split.

  Args:
    split: `'train'` or `'test'`.

  Returns:
    images: uint8 `[1500 or 297, 8, 8, 1]`.
    labels: int32 `[1500 or 297]`.
  """
  from sklearn import datasets  # Imported here: slow, and only digits need it.
  _check_split(split)
  digits = datasets.load_digits()
  images = np.round(digits.images * (255.0 / _DIGITS_MAX)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  cut = len(images) - _DIGITS_TEST_SIZE
  if split == 'train':
    return images[:cut], labels[:cut]
  return images[cut:], labels[cut:]


def load_tfds(name: str,
              split: str,
              data_dir: str | os.PathLike | None = None,
              *,
              image_key: str = 'image',
              label_key: str = 'label',
              download: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Loads a tensorflow-datasets split prepared in the `array_record` format, as numpy.

  Reads through `tfds.data_source`, which needs no TensorFlow once the data is prepared.
  Preparing it needs TensorFlow:
  `tfds build NAME --file_format=array_record --data_dir=DIR`.

  Args:
    name: tfds name, e.g. `'mnist'`, `'fashion_mnist'`, `'cifar10'`.
    split: tfds split, e.g. `'train'`, `'test'` or `'train[:90%]'`.
    data_dir: tfds data folder; `None` means tfds' default (`~/tensorflow_datasets`).
    image_key: the record's image feature.
    label_key: the record's label feature.
    download: let tfds download and prepare the data if it is missing (needs TensorFlow and
      network access).

  Returns:
    images: uint8 `[N, H, W, C]`.
    labels: int32 `[N]`.

  Raises:
    ImportError: tensorflow-datasets is not installed.
    FileNotFoundError: the data set is unknown or not prepared in `data_dir`.
  """
  try:
    import tensorflow_datasets as tfds  # Imported here: optional and slow.
  except ImportError as e:
    raise ImportError(f'Reading {name!r} through tfds needs tensorflow-datasets: pip install '
                      '"flowdistill[tfds]", or pass local files with path=...') from e
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
  except Exception as e:  # tfds raises many types; all mean "not readable here".
    where = data_dir or 'the default tfds data_dir (~/tensorflow_datasets)'
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise MissingInput(
        f'tfds data set {name!r} split {split!r} is not available in array_record format in '
        f'{where} ({reason}). Prepare it on a machine with TensorFlow and network access: '
        f'`tfds build {name} --file_format=array_record --data_dir=DIR`, then pass data_dir; '
        'or use local files (config.data.path: an idx folder, an .npz or an image folder).'
    ) from e
  records = source.__getitems__(list(range(len(source))))
  images = np.stack([np.asarray(r[image_key], np.uint8) for r in records])
  labels = np.asarray([r[label_key] for r in records], np.int32)
  return images, labels


def check_path(source: str, path: pathlib.Path) -> None:
  """Refuses a local data path that does not exist (MissingInput, naming the fix)."""
  if not path.exists():
    raise MissingInput(
        f'{source} data path {path} does not exist. Set config.data.path (or {env_var(source)}) '
        'to an idx folder, an .npz file or an image folder <path>/<split>/<class>/, or leave it '
        'unset to read tfds.')


def _load_path(source: str, split: str, path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """Loads local files, choosing the loader from what `path` holds."""
  check_path(source, path)
  if path.is_file():
    if path.suffix != '.npz':
      raise BadInput(f'{path}: a data file must be an .npz; for idx or image files pass their '
                     'folder.')
    return load_npz(path, split)
  if any(path.glob('*-idx[13]-ubyte*')) or any(path.glob('*.idx[13]-ubyte*')):
    return load_idx_folder(path, split)
  if (path / split).is_dir():
    images, labels, _ = load_image_folder(path, split)
    return images, labels
  raise MissingInput(
      f'{source} data path {path} holds neither MNIST-format idx files (e.g. '
      f'train-images-idx3-ubyte.gz) nor an image folder {path / split}/<class>/.')


def load(source: str,
         split: str,
         path: str | os.PathLike | None = None,
         *,
         data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Loads a labelled image data set split.

  With `path`, reads local files: an `.npz` file (see `load_npz`), a folder of idx files (see
  `load_idx_folder`) or an image folder `path/<split>/<class>/` (see `load_image_folder`).
  Without it, `'digits'` comes from scikit-learn and any other source from tfds (see
  `load_tfds`). This function reads no environment variable; the configs pass `path`.

  Args:
    source: `'digits'`, `'mnist'`, `'fashion_mnist'`, `'cifar10'` or another tfds name.
    split: `'train'` or `'test'`.
    path: local files, or `None`.
    data_dir: tfds data folder, used only when reading tfds.

  Returns:
    images: uint8 `[N, H, W, C]`.
    labels: int32 `[N]`.

  Raises:
    FileNotFoundError: `path` or the tfds data is missing; the message names the fix.
    ValueError: a file is malformed; the message names the file.
  """
  _check_split(split)
  if path is not None:
    return _load_path(source, split, pathlib.Path(path).expanduser())
  if source == 'digits':
    return load_digits(split)
  return load_tfds(source, split, data_dir)


def to_float(images: np.ndarray) -> np.ndarray:
  """Maps uint8 pixels 0..255 to float32 in `[-1, 1]`.

  Args:
    images: uint8 `[..., H, W, C]`.

  Returns:
    float32 array of the same shape, `images / 127.5 - 1`.
  """
  return np.asarray(images, np.float32) / np.float32(127.5) - np.float32(1.0)


def to_uint8(x: np.ndarray) -> np.ndarray:
  """Inverse of `to_float`: maps `[-1, 1]` to uint8 0..255, rounding and clipping.

  Args:
    x: float array `[..., H, W, C]` (values outside `[-1, 1]` are clipped).

  Returns:
    uint8 array of the same shape.
  """
  pixels = np.round((np.asarray(x, np.float32) + 1.0) * 127.5)
  return np.clip(pixels, 0, 255).astype(np.uint8)
