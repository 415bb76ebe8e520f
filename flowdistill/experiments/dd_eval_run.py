"""Experiment `dd_eval`: the dataset-distillation protocol — score saved synthetic sets and the
baselines (random, herding, k-center, k-means-nearest real images; DM) with `evaluate_synset`
at each IPC, next to the whole-data ConvNet, and write the table (`condense.protocol`).

Workdir layout (every cell resumable; rerunning the command skips cells whose set and protocol
are unchanged):

    WORKDIR/cells/<set>_ipc<n>.json     one set's accuracies, timing, settings and identity
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

from flowdistill import files
from flowdistill.condense import dm, protocol, reference_net, synset_eval
from flowdistill.data import sources
from flowdistill.errors import BadInput, MissingInput
from flowdistill.eval import report
from flowdistill.experiments import common
from flowdistill.sections import section

DEFAULTS = dict(             # what is scored
    synsets=(),              # saved synthetic sets (.npz with x [N, H, W, C] in [-1, 1], label)
    baselines=protocol.BASELINES,  # real-image subsets and DM, at every IPC of config.dd.ipcs
    whole_data=True,         # the whole-data ConvNet row (needed by the feature baselines)
    dm=section(dm.DMConfig, exclude=('dsa', 'strategy')),  # DM's own; DSA as config.dd's
)


def validate(config) -> None:
  unknown = [b for b in config.dd_eval.baselines if b not in protocol.BASELINES]
  if unknown:
    raise BadInput(f'config.dd_eval.baselines has {unknown}; choose from '
                   f'{list(protocol.BASELINES)}.')
  for path in config.dd_eval.synsets:
    if not files.exists(path):
      raise MissingInput(f'config.dd_eval.synsets: {path} does not exist; give .npz files '
                         'holding x [N, H, W, C] in [-1, 1] and label [N].')
    protocol.load_synset(path)  # refuses a malformed set before the workdir is made
  protocol.dm_settings(config.dd_eval.dm, config.dd)
  needs_features = set(config.dd_eval.baselines) & set(protocol.FEATURE_BASELINES)
  if needs_features and not config.dd_eval.whole_data:
    raise BadInput(f'config.dd_eval.baselines {sorted(needs_features)} select in the features '
                   'of the whole-data ConvNet; set config.dd_eval.whole_data=True.')


def run(config, workdir: str) -> dict:
  start = time.perf_counter()
  dd = config.dd
  dataset, validation = protocol.with_validation(sources.load(config.data), dd)
  split = synset_eval.test_split(dataset.train, dataset.test, validation)
  channels = dataset.shape[-1]
  whole = features = None
  if config.dd_eval.whole_data:
    proto = protocol.scoring(dd, None, channels=channels)
    bar = protocol.progress_bar('whole-data ConvNet', proto.epochs + 1)
    ref_start = time.perf_counter()
    ref = reference_net.load_or_train(dataset.train, split, proto, seed=dd.seed,
                                      on_progress=lambda done: bar.update(done - bar.n))
    bar.close()
    whole = {'test_accuracy': ref.test_accuracy, 'epochs': proto.epochs,
             'seconds': time.perf_counter() - ref_start}
    if set(config.dd_eval.baselines) & set(protocol.FEATURE_BASELINES):
      features = ref.features(dataset.train['x'])
  key = jax.random.key(dd.seed)
  settings = protocol.dm_settings(config.dd_eval.dm, dd, channels)

  def cells():
    for path in config.dd_eval.synsets:
      synset = protocol.load_synset(path)
      ipc = int(np.bincount(synset['label']).max())
      proto = protocol.scoring(dd, ipc, channels=channels)
      name = os.path.splitext(os.path.basename(path))[0]
      yield protocol.Cell(
          name, ipc, {'set': protocol.content_hash(synset['x'], synset['label']),
                      'protocol': dataclasses.asdict(proto), 'seed': dd.seed,
                      'validation': dd.validation},
          lambda name=name, ipc=ipc, synset=synset, proto=proto: protocol.score(
              name, ipc, [synset], split, proto, jax.random.fold_in(key, ipc), workdir))
    for ipc in dd.ipcs:
      proto = protocol.scoring(dd, ipc, channels=channels)
      for name in config.dd_eval.baselines:
        recipe = {'baseline': name, 'seed': dd.seed, 'runs': dd.runs,
                  **({'dm': dataclasses.asdict(settings)} if name == 'dm' else {})}
        identity = {'set': recipe, 'protocol': dataclasses.asdict(proto),
                    'validation': dd.validation}

        def make(name=name, ipc=ipc, proto=proto, identity=identity):
          set_key = jax.random.fold_in(key, ipc)
          synsets = protocol.baseline_sets(
              name, ipc, dataset.train, features, dd, set_key, settings,
              dm_state=protocol.state_path(cells_folder, name, ipc, identity))
          return protocol.score(name, ipc, synsets, split, proto, set_key, workdir)

        yield protocol.Cell(name, ipc, identity, make)

  cells_folder = files.join(workdir, 'cells')
  results = protocol.run_cells(cells_folder, cells())
  dataset_name = config.data.source
  preset = {'name': dd.preset, 'reductions': protocol.reductions(dd, config.dd_eval.dm),
            'protocol': dataclasses.asdict(protocol.scoring(dd, dd.ipcs[0], channels=channels))}
  result = {'cells': results, 'whole_data': whole, 'preset': preset,
            'wall_seconds': time.perf_counter() - start}
  lines = [f'# Dataset-distillation protocol: {dataset_name}, preset `{dd.preset}`', '',
           'Accuracy (%) of ConvNet-3 trained on each set: published · ours (mean ± std over '
           f'{dd.runs} runs; `random` draws a new subset for each run); s/run is seconds per '
           'evaluation run.', '',
           protocol.table(results, dataset_name), '']
  if whole is not None:
    pub = protocol.PUBLISHED.get(dataset_name, {}).get('whole')
    lines += [f'Whole-data ConvNet ({whole["epochs"] + 1} epochs): '
              f'{100 * whole["test_accuracy"]:.2f} %' + (f' (published {pub})' if pub else ''),
              '']
  lines += protocol.reductions_markdown(preset['reductions'])
  lines.append(f'Wall-clock time of this command: {result["wall_seconds"]:.0f} s (finished cells '
               'are read back, not rerun).')
  report.save_results(workdir, result, '\n'.join(lines))
  return result


METHOD = common.Method('dd_eval', run, DEFAULTS, validate, sources=sources.IMAGE_SOURCES)
