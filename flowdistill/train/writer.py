"""Metrics to JSON lines and TensorBoard in the workdir (process 0 only)."""

import json
import os

import numpy as np


class MetricWriter:
  """Appends `{"step": n, ...}` lines to `workdir/metrics.jsonl` and TensorBoard scalars."""

  def __init__(self, workdir: str, *, enabled: bool = True, filename: str = 'metrics.jsonl'):
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter  # imported lazily: only process 0 writes

    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, filename)
    self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': int(step), **scalars}) + '\n')
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self.enabled:
      self.tb.close()
