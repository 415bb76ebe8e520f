"""Metrics to JSON lines and TensorBoard in the workdir (process 0 only)."""

import json

import numpy as np
from etils import epath

from flowdistill import files


class MetricWriter:
  """Appends `{"step": n, ...}` lines to `workdir/metrics.jsonl` and TensorBoard scalars.

  In an object store (gs://), where objects cannot be appended to, the lines are kept and the
  file is rewritten at each write (metrics are small; a resumed run reads it back first).
  """

  def __init__(self, workdir: str, *, enabled: bool = True, filename: str = 'metrics.jsonl'):
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter  # imported lazily: only process 0 writes

    files.makedirs(workdir)
    self.path = epath.Path(workdir) / filename
    self.url = files.is_url(workdir)
    self.lines = self.path.read_text() if self.url and self.path.exists() else ''
    self.tb = SummaryWriter(files.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
    line = json.dumps({'step': int(step), **scalars}) + '\n'
    if self.url:
      self.lines += line
      self.path.write_text(self.lines)
    else:
      with self.path.open('a') as f:
        f.write(line)
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self.enabled:
      self.tb.close()
