"""Distribution matching (DM, Zhao & Bilen 2023): the cheap synthetic baseline.

Each step draws a fresh randomly initialised ConvNet and matches, class by class, the mean
embedding (the features before its head) of augmented real and synthetic images, with one DSA
key per class shared by both batches:

    loss = sum_c || mean φ(A(real_c)) − mean φ(A(syn_c)) ||².

The synthetic images start from real ones and follow SGD with momentum. Like the evaluator, DM
works on images standardised by the train split's channel statistics. With a `state_path`, a
stopped synthesis keeps its images, momentum, losses and batch generator there and a rerun
continues to the images of a run that never stopped.
"""

import dataclasses
import json
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowdistill import files
from flowdistill.condense.augment import DIGITS, augment, parse_strategy
from flowdistill.condense.subsets import check_ipc, random_subset
from flowdistill.condense.synset_eval import Protocol, make_net
from flowdistill.train import stop


@dataclasses.dataclass(frozen=True)
class DMConfig:
  """DM settings; the defaults are the reference (20 000 iterations, batch_real 256, image SGD
  lr 1.0 with momentum 0.5, DSA on, initialised from real images)."""
  iterations: int = 20000
  lr: float = 1.0
  momentum: float = 0.5
  batch_real: int = 256
  dsa: bool = True
  strategy: str = DIGITS

  def __post_init__(self):
    if self.iterations < 1 or self.batch_real < 1 or self.lr <= 0:
      raise ValueError('DMConfig needs iterations >= 1, batch_real >= 1 and lr > 0; got '
                       f'{self.iterations}, {self.batch_real}, {self.lr}.')
    parse_strategy(self.strategy)


def dm_loss(syn: jax.Array, real: jax.Array, key: jax.Array, embed: Callable, *,
            dsa: bool = True, strategy: str = DIGITS) -> jax.Array:
  """Sum over classes of the squared distance between mean real and synthetic embeddings.

  Args:
    syn: synthetic images [C, IPC, H, W, Ch]. real: real images [C, M, H, W, Ch].
    key: class c augments both of its batches with `fold_in(key, c)` (Siamese, shared params).
    embed: images [B, H, W, Ch] -> embeddings [B, F].

  Returns:
    Scalar loss; the real side is constant (no gradient flows into it).
  """
  num_classes = syn.shape[0]
  if dsa:
    keys = jax.vmap(lambda c: jax.random.fold_in(key, c))(jnp.arange(num_classes))
    aug = jax.vmap(lambda x, k: augment(x, k, strategy, shared=True))
    syn, real = aug(syn, keys), aug(real, keys)
  flat = lambda x: x.reshape(-1, *x.shape[2:])
  real_mean = embed(flat(jax.lax.stop_gradient(real))).reshape(num_classes, real.shape[1], -1)
  syn_mean = embed(flat(syn)).reshape(num_classes, syn.shape[1], -1)
  return jnp.sum(jnp.square(real_mean.mean(1) - syn_mean.mean(1)))


SAVE_EVERY = 100  # iterations between saves of the resume state


def distribution_matching(train: dict, ipc: int, key: jax.Array, settings: DMConfig,
                          protocol: Protocol | None = None, *,
                          on_progress: Callable[[int], None] | None = None,
                          state_path: str | None = None) -> dict:
  """Learns IPC synthetic images per class by DM.

  Args:
    train: {'x': float images [N, H, W, C] in [-1, 1], 'label': int [N]}.
    ipc: images per class.
    key: seeds the initial real images, the real batches, the networks and the augmentation.
    settings: DM settings. protocol: the ConvNet (width, depth, norm) whose embedding is matched
      (default `Protocol()`, ConvNet-3).
    on_progress: called with the number of iterations done, every 10.
    state_path: an `.npz` written every `SAVE_EVERY` iterations, when a stop signal comes
      (`train.stop`) and at the end; a call that finds it continues from it (the caller keys
      the path by everything above, e.g. the cell's recipe, and removes it once the set is
      used: `protocol.run_cells`). None: a stopped synthesis starts again.

  Returns:
    {'x': images [C * IPC, H, W, C] in [-1, 1] (clipped), 'label': int [C * IPC] by class,
     'loss': float [iterations] per-step losses}.
  """
  protocol = protocol or Protocol()
  x = np.asarray(train['x'], np.float32)
  labels = np.asarray(train['label'])
  check_ipc(labels, ipc)
  num_classes = int(labels.max()) + 1
  mean, std = x.mean((0, 1, 2)), x.std((0, 1, 2))
  x = (x - mean) / std
  seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  rows = [np.flatnonzero(labels == c) for c in range(num_classes)]
  batch_real = min(settings.batch_real, min(len(r) for r in rows))
  init = random_subset(None, labels, ipc, seed)
  syn = jnp.asarray(x[init].reshape(num_classes, ipc, *x.shape[1:]))

  @jax.jit
  def step(syn, momentum, real, i):
    step_key = jax.random.fold_in(key, i)
    net_key, aug_key = jax.random.split(step_key)
    graphdef, params = make_net(x.shape[1:], num_classes, protocol, net_key)
    embed = lambda images: nnx.merge(graphdef, params).features(images)
    loss, grad = jax.value_and_grad(dm_loss)(syn, real, aug_key, embed, dsa=settings.dsa,
                                             strategy=settings.strategy)
    momentum = settings.momentum * momentum + grad
    return syn - settings.lr * momentum, momentum, loss

  momentum = jnp.zeros_like(syn)
  losses, start = [], 0
  if state_path and files.exists(state_path):
    saved = files.load_npz(state_path)
    if saved['syn'].shape != syn.shape:
      raise ValueError(f'{state_path} holds DM images {saved["syn"].shape}, not {syn.shape}: '
                       'it belongs to another synthesis; delete it to start this one.')
    start, syn, momentum = int(saved['step']), jnp.asarray(saved['syn']), jnp.asarray(
        saved['momentum'])
    losses = list(saved['loss'])
    rng.bit_generator.state = json.loads(str(saved['rng']))

  def save(i):
    files.save_npz(state_path, step=i, syn=np.asarray(syn), momentum=np.asarray(momentum),
                   loss=np.asarray(jnp.stack(losses)) if losses else np.zeros(0, np.float32),
                   rng=json.dumps(rng.bit_generator.state))

  for i in range(start, settings.iterations):
    if state_path and ((i > start and i % SAVE_EVERY == 0) or stop.requested() is not None):
      save(i)
    stop.check(syn, where=f'DM iteration {i}' + ('' if state_path else
                                                 ' (DM starts again on a rerun)'))
    real = np.stack([x[rng.choice(r, batch_real, replace=False)] for r in rows])
    syn, momentum, loss = step(syn, momentum, real, jnp.int32(i))
    losses.append(loss)
    if on_progress is not None and (i + 1) % 10 == 0:
      on_progress(i + 1)
  if state_path and start < settings.iterations:
    save(settings.iterations)
  images = np.asarray(syn).reshape(-1, *x.shape[1:]) * std + mean
  return {'x': np.clip(images, -1, 1), 'label': np.repeat(np.arange(num_classes), ipc),
          'loss': np.asarray(jnp.stack(losses))}
