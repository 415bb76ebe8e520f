"""Time and label embeddings shared by every network."""

import jax.numpy as jnp
from flax import nnx


def sinusoidal_embedding(t, dim: int, max_frequency: float = 10.0,
                         max_period: float = 10_000.0):
  """Fourier features of a time in [0, 1].

  The highest angular frequency is `max_frequency` per unit time. DDPM-style embeddings of
  `1000 t` (frequency 1000) make the network oscillate in t; flow-map losses differentiate in
  t (`jax.jvp`), and with them a 2-D flow map trained 25x worse than with frequency 10
  (`tests/test_flow_map.py` setting).

  Args:
    t: times, shape [B] (or scalar, broadcast to [1]).
    dim: even embedding width.
    max_frequency: highest angular frequency (radians per unit time).
    max_period: ratio of the highest to the lowest frequency.

  Returns:
    [B, dim] array of sines and cosines of `t` at geometric frequencies.
  """
  t = jnp.atleast_1d(jnp.asarray(t, jnp.float32))
  half = dim // 2
  freqs = max_frequency * jnp.exp(
      -jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class TimeEmbedding(nnx.Module):
  """Embeds `t` (one-time models) or `(s, t)` (two-time flow-map models) into a vector.

  Two-time models embed `t` and the jump `t - s` separately and add them, so `s = t` is an
  ordinary velocity model plus a learned constant — the `u(x, t, t) = v(x, t)` limit is easy to
  represent.
  """

  def __init__(self, dim: int, *, two_time: bool = False, rngs: nnx.Rngs):
    self.dim = dim
    self.two_time = two_time
    self.t_mlp = nnx.Sequential(
        nnx.Linear(dim, dim, rngs=rngs), nnx.silu, nnx.Linear(dim, dim, rngs=rngs))
    self.gap_mlp = (nnx.Sequential(
        nnx.Linear(dim, dim, rngs=rngs), nnx.silu, nnx.Linear(dim, dim, rngs=rngs))
                    if two_time else None)

  def __call__(self, t, s=None):
    """t, s: [B] -> [B, dim]."""
    if self.two_time and s is None:
      raise ValueError('This is a two-time (flow map) model: pass `s` as well as `t`.')
    if not self.two_time and s is not None:
      raise ValueError('This is a one-time model: build it with two_time=True to pass `s`.')
    emb = self.t_mlp(sinusoidal_embedding(t, self.dim))
    if self.two_time:
      emb = emb + self.gap_mlp(sinusoidal_embedding(jnp.asarray(t) - jnp.asarray(s), self.dim))
    return emb


class LabelEmbedding(nnx.Module):
  """Class labels -> vectors; index `num_classes` is the null label used for guidance."""

  def __init__(self, num_classes: int, dim: int, *, rngs: nnx.Rngs):
    self.num_classes = num_classes
    self.table = nnx.Embed(num_classes + 1, dim, rngs=rngs)

  def __call__(self, cond):
    """cond: int [B] in [0, num_classes] -> [B, dim]."""
    return self.table(cond)


def embed_conditions(time: TimeEmbedding, label: LabelEmbedding | None, batch: int, t, s=None,
                     cond=None, *, broadcast: bool = True):
  """The conditioning vector of a network: time (and jump) embedding plus label embedding.

  A scalar `t` (and `s`), as ODE solvers pass it, is embedded once for the whole batch.

  Args:
    time, label: the network's embeddings (`label` None for an unconditional model).
    batch: batch size B; `t` and `s` are [B] or scalars.
    cond: int labels [B], required iff `label` is given.
    broadcast: False returns the [1, dim] embedding of a scalar time as it is (no label), so
      that a network can apply its first layer to it once.

  Returns:
    [B, dim] (or [1, dim], see `broadcast`).
  """
  once = jnp.ndim(t) == 0 and (s is None or jnp.ndim(s) == 0)
  rows = 1 if once else batch
  t = jnp.broadcast_to(t, (rows,))
  s = None if s is None else jnp.broadcast_to(s, (rows,))
  emb = time(t, s)
  if label is not None:
    if cond is None:
      raise ValueError('This model is class-conditional: pass `cond` (labels).')
    emb = emb + label(cond)
  return jnp.broadcast_to(emb, (batch, emb.shape[-1])) if broadcast else emb
