"""Experiment `sfm`: distil images for linear probes on a frozen self-supervised backbone with
statistical flow matching (METHODS.md §5), next to linear gradient matching and real subsets,
and score every set with the linear-probe protocol (normal, classifier inheritance, KD).

Stages, each cached so a rerun resumes where the last one stopped:

    backbones   `$FLOWDISTILL_CACHE/ssl/<fingerprint>` φ_d (distillation) and φ_e (cross-backbone
                probes: another seed and width), SimCLR on the train split
    statistics  `<φ_d folder>/statistics_golden<epochs>.npz` μ, ν, F and the golden head W*
                (with φ_d's fingerprint; verified against its manifest on load)
    WORKDIR/cells/<method>_ipc<n>.json   accuracies per probe mode and the cost of the step
                (reused while the distillation and probe settings are the same)
    WORKDIR/sets/<method>_ipc<n>.npz|png the set scored
    WORKDIR/snapshots/<method>_ipc<n>.npz  a distilled set every `sfm.snapshot_every` steps,
                with its wall-clock time (benchmarks/sfm_cost.py: steps and time to the final
                accuracy); while a set is distilled, `.state.npz` and `.partial.npz` beside it
                let a killed run continue from its last snapshot
"""

import functools
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from flowdistill import files
from flowdistill.condense import image_param, linear_probe, protocol, sfm, sfm_setup, ssl, subsets
from flowdistill.config import check_choice, check_positive
from flowdistill.data import sources
from flowdistill.errors import BadInput
from flowdistill.eval import report
from flowdistill.experiments import common
from flowdistill.models.encoder import ConvEncoder
from flowdistill.sections import section
from flowdistill.train import identity, stop

SETS = ('random', 'kmeans_nearest', 'lgm', 'sfm', 'sfm_decouple')
DISTILLED = ('lgm', 'sfm', 'sfm_decouple')
PROBES = {  # probe of a distilled set: (linear_probe mode, the backbone role it reads)
    'normal': ('normal', 'distill'),
    'normal_cross': ('normal', 'cross'),
    'ci': ('ci', 'cross'),
    'kd': ('kd', 'cross'),
}
DEFAULTS = dict(
    ssl=section(ssl.SSLConfig, exclude=('seed',)),  # φ_d's SimCLR (seeded by config.seed)
    cross_widths=(32, 64, 128, 192),  # φ_e of cross-backbone probes (φ_d's settings, seed + 1)
    sets=SETS,
    param='pixels', steps=5000, lr=2e-3, grow_every=200,
    init='real',                      # and the denominator: chosen on validation (RESULTS.md)
    snapshot_every=250,               # distilled images kept for benchmarks/sfm_cost.py curves
    copies=1,                         # A for sfm / sfm_decouple
    lgm_copies=10,                    # A for lgm
    nontarget_denominator='classes',  # sfm.DENOMINATORS
    decouple_alpha=0.5,
    probes=tuple(PROBES),             # of each distilled set; real subsets get `normal`
    probe=section(linear_probe.ProbeProtocol, exclude=('mode',)),
    golden_epochs=20,
)
DISTILLATION_KEYS = ('param', 'init', 'steps', 'lr', 'grow_every', 'copies', 'lgm_copies',
                     'nontarget_denominator', 'decouple_alpha')  # what makes a distilled set


def validate(config) -> None:
  flat = identity.flatten(config)
  for key, options in (('sfm.sets', SETS), ('sfm.probes', tuple(PROBES))):
    unknown = [m for m in flat[key] if m not in options]
    if unknown:
      raise BadInput(f'config.{key} has {unknown}; choose from {list(options)}.')
  check_choice(flat, 'sfm.param', image_param.MODES)
  check_choice(flat, 'sfm.init', image_param.INITS)
  check_choice(flat, 'sfm.nontarget_denominator', sfm.DENOMINATORS)
  check_positive(flat, ints=('sfm.steps', 'sfm.grow_every', 'sfm.snapshot_every', 'sfm.copies',
                             'sfm.lgm_copies', 'sfm.golden_epochs'), floats=('sfm.lr',))
  if not 0 <= flat['sfm.decouple_alpha'] <= 1:
    raise BadInput(f'config.sfm.decouple_alpha={flat["sfm.decouple_alpha"]} must lie in '
                   '[0, 1].')
  sfm_setup.ssl_settings(config)
  sfm_setup.probe_protocol(config)


def distil(name: str, ipc: int, backbone, real, dataset, p, key, folder: str) -> tuple[
    np.ndarray, dict, dict]:
  """One distilled set [C·IPC, H, W, C], its cost record and its snapshots {'steps' [K],
  'seconds' [K] of distillation, 'images' [K, C·IPC, H, W, C]} every `p.snapshot_every` steps
  and at the end. Resumable: the optimiser state and the snapshots so far are kept in `folder`
  (`<name>_ipc<n>.state.npz`, `.partial.npz`; `discard_progress` removes them)."""
  classes, shape = dataset.num_classes, dataset.shape
  labels = np.repeat(np.arange(classes), ipc)
  loss_fn, args = sfm_setup.distillation_loss(name, ipc, backbone, real, dataset, p)
  init = None
  if p.init == 'real':
    init = dataset.train['x'][subsets.select('random', None, dataset.train['label'], ipc,
                                             seed=0)]
  cost = sfm_setup.step_cost(loss_fn, jnp.zeros((classes * ipc, *shape)), key, *args)
  stem = files.join(folder, f'{name}_ipc{ipc}')
  snapshots = {'steps': [], 'seconds': [], 'images': []}
  if files.exists(stem + '.partial.npz'):
    snapshots = {k: list(v) for k, v in files.load_npz(stem + '.partial.npz').items()}
  offset = snapshots['seconds'][-1] if snapshots['seconds'] else 0.0
  bar = tqdm.tqdm(total=p.steps, initial=snapshots['steps'][-1] if snapshots['steps'] else 0,
                  desc=f'{name} IPC {ipc}', unit='step', leave=False,
                  disable=jax.process_index() > 0)
  start = time.perf_counter()

  def progress(done, loss, images):
    del loss
    keep = [k for k, s in enumerate(snapshots['steps']) if s < done]  # killed before the state
    for k in snapshots:
      snapshots[k] = [snapshots[k][j] for j in keep]
    snapshots['seconds'].append(offset + time.perf_counter() - start)
    snapshots['steps'].append(done)
    snapshots['images'].append(images())
    files.save_npz(stem + '.partial.npz', **snapshots)
    bar.update(done - bar.n)

  images, history = image_param.distill(
      loss_fn, shape, classes * ipc, key, steps=p.steps, lr=p.lr, mode=p.param,
      grow_every=p.grow_every, real=init, loss_args=args, on_progress=progress,
      progress_every=p.snapshot_every, state_path=stem + '.state.npz')
  bar.close()
  steps, seconds = snapshots['steps'], snapshots['seconds']
  steady = ((seconds[-1] - seconds[0]) / (steps[-1] - steps[0]) if len(steps) > 1
            else seconds[-1] / p.steps)
  cost.update(labels=labels, seconds_per_step=steady, compile_and_first_seconds=seconds[0],
              distill_seconds=seconds[-1],
              peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              final_loss=float(history['loss'][-10:].mean()))
  return images, cost, {k: np.asarray(v) for k, v in snapshots.items()}


def discard_progress(folder: str, name: str, ipc: int) -> None:
  """Removes the resumption files of `distil` once its set is scored."""
  for suffix in ('.state.npz', '.partial.npz'):
    files.remove(files.join(folder, f'{name}_ipc{ipc}{suffix}'))


def run(config, workdir: str) -> dict:
  start = time.perf_counter()
  snapshot_folder = files.join(workdir, 'snapshots')
  files.makedirs(snapshot_folder)
  # the backbones, statistics and real subsets see only what may be distilled
  dataset, validation = protocol.with_validation(sources.load(config.data), config.dd)
  p = config.sfm
  sfm.check_classes(dataset.num_classes)
  nets = sfm_setup.backbones(dataset, config)
  phi_d, phi_e = nets['distill'], nets['cross']
  features = phi_d.features(dataset.train['x'])
  real = sfm_setup.statistics(phi_d, dataset, config, features)
  test_features = {role: b.features(dataset.test['x']) for role, b in nets.items()}
  val_features = {role: (b.features(validation['x']), validation['label'])
                  for role, b in nets.items()} if validation is not None else {}
  random_encoder = ssl.standardised(
      ConvEncoder(dataset.shape[-1], widths=tuple(p.ssl.widths), rngs=nnx.Rngs(config.seed)),
      dataset.train['x'], 'random-init', {})
  control = linear_probe.train_golden_head(
      random_encoder.features(dataset.train['x']), dataset.train['label'], dataset.num_classes,
      jax.random.key(config.seed), epochs=p.golden_epochs)
  control_accuracy = linear_probe.accuracy(
      control.logits(random_encoder.features(dataset.test['x'])), dataset.test['label'])
  embed = {role: functools.partial(b.apply, b.params) for role, b in nets.items()}
  key = jax.random.key(config.dd.seed)

  def make(name, ipc):
    set_key = jax.random.fold_in(jax.random.fold_in(key, ipc), SETS.index(name))
    if name in DISTILLED:
      images, cell, snapshots = distil(name, ipc, phi_d, real, dataset, p, set_key,
                                       snapshot_folder)
      labels = cell.pop('labels')
      files.save_npz(files.join(snapshot_folder, f'{name}_ipc{ipc}.npz'), labels=labels,
                     **snapshots)
    else:
      index = subsets.select(name, features, dataset.train['label'], ipc, seed=config.dd.seed)
      images, labels, cell = dataset.train['x'][index], dataset.train['label'][index], {}
    stem = files.join(workdir, 'sets', f'{name}_ipc{ipc}')
    files.makedirs(os.path.dirname(stem))
    protocol.save_set(stem, {'x': np.asarray(images), 'label': np.asarray(labels)}, ipc,
                      dataset.num_classes)
    probes = p.probes if name in DISTILLED else ('normal',)
    cell.update(method=name, ipc=ipc, probes={})
    for probe in probes:
      stop.check(where=f'before the {probe} probe of {name} IPC {ipc}')
      mode, role = PROBES[probe]
      t0 = time.perf_counter()
      result = linear_probe.evaluate_probe(
          embed[role], images, labels, test_features[role], dataset.test['label'],
          dataset.num_classes, jax.random.fold_in(set_key, 7),
          sfm_setup.probe_protocol(config, mode), augment=ssl.view,
          teacher_embed=embed['distill'], golden=real['golden'],
          validation=val_features.get(role))
      cell['probes'][probe] = dict(result, seconds=time.perf_counter() - t0)
    if 'ci' in probes:
      cell['ci_storage_floats'] = int(real['golden'].weight.size + real['golden'].bias.size
                                      + phi_e.feature_dim * phi_d.feature_dim)
    discard_progress(snapshot_folder, name, ipc)
    return cell

  def cells():
    for ipc in config.dd.ipcs:
      for name in p.sets:
        recipe = {'set': name, 'seed': config.dd.seed, 'backbone': phi_d.fingerprint}
        if name in DISTILLED:
          recipe.update({k: p[k] for k in DISTILLATION_KEYS},
                        probes=list(p.probes), cross_backbone=phi_e.fingerprint)
        yield protocol.Cell(name, ipc, {'set': recipe, 'probe': p.probe.to_dict(),
                                        'validation': config.dd.validation},
                            functools.partial(make, name, ipc))

  results = protocol.run_cells(files.join(workdir, 'cells'), cells())
  result = {'cells': results, 'golden_accuracy': real['golden_accuracy'],
            'random_encoder_accuracy': control_accuracy,
            'backbones': {role: {'fingerprint': b.fingerprint, **b.info}
                          for role, b in nets.items()},
            'wall_seconds': time.perf_counter() - start}
  report.save_results(workdir, result, _markdown(result, config))
  return result


def _markdown(result: dict, config) -> str:
  pm = lambda r, split: f'{100 * r[split + "mean"]:.1f} ± {100 * r[split + "std"]:.1f}'
  rows = []
  for c in result['cells']:
    row = {'method': c['method'], 'IPC': c['ipc']}
    for mode, r in c['probes'].items():
      if 'val_mean' in r:
        row[f'{mode} val %'] = pm(r, 'val_')
      row[f'{mode} test %'] = pm(r, '')
    row['s/step'] = c.get('seconds_per_step', '')
    row['step peak MiB'] = (f'{c["xla_peak_bytes"] / 2**20:.1f}' if 'xla_peak_bytes' in c
                            else '')
    row['total min'] = f'{c["distill_seconds"] / 60:.1f}' if 'distill_seconds' in c else ''
    rows.append(row)
  probed = [f'{m} {split} %' for m in PROBES for split in ('val', 'test')
            if any(f'{m} {split} %' in row for row in rows)]
  columns = ['method', 'IPC'] + probed + ['s/step', 'step peak MiB', 'total min']
  for row in rows:
    for col in columns:
      row.setdefault(col, '')
  backbone = result['backbones']['distill']
  splits = ('the validation split held out of train (what settings are chosen on) and on the '
            'test split' if config.dd.validation else 'the test split')
  return '\n'.join([
      f'# SFM on {config.data.source}', '',
      f'Linear-probe accuracy (mean ± std over {config.sfm.probe.runs} runs, '
      f'{config.sfm.probe.epochs} epochs) on {splits}. On φ_d: `normal` a fresh head. On φ_e '
      '(another seed and width): `normal_cross` a fresh head, `ci` W* through a projector '
      'φ_e → φ_d, `kd` a fresh head distilled from W*.',
      '', report.markdown_table(rows, columns), '',
      f'All real images (the golden head W* on φ_d): {100 * result["golden_accuracy"]:.2f} %; '
      f'the same encoder at random init: {100 * result["random_encoder_accuracy"]:.2f} %. '
      f'SimCLR pre-training: {backbone["train_seconds"] / 60:.1f} min.', '',
      f'Wall-clock time of this command: {result["wall_seconds"]:.0f} s.'])


METHOD = common.Method('sfm', run, DEFAULTS, validate, sources=sources.IMAGE_SOURCES)
