"""Experiment `dd_eval`: the dataset-distillation protocol — score saved synthetic sets and the
baselines (random, herding, k-center, k-means-nearest real images; DM) with `evaluate_synset`
at each IPC, next to the whole-data ConvNet, and write the table.

Workdir layout (every cell resumable; rerunning the command skips finished cells):

    WORKDIR/cells/<set>_ipc<n>.json     one set's accuracies, timing and settings
    WORKDIR/sets/<set>_ipc<n>.npz|png   the set scored (x, label) and its grid, IPC per row
                                        (`random`: <set>_ipc<n>_subset<r>, one per run)
    WORKDIR/results.json, results.md    the table, the preset and its reductions

The whole-data ConvNet (the reference row and the feature space of herding, k-center and
k-means) is cached under `$FLOWDISTILL_CACHE/reference_nets/`.
"""

import dataclasses
import os
import time

import jax
import numpy as np
import tqdm

from flowdistill import files
from flowdistill.condense import dm, evaluate, reference_net, subsets
from flowdistill.condense.augment import DIGITS, RGB
from flowdistill.data import sources
from flowdistill.eval import plots, report
from flowdistill.experiments import common

BASELINES = subsets.SELECTORS + ('dm',)
DEFAULTS = dict(             # the dataset-distillation protocol: what is scored
    synsets=(),              # saved synthetic sets (.npz with x [N, H, W, C] in [-1, 1], label)
    baselines=BASELINES,     # real-image subsets and DM, at every IPC of config.dd.ipcs
    whole_data=True,         # the whole-data ConvNet row (needed by the feature baselines)
    dm_iterations=20000, dm_lr=1.0, dm_momentum=0.5, dm_batch_real=256,
)

# ConvNet-3 accuracy (%) in the DC/DSA/DM papers, {data: {set: (IPC 1, 10, 50)}}.
PUBLISHED = {
    'mnist': {'random': (64.9, 95.1, 97.9), 'herding': (89.2, 93.7, 94.8),
              'k_center': (89.3, 84.4, 97.4), 'dm': (89.7, 97.5, 98.6), 'whole': 99.6},
    'cifar10': {'random': (14.4, 26.0, 43.4), 'herding': (21.5, 31.6, 40.4),
                'k_center': (21.5, 14.7, 27.0), 'dm': (26.0, 48.9, 63.0), 'whole': 84.8},
}
PUBLISHED_IPCS = (1, 10, 50)


def validate(flat: dict) -> None:
  unknown = [b for b in flat['dd_eval.baselines'] if b not in BASELINES]
  if unknown:
    raise ValueError(f'config.dd_eval.baselines has {unknown}; choose from {list(BASELINES)}.')
  for path in flat['dd_eval.synsets']:
    if not files.exists(path):
      raise FileNotFoundError(f'config.dd_eval.synsets: {path} does not exist; give .npz files '
                              'holding x [N, H, W, C] in [-1, 1] and label [N].')
  common.check_positive(flat, ints=('dd_eval.dm_iterations', 'dd_eval.dm_batch_real'),
                        floats=('dd_eval.dm_lr',))
  needs_features = set(flat['dd_eval.baselines']) & {'herding', 'k_center', 'kmeans_nearest'}
  if needs_features and not flat['dd_eval.whole_data']:
    raise ValueError(f'config.dd_eval.baselines {sorted(needs_features)} select in the features '
                     'of the whole-data ConvNet; set config.dd_eval.whole_data=True.')


def protocol(dd, ipc_index: int | None = None, *, channels: int = 1) -> evaluate.Protocol:
  """The evaluator settings of `config.dd` at the `ipc_index`-th IPC (None: whole data)."""
  epochs = dd.whole_data_epochs if ipc_index is None else (
      dd.epochs[ipc_index] if len(dd.epochs) > 1 else dd.epochs[0])
  return evaluate.Protocol(
      runs=dd.runs, epochs=epochs, lr=dd.lr, momentum=dd.momentum,
      weight_decay=dd.weight_decay, batch_size=dd.batch_size, dsa=dd.dsa,
      strategy=dd.strategy or (DIGITS if channels == 1 else RGB), width=dd.width,
      depth=dd.depth, norm=dd.norm, runs_per_call=dd.runs_per_call,
      epochs_per_call=dd.epochs_per_call)


def reductions(config) -> dict:
  """The protocol keys (`dd.*`, `dd_eval.dm_*`) whose values differ from the paper values."""
  from flowdistill.config import base_config
  paper = base_config()
  out = {}
  for section, keys in (('dd', config.dd.keys()), ('dd_eval', DEFAULTS)):
    for key in keys:
      if section == 'dd' and key in ('preset', 'ipcs', 'runs_per_call', 'epochs_per_call'):
        continue
      if section == 'dd_eval' and not key.startswith('dm_'):
        continue
      value, default = config[section][key], paper[section][key]
      if value != default:
        out[f'{section}.{key}'] = {'paper': default, 'here': value}
  return out


def load_synset(path: str) -> dict:
  """A saved synthetic set {'x', 'label'}, refusing files without those arrays."""
  f = files.load_npz(path)
  missing = [k for k in ('x', 'label') if k not in f]
  if missing:
    raise ValueError(f'{path} lacks {missing} (it has {sorted(f)}); a synthetic set is an .npz '
                     'with x [N, H, W, C] float in [-1, 1] and label int [N].')
  return {'x': f['x'], 'label': f['label']}


def _bar(desc: str, total: int):
  return tqdm.tqdm(total=total, desc=desc, unit='epoch', disable=jax.process_index() > 0,
                   leave=False)


def save_set(stem: str, synset: dict, ipc: int, num_classes: int) -> None:
  """`stem`.npz (x, label) and `stem`.png (a grid, IPC per row, at most 10 columns)."""
  files.save_npz(stem + '.npz', x=synset['x'], label=synset['label'])
  order = np.argsort(synset['label'], kind='stable')
  columns = min(ipc, 10)
  grid = np.concatenate([synset['x'][order][synset['label'][order] == c][:columns]
                         for c in range(num_classes)])
  plots.image_grid(stem + '.png', grid, ncol=columns)


def score(name: str, ipc: int, synsets: list[dict], split, dd, ipc_index, key,
           workdir) -> dict:
  """Evaluates one set with R runs, or R sets (one per run, as the random baseline), saves each
  set and its grid, and returns the cell."""
  proto = protocol(dd, ipc_index, channels=split.x.shape[-1])
  files.makedirs(files.join(workdir, 'sets'))
  stem = files.join(workdir, 'sets', f'{name}_ipc{ipc}')
  bar = _bar(f'{name} IPC {ipc}', evaluate.epochs_total(proto))
  one_each = len(synsets) > 1
  accs, seconds = [], 0.0
  for r, synset in enumerate(synsets):
    save_set(f'{stem}_subset{r}' if one_each else stem, synset, ipc, split.num_classes)
    done = r * (proto.epochs + 1)
    result = evaluate.evaluate_synset(
        synset['x'], synset['label'], split, jax.random.fold_in(key, r) if one_each else key,
        dataclasses.replace(proto, runs=1) if one_each else proto,
        on_progress=lambda epochs, done=done: bar.update(done + epochs - bar.n))
    accs += result['accs'].tolist()
    seconds += result['seconds_per_run'] * len(result['accs'])
  bar.close()
  return {'set': name, 'ipc': ipc, 'accs': accs, 'mean': float(np.mean(accs)),
          'std': float(np.std(accs)), 'seconds_per_run': seconds / len(accs),
          'runs': proto.runs, 'epochs': proto.epochs, 'sets': len(synsets),
          **synsets[0].get('extra', {})}


def baseline_sets(name, ipc, dataset, features, config, key) -> list[dict]:
  """The sets a baseline is scored on: one per run for `random` (the published figure averages
  subsets, and at IPC 1 the subset drawn dominates the result), one otherwise."""
  labels = dataset.train['label']
  if name == 'dm':
    cfg = dm.DMConfig(iterations=config.dd_eval.dm_iterations, lr=config.dd_eval.dm_lr,
                      momentum=config.dd_eval.dm_momentum,
                      batch_real=config.dd_eval.dm_batch_real, dsa=config.dd.dsa,
                      strategy=protocol(config.dd, 0, channels=dataset.shape[-1]).strategy)
    bar = tqdm.tqdm(total=cfg.iterations, desc=f'DM IPC {ipc}', unit='it', leave=False,
                    disable=jax.process_index() > 0)
    start = time.perf_counter()
    out = dm.distribution_matching(dataset.train, ipc, key, cfg,
                                   protocol(config.dd, 0, channels=dataset.shape[-1]),
                                   on_progress=lambda done: bar.update(done - bar.n))
    bar.close()
    return [{'x': out['x'], 'label': out['label'],
             'extra': {'dm_seconds': time.perf_counter() - start,
                       'dm_final_loss': float(out['loss'][-10:].mean())}}]
  seeds = [config.dd.seed]
  if name == 'random':
    seeds = [config.dd.seed * config.dd.runs + r for r in range(config.dd.runs)]
  return [{'x': dataset.train['x'][index], 'label': labels[index]} for index in (
      subsets.select(name, features, labels, ipc, seed=seed) for seed in seeds)]


def _table(cells: list[dict], config, dataset_name: str) -> str:
  ipcs = sorted({c['ipc'] for c in cells})
  published = PUBLISHED.get(dataset_name, {})
  rows = []
  for name in dict.fromkeys(c['set'] for c in cells):
    row = {'set': name}
    for ipc in ipcs:
      cell = next((c for c in cells if c['set'] == name and c['ipc'] == ipc), None)
      pub = published.get(name)
      pub = f'{pub[PUBLISHED_IPCS.index(ipc)]} · ' if pub and ipc in PUBLISHED_IPCS else ''
      if cell:
        row[f'IPC {ipc}'] = f'{pub}{100 * cell["mean"]:.1f} ± {100 * cell["std"]:.1f}'
        row[f's/run {ipc}'] = f'{cell["seconds_per_run"]:.0f}'
    rows.append(row)
  columns = ['set'] + [f'IPC {i}' for i in ipcs] + [f's/run {i}' for i in ipcs]
  return report.markdown_table(rows, columns)


def run(config, workdir: str) -> dict:
  start = time.perf_counter()
  dataset = sources.load(config.data)
  split = evaluate.test_split(dataset.train, dataset.test)
  dd = config.dd
  ipcs = tuple(dd.ipcs)
  whole = features = None
  if config.dd_eval.whole_data:
    proto = protocol(dd, None, channels=dataset.shape[-1])
    bar = _bar('whole-data ConvNet', proto.epochs + 1)
    ref_start = time.perf_counter()
    ref = reference_net.load_or_train(dataset.train, split, proto, seed=dd.seed,
                                      on_progress=lambda done: bar.update(done - bar.n))
    bar.close()
    whole = {'test_accuracy': ref.test_accuracy, 'epochs': proto.epochs,
             'seconds': time.perf_counter() - ref_start}
    if set(config.dd_eval.baselines) & {'herding', 'k_center', 'kmeans_nearest'}:
      features = ref.features(dataset.train['x'])
  key = jax.random.key(dd.seed)
  cells = []
  files.makedirs(files.join(workdir, 'cells'))
  jobs = [(os.path.splitext(os.path.basename(p))[0], None, p) for p in config.dd_eval.synsets]
  jobs += [(name, ipc, None) for ipc in ipcs for name in config.dd_eval.baselines]
  for name, ipc, path in jobs:
    synsets = [load_synset(path)] if path else None
    if synsets is not None:
      ipc = int(np.bincount(synsets[0]['label']).max())
    cell_path = files.join(workdir, 'cells', f'{name}_ipc{ipc}.json')
    if files.exists(cell_path):
      cells.append(files.read_json(cell_path))
      continue
    ipc_index = ipcs.index(ipc) if ipc in ipcs else 0
    set_key = jax.random.fold_in(key, ipc)
    if synsets is None:
      synsets = baseline_sets(name, ipc, dataset, features, config, set_key)
    cell = score(name, ipc, synsets, split, dd, ipc_index, set_key, workdir)
    files.write_json(cell_path, cell)
    cells.append(cell)
  dataset_name = config.data.source
  preset = {'name': dd.preset, 'reductions': reductions(config),
            'protocol': dataclasses.asdict(protocol(dd, 0, channels=dataset.shape[-1]))}
  result = {'cells': cells, 'whole_data': whole, 'preset': preset,
            'wall_seconds': time.perf_counter() - start}
  lines = [f'# Dataset-distillation protocol: {dataset_name}, preset `{dd.preset}`', '',
           'Accuracy (%) of ConvNet-3 trained on each set: published · ours (mean ± std over '
           f'{dd.runs} runs; `random` draws a new subset for each run); s/run is seconds per '
           'evaluation run.', '',
           _table(cells, config, dataset_name), '']
  if whole is not None:
    pub = PUBLISHED.get(dataset_name, {}).get('whole')
    lines += [f'Whole-data ConvNet ({whole["epochs"] + 1} epochs): '
              f'{100 * whole["test_accuracy"]:.2f} %' + (f' (published {pub})' if pub else ''),
              '']
  if preset['reductions']:
    lines += ['Reductions from the paper protocol:', '']
    lines += [f'- `{k}`: {v["here"]} (paper {v["paper"]})' for k, v in
              preset['reductions'].items()]
    lines.append('')
  lines.append(f'Wall-clock time of this command: {result["wall_seconds"]:.0f} s (finished cells '
               'are read back, not rerun).')
  report.save_results(workdir, result, '\n'.join(lines))
  return result


METHOD = common.Method('dd_eval', run, DEFAULTS, validate, sources=sources.IMAGE_SOURCES)
