"""The dataset-distillation protocol as the runs use it: which IPCs and epochs (`Plan`, with
`synset_eval.Protocol` the config section `dd`), the real-image and DM baselines, saving and
loading sets, scoring a set into a result cell, resumable cells, the published figures and
the reductions a preset makes.

A cell is one set at one IPC, scored: `<folder>/<set>_ipc<n>.json`. It is stored with its
identity (what made the set and how it was scored, or the hash of the set's bytes); a rerun
reuses a cell only when the identity is the same, so a changed set or protocol is scored again.
"""

import dataclasses
import hashlib
import json
import time
import zipfile
from collections.abc import Callable, Iterable

import jax
import numpy as np
import tqdm
from absl import logging

from flowdistill import files
from flowdistill.condense import dm, subsets, synset_eval
from flowdistill.condense.augment import DIGITS, RGB, parse_strategy
from flowdistill.errors import BadInput
from flowdistill.eval import plots, report
from flowdistill.sections import from_section, section
from flowdistill.train import stop

BASELINES = subsets.SELECTORS + ('dm',)
FEATURE_BASELINES = ('herding', 'k_center', 'kmeans_nearest')  # in the whole-data net's features

# ConvNet-3 accuracy (%) in the DC/DSA/DM papers, {data: {set: (IPC 1, 10, 50)}}.
PUBLISHED = {
    'mnist': {'random': (64.9, 95.1, 97.9), 'herding': (89.2, 93.7, 94.8),
              'k_center': (89.3, 84.4, 97.4), 'dm': (89.7, 97.5, 98.6), 'whole': 99.6},
    'cifar10': {'random': (14.4, 26.0, 43.4), 'herding': (21.5, 31.6, 40.4),
                'k_center': (21.5, 14.7, 27.0), 'dm': (26.0, 48.9, 63.0), 'whole': 84.8},
}
PUBLISHED_IPCS = (1, 10, 50)


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a table scores, beside the per-set `synset_eval.Protocol` (config section `dd` holds
  the fields of both; defaults are the paper values).

  preset: the name results record ('paper', 'cpu', ...). ipcs: images per class.
  epochs: E per IPC (one value: all); 300 is the reference without DSA. strategy: DSA families
  ('' picks digits for grey and RGB families for colour images). whole_data_epochs: the
  whole-data ConvNet (our choice; the papers give none). seed: sets and evaluation keys.
  validation: the share of each class's train images held out (drawn with `seed`) to choose
  settings on; they are never distilled from, selected as a baseline or trained on (0: none).
  """
  preset: str = 'paper'
  ipcs: tuple[int, ...] = (1, 10, 50)
  epochs: tuple[int, ...] = (1000,)
  strategy: str = ''
  whole_data_epochs: int = 20
  seed: int = 0
  validation: float = 0.1

  def __post_init__(self):
    if not self.ipcs or min(self.ipcs) < 1:
      raise ValueError(f'Plan.ipcs={self.ipcs} must be images per class >= 1.')
    if len(self.epochs) not in (1, len(self.ipcs)) or min(self.epochs) < 1:
      raise ValueError(f'Plan.epochs={self.epochs} must be one value >= 1, or one per IPC of '
                       f'ipcs={self.ipcs}.')
    if self.whole_data_epochs < 1:
      raise ValueError(f'Plan.whole_data_epochs={self.whole_data_epochs} must be >= 1.')
    if self.strategy:
      parse_strategy(self.strategy)
    if not 0 <= self.validation < 1:
      raise ValueError(f'Plan.validation={self.validation} must lie in [0, 1).')


_SCORING_FIELDS = ('epochs', 'strategy')  # per IPC and per data set: given by the Plan


def dd_section() -> dict:
  """The config section `dd`: every field of `Plan` and `synset_eval.Protocol`, paper values."""
  return {**section(Plan), **section(synset_eval.Protocol, exclude=_SCORING_FIELDS)}


def plan(dd) -> Plan:
  """The `Plan` of the config section `dd`."""
  return from_section(Plan, dd, 'dd')


def check_section(dd) -> None:
  """Raises ValueError naming the first value of the section `dd` that `Plan` or
  `synset_eval.Protocol` refuses."""
  for ipc in plan(dd).ipcs:
    scoring(dd, ipc)


def scoring(dd, ipc: int | None = None, *, channels: int = 1) -> synset_eval.Protocol:
  """The evaluator settings of the section `dd` for sets of `ipc` images per class (an IPC
  outside `dd.ipcs` takes the first IPC's epochs; None: the whole-data ConvNet)."""
  p = plan(dd)
  if ipc is None:
    epochs = p.whole_data_epochs
  else:
    epochs = p.epochs[p.ipcs.index(ipc) if ipc in p.ipcs and len(p.epochs) > 1 else 0]
  return from_section(synset_eval.Protocol, dd, 'dd', epochs=epochs,
                      strategy=p.strategy or (DIGITS if channels == 1 else RGB))


def dm_settings(dm_section, dd, channels: int = 1) -> dm.DMConfig:
  """DM's settings from its config section (`config.dd_eval.dm`), augmenting as the protocol
  of the section `dd` does for images of `channels` channels."""
  net = scoring(dd, dd.ipcs[0], channels=channels)
  return from_section(dm.DMConfig, dm_section, 'dd_eval.dm', dsa=net.dsa,
                      strategy=net.strategy)


def reductions(dd, dm_section=None) -> dict:
  """{'dd.<key>' (or 'dm.<key>'): {'paper', 'here'}} for every protocol value of `dd` (and of
  the DM settings `dm_section`) that differs from the paper's; speed-only keys are skipped."""
  skip = ('preset', 'ipcs', 'runs_per_call', 'epochs_per_call')
  out = {}
  for prefix, values, paper in (('dd', dd, dd_section()),
                                ('dm', dm_section, section(dm.DMConfig))):
    for key, default in paper.items():
      if values is None or key in skip or key not in values:
        continue
      here = values[key]
      here = tuple(here) if isinstance(here, (list, tuple)) else here
      if here != default:
        out[f'{prefix}.{key}'] = {'paper': default, 'here': here}
  return out


def hold_out(train: dict, fraction: float, seed: int) -> tuple[dict, dict | None]:
  """(the rest of `train`, the validation split): `round(fraction · n_c)` images of each class
  (at least one), drawn without replacement with `seed`; both keep the train order.

  Args:
    train: {'x': [N, ...], 'label': int [N], ...} (every array split alike).
  """
  if fraction == 0:
    return train, None
  labels = np.asarray(train['label'])
  rng = np.random.default_rng([seed, 0x7a1])
  rows = [np.flatnonzero(labels == c) for c in range(labels.max() + 1)]
  held = np.sort(np.concatenate([rng.choice(r, max(1, round(fraction * len(r))), replace=False)
                                 for r in rows]))
  rest = np.setdiff1d(np.arange(len(labels)), held)
  emptied = [c for c, r in enumerate(rows) if np.isin(r, held).all()]
  if emptied:
    raise ValueError(f'Holding out {fraction:.0%} of each class for validation leaves class '
                     f'{emptied[0]} ({len(rows[emptied[0]])} images) with none to distil; lower '
                     'config.dd.validation.')
  return ({k: np.asarray(v)[rest] for k, v in train.items()},
          {k: np.asarray(v)[held] for k, v in train.items()})


def with_validation(dataset, dd):
  """(`dataset` with its train split reduced to what may be distilled, the validation split
  or None) of the section `dd`: what every dataset-distillation run starts from."""
  p = plan(dd)
  rest, validation = hold_out(dataset.train, p.validation, p.seed)
  return dataclasses.replace(dataset, train=rest), validation


def choose(results: list[dict], key: str = 'val_mean') -> int:
  """The index of the best of `results` (cells or evaluations) by their validation accuracy:
  how every setting is chosen; test accuracies are never read."""
  missing = [i for i, r in enumerate(results) if key not in r]
  if missing:
    raise ValueError(f'Results {missing} have no {key!r}: score them with a validation split '
                     '(config.dd.validation > 0).')
  return int(np.argmax([r[key] for r in results]))


def content_hash(*arrays) -> str:
  """16 hex digits naming the bytes, dtypes and shapes of `arrays`."""
  digest = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a)
    digest.update(f'{a.dtype}{a.shape}'.encode())
    digest.update(a.tobytes())
  return digest.hexdigest()[:16]


def load_synset(path: str) -> dict:
  """A saved synthetic set {'x', 'label'}, refusing files without those arrays and sets that
  `synset_eval.check_synset` refuses (the test split's shape and classes are checked later,
  by `score`)."""
  try:
    f = files.load_npz(path)
  except (ValueError, EOFError, zipfile.BadZipFile):
    raise BadInput(f'{path} cannot be read as an .npz of arrays; a synthetic set is an .npz '
                   'with x [N, H, W, C] float in [-1, 1] and label int [N].') from None
  missing = [k for k in ('x', 'label') if k not in f]
  if missing:
    raise BadInput(f'{path} lacks {missing} (it has {sorted(f)}); a synthetic set is an .npz '
                   'with x [N, H, W, C] float in [-1, 1] and label int [N].')
  try:
    synset_eval.check_synset(f['x'], f['label'])
  except BadInput as e:
    raise BadInput(f'{path}: {e}') from None
  return {'x': f['x'], 'label': f['label']}


def save_set(stem: str, synset: dict, ipc: int, num_classes: int) -> None:
  """`stem`.npz (x, label) and `stem`.png (a grid, IPC per row, at most 10 columns); writes
  nothing for a set that `synset_eval.check_synset` refuses."""
  synset_eval.check_synset(synset['x'], synset['label'], num_classes=num_classes)
  files.save_npz(stem + '.npz', x=synset['x'], label=synset['label'])
  order = np.argsort(synset['label'], kind='stable')
  columns = min(ipc, 10)
  grid = np.concatenate([synset['x'][order][synset['label'][order] == c][:columns]
                         for c in range(num_classes)])
  plots.image_grid(stem + '.png', grid, ncol=columns)


def progress_bar(desc: str, total: int, unit: str = 'epoch'):
  """A tqdm bar on process 0 only, removed when closed."""
  return tqdm.tqdm(total=total, desc=desc, unit=unit, disable=jax.process_index() > 0,
                   leave=False)


def score(name: str, ipc: int, synsets: list[dict], split: synset_eval.TestSplit,
          proto: synset_eval.Protocol, key, workdir: str) -> dict:
  """Evaluates one set with R runs, or R sets (one per run, as the random baseline), saves each
  set and its grid under `workdir/sets/`, and returns the cell (a set's 'extra' dict is merged
  into it). Every set is checked against `split` before anything is written or trained."""
  for synset in synsets:
    synset_eval.check_synset(synset['x'], synset['label'], split.x.shape[1:], split.num_classes)
  files.makedirs(files.join(workdir, 'sets'))
  stem = files.join(workdir, 'sets', f'{name}_ipc{ipc}')
  bar = progress_bar(f'{name} IPC {ipc}', synset_eval.epochs_total(proto))
  one_each = len(synsets) > 1
  accs, seconds = {}, 0.0
  for r, synset in enumerate(synsets):
    save_set(f'{stem}_subset{r}' if one_each else stem, synset, ipc, split.num_classes)
    done = r * (proto.epochs + 1)
    result = synset_eval.evaluate_synset(
        synset['x'], synset['label'], split, jax.random.fold_in(key, r) if one_each else key,
        dataclasses.replace(proto, runs=1) if one_each else proto,
        on_progress=lambda epochs, done=done: bar.update(done + epochs - bar.n))
    for prefix in ('', 'val_'):
      if f'{prefix}accs' in result:
        accs.setdefault(prefix, []).extend(result[f'{prefix}accs'].tolist())
    seconds += result['seconds_per_run'] * len(result['accs'])
  bar.close()
  out = {'set': name, 'ipc': ipc}
  for prefix, runs in accs.items():
    out.update({f'{prefix}accs': runs, f'{prefix}mean': float(np.mean(runs)),
                f'{prefix}std': float(np.std(runs))})
  return dict(out, seconds_per_run=seconds / len(accs['']), runs=proto.runs,
              epochs=proto.epochs, sets=len(synsets), **synsets[0].get('extra', {}))


def baseline_sets(name: str, ipc: int, train: dict, features, dd, key,
                  dm_settings: dm.DMConfig | None = None,
                  dm_state: str | None = None) -> list[dict]:
  """The sets a baseline is scored on: one per run for `random` (the published figure averages
  subsets, and at IPC 1 the subset drawn dominates the result), one otherwise.

  Args:
    train: {'x': [N, H, W, C] in [-1, 1], 'label': int [N]}.
    features: [N, F] of the whole-data ConvNet (the feature baselines), or None.
    dd: the config section `dd`. dm_settings: DM's (for `dm`; default `DMConfig()`).
    dm_state: DM's resume file (`dm.distribution_matching(state_path=...)`), keyed by the
      caller by everything that makes the set; None: a stopped DM starts again.
  """
  labels = train['label']
  if name == 'dm':
    net = scoring(dd, ipc, channels=train['x'].shape[-1])
    settings = dm_settings or dm.DMConfig()
    bar = progress_bar(f'DM IPC {ipc}', settings.iterations, unit='it')
    start = time.perf_counter()
    out = dm.distribution_matching(train, ipc, key, settings, net, state_path=dm_state,
                                   on_progress=lambda done: bar.update(done - bar.n))
    bar.close()
    return [{'x': out['x'], 'label': out['label'],
             'extra': {'dm_seconds': time.perf_counter() - start,
                       'dm_final_loss': float(out['loss'][-10:].mean())}}]
  seeds = [dd.seed]
  if name == 'random':
    seeds = [dd.seed * dd.runs + r for r in range(dd.runs)]
  return [{'x': train['x'][index], 'label': labels[index]} for index in (
      subsets.select(name, features, labels, ipc, seed=seed) for seed in seeds)]


@dataclasses.dataclass(frozen=True)
class Cell:
  """One set at one IPC to score. identity: JSON-able, what a stored result must match to be
  reused (the protocol, and the set's content hash or the recipe that made it).
  make: `() -> result dict`, called only when no matching result is stored."""
  name: str
  ipc: int
  identity: dict
  make: Callable[[], dict]


def _read_cell(path: str) -> dict | None:
  """A stored cell, or None where the file is not a JSON object (damaged)."""
  try:
    stored = files.read_json(path)
  except (ValueError, UnicodeDecodeError):
    return None
  return stored if isinstance(stored, dict) else None


def state_path(folder: str, name: str, ipc: int, identity: dict) -> str:
  """`folder/<name>_ipc<n>.<16 hex>.state.npz`: the resume file of a cell's set while it is
  being made (DM), named by the cell's identity, so a file another recipe left is never read."""
  digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
  return files.join(folder, f'{name}_ipc{ipc}.{digest}.state.npz')


def run_cells(folder: str, cells: Iterable[Cell]) -> list[dict]:
  """The results of `cells` in order: each read from `folder/<name>_ipc<n>.json` where one with
  the same identity is stored, else made and stored (with its identity) before the next.

  A stop signal (`stop.check`) ends it before the next cell is made, or inside one (its runs
  and epochs check too); the stored cells are kept, and a rerun makes the rest. A cell's
  resume file (`state_path`, DM's) is removed once the cell is stored."""
  files.makedirs(folder)
  results = []
  for cell in cells:
    path = files.join(folder, f'{cell.name}_ipc{cell.ipc}.json')
    identity = json.loads(json.dumps(cell.identity))
    if files.exists(path):
      stored = _read_cell(path)
      if stored is not None and stored.get('identity') == identity:
        results.append(stored)
        continue
      logging.warning('%s holds %s; scoring it again.', path,
                      'no readable result' if stored is None else
                      'a result of another set or protocol')
    stop.check(where=f'before {cell.name} IPC {cell.ipc}')
    try:
      result = dict(cell.make(), identity=identity)
    except stop.Stopped as e:
      raise stop.Stopped(e.signum, f'{e.where} in {cell.name} IPC {cell.ipc}') from None
    files.write_json(path, result)
    files.remove(state_path(folder, cell.name, cell.ipc, identity))
    results.append(result)
  return results


def table(cells: list[dict], dataset_name: str) -> str:
  """Markdown: a row per set, published · ours (mean ± std) and s/run per IPC."""
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


def reductions_markdown(reduced: dict) -> list[str]:
  """The lines listing `reductions(...)` in results.md (none when the paper values are kept)."""
  if not reduced:
    return []
  return (['Reductions from the paper protocol:', '']
          + [f'- `{k}`: {v["here"]} (paper {v["paper"]})' for k, v in reduced.items()] + [''])
