"""PNG figures: 2-D scatter panels, ODE trajectories, image grids."""

import io

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import numpy as np  # noqa: E402

from flowdistill import files  # noqa: E402


def _save(fig, path: str) -> None:
  """Writes `fig` as a PNG to a local or gs:// `path` and closes it."""
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format='png', dpi=100)
  plt.close(fig)
  files.write_bytes(path, png.getvalue())


def scatter_panels(path: str, panels: dict[str, np.ndarray], lim: float = 5.0) -> None:
  """One scatter plot per named point cloud [N, 2], side by side."""
  fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.2), squeeze=False)
  for ax, (title, pts) in zip(axes[0], panels.items()):
    ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5)
    ax.set(title=title, xlim=(-lim, lim), ylim=(-lim, lim), aspect='equal', xticks=[], yticks=[])
  _save(fig, path)


def trajectories(path: str, traj: np.ndarray, num: int = 200, lim: float = 5.0) -> None:
  """ODE paths [T + 1, B, 2]: noise start (grey), path (line), data end (dot)."""
  traj = traj[:, :num]
  fig, ax = plt.subplots(figsize=(4, 4))
  ax.plot(traj[:, :, 0], traj[:, :, 1], lw=0.4, alpha=0.5, color='tab:blue')
  ax.scatter(traj[0, :, 0], traj[0, :, 1], s=2, color='grey')
  ax.scatter(traj[-1, :, 0], traj[-1, :, 1], s=2, color='tab:red')
  ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect='equal', xticks=[], yticks=[])
  _save(fig, path)


def image_grid(path: str, images: np.ndarray, ncol: int = 10) -> None:
  """Saves images [N, H, W, C] in [-1, 1] as one grid PNG."""
  n, h, w, c = images.shape
  nrow = -(-n // ncol)
  grid = np.ones((nrow * (h + 1) + 1, ncol * (w + 1) + 1, c), np.float32)
  pix = np.clip((images + 1) / 2, 0, 1)
  for i in range(n):
    r, col = divmod(i, ncol)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = pix[i]
  png = io.BytesIO()
  plt.imsave(png, grid[..., 0] if c == 1 else grid, cmap='gray' if c == 1 else None,
             format='png')
  files.write_bytes(path, png.getvalue())
