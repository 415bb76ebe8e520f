"""Speed of one training step of the library's two image models against PyTorch twins.

Usage:
  python benchmarks/conv_peers.py [--seconds S] [--repeats N] [--models unet,convnet]
      [--torch-compile] [--out benchmarks/out/conv_peers.json]

Where XLA:CPU's convolutions stand. Each model is trained one step at a time by the library's
own jitted step and by a hand-written PyTorch twin (CPU, eager, NCHW, `os.cpu_count()`
threads) with the same layers and shapes. The twin is checked: the parameter counts must be
equal, every JAX array is copied into the twin parameter of the same name and shape (so both
start from the same weights), and both models' outputs on one batch must agree.

- 'unet': the flow-matching step of the MNIST U-Net, wired as the `fm` experiment wires it
  (`flowdistill.train.configured.fm_setup`): `configs/mnist.py` (`MNIST_UNET`: channels
  (32, 64, 64), one residual block per level, attention at the lowest level, time embedding
  128; batch 128 of 28x28x1; Adam lr 5e-4 with warm-up + cosine schedule, global-norm
  clipping at 1, EMA 0.999) but unconditional (`num_classes=0`, so no label embedding and no
  label dropout); `fm.make_loss` on the linear path; `make_train_step` under
  `jax.jit(..., donate_argnums=0)`. Twin: the same U-Net in `torch.nn` (GroupNorm eps 1e-6 as
  `nnx.GroupNorm`, stride-2 convs padded (0, 1) as XLA's 'SAME', nearest upsampling,
  `F.scaled_dot_product_attention`), MSE to `x1 - x0` at `x_t = (1 - t) x0 + t x1`,
  `clip_grad_norm_(1.0)`, Adam (constant lr 5e-4) and an EMA update of the parameters.
- 'convnet': one SGD step of the dataset-distillation evaluator, ConvNet-3 (width 128,
  instance norm) on a batch of 256 standardised 28x28x1 images with 10 classes:
  `flowdistill.condense.synset_eval.train_network(..., epochs=(0, 1), state=state)` with
  `Protocol(dsa=False)` and 256 images, i.e. exactly one `sgd_step` (shuffle, patch-product
  convs, cross-entropy, momentum 0.9, weight decay 5e-4, lr 0.01), no augmentation. Twin:
  `torch_convnet` of benchmarks/dd_eval_vs_torch.py with `torch.optim.SGD` (same settings).

Random data stands in for MNIST (a few pre-generated batches in rotation; the step's cost
does not depend on the values). `--torch-compile` adds rows with `torch.compile` on the model
(eager optimizer) where it works; it is off by default because Inductor compiles slowly on a
small CPU (ConvNet-3: about 40 s for the first step on 2 busy cores).

Timing (as benchmarks/fm_step.py): the first call (for JAX: trace + compile + one step) is
reported as the compile time; after 2 warm-up steps, steps run back to back for at least
`--seconds`, with `block_until_ready` on the last result only. Each measurement is repeated
`--repeats` times, interleaved across rows (each JAX repeat recompiles), and the median is
reported. Derived figures: ms/step, steps/s, torch / ours (ratio of ms per step: > 1 means the
library's step is faster), and for the JAX rows the GFLOP per step from XLA's cost analysis of
the compiled step and the GFLOP/s achieved. Requires PyTorch (`pip install torch==2.13.0`).
"""

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, BENCH_DIR)

import machine  # noqa: E402  pylint: disable=wrong-import-position
from dd_eval_vs_torch import torch_convnet  # noqa: E402
from fm_step import cpu_seconds, cycling_runner, time_loop  # noqa: E402

from flowdistill.condense import synset_eval  # noqa: E402
from flowdistill.train import configured  # noqa: E402
from flowdistill.train.step import make_train_step  # noqa: E402

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
NUM_BATCHES = 4  # Pre-generated batches in rotation.
WARMUP_STEPS = 2
GROUPNORM_EPS = 1e-6  # nnx.GroupNorm's default.
MODELS = ('unet', 'convnet')


def mnist_fm_config():
  """configs/mnist.py, made unconditional (no labels, so no label embedding or dropout)."""
  spec = importlib.util.spec_from_file_location('mnist_config',
                                                os.path.join(REPO_ROOT, 'configs', 'mnist.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.conditional = False
  config.fm.label_dropout = 0.0
  return config


def flat_params(params) -> dict:
  """{'down.0.0.res.conv1.kernel': array, ...} of a nested parameter dict."""
  out = {}
  for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = '.'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)
    out[name] = np.asarray(value)
  return out


def torch_layout(name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """A JAX parameter as the torch parameter of the twin: kernel/scale -> weight, conv kernels
  HWIO -> OIHW, dense kernels [in, out] -> [out, in]."""
  base, leaf = name.rsplit('.', 1)
  if leaf == 'kernel':
    value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
  return f'{base}.{"bias" if leaf == "bias" else "weight"}', np.array(value, order='C')


def load_into(module: nn.Module, named: dict) -> None:
  """Copies {torch name: array} into `module`; raises unless names and shapes match 1:1."""
  params = dict(module.named_parameters())
  if set(params) != set(named):
    raise AssertionError(f'twin parameters differ: only in torch {set(params) - set(named)}, '
                         f'only in JAX {set(named) - set(params)}')
  with torch.no_grad():
    for name, value in named.items():
      if tuple(params[name].shape) != value.shape:
        raise AssertionError(f'{name}: torch {tuple(params[name].shape)}, JAX {value.shape}')
      params[name].copy_(torch.from_numpy(value))


def count_params(params) -> tuple[int, int]:
  """(number of arrays, number of scalars) of a parameter tree."""
  leaves = jax.tree.leaves(params)
  return len(leaves), int(sum(np.size(a) for a in leaves))


def torch_count(module: nn.Module) -> tuple[int, int]:
  params = list(module.parameters())
  return len(params), int(sum(p.numel() for p in params))


# The PyTorch U-Net, layer for layer `flowdistill.models.unet.UNet` (one-time, unconditional).
# Module names follow the JAX parameter tree, so parameters are copied by name.


class TorchResBlock(nn.Module):
  """GroupNorm-SiLU-conv twice, with the embedding as a scale-shift (FiLM) on the second norm."""

  def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int):
    super().__init__()
    self.norm1 = nn.GroupNorm(groups, in_ch, eps=GROUPNORM_EPS)
    self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
    self.film = nn.Linear(emb_dim, 2 * out_ch)
    self.norm2 = nn.GroupNorm(groups, out_ch, eps=GROUPNORM_EPS)
    self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
    self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

  def forward(self, x, emb):
    h = self.conv1(F.silu(self.norm1(x)))
    scale, shift = self.film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
    h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
    return h + (x if self.skip is None else self.skip(x))


class TorchSelfAttention(nn.Module):
  """Multi-head self-attention over the H * W positions, with a residual connection."""

  def __init__(self, ch: int, heads: int, groups: int):
    super().__init__()
    self.heads = heads
    self.norm = nn.GroupNorm(groups, ch, eps=GROUPNORM_EPS)
    self.qkv = nn.Linear(ch, 3 * ch)
    self.out = nn.Linear(ch, ch)

  def forward(self, x):
    b, c, h, w = x.shape
    y = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
    q, k, v = self.qkv(y).reshape(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
    return x + self.out(y).transpose(1, 2).reshape(b, c, h, w)


class TorchBlock(nn.Module):
  """A residual block, optionally followed by self-attention."""

  def __init__(self, in_ch: int, out_ch: int, emb_dim: int, *, attention: bool, heads: int,
               groups: int):
    super().__init__()
    self.res = TorchResBlock(in_ch, out_ch, emb_dim, groups)
    self.attn = TorchSelfAttention(out_ch, heads, groups) if attention else None

  def forward(self, x, emb):
    h = self.res(x, emb)
    return h if self.attn is None else self.attn(h)


class SameStride2Conv(nn.Conv2d):
  """3x3 stride-2 convolution padded as XLA's 'SAME' (the extra pixel after, not before)."""

  def __init__(self, ch: int):
    super().__init__(ch, ch, 3, stride=2)

  def forward(self, x):
    pads = []
    for size in (x.shape[3], x.shape[2]):  # F.pad order: last axis first.
      total = max((math.ceil(size / 2) - 1) * 2 + 3 - size, 0)
      pads += [total // 2, total - total // 2]
    return super().forward(F.pad(x, pads))


class TorchUNet(nn.Module):
  """`flowdistill.models.unet.UNet(image_shape, channels, num_res_blocks, attention_levels,
  num_heads, norm_groups, time_dim)` for NCHW images; `forward(x, t)`."""

  def __init__(self, image_shape, *, channels, num_res_blocks: int, attention_levels,
               num_heads: int = 4, norm_groups: int = 8, time_dim: int = 128):
    super().__init__()
    in_ch = image_shape[2]
    levels = len(channels)
    attn = {i % levels for i in attention_levels}
    half = time_dim // 2
    self.register_buffer('freqs', 10.0 * torch.exp(
        -math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half))
    self.time = nn.Module()
    self.time.t_mlp = nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU(),
                                    nn.Linear(time_dim, time_dim))
    kw = dict(heads=num_heads, groups=norm_groups)
    self.conv_in = nn.Conv2d(in_ch, channels[0], 3, padding=1)

    ch, skips, down, downsample = channels[0], [channels[0]], [], []
    for level, width in enumerate(channels):
      blocks = []
      for _ in range(num_res_blocks):
        blocks.append(TorchBlock(ch, width, time_dim, attention=level in attn, **kw))
        ch = width
        skips.append(ch)
      down.append(nn.ModuleList(blocks))
      if level < levels - 1:
        downsample.append(SameStride2Conv(ch))
        skips.append(ch)
    self.down = nn.ModuleList(down)
    self.downsample = nn.ModuleList(downsample)
    self.mid = nn.ModuleList([TorchBlock(ch, ch, time_dim, attention=levels - 1 in attn, **kw),
                              TorchBlock(ch, ch, time_dim, attention=False, **kw)])
    up, upsample = [], []
    for level in reversed(range(levels)):
      blocks = []
      for _ in range(num_res_blocks + 1):
        blocks.append(TorchBlock(ch + skips.pop(), channels[level], time_dim,
                                 attention=level in attn, **kw))
        ch = channels[level]
      up.append(nn.ModuleList(blocks))
      if level > 0:
        upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
    self.up = nn.ModuleList(up)
    self.upsample = nn.ModuleList(upsample)
    self.norm_out = nn.GroupNorm(norm_groups, ch, eps=GROUPNORM_EPS)
    self.conv_out = nn.Conv2d(ch, in_ch, 3, padding=1)

  def forward(self, x, t):
    args = t[:, None] * self.freqs[None, :]
    emb = self.time.t_mlp(torch.cat([torch.sin(args), torch.cos(args)], dim=-1))
    h = self.conv_in(x)
    hs = [h]
    for level, blocks in enumerate(self.down):
      for block in blocks:
        h = block(h, emb)
        hs.append(h)
      if level < len(self.downsample):
        h = self.downsample[level](h)
        hs.append(h)
    for block in self.mid:
      h = block(h, emb)
    for level, blocks in enumerate(self.up):
      for block in blocks:
        h = block(torch.cat([h, hs.pop()], dim=1), emb)
      if level < len(self.upsample):
        h = self.upsample[level](F.interpolate(h, scale_factor=2, mode='nearest'))
    return self.conv_out(F.silu(self.norm_out(h)))


def torch_unet(config) -> TorchUNet:
  """The twin of `build_model(config.model, IMAGE_SHAPE)` (UNet defaults: 4 heads, 8 groups)."""
  model = config.model
  return TorchUNet(IMAGE_SHAPE, channels=tuple(model.channels),
                   num_res_blocks=model.num_res_blocks,
                   attention_levels=(-1,) if model.attention else (), time_dim=model.time_dim)


def unet_torch_params(params) -> dict:
  """The JAX U-Net parameters by twin name (`time.t_mlp.layers.0` is `time.t_mlp.0`)."""
  return dict(torch_layout(name.replace('.layers.', '.'), value)
              for name, value in flat_params(params).items())


def convnet_torch_params(params, depth: int) -> dict:
  """The JAX ConvNet parameters by name in the `nn.Sequential` twin (conv, norm, ReLU, pool per
  block; flatten; linear), the head's rows reordered from (H, W, C) to (C, H, W)."""
  flat = flat_params(params)
  out = {}
  for d in range(depth):
    out |= dict([torch_layout(f'{4 * d}.kernel', flat[f'convs.{d}.kernel']),
                 torch_layout(f'{4 * d}.bias', flat[f'convs.{d}.bias']),
                 torch_layout(f'{4 * d + 1}.scale', flat[f'norms.{d}.scale']),
                 torch_layout(f'{4 * d + 1}.bias', flat[f'norms.{d}.bias'])])
  kernel = flat['head.kernel']
  width = flat['convs.0.kernel'].shape[-1]
  side = math.isqrt(kernel.shape[0] // width)
  kernel = kernel.reshape(side, side, width, -1).transpose(2, 0, 1, 3).reshape(kernel.shape)
  head = 4 * depth + 1
  out |= dict([torch_layout(f'{head}.kernel', kernel),
               torch_layout(f'{head}.bias', flat['head.bias'])])
  return out


def to_nchw(x) -> torch.Tensor:
  return torch.from_numpy(np.array(np.asarray(x).transpose(0, 3, 1, 2)))


def max_rel_diff(ours, theirs) -> float:
  """max |ours - theirs| / max |ours|."""
  ours = np.asarray(ours)
  return float(np.abs(ours - theirs).max() / np.abs(ours).max())


# The models: setup, twin check and step runners. A runner is `run(n)`: n back-to-back steps,
# waiting on the last; JAX runners compile on their first call and record XLA's flop count.


def unet_setup():
  config = mnist_fm_config()
  dataset = types.SimpleNamespace(shape=IMAGE_SHAPE, num_classes=NUM_CLASSES)
  batch = config.data.batch_size
  x = jax.random.uniform(jax.random.key(0), (NUM_BATCHES, batch, *IMAGE_SHAPE), minval=-1.0,
                         maxval=1.0)
  return {'config': config, 'dataset': dataset, 'batch': batch,
          'jax_batches': [{'x': b} for b in jax.block_until_ready(x)],
          'torch_batches': [to_nchw(b) for b in x]}


def unet_check(setup) -> dict:
  """Parameter counts and output agreement of the JAX U-Net and its twin (the zero-initialised
  output conv set to random values first, so that the output is not trivially 0)."""
  apply_fn, params, _ = configured.fm_loss(setup['config'], setup['dataset'])
  model = torch_unet(setup['config'])
  ours, theirs = count_params(params), torch_count(model)
  print(f'unet parameters: JAX {ours[1]:,} in {ours[0]} arrays, torch {theirs[1]:,} in '
        f'{theirs[0]} arrays', file=sys.stderr)
  assert ours == theirs, (ours, theirs)
  params['conv_out']['kernel'] = 0.1 * jax.random.normal(jax.random.key(3),
                                                         params['conv_out']['kernel'].shape)
  load_into(model, unet_torch_params(params))
  x = setup['jax_batches'][0]['x'][:16]
  t = jax.random.uniform(jax.random.key(4), (x.shape[0],))
  out = apply_fn(params, x, t)
  with torch.no_grad():
    twin = model(to_nchw(x), torch.from_numpy(np.array(t))).numpy().transpose(0, 2, 3, 1)
  diff = max_rel_diff(out, twin)
  assert diff < 1e-3, f'U-Net twin output differs: max relative difference {diff:.2e}'
  return {'params_jax': ours[1], 'params_torch': theirs[1], 'param_arrays': ours[0],
          'output_max_rel_diff': diff}


def jax_runner(step, state, batches, extra_args=()):
  """`run(n)` for the jitted `step(state, batch, *extra_args) -> (state, out)`; `run.info`
  gets XLA's flop count of the compiled step on the first call."""
  compiled, counter, info = None, 0, {}

  def run(num_steps):
    nonlocal compiled, state, counter
    if compiled is None:
      compiled = step.lower(state, batches[0], *extra_args).compile()
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, list | tuple) else cost
      info['gflop_per_step'] = float(cost['flops']) / 1e9 if cost and 'flops' in cost else None
    out = None
    for _ in range(num_steps):
      state, out = compiled(state, batches[counter % len(batches)], *extra_args)
      counter += 1
    jax.block_until_ready(out)

  run.info = info
  return run


def unet_jax(setup, compile_model: bool):
  del compile_model
  _, loss_fn, optimizer, state = configured.fm_setup(setup['config'], setup['dataset'])
  step = jax.jit(make_train_step(loss_fn, optimizer, 1), donate_argnums=0)
  return jax_runner(step, state, setup['jax_batches'])


def unet_torch(setup, compile_model: bool):
  config = setup['config']
  _, params, _ = configured.fm_loss(config, setup['dataset'])
  model = torch_unet(config)
  load_into(model, unet_torch_params(params))
  forward = torch.compile(model) if compile_model else model
  weights = list(model.parameters())
  optimizer = torch.optim.Adam(weights, lr=config.optim.lr,
                               betas=(config.optim.b1, config.optim.b2))
  ema_rate = config.train.ema_rates[0]
  ema = [w.detach().clone() for w in weights]

  def step(x1):
    x0 = torch.randn_like(x1)
    t = torch.rand(x1.shape[0])
    tb = t[:, None, None, None]
    loss = torch.mean((forward((1.0 - tb) * x0 + tb * x1, t) - (x1 - x0))**2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(weights, config.optim.grad_clip)
    optimizer.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, weights, 1.0 - ema_rate)
    return loss

  run = cycling_runner(step, setup['torch_batches'])
  run.info = {}
  return run


CONVNET_PROTOCOL = synset_eval.Protocol(dsa=False)


def convnet_setup():
  batch = CONVNET_PROTOCOL.batch_size
  keys = jax.random.split(jax.random.key(5), 2)
  x = jax.random.normal(keys[0], (NUM_BATCHES, batch, *IMAGE_SHAPE))
  y = jax.random.randint(keys[1], (NUM_BATCHES, batch), 0, NUM_CLASSES)
  return {'batch': batch, 'jax_batches': [(a, b) for a, b in zip(x, y)],
          'torch_batches': [(to_nchw(a), torch.from_numpy(np.asarray(b, np.int64)))
                            for a, b in zip(x, y)]}


def convnet_init():
  """`(graphdef, params)` of a fresh ConvNet-3, as `train_network` makes it."""
  return synset_eval.make_net(IMAGE_SHAPE, NUM_CLASSES, CONVNET_PROTOCOL, jax.random.key(6))


def torch_convnet_from(params) -> nn.Module:
  net = torch_convnet(IMAGE_SHAPE[2], NUM_CLASSES, CONVNET_PROTOCOL.width,
                      CONVNET_PROTOCOL.depth)
  load_into(net, convnet_torch_params(params, CONVNET_PROTOCOL.depth))
  return net


def convnet_check(setup) -> dict:
  graphdef, params = convnet_init()
  net = torch_convnet(IMAGE_SHAPE[2], NUM_CLASSES, CONVNET_PROTOCOL.width,
                      CONVNET_PROTOCOL.depth)
  ours, theirs = count_params(params), torch_count(net)
  print(f'convnet parameters: JAX {ours[1]:,} in {ours[0]} arrays, torch {theirs[1]:,} in '
        f'{theirs[0]} arrays', file=sys.stderr)
  assert ours == theirs, (ours, theirs)
  net = torch_convnet_from(params)
  x = setup['jax_batches'][0][0][:16]
  logits = nnx.merge(graphdef, params)(x)  # The training path (patch products, fused norm).
  with torch.no_grad():
    twin = net(to_nchw(x)).numpy()
  diff = max_rel_diff(logits, twin)
  assert diff < 1e-3, f'ConvNet twin output differs: max relative difference {diff:.2e}'
  return {'params_jax': ours[1], 'params_torch': theirs[1], 'param_arrays': ours[0],
          'output_max_rel_diff': diff}


def convnet_jax(setup, compile_model: bool):
  del compile_model

  def step(state, batch, key):
    images, labels = batch
    state = synset_eval.train_network(images, labels, key, CONVNET_PROTOCOL, NUM_CLASSES,
                                   epochs=(0, 1), state=state)
    return state, state[0]['head']['bias']

  _, params = convnet_init()
  state = (params, jax.tree.map(jnp.zeros_like, params))
  return jax_runner(jax.jit(step, donate_argnums=0), state, setup['jax_batches'],
                    (jax.random.key(7),))


def convnet_torch(setup, compile_model: bool):
  net = torch_convnet_from(convnet_init()[1])
  forward = torch.compile(net) if compile_model else net
  p = CONVNET_PROTOCOL
  optimizer = torch.optim.SGD(net.parameters(), lr=p.lr, momentum=p.momentum,
                              weight_decay=p.weight_decay)

  def step(batch):
    x, y = batch
    idx = torch.randperm(x.shape[0])
    loss = F.cross_entropy(forward(x[idx]), y[idx])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss

  run = cycling_runner(step, setup['torch_batches'])
  run.info = {}
  return run


SPECS = {'unet': (unet_setup, unet_check, unet_jax, unet_torch),
         'convnet': (convnet_setup, convnet_check, convnet_jax, convnet_torch)}


# Timing.


def measure(run, seconds: float) -> dict:
  """First call, then 2 warm-up steps, then back-to-back steps for at least `seconds`."""
  compile_s = time_loop(run, 1)
  warm_s = time_loop(run, WARMUP_STEPS)
  steps = max(1, math.ceil(seconds * WARMUP_STEPS / warm_s))
  all_start, own_start = cpu_seconds()
  elapsed = time_loop(run, steps)
  all_end, own_end = cpu_seconds()
  others = ((all_end - all_start) - (own_end - own_start)) / elapsed
  return {'compile_s': compile_s, 'steps_per_s': steps / elapsed, 'timed_steps': steps,
          'other_cpu_cores': others, **run.info}


def run_all(args):
  """Checks the twins, then times every row `args.repeats` times, interleaved."""
  setups, checks, rows = {}, {}, {}
  for model in args.models:
    setup_fn, check_fn, jax_fn, torch_fn = SPECS[model]
    setups[model] = setup_fn()
    checks[model] = check_fn(setups[model]) | {'batch': setups[model]['batch']}
    rows[f'{model} jax'] = (model, jax_fn, False)
    rows[f'{model} torch eager'] = (model, torch_fn, False)
    if args.torch_compile:
      rows[f'{model} torch.compile (model; eager optimizer)'] = (model, torch_fn, True)
  results = {name: {'model': model, 'runs': []} for name, (model, _, _) in rows.items()}
  for rep in range(args.repeats):
    for name, (model, make, compile_model) in list(rows.items()):
      try:
        row = measure(make(setups[model], compile_model), args.seconds)
      except Exception as err:  # pylint: disable=broad-except
        if not compile_model:
          raise
        print(f'{name}: skipped ({type(err).__name__}: {str(err).splitlines()[0][:200]})',
              file=sys.stderr)
        del rows[name], results[name]
        continue
      results[name]['runs'].append(row)
      print(f'[repeat {rep + 1}/{args.repeats}] {name}: {1e3 / row["steps_per_s"]:.1f} ms/step '
            f'({row["timed_steps"]} steps), first call {row["compile_s"]:.2f} s',
            file=sys.stderr, flush=True)
  for result in results.values():
    runs = result['runs']
    result['compile_s_median'] = statistics.median(r['compile_s'] for r in runs)
    result['steps_per_s_median'] = statistics.median(r['steps_per_s'] for r in runs)
    result['ms_per_step'] = 1e3 / result['steps_per_s_median']
    gflop = runs[0].get('gflop_per_step')
    if gflop is not None:
      result['gflop_per_step'] = gflop
      result['gflop_per_s'] = gflop * result['steps_per_s_median']
  for result in results.values():
    ours = results.get(f'{result["model"]} jax')
    if ours is not None:
      result['torch_over_ours'] = result['ms_per_step'] / ours['ms_per_step']
  return checks, results


def markdown(checks, results, repeats: int) -> str:
  lines = [f'| step | batch | params | first call (s) | ms/step (median of {repeats}) | steps/s '
           '| torch / ours | GFLOP/step (XLA) | GFLOP/s |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  for name, row in results.items():
    check = checks[row['model']]
    gflop = f'{row["gflop_per_step"]:.1f}' if 'gflop_per_step' in row else '–'
    rate = f'{row["gflop_per_s"]:.1f}' if 'gflop_per_s' in row else '–'
    lines.append(f'| {name} | {check["batch"]} | {check["params_jax"]:,} '
                 f'| {row["compile_s_median"]:.2f} | {row["ms_per_step"]:.1f} '
                 f'| {row["steps_per_s_median"]:.2f} | {row["torch_over_ours"]:.2f} '
                 f'| {gflop} | {rate} |')
  lines.append('\ntorch / ours: ratio of ms per step (> 1: the library\'s step is faster). '
               'Twin outputs agree to a max relative difference of ' +
               ', '.join(f'{c["output_max_rel_diff"]:.1e} ({m})' for m, c in checks.items()) +
               '.')
  return '\n'.join(lines)


def environment() -> dict:
  import flax  # pylint: disable=import-outside-toplevel
  return {'python': platform.python_version(), 'jax': jax.__version__,
          'jaxlib': jax.lib.__version__, 'flax': flax.__version__, 'optax': optax.__version__,
          'torch': torch.__version__, 'torch_threads': torch.get_num_threads(),
          'machine': machine.describe(torch=torch),
          'XLA_FLAGS': os.environ.get('XLA_FLAGS', '')}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seconds', type=float, default=3.0,
                      help='minimum timed duration per measurement')
  parser.add_argument('--repeats', type=int, default=3, help='repeats; the median is reported')
  parser.add_argument('--models', type=lambda s: s.split(','), default=list(MODELS),
                      help=f'comma-separated subset of {",".join(MODELS)}')
  parser.add_argument('--torch-compile', action='store_true',
                      help='also time torch.compile on the model (slow to compile on a CPU)')
  parser.add_argument('--out', default='benchmarks/out/conv_peers.json', help='JSON output path')
  args = parser.parse_args()
  if unknown := set(args.models) - set(MODELS):
    parser.error(f'unknown models {sorted(unknown)}; choose from {MODELS}')
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  load_start = os.getloadavg()
  checks, results = run_all(args)
  env = environment() | {'load_avg_start': load_start, 'load_avg_end': os.getloadavg()}
  others = max(r['other_cpu_cores'] for row in results.values() for r in row['runs'])
  if others > 0.1:
    print(f'Warning: other processes used up to {others:.2f} CPU cores during a timed loop; '
          'the timings are disturbed. Rerun on an idle machine.', file=sys.stderr)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'environment': env, 'settings': vars(args), 'models': checks,
               'results': results}, f, indent=2)
  print(machine.headline(env['machine']))
  print(markdown(checks, results, args.repeats))


if __name__ == '__main__':
  main()
