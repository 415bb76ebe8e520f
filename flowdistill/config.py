"""The experiment configuration: the shared sections, their checks, and what configs share.

The method registry above this module builds a method's full config from these shared sections
plus each registered method's own section, every key with its default. A key missing there is a
typo: `validate` rejects it (and any inconsistent value) with a message naming the key, before
any work starts. Settings that a library dataclass defines (`condense.protocol.Plan` and
`condense.synset_eval.Protocol` for `dd`) take their defaults and checks from it.

Config files are loaded by path (`--config=configs/x.py:arg`), so what they share lives here,
importable: `parse_arg` for their argument and presets such as `MNIST_UNET`.
"""

import difflib

import ml_collections

from flowdistill import ode, paths, timesampling
from flowdistill.condense import protocol
from flowdistill.couplings import COUPLINGS
from flowdistill.couplings import SOLVERS as OT_SOLVERS
from flowdistill.data.sources import (
  IMAGE_SOURCES,
  LATENT_SOURCES,
  SOURCES,
  TABULAR_SOURCES,
  TOY_SOURCES,
)
from flowdistill.errors import BadInput
from flowdistill.models import dit
from flowdistill.train import identity, parallel
from flowdistill.train import state as train_state

MODELS = ('mlp', 'unet', 'dit')
DTYPES = ('float32', 'bfloat16')

# Presets the MNIST configs of every method share: `config.data.update(**MNIST_DATA)`, ...
MNIST_DATA = dict(source='mnist', path_env='FLOWDISTILL_MNIST_DIR', batch_size=128,
                  conditional=True)
# The `cpu` preset's DM baseline (`config.dd_eval.dm`) for every dataset-distillation config:
# 1000 iterations of 64 real images per class instead of 20 000 of 256.
CPU_DM = dict(iterations=1000, batch_real=64)
MNIST_UNET = dict(name='unet', channels=(32, 64, 64), num_res_blocks=1, attention=True,
                  time_dim=128)
MNIST_EVAL = dict(num_samples=1000, nll_samples=256, nll_divergence='hutchinson', rtol=1e-4,
                  atol=1e-4)


def check_positive(flat: dict, ints=(), floats=()) -> None:
  """Raises naming the first key of `ints` below 1 or of `floats` not above 0."""
  for key in ints:
    if flat[key] < 1:
      raise BadInput(f'config.{key}={flat[key]} must be >= 1.')
  for key in floats:
    if not flat[key] > 0:
      raise BadInput(f'config.{key}={flat[key]} must be > 0.')


def check_choice(flat: dict, key: str, options) -> None:
  """Raises unless `config.<key>` is one of `options`."""
  if flat[key] not in options:
    raise BadInput(f'config.{key}={flat[key]!r} is not one of {list(options)}.')


def base_config() -> ml_collections.ConfigDict:
  """The shared sections with their defaults (a 2-D flow-matching run)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.method = 'fm'
  c.distributed = False  # jax.distributed.initialize() before anything else

  c.data = dict(
      source='toy',         # 'toy' | 'tabular' | 'digits' | 'mnist' | 'fashion_mnist' | 'cifar10'
      name='checkerboard',  # toy set name (tabular: 'mixture16')
      path='',              # local files (idx folder, .npz, image folder); '' = built-in/tfds
      path_env='',          # environment variable holding the path (used when path is '')
      batch_size=1024,      # global batch
      conditional=False,    # feed labels to the model
      # source 'latent' with a missing cache data.path: encode the images of encode.source
      # (encode.path: its local files) with the diffusers AutoencoderKL weights encode.vae
      encode=dict(vae='', source='', path=''),
  )
  c.model = dict(
      name='mlp', hidden=256, depth=3,                          # MLP
      time_dim=0,  # time-embedding width (MLP, U-Net); 0: the network's own default
      channels=(32, 64, 64), num_res_blocks=1, attention=True,  # U-Net
      dit='S', patch_size=2,                                    # DiT: models.dit.PRESETS
      dtype='float32',
  )
  c.path = dict(name='linear', noise_scale=1.0)
  c.fm = dict(time_distribution='uniform', coupling='independent', ot_block_size=0,
              ot_solver='auction',  # 'exact' OT in the step: on the device | 'scipy' (host)
              sinkhorn_epsilon=0.05, label_dropout=0.0,
              ot_on_host=False)  # 'exact' OT in the data pipeline, overlapping the step
  c.teacher = dict(workdir='', ema=-1.0)  # a trained run to distil; ema -1: its eval_ema
  c.optim = dict(name='adam', lr=1e-3, schedule='warmup', warmup_steps=100, b1=0.9, b2=0.999,
                 weight_decay=0.0, grad_clip=1.0)
  c.train = dict(steps=2000, steps_per_call=1, num_devices=0, log_every=100, ckpt_every=1000,
                 keep=3, ema_rates=(0.999,), eval_ema=0.999,
                 mesh=dict(data=-1, fsdp=1),  # fsdp devices share one sharded copy of the state
                 allow_config_change='')  # 'optim.lr,train.steps': resume despite these
  c.eval = dict(
      num_samples=2000,
      euler_steps=(1, 2, 4, 8, 16, 100),
      adaptive_solver='dopri5', rtol=1e-5, atol=1e-5,
      nll_samples=1000, nll_divergence='exact', nll_probes=1,
      cfg_scale=1.0,              # classifier-free guidance weight for conditional sampling
      dtype='float32',            # compute dtype of the network in sampling and likelihoods
      classifier_steps=1500,      # feature network for the image Fréchet distance
      map_steps=(1, 2, 4, 8),    # flow-map jumps to evaluate
      plot=True,
  )
  c.dd = protocol.dd_section()  # the dataset-distillation protocol; defaults: paper values
  return c


def check_preset(config_file: str, preset: str, presets) -> None:
  """Refuses a preset that `config_file` (e.g. 'configs/sfm.py') does not define."""
  if preset not in presets:
    raise BadInput(f'{config_file}: unknown preset {preset!r}; choose one of {presets}.')


def parse_arg(arg: str, **spec) -> ml_collections.ConfigDict:
  """A config file's `arg` (`--config=file.py:arg`) as typed fields, like big_vision's.

  `spec` gives each field's default, in order; `arg` is comma-separated values: `name=value`
  sets a field, a bare value fills the next positional field, and the bare name of a boolean
  field sets it True. Values take the type of the default. Example:
  `parse_arg('lmd,data=mnist', loss='lmd', data='checkerboard')` has loss 'lmd' and data
  'mnist'; `parse_arg('tabular,distill', data='checkerboard', distill=False)` sets both.
  """
  fields, positional = dict(spec), iter(spec)
  for part in filter(None, (p.strip() for p in (arg or '').split(','))):
    name, eq, value = part.partition('=')
    if not eq and isinstance(spec.get(name), bool):
      value = 'True'
    elif not eq:
      name, value = next(positional, None), part
      if name is None:
        raise BadInput(f'Config argument {arg!r}: too many values; the fields are '
                       f'{list(spec)}.')
    if name not in spec:
      raise BadInput(f'Config argument {arg!r}: unknown field {name!r}; the fields are '
                     f'{list(spec)}.')
    fields[name] = _typed(value, spec[name], name, arg)
  return ml_collections.ConfigDict(fields)


def _typed(value: str, default, name: str, arg: str):
  if isinstance(default, bool):
    if value not in ('True', 'False', 'true', 'false', '1', '0'):
      raise BadInput(f'Config argument {arg!r}: {name} must be True or False, got {value!r}.')
    return value in ('True', 'true', '1')
  try:
    return type(default)(value)
  except ValueError:
    raise BadInput(f'Config argument {arg!r}: {name}={value!r} is not a '
                   f'{type(default).__name__}.') from None



def validate(config, defaults, num_devices: int | None = None, num_processes: int = 1) -> None:
  """Raises `BadInput` naming the first key of `config` that `defaults` (the full config of its
  method, from the method registry) lacks or types otherwise, or the first inconsistent value
  of the shared sections (the registry adds the method's own checks)."""
  known, flat = identity.flatten(defaults), identity.flatten(config)
  for key in flat:
    if key not in known:
      near = difflib.get_close_matches(key, known, n=1)
      hint = f' Did you mean config.{near[0]}?' if near else ''
      raise BadInput(f'Unknown config key config.{key}.{hint}')
  for key, default in known.items():
    if key not in flat:
      raise BadInput(f'config.{key} is missing; start configs from flowdistill.config.'
                     'base_config().')
    value = flat[key]
    if isinstance(default, bool) != isinstance(value, bool) or (
        isinstance(default, (int, float)) and not isinstance(value, (int, float))) or (
            isinstance(default, str) and not isinstance(value, str)):
      raise BadInput(f'config.{key}={value!r} has the wrong type; expected a '
                     f'{type(default).__name__} like {default!r}.')
  check_choice(flat, 'data.source', SOURCES)
  check_choice(flat, 'model.name', MODELS)
  check_choice(flat, 'model.dtype', DTYPES)
  check_choice(flat, 'eval.dtype', DTYPES)
  check_choice(flat, 'path.name', tuple(paths._PATHS))
  check_choice(flat, 'fm.time_distribution', timesampling.TIME_DISTRIBUTIONS)
  check_choice(flat, 'fm.coupling', COUPLINGS)
  check_choice(flat, 'fm.ot_solver', OT_SOLVERS)
  check_choice(flat, 'optim.name', train_state.OPTIMIZERS)
  check_choice(flat, 'optim.schedule', train_state.SCHEDULES)
  check_choice(flat, 'eval.adaptive_solver', ode.ADAPTIVE_SOLVERS)
  check_choice(flat, 'eval.nll_divergence', ('exact', 'hutchinson'))
  check_positive(flat, ints=('data.batch_size', 'train.steps', 'train.steps_per_call',
                             'train.log_every', 'train.ckpt_every', 'train.keep',
                             'eval.num_samples', 'eval.nll_samples'), floats=('optim.lr',))
  if flat['eval.cfg_scale'] < 0:
    raise BadInput(f'config.eval.cfg_scale={flat["eval.cfg_scale"]} must be >= 0 (0: '
                   'unconditional, 1: conditional, > 1: guided).')
  for key in ('eval.euler_steps', 'eval.map_steps'):
    if key in flat and any(n < 1 for n in flat[key]):
      raise BadInput(f'config.{key}={tuple(flat[key])}: every step count must be >= 1.')
  if not 0.0 <= flat['fm.label_dropout'] < 1.0:
    raise BadInput(f'config.fm.label_dropout={flat["fm.label_dropout"]} must be in [0, 1).')
  if flat['fm.label_dropout'] > 0 and not flat['data.conditional']:
    raise BadInput('config.fm.label_dropout > 0 needs config.data.conditional=True.')
  if any(not 0.0 < r < 1.0 for r in flat['train.ema_rates']):
    raise BadInput(f'config.train.ema_rates={flat["train.ema_rates"]} must lie in (0, 1).')
  if flat['train.eval_ema'] and flat['train.eval_ema'] not in flat['train.ema_rates']:
    raise BadInput(f'config.train.eval_ema={flat["train.eval_ema"]} is not among '
                   f'config.train.ema_rates={flat["train.ema_rates"]}; add it or set 0 to '
                   'evaluate the raw params.')
  if flat['data.source'] in TOY_SOURCES + TABULAR_SOURCES and flat['model.name'] != 'mlp':
    raise BadInput(f'config.model.name must be "mlp" for config.data.source='
                   f'{flat["data.source"]!r}.')
  if flat['data.source'] in IMAGE_SOURCES + LATENT_SOURCES and flat['model.name'] == 'mlp':
    raise BadInput(f'config.model.name must be "unet" or "dit" for image and latent data '
                   f'(config.data.source={flat["data.source"]!r}).')
  check_choice(flat, 'model.dit', tuple(dit.PRESETS))
  check_positive(flat, ints=('model.patch_size',))
  if flat['model.time_dim'] < 0 or flat['model.time_dim'] % 2:
    raise BadInput(f'config.model.time_dim={flat["model.time_dim"]} must be 0 (the network\'s '
                   'default) or a positive even number (sines and cosines in pairs).')
  if flat['data.encode.vae'] and flat['data.source'] != 'latent':
    raise BadInput(f'config.data.encode.vae encodes images into a latent cache, so it needs '
                   f"config.data.source='latent'; got {flat['data.source']!r}.")
  if flat['data.source'] == 'toy' and flat['data.conditional']:
    raise BadInput('config.data.conditional needs labelled (image) data.')
  devices = flat['train.num_devices'] or num_devices
  fsdp, data = flat['train.mesh.fsdp'], flat['train.mesh.data']
  if num_devices and flat['train.num_devices'] > num_devices:
    raise BadInput(f'config.train.num_devices={flat["train.num_devices"]} but only {num_devices} '
                   f'devices exist; set it to 0 (all devices) or at most {num_devices}.')
  if devices:
    try:
      parallel.mesh_shape(devices, data, fsdp)
    except ValueError as e:  # its message names the key
      raise BadInput(str(e)) from None
  elif fsdp < 1 or (data != -1 and data < 1):
    raise BadInput(f'config.train.mesh: fsdp={fsdp} must be >= 1 and data={data} >= 1 (or -1: '
                   'the rest).')
  if devices and flat['data.batch_size'] % devices:
    raise BadInput(f'config.data.batch_size={flat["data.batch_size"]} is not divisible by '
                   f'the {devices} devices; change the batch or config.train.num_devices.')
  if flat['data.batch_size'] % num_processes:
    raise BadInput(f'config.data.batch_size={flat["data.batch_size"]} is not divisible by '
                   f'the {num_processes} processes.')
  not_identity = identity.allowed_changes(flat['train.allow_config_change']) - set(
      identity.identity(flat))
  if not_identity:
    raise BadInput(f'config.train.allow_config_change names {sorted(not_identity)}, which '
                   'do not define this run (a resume never checks them); list keys such as '
                   'train.steps or optim.lr.')
  protocol.check_section(config.dd)
  if flat['fm.ot_on_host'] and (flat['fm.coupling'] != 'exact' or flat['method'] != 'fm'):
    raise BadInput(f'config.fm.ot_on_host=True pairs by exact OT in the data pipeline of '
                   f'method="fm"; got config.fm.coupling={flat["fm.coupling"]!r} and '
                   f'config.method={flat["method"]!r}. Set config.fm.coupling="exact" or '
                   'config.fm.ot_on_host=False.')
  block = flat['fm.ot_block_size']
  if block and (flat['data.batch_size'] // (devices or 1)) % block:
    raise BadInput(f'config.fm.ot_block_size={block} must divide the per-device batch '
                   f'{flat["data.batch_size"] // (devices or 1)}.')
