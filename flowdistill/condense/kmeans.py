"""k-means with k-means++ seeding (the real-image baseline here, the PGFM prototypes later)."""

import numpy as np


def sq_distances(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
  """[N, D], [K, D] -> squared distances [N, K] (clipped at 0 against rounding)."""
  d = (points**2).sum(1)[:, None] + (centres**2).sum(1)[None] - 2 * points @ centres.T
  return np.maximum(d, 0)


def kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
  """k-means++ seeding: each next centre drawn with probability ∝ squared distance. [K, D]."""
  centres = [points[rng.integers(len(points))]]
  closest = sq_distances(points, centres[0][None])[:, 0]
  for _ in range(1, k):
    total = closest.sum()
    index = rng.choice(len(points), p=closest / total) if total > 0 else rng.integers(len(points))
    centres.append(points[index])
    closest = np.minimum(closest, sq_distances(points, points[index][None])[:, 0])
  return np.stack(centres)


def kmeans(points: np.ndarray, k: int, *, seed: int = 0, n_init: int = 1,
           iters: int = 100) -> tuple[np.ndarray, np.ndarray, float]:
  """Lloyd's k-means from k-means++ seeds; the best of `n_init` restarts by inertia.

  Args:
    points: [N, D] float. k: number of clusters, 1 <= k <= N.
    seed: seeds every restart (restart i uses `seed` and `i`).
    n_init: restarts. iters: Lloyd iterations at most (stops when assignments settle).

  Returns:
    (centres [K, D], assignment int [N], inertia = sum of squared distances to the centre).
  """
  points = np.asarray(points, np.float64)
  if not 1 <= k <= len(points):
    raise ValueError(f'k-means needs 1 <= k <= {len(points)} points; got k={k}.')
  best = None
  for restart in range(n_init):
    rng = np.random.default_rng([seed, restart])
    centres = kmeans_plus_plus(points, k, rng)
    assignment = None
    for _ in range(iters):
      new = sq_distances(points, centres).argmin(1)
      if assignment is not None and np.array_equal(new, assignment):
        break
      assignment = new
      for j in range(k):
        members = points[assignment == j]
        # An emptied cluster keeps its centre rather than becoming NaN.
        if len(members):
          centres[j] = members.mean(0)
    inertia = float(sq_distances(points, centres)[np.arange(len(points)), assignment].sum())
    if best is None or inertia < best[2]:
      best = (centres, assignment, inertia)
  return best
