"""The configured data: train batches per process, and held-out data for evaluation."""

import dataclasses
import functools
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from flowdistill import couplings, files
from flowdistill.data import images, tabular, toy
from flowdistill.data.pipeline import BatchIterator
from flowdistill.errors import BadInput, MissingInput

TOY_SOURCES = ('toy',)
TABULAR_SOURCES = ('tabular',)
IMAGE_SOURCES = ('digits', 'mnist', 'fashion_mnist', 'cifar10')
LATENT_SOURCES = ('latent',)  # a cache of scaled VAE latents (`condense/latents.py`)
SOURCES = TOY_SOURCES + TABULAR_SOURCES + IMAGE_SOURCES + LATENT_SOURCES
_LOADERS = {}  # source -> `load(data_config) -> Dataset`, registered by the layers above


@dataclasses.dataclass
class Dataset:
  """What an experiment needs to know about its data.

  Attributes:
    shape: one sample's shape ([2] for toys, [H, W, C] for images).
    num_classes: number of labels (0 for toys).
    train: {'x': float32 [N, ...], 'label': int32 [N]} for images, {'x': [N, D]} for tabular
      sets; None for toys (generated).
    test: the same for the test split; None for toys.
    toy: the toy set's name, or ''.
    tabular: the generated tabular set's name, or ''.
  """
  shape: tuple[int, ...]
  num_classes: int = 0
  train: dict | None = None
  test: dict | None = None
  toy: str = ''
  tabular: str = ''

  def reference(self, key, num: int) -> np.ndarray:
    """`num` held-out data points to compare samples with ([num, ...] float32)."""
    if self.toy:
      return np.asarray(toy.sample(self.toy, key, num))
    return self.test['x'][:num]

  def true_nll(self, x) -> float | None:
    """-mean log p(x) under the true density (the best achievable NLL) where it is known: the
    exact entropy of checkerboard and gaussian, else a Monte-Carlo estimate at x [N, D]."""
    if self.toy in ('checkerboard', 'gaussian'):
      return toy.entropy(self.toy)
    if self.toy in ('8gaussians',):
      return float(-np.mean(toy.log_density(self.toy, x)))
    if self.tabular:
      return float(-np.mean(tabular.log_density(self.tabular, x)))
    return None


def register(source: str, loader) -> None:
  """Makes `load` read `config.data.source == source` with `loader(data_config) -> Dataset`:
  how sources built on higher layers (the VAE latents of `condense.latents`) plug in."""
  _LOADERS[source] = loader


def data_path(data_config) -> str | None:
  """The local data path from config.data.path, else from config.data.path_env (if set)."""
  if data_config.path:
    return data_config.path
  if data_config.path_env:
    value = os.environ.get(data_config.path_env)
    if not value:
      raise MissingInput(
          f'config.data.path is empty and the environment variable {data_config.path_env} is '
          f'not set; set one of them to the folder holding the {data_config.source} files.')
    return value
  return None


def check_path(data_config) -> None:
  """Refuses, before any work, an image source whose local path (or path variable) is missing."""
  if data_config.source in IMAGE_SOURCES:
    path = data_path(data_config)
    if path and not files.is_url(path):
      images.check_path(data_config.source, pathlib.Path(path))


def load(data_config) -> Dataset:
  """Loads (or describes, for generated toys) the configured data set."""
  if data_config.source == 'toy':
    if data_config.name not in toy.NAMES:
      raise BadInput(f'config.data.name={data_config.name!r} is not a toy set; choose one of '
                     f'{list(toy.NAMES)}.')
    return Dataset(shape=(2,), toy=data_config.name)
  if data_config.source == 'tabular':
    if data_config.name not in tabular.NAMES:
      raise BadInput(f'config.data.name={data_config.name!r} is not a tabular set; choose one '
                     f'of {list(tabular.NAMES)}.')
    return Dataset(shape=(tabular.dim(data_config.name),), tabular=data_config.name,
                   **tabular.splits(data_config.name))
  if data_config.source in _LOADERS:
    return _LOADERS[data_config.source](data_config)
  if data_config.source in LATENT_SOURCES:
    raise BadInput(f'config.data.source={data_config.source!r} is loaded by a module that '
                   'registers it: import flowdistill.experiments (or call '
                   "sources.register('latent', flowdistill.condense.latents.load_source)).")
  path = data_path(data_config)
  splits = image_splits(data_config.source, path)
  num_classes = check_labels(splits, path or data_config.source)
  return Dataset(shape=splits['train']['x'].shape[1:], num_classes=num_classes, **splits)


def image_splits(source: str, path: str | None) -> dict:
  """{'train': {'x': float32 [N, H, W, C] in [-1, 1], 'label': int32 [N]}, 'test': ...}."""
  splits = {}
  for split in ('train', 'test'):
    x, y = images.load(source, split, path)
    splits[split] = {'x': images.to_float(x), 'label': y.astype(np.int32)}
  return splits


def check_labels(splits: dict, where: str) -> int:
  """The class count (max train label + 1) after checking that both splits hold images and
  every label lies in [0, class count)."""
  for split in ('train', 'test'):
    if len(splits[split]['label']) == 0:
      raise BadInput(f'{where}: the {split} split holds no images.')
  num_classes = int(splits['train']['label'].max()) + 1
  for split in ('train', 'test'):
    labels = splits[split]['label']
    if labels.min() < 0 or labels.max() >= num_classes:
      raise BadInput(f'{where}: {split} labels span {labels.min()}..{labels.max()}, but the '
                     f'classes are 0..{num_classes - 1} (from the train labels); labels must '
                     'be class indices starting at 0.')
  return num_classes


TOY_CHUNK = 32  # Toy batches drawn per device call: one host sync per chunk, not per step.


@functools.partial(jax.jit, static_argnames=('name', 'num', 'steps'))
def _toy_chunk(name, key, first, num, steps):
  """The toy batches of steps `first, ..., first + steps - 1`: [steps, num, D]."""
  draw = lambda step: toy.sample(name, jax.random.fold_in(key, step), num)
  return jax.vmap(draw)(first + jnp.arange(steps))


def batch_source(dataset: Dataset, global_batch: int, *, seed: int, conditional: bool):
  """`start_step -> iterator` of this process's numpy batches; step k depends only on k."""
  process, count = jax.process_index(), jax.process_count()
  local = global_batch // count

  def toy_batches(start):
    # Converting a draw to numpy waits for every step already dispatched, so drawing step by
    # step would stall the loop's pipeline at every step (measured: 74 % of the bare step).
    key = jax.random.key(seed)
    for first in range(start, 2**62, TOY_CHUNK):
      chunk = np.asarray(_toy_chunk(dataset.toy, key, first, global_batch, TOY_CHUNK))
      for rows in chunk:
        yield {'x': rows[process * local:(process + 1) * local]}

  def image_batches(start):
    arrays = dataset.train if conditional else {'x': dataset.train['x']}
    return BatchIterator(arrays, global_batch, seed=seed, start_step=start,
                         process_index=process, process_count=count)

  return toy_batches if dataset.toy else image_batches


def with_ot_noise(batches, global_batch: int, *, seed: int, block_size: int | None,
                  within_class: bool):
  """Wraps a batch source: each batch gains `'x0'`, standard normal noise paired to its `'x'`
  by exact minibatch OT on the host (`couplings.pair_on_host`, within classes if asked).

  The training loop draws batch k + 1 while step k computes, so the pairing overlaps the
  step instead of stalling it. The noise of step k is this process's rows of one global draw
  from `(seed, k)`: with blocks inside each process's rows the pairs do not depend on the
  number of processes.
  """
  process, count = jax.process_index(), jax.process_count()
  local = global_batch // count

  def source(start):
    for step, batch in enumerate(batches(start), start):
      shape = (global_batch, *batch['x'].shape[1:])
      noise = np.random.default_rng([seed, step]).standard_normal(shape, np.float32)
      labels = batch.get('label') if within_class else None
      x0 = couplings.pair_on_host(noise[process * local:(process + 1) * local], batch['x'],
                                  labels=labels, block_size=block_size)
      yield dict(batch, x0=x0)

  return source
