"""Real-image baselines of dataset distillation: IPC images per class picked from the train
split, by chance or greedily in a fixed feature space (the penultimate features of a whole-set
ConvNet-3, `reference_net.py`).

Every selector takes features [N, D] (ignored by `random`), labels int [N], the IPC and a seed,
and returns indices [C * IPC] into the train split, grouped by class in class order.
"""

import numpy as np

from flowdistill.condense.kmeans import kmeans

SELECTORS = ('random', 'herding', 'k_center', 'kmeans_nearest')


def check_ipc(labels: np.ndarray, ipc: int) -> None:
  """Refuses an IPC below 1 or above the smallest class, naming that class and its count."""
  counts = np.bincount(labels)
  if ipc < 1:
    raise ValueError(f'IPC (images per class) must be >= 1; got {ipc}.')
  smallest = int(counts.argmin())
  if ipc > counts[smallest]:
    raise ValueError(f'IPC {ipc} is larger than class {smallest}, which has only '
                     f'{counts[smallest]} images; use IPC <= {counts[smallest]}.')


def random_subset(features, labels, ipc: int, seed: int) -> np.ndarray:
  """`ipc` images of each class drawn uniformly without replacement."""
  rng = np.random.default_rng(seed)
  return np.concatenate([rng.choice(np.flatnonzero(labels == c), ipc, replace=False)
                         for c in range(labels.max() + 1)])


def herding_order(points: np.ndarray, k: int) -> np.ndarray:
  """Greedy mean matching: pick k rows whose running mean stays closest to the mean of all.

  Args:
    points: [N, D]. k: picks.

  Returns:
    int [k] row indices in the order picked (the first is the row nearest the mean).
  """
  target = points.mean(0)
  total = np.zeros_like(target)
  free = np.ones(len(points), bool)
  picks = []
  for i in range(1, k + 1):
    gaps = np.linalg.norm(target - (total + points) / i, axis=1)
    gaps[~free] = np.inf
    j = int(gaps.argmin())
    picks.append(j)
    free[j] = False
    total += points[j]
  return np.array(picks)


def k_center_order(points: np.ndarray, k: int) -> np.ndarray:
  """Greedy k-center (farthest-first traversal) started from the class mean: the first pick is
  the row nearest the mean, each next one the row farthest from all rows picked so far.

  Args:
    points: [N, D]. k: picks.

  Returns:
    int [k] row indices in the order picked.
  """
  first = int(np.linalg.norm(points - points.mean(0), axis=1).argmin())
  picks = [first]
  nearest = np.linalg.norm(points - points[first], axis=1)
  for _ in range(1, k):
    j = int(nearest.argmax())
    picks.append(j)
    nearest = np.minimum(nearest, np.linalg.norm(points - points[j], axis=1))
  return np.array(picks)


def kmeans_nearest_order(points: np.ndarray, k: int, seed: int) -> np.ndarray:
  """The real row closest to each of k k-means centroids (distinct rows, in centroid order)."""
  centres, _, _ = kmeans(points, k, seed=seed)
  free = np.ones(len(points), bool)
  picks = []
  for centre in centres:
    dist = np.linalg.norm(points - centre, axis=1)
    dist[~free] = np.inf
    j = int(dist.argmin())
    picks.append(j)
    free[j] = False
  return np.array(picks)


def select(name: str, features, labels, ipc: int, seed: int = 0) -> np.ndarray:
  """Indices [C * IPC] of the `name` baseline (one of `SELECTORS`), class by class.

  Args:
    features: [N, D] float (any value for 'random'). labels: int [N] in [0, C).
    ipc: images per class. seed: for 'random' and the k-means seeding.
  """
  labels = np.asarray(labels)
  check_ipc(labels, ipc)
  if name == 'random':
    return random_subset(features, labels, ipc, seed)
  if name not in SELECTORS:
    raise ValueError(f'Unknown subset baseline {name!r}; choose one of {SELECTORS}.')
  features = np.asarray(features, np.float64)
  picks = []
  for c in range(labels.max() + 1):
    rows = np.flatnonzero(labels == c)
    if name == 'herding':
      order = herding_order(features[rows], ipc)
    elif name == 'k_center':
      order = k_center_order(features[rows], ipc)
    else:
      order = kmeans_nearest_order(features[rows], ipc, seed)
    picks.append(rows[order])
  return np.concatenate(picks)
