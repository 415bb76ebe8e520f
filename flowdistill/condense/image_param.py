"""Learnable synthetic images for SFM and LGM: `pixels`, or a `pyramid` of resolutions
1, 2, 4, ..., full grown during distillation (the public LGM/SFM recipe).

The rendered image is `2 sigmoid(2 a) − 1 = tanh(a)` of a pre-activation `a`, so it always lies in
the library's [-1, 1]. `pixels`: `a` is a free [N, H, W, C] array. `pyramid`: `a` is the sum of
levels [N, r, r, C], each resized bilinearly to full size; the optimiser adds a level every
`grow_every` steps (coarse to fine) and restarts Adam at each addition. RGB images get a fixed
colour decorrelation (the ImageNet colour covariance's square root, as in Lucid) applied to `a`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flowdistill import files, fitting

MODES = ('pixels', 'pyramid')
INITS = ('noise', 'real')
# sqrt of the ImageNet RGB covariance (Lucid's color_correlation_svd_sqrt), normalised.
_COLOUR = np.array([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], np.float32)
_COLOUR = _COLOUR / np.max(np.linalg.norm(_COLOUR, axis=0))


def pyramid_sizes(size: int) -> tuple[int, ...]:
  """1, 2, 4, ... below `size`, then `size` (28 -> (1, 2, 4, 8, 16, 28))."""
  sizes = [1]
  while sizes[-1] * 2 < size:
    sizes.append(sizes[-1] * 2)
  return tuple(sizes) + ((size,) if size > 1 else ())


def render(levels: list, image_shape) -> jax.Array:
  """Levels (pixels: one [N, H, W, C] level) -> images [N, H, W, C] in [-1, 1]."""
  h, w, c = image_shape
  pre = sum(jax.image.resize(a, (a.shape[0], h, w, c), 'bilinear') for a in levels)
  if c == 3:
    pre = pre @ jnp.asarray(_COLOUR).T
  return jnp.tanh(pre)


def _preactivation(images: np.ndarray) -> np.ndarray:
  images = np.clip(np.asarray(images, np.float32), -0.999, 0.999)
  pre = np.arctanh(images)
  if images.shape[-1] == 3:
    pre = pre @ np.linalg.inv(_COLOUR).T
  return pre


def grow(levels: list, size: int, count: int, image_shape, key, *,
         real: np.ndarray | None = None) -> list:
  """Adds a level of `size` to the pyramid: small noise, or (`real` images) the residual that
  makes the render equal the real images seen at that resolution."""
  h, w, c = image_shape
  rows, cols = (h, w) if size >= max(h, w) else (size, size)
  if real is None:
    return levels + [0.1 * jax.random.normal(key, (count, rows, cols, c))]
  target = jax.image.resize(jnp.asarray(_preactivation(real)), (count, rows, cols, c), 'area'
                            if rows < h else 'nearest')
  current = (jnp.zeros_like(target) if not levels else
             sum(jax.image.resize(a, target.shape, 'bilinear') for a in levels))
  return levels + [target - current]


def distill(loss_fn, image_shape, count: int, key, *, steps: int, lr: float = 2e-3,
            mode: str = 'pixels', grow_every: int = 200, real: np.ndarray | None = None,
            loss_args: tuple = (), on_progress=None, progress_every: int = 100,
            state_path: str | None = None):
  """Adam on the parameterised images.

  Args:
    loss_fn: `(images [count, H, W, C], key, *loss_args) -> (scalar, metrics)`.
    real: initial images [count, H, W, C] in [-1, 1] (init 'real'), or None (noise).
    on_progress: called every `progress_every` steps and at the end with (steps done, last
      loss, `images()` -> the current images [count, H, W, C] numpy).
    state_path: an `.npz` file that holds the levels, the Adam state and the history after
      each `on_progress` call (`fitting.fit`'s state file); a run started with the same
      arguments continues from it, and reaches the same images as one that never stopped.

  Returns:
    (images [count, H, W, C] numpy, {'loss': [steps], 'adam_count': [steps]}).
  """
  if mode not in MODES:
    raise ValueError(f'Unknown image parameterisation {mode!r} (config sfm.param); choose one '
                     f'of {MODES}.')
  sizes = pyramid_sizes(max(image_shape[:2])) if mode == 'pyramid' else (max(image_shape[:2]),)
  opt = optax.adam(lr)
  loss_key, grow_key = jax.random.split(key)

  def objective(levels, i, *args):
    return loss_fn(render(levels, image_shape), jax.random.fold_in(loss_key, i), *args)

  update = fitting.make_update(objective, opt, has_aux=True)

  def record(out):
    return {'loss': out.loss, 'adam_count': out.opt_state[0].count}

  def progress(done, levels, metrics):
    on_progress(done, float(metrics['loss']), lambda: np.asarray(render(levels, image_shape)))

  _check_state(state_path, count, image_shape, steps)
  levels, history = [], None
  for phase, size in enumerate(sizes):
    levels = grow(levels, size, count, image_shape, jax.random.fold_in(grow_key, phase),
                  real=real)
    end = steps if phase == len(sizes) - 1 else min(steps, (phase + 1) * grow_every)
    # Adam restarts at each growth; the state file holds the phase that wrote it.
    levels, history = fitting.fit(
        update, levels, opt.init(levels), steps=steps, start=phase * grow_every, stop=end,
        history=history, args=loss_args, record=record,
        on_progress=None if on_progress is None else progress, progress_every=progress_every,
        state_path=state_path)
    if end >= steps:
      break
  return np.asarray(render(levels, image_shape)), history


def _check_state(path: str | None, count: int, image_shape, steps: int) -> None:
  if path is None or not files.exists(path):
    return
  saved = files.load_npz(path)
  first = saved['leaf0']
  if first.shape[0] != count or first.shape[-1] != image_shape[-1] or saved['step'] > steps:
    raise ValueError(f'{path} holds a distillation of {first.shape[0]} images of '
                     f'{first.shape[-1]} channels at step {saved["step"]}, but this run '
                     f'distils {count} images of {image_shape[-1]} channels for {steps} steps; '
                     'delete it to start over.')
