"""The shape of the run layer: sections made from the library's dataclasses (each default
defined once), the import rules between layers, and the resumable cells of the protocol."""

import ast
import dataclasses
import pathlib

import numpy as np
import pytest

from flowdistill import experiments, sections
from flowdistill.condense import (
  dm,
  frozen_vae,
  linear_probe,
  pgfm,
  pgfm_workdir,
  protocol,
  ssl,
  synset_eval,
)
from flowdistill.experiments import dd_eval_run, pgfm_run, sfm_run

PACKAGE = pathlib.Path(__file__).parent.parent / 'flowdistill'


@dataclasses.dataclass(frozen=True)
class _Inner:
  a: float = 0.5


@dataclasses.dataclass(frozen=True)
class _Outer:
  n: int = 2
  widths: tuple[int, ...] = (1, 2)
  inner: _Inner = _Inner()
  seed: int = 0

  def __post_init__(self):
    if self.n < 1:
      raise ValueError(f'_Outer.n must be >= 1; got {self.n}.')


def test_section_round_trips_a_dataclass_and_names_refusals():
  values = sections.section(_Outer, exclude=('seed',))
  assert values == {'n': 2, 'widths': (1, 2), 'inner': {'a': 0.5}}
  values['widths'] = [3, 4]  # ConfigDict overrides may give lists
  out = sections.from_section(_Outer, values, 'x', seed=7)
  assert out == _Outer(n=2, widths=(3, 4), inner=_Inner(0.5), seed=7)
  with pytest.raises(ValueError, match=r'config.x: _Outer.n must be >= 1; got 0'):
    sections.from_section(_Outer, dict(values, n=0), 'x', seed=0)
  with pytest.raises(ValueError, match=r'config.x.seed is missing'):
    sections.from_section(_Outer, values, 'x')


@pytest.mark.parametrize('cls,where,exclude', [
    (frozen_vae.VAEConfig, ('pgfm', 'vae'), ('seed',)),
    (pgfm.PrototypeGuidance, ('pgfm', 'prototype_guidance'), ()),
    (ssl.SSLConfig, ('sfm', 'ssl'), ('seed',)),
    (linear_probe.ProbeProtocol, ('sfm', 'probe'), ('mode',)),
    (dm.DMConfig, ('dd_eval', 'dm'), ('dsa', 'strategy')),
    (protocol.Plan, ('dd',), ()),
    (synset_eval.Protocol, ('dd',), ('epochs', 'strategy')),
])
def test_config_defaults_are_the_dataclass_defaults(cls, where, exclude):
  config = experiments.method_config()
  for key in where:
    config = config[key]
  defaults = cls()
  for field in dataclasses.fields(cls):
    if field.name not in exclude:
      value = config[field.name]
      expected = getattr(defaults, field.name)
      if dataclasses.is_dataclass(expected):
        assert sections.from_section(type(expected), value, 'x') == expected
      else:
        assert (tuple(value) if isinstance(value, list) else value) == expected, field.name


def test_default_pgfm_sampler_uses_the_library_pull():
  """The run's sampler settings are the library's: one default, read back unchanged."""
  config = experiments.method_config('pgfm')
  assert pgfm_workdir.prototype_guidance(config) == pgfm.PrototypeGuidance()
  assert pgfm_workdir.vae_settings(config) == frozen_vae.VAEConfig(seed=config.seed)


def _imports(path: pathlib.Path) -> set[str]:
  """The flowdistill modules `path` imports (any level of the file)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('flowdistill'):
      out |= {f'{node.module}.{a.name}' for a in node.names} | {node.module}
    elif isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith('flowdistill')}
  return out


def _module(path: pathlib.Path) -> str:
  return '.'.join(('flowdistill',) + path.relative_to(PACKAGE).with_suffix('').parts)


def test_import_rules_between_layers():
  experiment_modules = {_module(p) for p in (PACKAGE / 'experiments').glob('*_run.py')}
  for path in PACKAGE.rglob('*.py'):
    imported, name = _imports(path), _module(path)
    if name.startswith('flowdistill.experiments.') and name in experiment_modules:
      assert not imported & (experiment_modules - {name}), f'{name} imports another experiment'
    if name.startswith('flowdistill.data'):
      assert not any(m.startswith('flowdistill.condense') for m in imported), name
    if not name.startswith('flowdistill.experiments') and name != 'flowdistill.main':
      assert not any(m.startswith('flowdistill.experiments') for m in imported), (
          f'{name} (library) imports the run layer')


def test_one_optax_loop_and_one_cache_helper():
  """Only the fitting helper builds optax updates; only the cache helper fingerprints data."""
  for path in PACKAGE.rglob('*.py'):
    text = path.read_text()
    if path.name != 'fitting.py':
      assert 'optax.apply_updates' not in text, path
    if path.name != 'cache.py':
      assert 'def data_fingerprint' not in text and 'def cache_root' not in text, path


def _cell(name, identity, calls):
  return protocol.Cell(name, 1, identity, lambda: calls.append(name) or {'mean': len(calls)})


def test_cells_are_reused_only_for_the_same_set_and_protocol(tmp_path, caplog):
  calls = []
  first = protocol.run_cells(str(tmp_path), [_cell('a', {'set': 'h1', 'runs': 2}, calls),
                                             _cell('b', {'set': 'h2', 'runs': 2}, calls)])
  assert calls == ['a', 'b'] and [c['mean'] for c in first] == [1, 2]
  again = protocol.run_cells(str(tmp_path), [_cell('a', {'set': 'h1', 'runs': 2}, calls),
                                             _cell('b', {'set': 'h3', 'runs': 2}, calls)])
  assert calls == ['a', 'b', 'b'] and again[0] == first[0] and again[1]['mean'] == 3
  assert 'holds a result of another set or protocol' in caplog.text
  protocol.run_cells(str(tmp_path), [_cell('a', {'set': 'h1', 'runs': (3,)}, calls)])
  assert calls[-1] == 'a'


@pytest.mark.parametrize('damage', [b'{"identity": {"set": "h1"', b'', b'[1, 2]', b'\xff\xfe'])
def test_a_damaged_cell_is_scored_again_with_a_warning(tmp_path, caplog, damage):
  calls = []
  protocol.run_cells(str(tmp_path), [_cell('a', {'set': 'h1'}, calls)])
  (tmp_path / 'a_ipc1.json').write_bytes(damage)
  (again,) = protocol.run_cells(str(tmp_path), [_cell('a', {'set': 'h1'}, calls)])
  assert calls == ['a', 'a'] and again['mean'] == 2
  assert f'{tmp_path / "a_ipc1.json"} holds no readable result; scoring it again' in caplog.text


def test_content_hash_names_bytes_dtype_and_shape():
  x = np.zeros((2, 3), np.float32)
  assert protocol.content_hash(x) == protocol.content_hash(x.copy())
  assert protocol.content_hash(x) != protocol.content_hash(x.reshape(3, 2))
  assert protocol.content_hash(x) != protocol.content_hash(x.astype(np.float64))
  y = x.copy()
  y[1, 2] = 1e-7
  assert protocol.content_hash(x) != protocol.content_hash(y)


def test_reductions_compare_with_the_paper_values():
  config = experiments.method_config('dd_eval')
  assert protocol.reductions(config.dd, config.dd_eval.dm) == {}
  config.dd.update(runs=3, epochs=(300,), runs_per_call=4)
  config.dd_eval.dm.iterations = 1000
  assert protocol.reductions(config.dd, config.dd_eval.dm) == {
      'dd.runs': {'paper': 20, 'here': 3}, 'dd.epochs': {'paper': (1000,), 'here': (300,)},
      'dm.iterations': {'paper': 20000, 'here': 1000}}


def test_scoring_takes_epochs_per_ipc_and_strategy_by_channels():
  config = experiments.method_config('dd_eval')
  config.dd.update(ipcs=(1, 10), epochs=(300, 500))
  assert protocol.scoring(config.dd, 10).epochs == 500
  assert protocol.scoring(config.dd, 50).epochs == 300  # outside ipcs: the first
  assert protocol.scoring(config.dd, None).epochs == config.dd.whole_data_epochs
  assert protocol.scoring(config.dd, 1, channels=3).strategy != protocol.scoring(
      config.dd, 1, channels=1).strategy


def test_registry_names_each_method_once():
  assert set(experiments.REGISTRY) == {'fm', 'flow_map', 'local_fm', 'reflow', 'dd_eval',
                                       'pgfm', 'sfm'}
  for module in (dd_eval_run, pgfm_run, sfm_run):
    assert experiments.get(module.METHOD.name) is module.METHOD
