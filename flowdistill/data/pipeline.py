"""Deterministic, resumable, per-process batches over in-memory numpy arrays.

The global batch at step `k` depends only on `(seed, k)`: epoch `e = k // steps_per_epoch`
visits the examples in the order `np.random.default_rng([seed, e]).permutation(N)`, step `k`
takes the `(k % steps_per_epoch)`-th run of `global_batch_size` indices of that order, and the
last `N % global_batch_size` indices of each epoch are dropped. Process `p` of `P` receives rows
`[p * b / P, (p + 1) * b / P)` of that global batch (`b = global_batch_size`), so stacking the
per-process batches in process order gives the single-process global batch exactly. A run that
restarts with `start_step=k` continues the same sequence.
"""

from collections.abc import Iterator, Mapping

import numpy as np

from flowdistill.errors import BadInput


class BatchIterator(Iterator[dict[str, np.ndarray]]):
  """Yields this process's part of each global batch, step after step.

  Example:
    it = BatchIterator({'x': images, 'label': labels}, 128, seed=0,
                       process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)  # {'x': [128 / P, H, W, C], 'label': [128 / P]}

  Attributes:
    step: the global step of the next batch (the state to checkpoint).
    steps_per_epoch: `N // global_batch_size`.
    local_batch_size: `global_batch_size // process_count`.
  """

  def __init__(self,
               arrays: Mapping[str, np.ndarray],
               global_batch_size: int,
               *,
               seed: int = 0,
               start_step: int = 0,
               process_index: int = 0,
               process_count: int = 1):
    """Checks the arguments.

    Args:
      arrays: named arrays `[N, ...]` with the same leading dimension `N`.
      global_batch_size: examples per step over all processes; divisible by `process_count`
        and at most `N`.
      seed: non-negative integer seed of the epoch permutations.
      start_step: global step of the first batch (non-negative); pass the checkpointed `step`
        to resume.
      process_index: this process, in `[0, process_count)`.
      process_count: number of processes sharing each global batch.

    Raises:
      ValueError: an argument is out of range or the arrays disagree on `N`.
    """
    if not arrays:
      raise BadInput('arrays is empty: pass a dict such as {"x": images, "label": labels}.')
    sizes = {name: len(a) for name, a in arrays.items()}
    n = next(iter(sizes.values()))
    if any(size != n for size in sizes.values()):
      raise BadInput(f'All arrays need the same leading dimension, got {sizes}.')
    if process_count < 1 or not 0 <= process_index < process_count:
      raise BadInput(f'Need 0 <= process_index < process_count, got process_index='
                     f'{process_index}, process_count={process_count}.')
    if global_batch_size < 1 or global_batch_size % process_count:
      raise BadInput(f'global_batch_size={global_batch_size} must be a positive multiple of '
                     f'process_count={process_count}.')
    if global_batch_size > n:
      raise BadInput(f'global_batch_size={global_batch_size} exceeds the {n} examples; '
                     'lower the batch size.')
    if seed < 0 or start_step < 0:
      raise BadInput(f'seed and start_step must be non-negative, got {seed}, {start_step}.')
    self._arrays = dict(arrays)
    self._n = n
    self._global_batch_size = global_batch_size
    self._seed = seed
    self._process_index = process_index
    self.local_batch_size = global_batch_size // process_count
    self.steps_per_epoch = n // global_batch_size
    self.step = start_step
    self._epoch = -1
    self._order = np.empty(0, np.int64)

  def state(self) -> dict[str, int]:
    """The JSON-able resume state: `{'step': next global step}` (pass it as `start_step`)."""
    return {'step': self.step}

  def indices(self, step: int) -> np.ndarray:
    """Indices into the arrays of this process's rows of the global batch at `step`.

    Args:
      step: a global step, non-negative.

    Returns:
      int64 `[local_batch_size]`.
    """
    epoch, offset = divmod(step, self.steps_per_epoch)
    if epoch != self._epoch:
      self._order = np.random.default_rng([self._seed, epoch]).permutation(self._n)
      self._epoch = epoch
    start = offset * self._global_batch_size + self._process_index * self.local_batch_size
    return self._order[start:start + self.local_batch_size]

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's part of the global batch at `step`, without moving the iterator.

    Args:
      step: a global step, non-negative.

    Returns:
      The arrays' names mapped to `[local_batch_size, ...]` numpy batches.
    """
    rows = self.indices(step)
    return {name: a[rows] for name, a in self._arrays.items()}

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.batch(self.step)
    self.step += 1
    return batch
