"""Speed of `evaluate_synset` against a PyTorch twin of the reference one (DC/DSA/DM utils.py).

Both sides train ConvNet-3 (instance norm, 317 706 parameters on 28x28x1) on the same random
real MNIST subset for E + 1 epochs with SGD (momentum 0.9, weight decay 5e-4, lr 0.01 x0.1
after epoch E/2 + 1, batch 256), every batch augmented by DSA (one family per batch from
`color_crop_cutout_scale_rotate`, parameters per sample), then test on the 10 000 test images.
The twin follows the reference code: a Python loop over shuffled batches, `F.affine_grid` /
`F.grid_sample` for scale and rotate, index gathers for crop and cutout. Seconds per run are
wall-clock, cold (ours: including compilation, once per call) and warm (ours: a second call
with the same shapes). Run on an otherwise idle machine; torch is not a requirement of the
project (here `pip install torch` found a CPU wheel in the local wheel cache; elsewhere
`pip install torch --index-url https://download.pytorch.org/whl/cpu`).

FLOWDISTILL_MNIST_DIR=../shared/data/mnist python benchmarks/dd_eval_vs_torch.py \
    --ipcs 1 10 50 --epochs 100 --runs 2
"""

import argparse
import json
import math
import os
import time

import jax
import numpy as np

from flowdistill.condense import subsets, synset_eval
from flowdistill.data import images

try:
  import torch
  import torch.nn.functional as F
  from torch import nn
except ImportError:
  torch = None


def mnist() -> dict:
  """{'train', 'test'}: {'x': float [N, 28, 28, 1] in [-1, 1], 'label': int [N]}."""
  path = os.environ['FLOWDISTILL_MNIST_DIR']
  out = {}
  for split in ('train', 'test'):
    x, y = images.load('mnist', split, path)
    out[split] = {'x': images.to_float(x), 'label': y}
  return out


# The PyTorch twin, as the reference code writes it.


def torch_convnet(channels: int = 1, num_classes: int = 10, width: int = 128, depth: int = 3):
  """ConvNet-D of the reference `get_network('ConvNet')` for 28x28 (seen at 32x32) images."""
  layers, size, in_ch = [], 32, channels
  for d in range(depth):
    layers += [nn.Conv2d(in_ch, width, 3, padding=3 if channels == 1 and d == 0 else 1),
               nn.GroupNorm(width, width, affine=True), nn.ReLU(inplace=True),
               nn.AvgPool2d(2, 2)]
    in_ch, size = width, size // 2
  return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * size * size, num_classes))


def _affine(x, theta):
  grid = F.affine_grid(theta, x.shape, align_corners=True)
  return F.grid_sample(x, grid, align_corners=True)


def _scale(x):
  n = x.shape[0]
  sx, sy = (torch.rand(n) * (1.2 - 1 / 1.2) + 1 / 1.2 for _ in range(2))
  zero = torch.zeros(n)
  theta = torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)
  return _affine(x, theta)


def _rotate(x):
  n = x.shape[0]
  angle = (torch.rand(n) - 0.5) * 2 * 15 / 180 * math.pi
  zero = torch.zeros(n)
  theta = torch.stack([torch.stack([torch.cos(angle), torch.sin(-angle), zero], 1),
                       torch.stack([torch.sin(angle), torch.cos(angle), zero], 1)], 1)
  return _affine(x, theta)


def _color(x):
  n = x.shape[0]
  x = x + (torch.rand(n, 1, 1, 1) - 0.5)
  mean = x.mean(dim=1, keepdim=True)
  x = (x - mean) * (torch.rand(n, 1, 1, 1) * 2.0) + mean
  mean = x.mean(dim=[1, 2, 3], keepdim=True)
  return (x - mean) * (torch.rand(n, 1, 1, 1) + 0.5) + mean


def _crop(x):
  n, _, h, w = x.shape
  sh, sw = int(h * 0.125 + 0.5), int(w * 0.125 + 0.5)
  tx = torch.randint(-sh, sh + 1, size=[n, 1, 1])
  ty = torch.randint(-sw, sw + 1, size=[n, 1, 1])
  gb, gx, gy = torch.meshgrid(torch.arange(n), torch.arange(h), torch.arange(w), indexing='ij')
  gx = torch.clamp(gx + tx + 1, 0, h + 1)
  gy = torch.clamp(gy + ty + 1, 0, w + 1)
  padded = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
  return padded.permute(0, 2, 3, 1).contiguous()[gb, gx, gy].permute(0, 3, 1, 2)


def _cutout(x):
  n, _, h, w = x.shape
  ch, cw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
  ox = torch.randint(0, h + (1 - ch % 2), size=[n, 1, 1])
  oy = torch.randint(0, w + (1 - cw % 2), size=[n, 1, 1])
  gb, gx, gy = torch.meshgrid(torch.arange(n), torch.arange(ch), torch.arange(cw), indexing='ij')
  gx = torch.clamp(gx + ox - ch // 2, min=0, max=h - 1)
  gy = torch.clamp(gy + oy - cw // 2, min=0, max=w - 1)
  mask = torch.ones(n, h, w, dtype=x.dtype)
  mask[gb, gx, gy] = 0
  return x * mask.unsqueeze(1)


TORCH_FAMILIES = (_color, _crop, _cutout, _scale, _rotate)   # color_crop_cutout_scale_rotate


def torch_run(x, y, test_x, test_y, epochs: int, seed: int) -> float:
  """One reference `evaluate_synset` run; returns the test accuracy."""
  torch.manual_seed(seed)
  net = torch_convnet()
  opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
  lr = 0.01
  net.train()
  for ep in range(epochs + 1):
    for idx in torch.randperm(len(x)).split(256):
      family = TORCH_FAMILIES[torch.randint(0, len(TORCH_FAMILIES), (1,)).item()]
      loss = F.cross_entropy(net(family(x[idx])), y[idx])
      opt.zero_grad()
      loss.backward()
      opt.step()
    if ep == epochs // 2 + 1:
      lr *= 0.1
      for group in opt.param_groups:
        group['lr'] = lr
  net.eval()
  correct = 0
  with torch.no_grad():
    for i in range(0, len(test_x), 500):
      correct += (net(test_x[i:i + 500]).argmax(1) == test_y[i:i + 500]).sum().item()
  return correct / len(test_x)


def bench_torch(synset, split, epochs, runs) -> dict:
  to_nchw = lambda a: torch.from_numpy(np.ascontiguousarray(
      ((a - split.mean) / split.std).transpose(0, 3, 1, 2).astype(np.float32)))
  x, test_x = to_nchw(synset['x']), to_nchw(split.x)
  y, test_y = torch.from_numpy(synset['label'].astype(np.int64)), torch.from_numpy(
      split.label.astype(np.int64))
  accs, seconds = [], []
  for r in range(runs):
    start = time.perf_counter()
    accs.append(torch_run(x, y, test_x, test_y, epochs, seed=r))
    seconds.append(time.perf_counter() - start)
  return {'seconds_per_run': float(np.mean(seconds)), 'accuracy': float(np.mean(accs))}


def bench_ours(synset, split, epochs, runs, runs_per_call) -> dict:
  protocol = synset_eval.Protocol(runs=runs, epochs=epochs, runs_per_call=runs_per_call)
  cold = synset_eval.evaluate_synset(synset['x'], synset['label'], split, jax.random.key(0),
                                  protocol)
  warm = synset_eval.evaluate_synset(synset['x'], synset['label'], split, jax.random.key(1),
                                  protocol)
  return {'seconds_per_run': cold['seconds_per_run'],
          'warm_seconds_per_run': warm['seconds_per_run'],
          'accuracy': float(np.mean([cold['mean'], warm['mean']]))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--ipcs', type=int, nargs='+', default=[1, 10, 50])
  parser.add_argument('--epochs', type=int, default=100)
  parser.add_argument('--runs', type=int, default=2)
  parser.add_argument('--runs-per-call', type=int, nargs='+', default=[1])
  parser.add_argument('--out', default='benchmarks/out/dd_eval_vs_torch.json')
  args = parser.parse_args()
  if torch is not None:
    torch.set_num_threads(os.cpu_count())
  data = mnist()
  split = synset_eval.test_split(data['train'], data['test'])
  rows = []
  for ipc in args.ipcs:
    index = subsets.select('random', None, data['train']['label'], ipc, seed=0)
    synset = {'x': data['train']['x'][index], 'label': data['train']['label'][index]}
    row = {'ipc': ipc}
    for k in args.runs_per_call:
      row[f'ours_vmap{k}'] = bench_ours(synset, split, args.epochs, args.runs, k)
    if torch is not None:
      row['torch'] = bench_torch(synset, split, args.epochs, args.runs)
    rows.append(row)
    print(json.dumps(row), flush=True)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'args': vars(args), 'rows': rows}, f, indent=2)
  head = '| IPC | ' + ' | '.join(f'ours vmap {k} cold / warm s/run' for k in args.runs_per_call)
  print(head + ' | torch s/run | torch / ours (cold) | acc ours / torch |')
  for row in rows:
    ours = [row[f'ours_vmap{k}'] for k in args.runs_per_call]
    cells = [f'{o["seconds_per_run"]:.1f} / {o["warm_seconds_per_run"]:.1f}' for o in ours]
    t = row.get('torch')
    ratio = f'{t["seconds_per_run"] / ours[0]["seconds_per_run"]:.2f}' if t else 'n/a'
    tsec = f'{t["seconds_per_run"]:.1f}' if t else 'skipped (no torch)'
    tacc = f'{100 * t["accuracy"]:.1f}' if t else '-'
    print(f'| {row["ipc"]} | ' + ' | '.join(cells) +
          f' | {tsec} | {ratio} | {100 * ours[0]["accuracy"]:.1f} / {tacc} |')


if __name__ == '__main__':
  main()
