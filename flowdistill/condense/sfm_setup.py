"""An SFM config's settings as library objects, and what it caches beside its backbone: the
SimCLR settings of φ_d and φ_e (`ssl_settings`), the linear-probe protocol (`probe_protocol`),
the pre-trained backbones (`backbones`) and the real statistics with the golden head
(`statistics`), the distillation losses of a config (`distillation_loss`) and the memory of
their compiled step (`step_cost`). The SFM run and benchmarks/sfm_cost.py start from these.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from flowdistill import cache, files
from flowdistill.condense import linear_probe, sfm, ssl
from flowdistill.condense.protocol import progress_bar
from flowdistill.errors import BadInput, MissingInput
from flowdistill.sections import from_section

ROLES = ('distill', 'cross')  # φ_d: the distillation backbone; φ_e: cross-backbone probes


def ssl_settings(config) -> dict[str, ssl.SSLConfig]:
  """{'distill': φ_d, 'cross': φ_e}: `config.sfm.ssl` seeded by `config.seed`, and the same
  with `config.sfm.cross_widths` and seed + 1."""
  distill = from_section(ssl.SSLConfig, config.sfm.ssl, 'sfm.ssl', seed=config.seed)
  return {'distill': distill, 'cross': dataclasses.replace(
      distill, widths=tuple(config.sfm.cross_widths), seed=config.seed + 1)}


def probe_protocol(config, mode: str = 'normal') -> linear_probe.ProbeProtocol:
  """`config.sfm.probe` in the linear-probe `mode`."""
  return from_section(linear_probe.ProbeProtocol, config.sfm.probe, 'sfm.probe', mode=mode)


def backbones(dataset, config, *, train: bool = True) -> dict[str, ssl.FrozenBackbone]:
  """{'distill': φ_d, 'cross': φ_e} of this config, pre-trained where missing (`train`) or
  refused with the command that trains them."""
  out = {}
  for role, settings in ssl_settings(config).items():
    if not train:
      out[role] = ssl.load_cached(dataset.train, settings)
      if out[role] is None:
        folder = ssl.cache_folder(dataset.train, settings)[1]
        raise MissingInput(
            f'No {role} backbone of this config is cached ({folder} holds no complete entry); '
            f'pre-train it with `python -m flowdistill.main --config=configs/sfm.py:'
            f'{config.data.source} --workdir=...` (the same config).')
      continue
    bar = progress_bar(f'SimCLR ({role})', settings.steps, unit='step')
    out[role] = ssl.load_or_train(dataset.train, settings,
                                  on_progress=lambda done, bar=bar: bar.update(done - bar.n))
    bar.close()
  return out


def load_statistics(path: str, fingerprint: str) -> dict | None:
  """{'mu', 'nu', 'flow', 'golden': Head, 'golden_accuracy'} from `path`, or None if missing;
  refuses a file made with another backbone."""
  if not files.exists(path):
    return None
  f = files.load_npz(path)
  if str(f['fingerprint']) != fingerprint:
    raise BadInput(f'{path} holds statistics of backbone {f["fingerprint"]}, but the '
                     f'backbone in use is {fingerprint}; delete the file and rerun '
                     'method="sfm" to recompute them.')
  return {'mu': jnp.asarray(f['mu']), 'nu': jnp.asarray(f['nu']),
          'flow': jnp.asarray(f['flow']),
          'golden': linear_probe.Head(jnp.asarray(f['weight']), jnp.asarray(f['bias'])),
          'golden_accuracy': float(f['golden_accuracy'])}


def statistics(backbone: ssl.FrozenBackbone, dataset, config,
               train_features: np.ndarray | None = None) -> dict:
  """Real statistics and the golden head of φ_d (`backbone`; `train_features`: its features of
  the train split, where the caller has them already), cached beside it as
  `statistics_golden<epochs>.npz`, a one-file entry of `flowdistill.cache` (one changed on disk
  is recomputed, with one warning)."""
  settings = ssl_settings(config)['distill']
  path = files.join(ssl.cache_folder(dataset.train, settings)[1],
                    f'statistics_golden{config.sfm.golden_epochs}.npz')

  def build(path):
    features = backbone.features(dataset.train['x']) if train_features is None else train_features
    real = sfm.real_statistics(features, dataset.train['label'], dataset.num_classes)
    golden = linear_probe.train_golden_head(features, dataset.train['label'],
                                            dataset.num_classes, jax.random.key(config.seed),
                                            epochs=config.sfm.golden_epochs)
    accuracy = linear_probe.accuracy(golden.logits(backbone.features(dataset.test['x'])),
                                     dataset.test['label'])
    files.save_npz(path, fingerprint=backbone.fingerprint, weight=golden.weight,
                   bias=golden.bias, golden_accuracy=accuracy,
                   **{k: np.asarray(v) for k, v in real.items()})
    return load_statistics(path, backbone.fingerprint)

  return cache.load_or_build_file(path, build,
                                  lambda path: load_statistics(path, backbone.fingerprint),
                                  describe='SFM statistics')


def step_cost(loss_fn, images, key, *args) -> dict:
  """XLA memory of the compiled loss-and-gradient step: temporaries, arguments (the images,
  the backbone and, for LGM, the real images), outputs, and their sum less what the outputs
  alias from the arguments: the step's peak."""
  grad = jax.jit(jax.value_and_grad(lambda x, k, *a: loss_fn(x, k, *a)[0]))
  memory = grad.lower(images, key, *args).compile().memory_analysis()
  out = {f'xla_{name}_bytes': int(getattr(memory, f'{name}_size_in_bytes'))
         for name in ('temp', 'argument', 'output', 'alias')}
  out['xla_peak_bytes'] = (out['xla_temp_bytes'] + out['xla_argument_bytes']
                           + out['xla_output_bytes'] - out['xla_alias_bytes'])
  return out


def distillation_loss(name: str, ipc: int, backbone, real, dataset, p) -> tuple:
  """(loss_fn, loss_args) of the distillation method `name` ('lgm', 'sfm', 'sfm_decouple')
  with the settings of the section `p` (`config.sfm`): `loss_fn(images, key, *loss_args)`."""
  classes = dataset.num_classes
  if name == 'lgm':
    loss_fn = sfm.make_lgm_loss(backbone.apply, classes, ipc, augment=ssl.view,
                                copies=p.lgm_copies)
    args = (backbone.params, jnp.asarray(dataset.train['x']),
            jnp.asarray(sfm.class_index_table(dataset.train['label'], classes)))
  else:
    factory = sfm.make_sfm_loss if name == 'sfm' else sfm.make_sfm_decouple_loss
    extra = {} if name == 'sfm' else {'alpha': p.decouple_alpha}
    loss_fn = factory(backbone.apply, real, classes, ipc, augment=ssl.view, copies=p.copies,
                      denominator=p.nontarget_denominator, **extra)
    args = (backbone.params,)
  return loss_fn, args
