"""Diversity metrics of a synthetic set against the real classes it condenses.

- mode coverage MC: per class, the modes are k-means centres (K = IPC, fixed seed) of the real
  class in an evaluation space φ; MC_c is the share of modes that some synthetic sample of the
  class has as its nearest mode; MC is the mean over classes. K independent draws uniform over
  K equal modes cover `1 − (1 − 1/K)^K` of them on average (0.651 at K = 10).
- landing rate: the share of samples whose nearest prototype (of their class) is the one they
  were assigned.
- diversity: mean pairwise distance within each synthetic class over the same for the real
  class, averaged over classes (1 = as spread as the data).
- per-class Fréchet distance between synthetic and real features, averaged over classes.

Points are flattened to [N, D]; labels are int [N] in [0, C).
"""

import numpy as np

from flowdistill.condense.kmeans import kmeans, sq_distances
from flowdistill.eval.metrics import frechet_distance


def _flat(points) -> np.ndarray:
  points = np.asarray(points, np.float64)
  return points.reshape(len(points), -1)


def uniform_coverage(k: int) -> float:
  """Expected coverage of K draws uniform over K equal modes: 1 − (1 − 1/K)^K."""
  return 1.0 - (1.0 - 1.0 / k)**k


def class_modes(real, labels, k: int, *, seed: int = 0) -> list[np.ndarray]:
  """k-means centres [K, D] of each real class, in class order."""
  real, labels = _flat(real), np.asarray(labels)
  return [kmeans(real[labels == c], k, seed=seed)[0] for c in range(labels.max() + 1)]


def mode_coverage(synthetic, labels, modes: list[np.ndarray]) -> dict:
  """{'mc': mean over classes, 'per_class': [C]} for synthetic points [N, ...] and labels [N]."""
  synthetic, labels = _flat(synthetic), np.asarray(labels)
  per_class = []
  for c, centres in enumerate(modes):
    members = synthetic[labels == c]
    hit = np.unique(sq_distances(members, centres).argmin(1)) if len(members) else []
    per_class.append(len(hit) / len(centres))
  return {'mc': float(np.mean(per_class)), 'per_class': per_class}


def landing_rate(synthetic, labels, assigned, prototypes) -> float:
  """Share of samples nearest to their assigned prototype.

  Args:
    synthetic: [N, ...]. labels: int [N]. assigned: int [N], the index j of each sample's
      prototype within its class. prototypes: [C, K, ...].
  """
  synthetic, labels = _flat(synthetic), np.asarray(labels)
  protos = np.asarray(prototypes, np.float64).reshape(*np.shape(prototypes)[:2], -1)
  nearest = np.array([sq_distances(s[None], protos[c])[0].argmin()
                      for s, c in zip(synthetic, labels)])
  return float(np.mean(nearest == np.asarray(assigned)))


def _mean_pairwise(points: np.ndarray) -> float:
  if len(points) < 2:
    return 0.0
  d = np.sqrt(sq_distances(points, points))
  return float(d.sum() / (len(points) * (len(points) - 1)))


def diversity(synthetic, labels, real, real_labels, *, max_real: int = 1000,
              seed: int = 0) -> float:
  """Mean over classes of (mean pairwise synthetic distance) / (mean pairwise real distance);
  the real side uses at most `max_real` points per class, drawn with `seed`."""
  synthetic, labels = _flat(synthetic), np.asarray(labels)
  real, real_labels = _flat(real), np.asarray(real_labels)
  rng = np.random.default_rng(seed)
  ratios = []
  for c in range(real_labels.max() + 1):
    rows = np.flatnonzero(real_labels == c)
    rows = rng.choice(rows, min(max_real, len(rows)), replace=False)
    ratios.append(_mean_pairwise(synthetic[labels == c]) / _mean_pairwise(real[rows]))
  return float(np.mean(ratios))


def per_class_frechet(synthetic, labels, real, real_labels) -> float | None:
  """Mean over classes of the Fréchet distance between the synthetic and the real features of
  the class ([N, D] each); None below 2 synthetic points per class (no covariance)."""
  synthetic, labels = _flat(synthetic), np.asarray(labels)
  real, real_labels = _flat(real), np.asarray(real_labels)
  if np.bincount(labels).min() < 2:
    return None
  return float(np.mean([frechet_distance(synthetic[labels == c], real[real_labels == c])
                        for c in range(real_labels.max() + 1)]))
