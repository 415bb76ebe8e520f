"""MLP velocity / flow-map network for 2-D and tabular data."""

import jax.numpy as jnp
from flax import nnx

from flowdistill.models.embedding import LabelEmbedding, TimeEmbedding, embed_conditions


class MLP(nnx.Module):
  """`f(x, t[, s][, cond])` for flat data.

  Args:
    dim: data dimension D.
    hidden: width of each hidden layer.
    depth: number of hidden layers.
    time_dim: width of the time embedding (and of the label embedding). 16 by default: at
      64 the time MLP and the first layer's time inputs cost 12 % of a 2-D training step's
      FLOPs, for W2 and NLL within the seed noise on two of three toy sets (on 8gaussians,
      width 64 is 3-5 % better in W2 at 4-16 Euler steps; benchmarks/RESULTS.md, issue 33).
    two_time: take `(s, t)` (flow maps) instead of `t`.
    num_classes: if > 0, condition on labels in [0, num_classes] (num_classes = null label).
    dtype: compute dtype of the hidden layers (e.g. jnp.bfloat16); parameters, the time
      embedding and the output stay float32.
  """

  def __init__(self, dim: int, *, hidden: int = 256, depth: int = 3, time_dim: int = 16,
               two_time: bool = False, num_classes: int = 0, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.dim = dim
    self.dtype = dtype
    self.time = TimeEmbedding(time_dim, two_time=two_time, rngs=rngs)
    self.label = LabelEmbedding(num_classes, time_dim, rngs=rngs) if num_classes else None
    widths = [dim + time_dim] + [hidden] * depth
    self.hidden = nnx.List([nnx.Linear(a, b, dtype=dtype, rngs=rngs)
                            for a, b in zip(widths[:-1], widths[1:])])
    self.out = nnx.Linear(hidden, dim, dtype=dtype, kernel_init=nnx.initializers.zeros,
                          rngs=rngs)

  scalar_time = True  # a scalar t is embedded once per batch (see `to_apply_fn`)

  def __call__(self, x, t, *, s=None, cond=None, train=False):
    """x: [B, D]; t, s: [B] or scalar; cond: int [B] -> [B, D] float32."""
    del train
    emb = embed_conditions(self.time, self.label, x.shape[0], t, s, cond, broadcast=False)
    first, *rest = self.hidden
    if emb.shape[0] == x.shape[0]:
      h = first(jnp.concatenate([x, emb], axis=-1).astype(self.dtype))
    else:  # one time for the batch: the embedding's share of the first layer, once
      kernel = first.kernel[...].astype(self.dtype)
      shared = emb.astype(self.dtype) @ kernel[self.dim:] + first.bias[...].astype(self.dtype)
      h = x.astype(self.dtype) @ kernel[:self.dim] + shared
    h = nnx.silu(h)
    for layer in rest:
      h = nnx.silu(layer(h))
    return self.out(h).astype(jnp.float32)
