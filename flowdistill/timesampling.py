"""Training-time distributions on [0, 1]."""

import jax
import jax.numpy as jnp

TIME_DISTRIBUTIONS = ('uniform', 'logit_normal', 'beta')


def sample_times(key, num: int, distribution: str = 'uniform', *, loc: float = 0.0,
                 scale: float = 1.0, a: float = 1.0, b: float = 1.0, eps: float = 0.0):
  """Times [num] in [eps, 1 - eps].

  Args:
    distribution: 'uniform'; 'logit_normal' (`sigmoid(N(loc, scale^2))`, SD3-style, more
      weight mid-path); 'beta' (`Beta(a, b)`).
    eps: keep times away from the ends where a conversion is singular.
  """
  if distribution == 'uniform':
    t = jax.random.uniform(key, (num,))
  elif distribution == 'logit_normal':
    t = jax.nn.sigmoid(loc + scale * jax.random.normal(key, (num,)))
  elif distribution == 'beta':
    t = jax.random.beta(key, a, b, (num,))
  else:
    raise ValueError(f'Unknown time distribution {distribution!r}; choose one of '
                     f'{list(TIME_DISTRIBUTIONS)}.')
  return jnp.clip(t, eps, 1.0 - eps)
