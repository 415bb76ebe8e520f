"""The fixed evaluator of the dataset-distillation protocol: `evaluate_synset` of DC/DSA/DM.

Each of R runs trains a fresh ConvNet-3 on the synthetic set with SGD (momentum 0.9, weight
decay 5e-4, batch 256, lr 0.01, ×0.1 after epoch E/2 + 1; E + 1 epochs as the reference's
`range(Epoch + 1)`), augmenting every batch with DSA, and reports its accuracy on the whole test
split. Images reach the network standardised by the per-channel mean and std of the real train
split. Training is a `lax.scan` over epochs (and over the batches of an epoch), so a run's
accuracy depends only on its key; runs are batched with `vmap` `runs_per_call` at a time.
"""

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flowdistill.condense.augment import DIGITS, augment, parse_strategy
from flowdistill.errors import BadInput
from flowdistill.models.convnet import ConvNet
from flowdistill.train import stop


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How a synthetic set is scored. Defaults are the reference values (DSA/DM evaluation).

  runs: R networks trained per set. epochs: E (1000 with DSA, 300 without in the reference).
  dsa: augment every batch (`strategy` families, one per batch, parameters per sample).
  width, depth, norm: the ConvNet. runs_per_call: runs trained together under `vmap`.
  epochs_per_call: epochs per dispatch (between progress updates).
  """
  runs: int = 20
  epochs: int = 1000
  lr: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 5e-4
  batch_size: int = 256
  dsa: bool = True
  strategy: str = DIGITS
  width: int = 128
  depth: int = 3
  norm: str = 'instance'
  runs_per_call: int = 1
  epochs_per_call: int = 50

  def __post_init__(self):
    for name in ('runs', 'epochs', 'batch_size', 'width', 'depth', 'runs_per_call',
                 'epochs_per_call'):
      if getattr(self, name) < 1:
        raise ValueError(f'Protocol.{name} must be >= 1; got {getattr(self, name)}.')
    if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
      raise ValueError('Protocol needs lr > 0, weight_decay >= 0 and 0 <= momentum < 1; got '
                       f'lr={self.lr}, weight_decay={self.weight_decay}, '
                       f'momentum={self.momentum}.')
    if self.norm == 'batch':
      raise ValueError("evaluate_synset trains ConvNets with norm 'instance' or 'none' (the "
                       "protocol's default is 'instance'); batch norm is not supported here.")
    parse_strategy(self.strategy)

  @property
  def lr_drop_epoch(self) -> int:
    """The last epoch at the initial lr (the reference's `lr_schedule = [Epoch // 2 + 1]`)."""
    return self.epochs // 2 + 1


# Pixels this far outside [-1, 1] are refused; rounding after a clip stays well inside it.
RANGE_TOLERANCE = 0.01


def check_images(images: np.ndarray, what: str) -> None:
  """Refuses images that are not float in the library's [-1, 1], naming the conversion.

  Args:
    images: [N, H, W, C]. what: whose they are in the message ('Synthetic', 'Test', ...).
  """
  if not np.issubdtype(images.dtype, np.floating):
    raise BadInput(f'{what} images are {images.dtype}; the evaluator takes float images in '
                   '[-1, 1]: map uint8 pixels with x / 127.5 - 1.')
  if not np.all(np.isfinite(images)):
    raise BadInput(f'{what} images hold {int((~np.isfinite(images)).sum())} NaN or Inf '
                   'pixels; the set was not produced correctly.')
  lo, hi = float(images.min()), float(images.max())
  span = f'{what} pixels span [{lo:.3g}, {hi:.3g}]; the library range is [-1, 1]'
  if lo < -1 - RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
    fix = 'map 0..255 pixels with x / 127.5 - 1' if lo >= 0 else 'clip or rescale them'
    raise BadInput(f'{span}: {fix}.')
  # A real spread inside [0, 1] is a [0, 1] image; images in [-1, 1] reach below 0.
  if lo >= 0 and hi - lo > 0.5:
    raise BadInput(f'{span}, and these look like [0, 1] images: map them with x * 2 - 1.')


def check_labels(labels: np.ndarray, n: int, what: str, num_classes: int | None = None) -> None:
  """Refuses labels that are not class indices int [n] (in [0, num_classes) when given).

  what: whose they are in the message ('Synthetic', 'Test', ...).
  """
  if labels.ndim == 2 and labels.shape[0] == n:
    raise BadInput(f'{what} labels have shape {labels.shape} and look one-hot; pass class '
                   'indices int [N] (labels.argmax(-1)).')
  if labels.shape != (n,):
    raise BadInput(f'{what} labels have shape {labels.shape}; the {n} images need class '
                   f'indices int [{n}].')
  if not np.issubdtype(labels.dtype, np.integer):
    raise BadInput(f'{what} labels are {labels.dtype}; class indices must be integers: cast '
                   'whole numbers with labels.astype(np.int32).')
  if n and labels.min() < 0:
    raise BadInput(f'{what} label {int(labels.min())} is negative; class indices start at 0.')
  if num_classes is not None and n and labels.max() >= num_classes:
    raise BadInput(f'{what} label {int(labels.max())} is out of range [0, {num_classes}).')


@dataclasses.dataclass(frozen=True)
class TestSplit:
  """The real test split, the per-channel statistics of the real train split, and optionally
  a validation split held out of train (what settings are chosen on).

  x: float images [N, H, W, C] in the library's [-1, 1]. label: int [N].
  mean, std: [C] of the train split, in the same range.
  validation_x, validation_label: [M, H, W, C] and int [M], or None.
  """
  x: np.ndarray
  label: np.ndarray
  mean: np.ndarray
  std: np.ndarray
  validation_x: np.ndarray | None = None
  validation_label: np.ndarray | None = None

  def __post_init__(self):
    held_out = [('Test', self.x, self.label)]
    if self.validation_x is not None:
      held_out.append(('Validation', self.validation_x, self.validation_label))
    for name, x, label in held_out:
      x, label = np.asarray(x), np.asarray(label)
      if x.ndim != 4:
        raise BadInput(f'{name} images have shape {x.shape}; the evaluator takes [N, H, W, C].')
      check_images(x, name)
      check_labels(label, len(x), name)

  @property
  def num_classes(self) -> int:
    return int(self.label.max()) + 1

  def standardise(self, images) -> jax.Array:
    """[N, H, W, C] in [-1, 1] -> per-channel standardised by the train statistics."""
    return (jnp.asarray(images, jnp.float32) - self.mean) / self.std


def _float32(x) -> np.ndarray:
  """Float arrays as float32; others unchanged, so that `TestSplit` refuses them by dtype."""
  x = np.asarray(x)
  return x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) else x


def test_split(train: dict, test: dict, validation: dict | None = None) -> TestSplit:
  """A `TestSplit` from `{'x': [N, H, W, C] float in [-1, 1], 'label': int [N]}` train and test
  splits (and the validation split held out of train, if any)."""
  x = np.asarray(train['x'])
  check_images(x, 'Train')
  x = x.astype(np.float32)
  held_out = {} if validation is None else {
      'validation_x': _float32(validation['x']),
      'validation_label': np.asarray(validation['label'])}
  return TestSplit(_float32(test['x']), np.asarray(test['label']), x.mean((0, 1, 2)),
                   x.std((0, 1, 2)), **held_out)


def make_net(image_shape, num_classes: int, protocol: Protocol, key):
  """A fresh ConvNet as `(graphdef, params)` initialised from `key`."""
  net = ConvNet(image_shape, num_classes, width=protocol.width, depth=protocol.depth,
                norm=protocol.norm, rngs=nnx.Rngs(params=key))
  graphdef, state = nnx.split(net)
  return graphdef, nnx.to_pure_dict(state)


def _batches(n: int, batch_size: int) -> tuple[int, int, int]:
  """(batch size, number of full batches, size of the last partial batch) of one epoch."""
  size = min(batch_size, n)
  return size, n // size, n % size


def train_network(images: jax.Array, labels: jax.Array, key: jax.Array, protocol: Protocol,
                  num_classes: int, *, epochs: tuple[int, int] | None = None, state=None):
  """Trains (or continues training) one ConvNet; jittable and `vmap`-able over `key`.

  Args:
    images: standardised images [N, H, W, C]. labels: int [N].
    key: the run's key (initialisation, epoch shuffles, augmentation).
    protocol: the schedule and network.
    num_classes: logits of the network.
    epochs: (first, count) epochs to run from `state`; all E + 1 from a fresh net if None.
    state: (params, momentum) to continue from; a fresh net from `key` if None.

  Returns:
    (params, momentum) after the epochs.
  """
  images, labels = jnp.asarray(images), jnp.asarray(labels)
  init_key, train_key = jax.random.split(key)
  graphdef, params = make_net(images.shape[1:], num_classes, protocol, init_key)
  if state is None:
    state = (params, jax.tree.map(jnp.zeros_like, params))
  first, count = epochs if epochs is not None else (0, protocol.epochs + 1)
  size, full, rest = _batches(images.shape[0], protocol.batch_size)

  def loss_fn(params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def sgd_step(state, idx, lr, step_key):
    params, momentum = state
    x = images[idx]
    if protocol.dsa:
      x = augment(x, step_key, protocol.strategy)
    grads = jax.grad(loss_fn)(params, x, labels[idx])
    # torch.optim.SGD: coupled weight decay, then momentum without dampening.
    momentum = jax.tree.map(lambda m, g, p: protocol.momentum * m + g + protocol.weight_decay * p,
                            momentum, grads, params)
    params = jax.tree.map(lambda p, m: p - lr * m, params, momentum)
    return params, momentum

  def epoch(state, index):
    perm_key, epoch_key = jax.random.split(jax.random.fold_in(train_key, index))
    perm = jax.random.permutation(perm_key, images.shape[0])
    lr = jnp.where(index > protocol.lr_drop_epoch, 0.1 * protocol.lr, protocol.lr)

    def batch(state, i):
      idx = jax.lax.dynamic_slice_in_dim(perm, i * size, size)
      return sgd_step(state, idx, lr, jax.random.fold_in(epoch_key, i)), None

    new, _ = jax.lax.scan(batch, state, jnp.arange(full))
    if rest:
      new = sgd_step(new, perm[full * size:], lr, jax.random.fold_in(epoch_key, full))
    # Epochs past E (the padding of the last dispatch) leave the state unchanged.
    return jax.tree.map(lambda a, b: jnp.where(index <= protocol.epochs, a, b), new, state), None

  state, _ = jax.lax.scan(epoch, state, first + jnp.arange(count))
  return state


def test_accuracy(graphdef, params, x: jax.Array, labels: jax.Array, *,
                  batch_size: int = 500) -> jax.Array:
  """Accuracy (scalar) of the ConvNet `(graphdef, params)` on standardised images [N, H, W, C]."""
  logits = jax.lax.map(lambda xb: nnx.merge(graphdef, params)(xb[None], inference=True)[0], x,
                       batch_size=batch_size)
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def check_synset(images, labels, image_shape: tuple[int, ...] | None = None,
                 num_classes: int | None = None) -> None:
  """Refuses a synthetic set the evaluator would score wrongly or could not plot, naming the
  problem and the fix; every entry point calls it before any work or file.

  Args:
    images: [N, H, W, C] float in [-1, 1]; channels last, [H, W, C] = `image_shape` when given
      (the test split's), else grey or RGB (C of 1 or 3).
    labels: int [N], class indices; with `num_classes`, in [0, num_classes) and every class
      present with the same count.
  """
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim != 4:
    raise BadInput(f'Synthetic images have shape {images.shape}; the evaluator takes '
                   '[N, H, W, C] (channels last).')
  shape = images.shape[1:]
  if image_shape is None:
    bad, looks_first = shape[-1] not in (1, 3), shape[0] in (1, 3)
    expected = '[N, H, W, C] with C of 1 or 3'
  else:
    h, w, c = image_shape
    bad, looks_first = shape != (h, w, c), shape == (c, h, w)
    expected = f'[N, {h}, {w}, {c}]'
  if bad:
    hint = ' It looks channels-first: transpose to [N, H, W, C].' if looks_first else ''
    raise BadInput(f'Synthetic images have shape {images.shape}; the evaluator needs '
                   f'{expected} (channels last).{hint}')
  check_labels(labels, len(images), 'Synthetic', num_classes)
  check_images(images, 'Synthetic')
  if num_classes is None:
    return
  counts = np.bincount(labels, minlength=num_classes)
  if counts.min() == 0:
    raise BadInput(f'The synthetic set has no image of class {int(counts.argmin())}; every '
                   f'one of the {num_classes} classes needs the same number of images.')
  if counts.min() != counts.max():
    raise BadInput(f'The synthetic set is unbalanced: images per class {counts.tolist()}; '
                   'the protocol needs the same count (IPC) in every class.')


@functools.partial(jax.jit, static_argnames=('protocol', 'num_classes'))
def _init_networks(keys, images, labels, *, protocol, num_classes):
  fresh = lambda k: train_network(images, labels, k, protocol, num_classes, epochs=(0, 0))
  return jax.vmap(fresh)(keys)


@functools.partial(jax.jit, static_argnames=('protocol', 'num_classes', 'count'))
def _train_epochs(state, keys, first, images, labels, *, protocol, num_classes, count):
  run = lambda s, k: train_network(images, labels, k, protocol, num_classes,
                                   epochs=(first, count), state=s)
  return jax.vmap(run)(state, keys)


@functools.partial(jax.jit, static_argnames=('protocol', 'num_classes'))
def _test_accuracies(params, images, labels, *, protocol, num_classes):
  graphdef = make_net(images.shape[1:], num_classes, protocol, jax.random.key(0))[0]
  return jax.vmap(lambda p: test_accuracy(graphdef, p, images, labels))(params)


def train_networks(images: jax.Array, labels: jax.Array, keys: jax.Array, protocol: Protocol,
                   num_classes: int, *, on_progress: Callable[[int], None] | None = None):
  """Trains one ConvNet per key together under `vmap`, `epochs_per_call` epochs per dispatch
  (compiled once per protocol and shapes, so the next set of the same size reuses it).

  Args:
    images: standardised images [N, H, W, C]. labels: int [N].
    keys: [K] run keys. protocol, num_classes: as `train_network`.
    on_progress: called with the epochs done by each network after each dispatch.

  Returns:
    (params, momentum), each leaf with a leading axis K.

  Raises:
    stop.Stopped: after the dispatch during which a stop signal came (`stop.check`).
  """
  total = protocol.epochs + 1
  chunk = min(protocol.epochs_per_call, total)
  static = dict(protocol=protocol, num_classes=num_classes)
  images, labels = jnp.asarray(images), jnp.asarray(labels)
  state = _init_networks(keys, images, labels, **static)
  for first in range(0, total, chunk):
    state = _train_epochs(state, keys, jnp.int32(first), images, labels, count=chunk, **static)
    stop.check(state, where=f'after epoch {min(first + chunk, total)} of {total}')
    if on_progress is not None:
      jax.block_until_ready(state)
      on_progress(min(first + chunk, total))
  return state


def evaluate_synset(images, labels, split: TestSplit, key: jax.Array, protocol: Protocol, *,
                    on_progress: Callable[[int], None] | None = None) -> dict:
  """Trains `protocol.runs` fresh ConvNets on a synthetic set and tests each on `split`.

  Args:
    images: synthetic images [N, H, W, C] in [-1, 1]. labels: int [N], balanced over classes.
    split: the test split and train statistics (`test_split`).
    key: jax.random key; run r uses `fold_in(key, r)`, so its accuracy depends only on it.
    protocol: schedule and network.
    on_progress: called with the number of epochs done, summed over runs, after each dispatch.

  Returns:
    {'accs': [R] test accuracies, 'mean', 'std', 'seconds_per_run'}, and with a validation
    split the same networks' 'val_accs', 'val_mean', 'val_std'.
  """
  check_synset(images, labels, split.x.shape[1:], split.num_classes)
  x, y = split.standardise(images), jnp.asarray(labels, jnp.int32)
  held_out = {'': (split.standardise(split.x), jnp.asarray(split.label))}
  if split.validation_x is not None:
    held_out['val_'] = (split.standardise(split.validation_x),
                        jnp.asarray(split.validation_label))
  start = time.perf_counter()
  accs = {prefix: [] for prefix in held_out}
  run_keys = jnp.stack([jax.random.fold_in(key, r) for r in range(protocol.runs)])
  for lo in range(0, protocol.runs, protocol.runs_per_call):
    keys = run_keys[lo:lo + protocol.runs_per_call]
    done, group = (protocol.epochs + 1) * lo, len(keys)
    progress = None if on_progress is None else (
        lambda epochs, done=done, group=group: on_progress(done + epochs * group))
    stop.check(where=f'before run {lo + 1} of {protocol.runs}')
    params, _ = train_networks(x, y, keys, protocol, split.num_classes, on_progress=progress)
    for prefix, (images_, labels_) in held_out.items():
      accs[prefix].append(np.asarray(_test_accuracies(
          params, images_, labels_, protocol=protocol, num_classes=split.num_classes)))
  seconds = time.perf_counter() - start
  out = {'seconds_per_run': seconds / protocol.runs}
  for prefix, runs in accs.items():
    runs = np.concatenate(runs)
    out.update({f'{prefix}accs': runs, f'{prefix}mean': float(runs.mean()),
                f'{prefix}std': float(runs.std())})
  return out


def epochs_total(protocol: Protocol) -> int:
  """Epochs `evaluate_synset` trains over all runs (the length of its progress bar)."""
  return protocol.runs * (protocol.epochs + 1)
