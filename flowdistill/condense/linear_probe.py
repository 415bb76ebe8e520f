"""The SFM/LGM evaluator: linear probes on a frozen backbone, trained on a synthetic set.

`normal`: a fresh head (W ~ N(0, 0.01²), b = 0) trained with Adam (lr 1e-3·bs/256, cosine to 0,
no weight decay, batch min(100, |S|)) on the features of the synthetic images, augmented anew
each epoch; accuracy on the whole test split at the last epoch only (no option selects an epoch
by its test accuracy). `ci` (classifier inheritance): the golden head W* of the distillation
backbone φ_d is kept, and only a linear projector P: D_e -> D_d is fitted on the synthetic
images, by MSE(P φ_e(aug s), φ_d(aug s)) over E augmented copies of the set; predictions are
argmax W* P φ_e(x). The fit is the least-squares solution (pseudo-inverse of the accumulated
Gram matrix), which is what gradient descent on that quadratic converges to: with Adam at the
head's learning rate a 10-image set moves P by ~0.01 in 300 steps, far from it. `kd`: a fresh head
on φ_e distilled from W* φ_d at temperature T (α CE + (1 − α) T² KL). R runs are trained at once
under `vmap`; each run's result depends only on its key.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flowdistill import fitting

MODES = ('normal', 'ci', 'kd')
PINV_RTOL = 1e-5  # eigenvalues of the Gram matrix below this share of the largest count as 0


@dataclasses.dataclass(frozen=True)
class ProbeProtocol:
  """runs: R heads (or projectors) per set. epochs: passes over the augmented synthetic set.
  batch_size: at most this many images per step. kd_temperature, kd_alpha: the `kd` mode."""
  runs: int = 5
  epochs: int = 1000
  batch_size: int = 100
  lr_per_256: float = 1e-3
  head_std: float = 0.01
  mode: str = 'normal'
  kd_temperature: float = 4.0
  kd_alpha: float = 0.5

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f'Unknown linear-probe mode {self.mode!r}; choose '
                       f'one of {MODES}.')
    for name in ('runs', 'epochs', 'batch_size'):
      if getattr(self, name) < 1:
        raise ValueError(f'ProbeProtocol.{name} must be >= 1; got {getattr(self, name)}.')
    if self.lr_per_256 <= 0 or self.head_std < 0 or self.kd_temperature <= 0:
      raise ValueError('ProbeProtocol needs lr_per_256 > 0, head_std >= 0 and kd_temperature > 0; '
                       f'got {self.lr_per_256}, {self.head_std}, {self.kd_temperature}.')
    if not 0 <= self.kd_alpha <= 1:
      raise ValueError(f'ProbeProtocol.kd_alpha={self.kd_alpha} must lie in [0, 1].')


@dataclasses.dataclass(frozen=True)
class Head:
  """A linear classifier on features [N, D]: logits = features @ weight + bias."""
  weight: jax.Array  # [D, C]
  bias: jax.Array    # [C]

  def logits(self, features):
    return features @ self.weight + self.bias


jax.tree_util.register_dataclass(Head, data_fields=['weight', 'bias'], meta_fields=[])


def cross_entropy(logits, labels):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


def train_golden_head(features: np.ndarray, labels: np.ndarray, num_classes: int, key, *,
                      epochs: int = 20, batch_size: int = 256, lr: float = 1e-2) -> Head:
  """W* of classifier inheritance: a linear head on all train features [N, D] (Adam, cosine).

  It is fitted on standardised features and the standardisation is folded into W* and b*, so
  the head reads raw features; unstandardised, the ill-conditioned problem is far from its
  optimum after 20 epochs (93 % against 98 % on MNIST SimCLR features)."""
  features, labels = jnp.asarray(features), jnp.asarray(labels, jnp.int32)
  mean, scale = features.mean(0), features.std(0) + 1e-6
  features = (features - mean) / scale
  n, dim = features.shape
  per_epoch = n // batch_size
  opt = optax.adam(optax.cosine_decay_schedule(lr, epochs * per_epoch))
  head = Head(jnp.zeros((dim, num_classes)), jnp.zeros((num_classes,)))
  update = fitting.make_update(
      lambda h, idx: cross_entropy(h.logits(features[idx]), labels[idx]), opt)

  def epoch(carry, k):
    order = jax.random.permutation(k, n)[:per_epoch * batch_size].reshape(per_epoch, batch_size)

    def step(carry, idx):
      out = update(*carry, idx)
      return (out.params, out.opt_state), None

    return jax.lax.scan(step, carry, order)[0], None

  (head, _), _ = jax.jit(lambda c, ks: jax.lax.scan(epoch, c, ks))(
      (head, opt.init(head)), jax.random.split(key, epochs))
  weight = head.weight / scale[:, None]
  return Head(weight, head.bias - mean @ weight)


def accuracy(logits: jax.Array, labels) -> float:
  return float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(labels)))


def make_probe(embed: Callable, images: jax.Array, labels: jax.Array, num_classes: int,
               protocol: ProbeProtocol, *, augment: Callable, teacher_embed: Callable | None = None,
               golden: Head | None = None) -> Callable:
  """`train(key) -> trained pytree` of one run (a `Head`, or the least-squares projector
  [D_e, D_d] for `ci`), to be vmapped over keys.

  Args:
    embed: frozen evaluation backbone φ_e, images [B, H, W, C] -> [B, D_e].
    images, labels: the synthetic set [N, H, W, C], int [N].
    augment: `(images, key) -> images`, applied anew each epoch.
    teacher_embed, golden: φ_d and W* (modes `ci` and `kd`).
  """
  n = images.shape[0]
  batch = min(protocol.batch_size, n)
  per_epoch = n // batch
  lr = protocol.lr_per_256 * batch / 256
  opt = optax.adam(optax.cosine_decay_schedule(lr, protocol.epochs * per_epoch))
  mode = protocol.mode
  if mode != 'normal' and (teacher_embed is None or golden is None):
    raise ValueError(f"Linear-probe mode {mode!r} needs the distillation backbone and its golden "
                     'head W*.')
  dim_d = None if mode == 'normal' else teacher_embed(images[:1]).shape[-1]
  if mode != 'normal' and dim_d != golden.weight.shape[0]:
    raise ValueError(f'The golden head W* takes {golden.weight.shape[0]} features but the '
                     f'distillation backbone gives {dim_d}: the projector would map to the '
                     'wrong space; use the W* of that backbone.')
  dim_e = embed(images[:1]).shape[-1]

  def loss(params, feats, targets, idx):
    logits = params.logits(feats[idx])
    ce = cross_entropy(logits, labels[idx])
    if mode == 'normal':
      return ce
    t = protocol.kd_temperature
    soft = jax.nn.softmax(targets[idx] / t)
    kl = jnp.mean(jnp.sum(soft * (jnp.log(soft + 1e-12) - jax.nn.log_softmax(logits / t)), -1))
    return protocol.kd_alpha * ce + (1 - protocol.kd_alpha) * t * t * kl

  update = fitting.make_update(loss, opt)

  def views(key):
    """φ_e and the targets of one augmented copy of the set."""
    seen = augment(images, key)
    feats = embed(seen)
    if mode == 'normal':
      return feats, jnp.zeros((n, 0))
    teacher = feats if teacher_embed is embed else teacher_embed(seen)  # φ_e = φ_d: one pass
    return feats, teacher if mode == 'ci' else golden.logits(teacher)

  def fit_projector(key):
    def add(gram, k):
      feats, targets = views(k)
      return (gram[0] + feats.T @ feats, gram[1] + feats.T @ targets), None

    zeros = (jnp.zeros((dim_e, dim_e)), jnp.zeros((dim_e, dim_d)))
    (ff, ft), _ = jax.lax.scan(add, zeros, jax.random.split(key, protocol.epochs))
    return jnp.linalg.pinv(ff, rtol=PINV_RTOL, hermitian=True) @ ft

  def train(key):
    if mode == 'ci':
      return fit_projector(key)
    k_init, k_epochs = jax.random.split(key)
    params = Head(protocol.head_std * jax.random.normal(k_init, (dim_e, num_classes)),
                  jnp.zeros((num_classes,)))

    def epoch(carry, k):
      k_aug, k_order = jax.random.split(k)
      feats, targets = views(k_aug)
      order = jax.random.permutation(k_order, n)[:per_epoch * batch].reshape(per_epoch, batch)

      def step(carry, idx):
        out = update(*carry, feats, targets, idx)
        return (out.params, out.opt_state), None

      return jax.lax.scan(step, carry, order)[0], None

    (params, _), _ = jax.lax.scan(epoch, (params, opt.init(params)),
                                  jax.random.split(k_epochs, protocol.epochs))
    return params

  return train


def evaluate_probe(embed: Callable, images, labels, test_features: np.ndarray, test_labels,
                   num_classes: int, key, protocol: ProbeProtocol, *, augment: Callable,
                   teacher_embed: Callable | None = None, golden: Head | None = None,
                   validation: tuple | None = None) -> dict:
  """{'accs' [R], 'mean', 'std'} of R probes trained on the synthetic set, tested on
  `test_features` [M, D_e] (φ_e of the whole test split, no augmentation) at the last epoch;
  with `validation` = (features [V, D_e], labels [V]) also 'val_accs', 'val_mean', 'val_std'
  of the same probes."""
  if float(np.min(images)) < -1 or float(np.max(images)) > 1:
    raise ValueError(f'Synthetic images must lie in [-1, 1]; got values in [{np.min(images):.3g}, '
                     f'{np.max(images):.3g}]. Map them with 2 x - 1 from [0, 1], or clip.')
  train = make_probe(embed, jnp.asarray(images), jnp.asarray(labels, jnp.int32), num_classes,
                     protocol, augment=augment, teacher_embed=teacher_embed, golden=golden)
  trained = jax.jit(jax.vmap(train))(jax.random.split(key, protocol.runs))

  def logits(params, features):
    return golden.logits(features @ params) if protocol.mode == 'ci' else params.logits(features)

  out = {}
  held_out = {'': (test_features, test_labels)}
  if validation is not None:
    held_out['val_'] = validation
  for prefix, (features, labels_) in held_out.items():
    features = jnp.asarray(features)
    accs = np.array([accuracy(logits(jax.tree.map(lambda a, r=r: a[r], trained), features),
                              labels_) for r in range(protocol.runs)])
    out.update({f'{prefix}accs': accs.tolist(), f'{prefix}mean': float(accs.mean()),
                f'{prefix}std': float(accs.std())})
  return out
