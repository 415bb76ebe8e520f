"""SFM: statistical flow matching for linear probes on a frozen backbone φ (METHODS.md §5), and
the linear-gradient-matching (LGM) baseline it replaces.

Real statistics are computed once: class means μ_c = mean φ(x) over class c, the mean of the
other classes ν_c = (Σ_k μ_k − μ_c) / (C − 1), and the flow F = ν − μ, [C, D] each. At a zero
linear head with balanced labels, the cross-entropy gradient is ∂CE/∂W_c = ((C − 1)/C²) F_c and
∂CE/∂b = 0, so matching F is matching LGM's gradient at W = 0 with no real images per step.

Losses are pure: `loss_fn(images, key, backbone_params, ...) -> (scalar, metrics)`, images
[C·IPC, H, W, C] ordered class by class (`labels = repeat(arange(C), IPC)`).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

DENOMINATORS = ('classes', 'reference')


def class_means(features: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """features [N, D], labels int [N] -> per-class means [C, D] (every class present)."""
  onehot = jax.nn.one_hot(labels, num_classes, dtype=features.dtype)
  return (onehot.T @ features) / onehot.sum(0)[:, None]


def other_class_means(means: jax.Array, denominator: float) -> jax.Array:
  """ν [C, D] from class means [C, D]: (Σ_k μ_k − μ_c) / denominator."""
  return (means.sum(0, keepdims=True) - means) / denominator


def check_classes(num_classes: int) -> None:
  if num_classes < 2:
    raise ValueError(f'SFM needs at least 2 classes (ν_c, the mean of the other classes, is '
                     f'undefined for C = {num_classes}).')


def real_statistics(features, labels, num_classes: int) -> dict:
  """{'mu', 'nu', 'flow'} [C, D] of real features [N, D] (computed once, no augmentation)."""
  check_classes(num_classes)
  mu = class_means(jnp.asarray(features), jnp.asarray(labels), num_classes)
  nu = other_class_means(mu, num_classes - 1)
  return {'mu': mu, 'nu': nu, 'flow': nu - mu}


def synthetic_statistics(features: jax.Array, labels: jax.Array, num_classes: int, ipc: int,
                         denominator: str = 'classes') -> dict:
  """{'mu', 'nu', 'flow'} of synthetic features [C·IPC, D]. `denominator`: 'classes' divides
  the other-class sum by C − 1 (the real statistics' own), 'reference' by C·IPC − 1 (the
  public SFM code; the two agree at IPC = 1)."""
  if denominator not in DENOMINATORS:
    raise ValueError(f'Unknown SFM denominator {denominator!r} (config sfm.nontarget_'
                     f'denominator); choose one of {DENOMINATORS}.')
  mu = class_means(features, labels, num_classes)
  nu = other_class_means(mu, num_classes - 1 if denominator == 'classes'
                         else num_classes * ipc - 1)
  return {'mu': mu, 'nu': nu, 'flow': nu - mu}


def cosine_distance(a: jax.Array, b: jax.Array) -> jax.Array:
  """1 − cos(vec a, vec b): one cosine over all entries."""
  a, b = a.ravel(), b.ravel()
  return 1.0 - a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)).clip(1e-12)


def _embedded(apply, params, images, key, augment, copies):
  """φ of `copies` augmented versions of each image, averaged per image: [B, D]."""
  keys = jax.random.split(key, copies)
  return jnp.mean(jax.vmap(lambda k: apply(params, augment(images, k)))(keys), axis=0)


def check_copies(copies: int) -> None:
  if copies < 1:
    raise ValueError(f'The number of augmented copies A must be >= 1; got {copies}.')


def check_ipc(ipc: int) -> None:
  if ipc < 1:
    raise ValueError(f'IPC (images per class) must be >= 1; got {ipc}.')


def _synthetic_statistics_fn(apply, num_classes, ipc, augment, copies, denominator):
  """Checks the sizes; `(images, key, params) -> synthetic_statistics` of the set's features."""
  check_classes(num_classes)
  check_copies(copies)
  check_ipc(ipc)
  labels = jnp.repeat(jnp.arange(num_classes), ipc)

  def statistics(images, key, params):
    return synthetic_statistics(_embedded(apply, params, images, key, augment, copies), labels,
                                num_classes, ipc, denominator)

  return statistics


def make_sfm_loss(apply: Callable, real: dict, num_classes: int, ipc: int, *,
                  augment: Callable, copies: int = 1, denominator: str = 'classes') -> Callable:
  """`loss_fn(images, key, backbone_params) -> (1 − cos(F_real, F_syn), metrics)`.

  Args:
    apply: the backbone `(params, x [B, H, W, C]) -> [B, D]`. real: `real_statistics`.
    augment: `(images, key) -> images`. copies: A augmented copies averaged per image.
  """
  statistics = _synthetic_statistics_fn(apply, num_classes, ipc, augment, copies, denominator)

  def loss_fn(images, key, params):
    syn = statistics(images, key, params)
    loss = cosine_distance(real['flow'], syn['flow'])
    return loss, {'cosine': 1.0 - loss}

  return loss_fn


def make_sfm_decouple_loss(apply: Callable, real: dict, num_classes: int, ipc: int, *,
                           augment: Callable, copies: int = 1, alpha: float = 0.5,
                           denominator: str = 'classes') -> Callable:
  """`loss_fn(images, key, backbone_params) -> (α MSE(μ, μ̃) + (1 − α) MSE(ν, ν̃), metrics)`."""
  statistics = _synthetic_statistics_fn(apply, num_classes, ipc, augment, copies, denominator)

  def loss_fn(images, key, params):
    syn = statistics(images, key, params)
    mse_mu = jnp.mean(jnp.square(real['mu'] - syn['mu']))
    mse_nu = jnp.mean(jnp.square(real['nu'] - syn['nu']))
    return alpha * mse_mu + (1 - alpha) * mse_nu, {'mse_mu': mse_mu, 'mse_nu': mse_nu}

  return loss_fn


def head_gradient(features: jax.Array, labels: jax.Array, weight: jax.Array,
                  bias: jax.Array) -> jax.Array:
  """vec(∂CE/∂W, ∂CE/∂b) of a linear head (W [D, C], b [C]) on features [B, D]: [D·C + C]."""

  def ce(w, b):
    logits = features @ w + b
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  gw, gb = jax.grad(ce, argnums=(0, 1))(weight, bias)
  return jnp.concatenate([gw.ravel(), gb])


def class_index_table(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """int [C, n_min]: the indices of each class's images (truncated to the smallest class), from
  which LGM draws its class-balanced real batches."""
  check_classes(num_classes)
  groups = [np.flatnonzero(np.asarray(labels) == c) for c in range(num_classes)]
  n_min = min(len(g) for g in groups)
  return np.stack([g[:n_min] for g in groups]).astype(np.int32)


def make_lgm_loss(apply: Callable, num_classes: int, ipc: int, *, augment: Callable,
                  copies: int = 10, head_std: float = 0.01) -> Callable:
  """`loss_fn(images, key, backbone_params, real_x, real_index) -> (1 − cos(g_real, g_syn),
  metrics)`: linear gradient matching (Cazenavette et al. 2025). Each step draws a fresh head
  (W ~ N(0, head_std²), b = 0), a class-balanced real batch of IPC·A images per class (each
  augmented once) from `real_x` [N, H, W, C] via `real_index` (`class_index_table`), and A
  augmented copies of each synthetic image; the loss is differentiated through the inner
  gradient."""
  check_classes(num_classes)
  check_copies(copies)
  check_ipc(ipc)
  syn_labels = jnp.tile(jnp.repeat(jnp.arange(num_classes), ipc), copies)
  real_labels = jnp.repeat(jnp.arange(num_classes), ipc * copies)

  def loss_fn(images, key, params, real_x, real_index):
    k_head, k_real, k_aug_real, k_aug_syn = jax.random.split(key, 4)
    pick = jax.random.randint(k_real, (num_classes, ipc * copies), 0, real_index.shape[1])
    real = real_x[jnp.take_along_axis(real_index, pick, 1).ravel()]
    real_features = apply(params, augment(real, k_aug_real))
    syn = jnp.concatenate([augment(images, k) for k in jax.random.split(k_aug_syn, copies)])
    syn_features = apply(params, syn)
    dim = real_features.shape[-1]
    weight = head_std * jax.random.normal(k_head, (dim, num_classes))
    bias = jnp.zeros((num_classes,))
    g_real = jax.lax.stop_gradient(head_gradient(real_features, real_labels, weight, bias))
    g_syn = head_gradient(syn_features, syn_labels, weight, bias)
    loss = cosine_distance(g_real, g_syn)
    return loss, {'cosine': 1.0 - loss}

  return loss_fn
