"""Build the configured network as an `(apply_fn, params)` pair."""

import jax.numpy as jnp
from flax import nnx

from flowdistill.models.apply import to_apply_fn
from flowdistill.models.dit import PRESETS, DiT
from flowdistill.models.mlp import MLP
from flowdistill.models.unet import UNet


def build_model(model_config, data_shape: tuple[int, ...], *, num_classes: int = 0,
                two_time: bool = False, seed: int = 0, dtype: str | None = None):
  """`(apply_fn, params)` for `config.model` on samples of `data_shape` ([D] or [H, W, C]).

  `num_classes > 0` makes a class-conditional model whose null label is `num_classes`.
  `dtype` overrides `config.model.dtype`, the compute dtype ('float32' | 'bfloat16'); the
  parameters are float32 either way, so one set of params serves both.
  """
  rngs = nnx.Rngs(seed)
  dtype = jnp.dtype(dtype or model_config.dtype)
  time = {'time_dim': model_config.time_dim} if model_config.time_dim else {}
  if model_config.name == 'mlp':
    if len(data_shape) != 1:
      raise ValueError(f'config.model.name="mlp" needs flat data; got samples of {data_shape}.')
    module = MLP(data_shape[0], hidden=model_config.hidden, depth=model_config.depth,
                 two_time=two_time, num_classes=num_classes, dtype=dtype, rngs=rngs, **time)
  elif len(data_shape) != 3:
    raise ValueError(f'config.model.name="{model_config.name}" needs [H, W, C] images; got '
                     f'{data_shape}.')
  elif model_config.name == 'dit':
    hidden, depth, heads = PRESETS[model_config.dit]
    module = DiT(data_shape, patch_size=model_config.patch_size, hidden=hidden, depth=depth,
                 heads=heads, two_time=two_time, num_classes=num_classes, dtype=dtype, rngs=rngs)
  else:
    module = UNet(data_shape, channels=tuple(model_config.channels),
                  num_res_blocks=model_config.num_res_blocks,
                  attention_levels=(-1,) if model_config.attention else (),
                  two_time=two_time, num_classes=num_classes, dtype=dtype, rngs=rngs, **time)
  return to_apply_fn(module)
