"""The experiment configuration: its full set of keys, and `validate`.

Every `configs/*.py` starts from `base_config()` and changes values, so a key missing here is a
typo: `validate` rejects it (and any inconsistent value) with a message naming the key, before
any work starts.
"""

import difflib
import importlib.util
import os

import ml_collections

from flowdistill import ode, paths, timesampling
from flowdistill.couplings import METHODS as COUPLINGS
from flowdistill.train import state as train_state

TOY_SOURCES = ('toy',)
IMAGE_SOURCES = ('digits', 'mnist', 'fashion_mnist', 'cifar10')
TABULAR_SOURCES = ('tabular',)
MODELS = ('mlp', 'unet')
METHODS = ('fm', 'flow_map', 'local_fm', 'reflow')
FLOW_MAP_LOSSES = ('lmd', 'emd', 'fmm', 'pfmm')
DTYPES = ('float32', 'bfloat16')


def base_config() -> ml_collections.ConfigDict:
  """All keys with defaults (a 2-D flow-matching run)."""
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
  )
  c.model = dict(
      name='mlp', hidden=256, depth=3, time_dim=64,            # MLP
      channels=(32, 64, 64), num_res_blocks=1, attention=True,  # U-Net
      dtype='float32',
  )
  c.path = dict(name='linear', noise_scale=1.0)
  c.fm = dict(time_distribution='uniform', coupling='independent', ot_block_size=0,
              sinkhorn_epsilon=0.05, label_dropout=0.0,
              ot_on_host=False)  # 'exact' OT in the data pipeline, overlapping the step
  c.teacher = dict(workdir='', ema=-1.0)  # a trained run to distil; ema -1: its eval_ema
  c.flow_map = dict(loss='lmd', scheme='ordered', band=1.0, teacher_jumps=2,
                    invertibility_weight=1.0, warm_start=True)
  c.local_fm = dict(        # local flow matching: a chain of blocks (METHODS.md section 3)
      num_blocks=4, h0=0.1, growth=1.5,  # OU steps h0 * growth^n, the last block free
      warm_start=True,                   # block n+1 starts from block n's parameters
      train_size=100_000,                # points pushed through the chain (toy data)
      pushforward_solver='dopri5', pushforward_tol=1e-5, pushforward_steps=100,
      pushforward_chunk=4096,            # points per cached push-forward chunk
      distill_steps=0, distill_loss='lmd', distill_scheme='ordered',  # per-block flow maps
  )
  c.reflow = dict(          # reflow, piecewise reflow, marginal alignment (METHODS.md section 2)
      windows=1,                         # K windows on [0, 1] (1: vanilla reflow)
      num_pairs=50_000,                  # teacher trajectories to train on
      pairs_dir='',                      # where they are cached ('' = WORKDIR/pairs); reusable
      pair_chunk=5000, pair_solver='dopri5', pair_rtol=1e-5, pair_atol=1e-5,
      align_weight=0.0,                  # λ of the marginal-alignment regulariser (0: off)
      align_warmup=0,                    # steps of λ's linear warm-up (0: constant)
      align_steps=1,                     # Euler steps of the student's window map
      align_logdet='exact',              # 'exact' | 'trace' (low dimension) | 'hutchinson'
      align_probes=1,                    # Hutchinson probes
      score_eps=0.01,                    # teacher-score time clipped to [eps, 1 - eps]
      kl_samples=1000,                   # teacher states for the per-window KL report
      warm_start=True,                   # start the student from the teacher's parameters
  )
  c.optim = dict(name='adam', lr=1e-3, schedule='warmup', warmup_steps=100, b1=0.9, b2=0.999,
                 weight_decay=0.0, grad_clip=1.0)
  c.train = dict(steps=2000, steps_per_call=1, num_devices=0, log_every=100, ckpt_every=1000,
                 keep=3, ema_rates=(0.999,), eval_ema=0.999)
  c.eval = dict(
      num_samples=2000,
      euler_steps=(1, 2, 4, 8, 16, 100),
      adaptive_solver='dopri5', rtol=1e-5, atol=1e-5,
      nll_samples=1000, nll_divergence='exact', nll_probes=1,
      guidance=1.0,               # classifier-free guidance weight for conditional sampling
      classifier_steps=1500,      # feature network for the image Fréchet distance
      map_steps=(1, 2, 4, 8),    # flow-map jumps to evaluate
      plot=True,
  )
  return c


def load_config_file(path: str | os.PathLike, arg: str = ''):
  """`get_config(arg)` of a config file, as `--config=path:arg` would load it."""
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0],
                                                path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _flatten(cfg, prefix=''):
  out = {}
  for k, v in cfg.items():
    name = f'{prefix}{k}'
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_flatten(v, name + '.'))
    else:
      out[name] = v
  return out


def _choice(flat, key, options):
  if flat[key] not in options:
    raise ValueError(f'config.{key}={flat[key]!r} is not one of {list(options)}.')


def validate(config, num_devices: int | None = None, num_processes: int = 1) -> None:
  """Raises ValueError naming the first unknown key or inconsistent value."""
  known, flat = _flatten(base_config()), _flatten(config)
  for key in flat:
    if key not in known:
      near = difflib.get_close_matches(key, known, n=1)
      hint = f' Did you mean config.{near[0]}?' if near else ''
      raise ValueError(f'Unknown config key config.{key}.{hint}')
  for key, default in known.items():
    if key not in flat:
      raise ValueError(f'config.{key} is missing; start configs from flowdistill.config.'
                       'base_config().')
    value = flat[key]
    if isinstance(default, bool) != isinstance(value, bool) or (
        isinstance(default, (int, float)) and not isinstance(value, (int, float))) or (
            isinstance(default, str) and not isinstance(value, str)):
      raise ValueError(f'config.{key}={value!r} has the wrong type; expected a '
                       f'{type(default).__name__} like {default!r}.')
  _choice(flat, 'method', METHODS)
  _choice(flat, 'flow_map.loss', FLOW_MAP_LOSSES)
  _choice(flat, 'flow_map.scheme', ('uniform', 'ordered', 'band'))
  if flat['method'] == 'flow_map' and flat['flow_map.loss'] != 'fmm' and not flat[
      'teacher.workdir']:
    raise ValueError(f'config.flow_map.loss={flat["flow_map.loss"]!r} distils a teacher: set '
                     'config.teacher.workdir to a trained run (fmm needs none).')
  _choice(flat, 'data.source', TOY_SOURCES + TABULAR_SOURCES + IMAGE_SOURCES)
  _choice(flat, 'model.name', MODELS)
  _choice(flat, 'model.dtype', DTYPES)
  _choice(flat, 'path.name', tuple(paths._PATHS))
  _choice(flat, 'fm.time_distribution', timesampling.TIME_DISTRIBUTIONS)
  _choice(flat, 'fm.coupling', COUPLINGS)
  _choice(flat, 'optim.name', train_state.OPTIMIZERS)
  _choice(flat, 'optim.schedule', train_state.SCHEDULES)
  _choice(flat, 'eval.adaptive_solver', ode.ADAPTIVE_SOLVERS)
  _choice(flat, 'eval.nll_divergence', ('exact', 'hutchinson'))
  for key in ('data.batch_size', 'train.steps', 'train.steps_per_call', 'train.log_every',
              'train.ckpt_every', 'train.keep', 'eval.num_samples'):
    if flat[key] < 1:
      raise ValueError(f'config.{key}={flat[key]} must be >= 1.')
  for key in ('optim.lr',):
    if not flat[key] > 0:
      raise ValueError(f'config.{key}={flat[key]} must be > 0.')
  if not 0.0 <= flat['fm.label_dropout'] < 1.0:
    raise ValueError(f'config.fm.label_dropout={flat["fm.label_dropout"]} must be in [0, 1).')
  if flat['fm.label_dropout'] > 0 and not flat['data.conditional']:
    raise ValueError('config.fm.label_dropout > 0 needs config.data.conditional=True.')
  if any(not 0.0 < r < 1.0 for r in flat['train.ema_rates']):
    raise ValueError(f'config.train.ema_rates={flat["train.ema_rates"]} must lie in (0, 1).')
  if flat['train.eval_ema'] and flat['train.eval_ema'] not in flat['train.ema_rates']:
    raise ValueError(f'config.train.eval_ema={flat["train.eval_ema"]} is not among '
                     f'config.train.ema_rates={flat["train.ema_rates"]}; add it or set 0 to '
                     'evaluate the raw params.')
  _validate_local_fm(flat)
  _validate_reflow(flat)
  if flat['data.source'] == 'toy' and flat['model.name'] != 'mlp':
    raise ValueError('config.model.name must be "mlp" for config.data.source="toy".')
  if flat['data.source'] in IMAGE_SOURCES and flat['model.name'] != 'unet':
    raise ValueError(f'config.model.name must be "unet" for image data '
                     f'(config.data.source={flat["data.source"]!r}).')
  if flat['data.source'] == 'toy' and flat['data.conditional']:
    raise ValueError('config.data.conditional needs labelled (image) data.')
  devices = flat['train.num_devices'] or num_devices
  if devices and flat['data.batch_size'] % devices:
    raise ValueError(f'config.data.batch_size={flat["data.batch_size"]} is not divisible by '
                     f'the {devices} devices; change the batch or config.train.num_devices.')
  if flat['data.batch_size'] % num_processes:
    raise ValueError(f'config.data.batch_size={flat["data.batch_size"]} is not divisible by '
                     f'the {num_processes} processes.')
  if flat['fm.ot_on_host'] and (flat['fm.coupling'] != 'exact' or flat['method'] != 'fm'):
    raise ValueError(f'config.fm.ot_on_host=True pairs by exact OT in the data pipeline of '
                     f'method="fm"; got config.fm.coupling={flat["fm.coupling"]!r} and '
                     f'config.method={flat["method"]!r}. Set config.fm.coupling="exact" or '
                     'config.fm.ot_on_host=False.')
  block = flat['fm.ot_block_size']
  if block and (flat['data.batch_size'] // (devices or 1)) % block:
    raise ValueError(f'config.fm.ot_block_size={block} must divide the per-device batch '
                     f'{flat["data.batch_size"] // (devices or 1)}.')


def _validate_local_fm(flat) -> None:
  if flat['data.source'] in TABULAR_SOURCES:
    if flat['method'] != 'local_fm':
      raise ValueError(f'config.data.source="tabular" is evaluated by config.method="local_fm" '
                       f'only (got {flat["method"]!r}); for global flow matching on it use '
                       'local_fm with config.local_fm.num_blocks=1.')
    if flat['model.name'] != 'mlp':
      raise ValueError('config.model.name must be "mlp" for config.data.source="tabular".')
  if flat['method'] != 'local_fm':
    return
  _choice(flat, 'local_fm.pushforward_solver', ode.SOLVERS)
  _choice(flat, 'local_fm.distill_loss', ('lmd', 'emd'))
  _choice(flat, 'local_fm.distill_scheme', ('uniform', 'ordered', 'band'))
  for key in ('local_fm.num_blocks', 'local_fm.pushforward_chunk', 'local_fm.pushforward_steps',
              'local_fm.train_size'):
    if flat[key] < 1:
      raise ValueError(f'config.{key}={flat[key]} must be >= 1.')
  for key in ('local_fm.h0', 'local_fm.growth', 'local_fm.pushforward_tol'):
    if not flat[key] > 0:
      raise ValueError(f'config.{key}={flat[key]} must be > 0.')
  if flat['local_fm.distill_steps'] < 0:
    raise ValueError(f'config.local_fm.distill_steps={flat["local_fm.distill_steps"]} must be '
                     '>= 0 (0: no distillation).')
  if flat['data.conditional']:
    raise ValueError('config.method="local_fm" trains unconditional chains; set '
                     'config.data.conditional=False.')
  if flat['data.source'] == 'toy' and flat['local_fm.train_size'] < flat['data.batch_size']:
    raise ValueError(f'config.local_fm.train_size={flat["local_fm.train_size"]} is below '
                     f'config.data.batch_size={flat["data.batch_size"]}; the later blocks draw '
                     'their batches from that many pushed points: raise it.')


def _validate_reflow(flat) -> None:
  if flat['method'] != 'reflow':
    return
  if not flat['teacher.workdir']:
    raise ValueError('config.method="reflow" distils a teacher: set config.teacher.workdir to '
                     'a trained run (method "fm" or "reflow").')
  if flat['data.source'] not in TOY_SOURCES + IMAGE_SOURCES:
    raise ValueError(f'config.method="reflow" needs toy or image data, not '
                     f'config.data.source={flat["data.source"]!r}.')
  _choice(flat, 'reflow.pair_solver', ode.SOLVERS)
  _choice(flat, 'reflow.align_logdet', ('exact', 'trace', 'hutchinson'))
  for key in ('reflow.windows', 'reflow.pair_chunk', 'reflow.align_steps',
              'reflow.align_probes', 'reflow.kl_samples'):
    if flat[key] < 1:
      raise ValueError(f'config.{key}={flat[key]} must be >= 1.')
  if flat['reflow.num_pairs'] < flat['data.batch_size']:
    raise ValueError(f'config.reflow.num_pairs={flat["reflow.num_pairs"]} is below '
                     f'config.data.batch_size={flat["data.batch_size"]}; raise it.')
  if flat['reflow.align_weight'] < 0 or flat['reflow.align_warmup'] < 0:
    raise ValueError('config.reflow.align_weight and config.reflow.align_warmup must be >= 0.')
  if not 0.0 <= flat['reflow.score_eps'] < 0.5:
    raise ValueError(f'config.reflow.score_eps={flat["reflow.score_eps"]} must be in [0, 0.5).')
  if flat['reflow.align_logdet'] != 'hutchinson' and flat['data.source'] in IMAGE_SOURCES:
    raise ValueError(f'config.reflow.align_logdet={flat["reflow.align_logdet"]!r} needs a '
                     'full Jacobian per image; use "hutchinson" for image data.')
  if not any(n % flat['reflow.windows'] == 0 for n in flat['eval.euler_steps']):
    raise ValueError(f'No entry of config.eval.euler_steps={flat["eval.euler_steps"]} is a '
                     f'multiple of config.reflow.windows={flat["reflow.windows"]}: the student '
                     'takes whole steps inside each window.')
