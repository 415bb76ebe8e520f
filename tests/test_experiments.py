"""End to end: the CLI trains and reports; a flow map distils a teacher from its workdir."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from flowdistill import experiments
from flowdistill.data import sources
from flowdistill.eval import report
from flowdistill.experiments import common, flow_map_run, fm_run, method_config, validate
from flowdistill.train import configured
from flowdistill.train.teacher import load_trained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config.train.steps=30', '--config.train.ckpt_every=15', '--config.data.batch_size=64',
        '--config.model.hidden=32', '--config.eval.num_samples=200',
        '--config.eval.nll_samples=20', '--config.eval.euler_steps=(1,2)']


def _tiny(config):
  config.data.batch_size = 64
  config.model.hidden = 32
  config.train.update(steps=30, ckpt_every=15, log_every=10)
  config.eval.update(num_samples=200, nll_samples=20, euler_steps=(1, 2), map_steps=(1, 2),
                     plot=False)
  return config


def test_cli_trains_evaluates_and_writes_everything(tmp_path):
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, '-m', 'flowdistill.main', '--config=configs/quickstart.py:moons',
       f'--workdir={workdir}', *TINY], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'euler-2' in result.stdout and 'NLL' in result.stdout
  for name in ('results.md', 'results.json', 'metrics.jsonl', 'samples.png',
               'trajectories.png', 'tensorboard', 'checkpoints'):
    assert (workdir / name).exists(), name
  rows = json.loads((workdir / 'results.json').read_text())['rows']
  assert [r['sampler'] for r in rows][1:] == ['euler-1', 'euler-2', 'dopri5']


def test_cli_rejects_an_unknown_override_before_any_work(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'flowdistill.main', '--config=configs/quickstart.py',
       f'--workdir={tmp_path / "run"}', '--config.train.stepz=3'], cwd=ROOT,
      capture_output=True, text=True, timeout=300)
  assert result.returncode != 0 and 'stepz' in result.stderr
  assert not (tmp_path / 'run').exists()


def test_flow_map_distils_a_teacher_from_its_workdir(tmp_path):
  teacher = _tiny(method_config())
  teacher.data.name = 'moons'
  configured.train_fm(teacher, str(tmp_path / 'teacher'))
  for loss in ('lmd', 'emd'):
    student = _tiny(method_config())
    student.data.name = 'moons'
    student.method = 'flow_map'
    student.flow_map.loss = loss
    student.teacher.workdir = str(tmp_path / 'teacher')
    validate(student)
    result = flow_map_run.run(student, str(tmp_path / loss))
    labels = [r['sampler'] for r in result['rows']]
    assert {'student 1-jump', 'student 2-jump', 'teacher euler-1', 'teacher dopri5'} <= set(
        labels)
    assert all(v['nll'] > 0 and v['inverse_error'] < 10 for v in result['nll_jumps'].values())
  pfmm = _tiny(method_config())
  pfmm.data.name = 'moons'
  pfmm.method = 'flow_map'
  pfmm.flow_map.loss = 'pfmm'
  pfmm.teacher.workdir = str(tmp_path / 'teacher')
  with pytest.raises(ValueError, match='needs a flow-map teacher'):
    flow_map_run.run(pfmm, str(tmp_path / 'pfmm'))
  pfmm.teacher.workdir = str(tmp_path / 'lmd')
  result = flow_map_run.run(pfmm, str(tmp_path / 'pfmm'))
  assert 'teacher 2-jump' in [r['sampler'] for r in result['rows']]


def test_missing_teacher_is_refused_with_the_fix(tmp_path):
  student = _tiny(method_config())
  student.method = 'flow_map'
  student.teacher.workdir = str(tmp_path / 'nothing')
  with pytest.raises(FileNotFoundError, match='config.teacher.workdir'):
    flow_map_run.run(student, str(tmp_path / 'student'))
  student.teacher.workdir = ''
  with pytest.raises(ValueError, match='distils a teacher'):
    validate(student)


def test_image_pipeline_on_builtin_digits(tmp_path, monkeypatch):
  """Class-conditional U-Net, guidance, feature-net Fréchet distance, bits/dim, sample grid."""
  monkeypatch.setenv('FLOWDISTILL_CACHE', str(tmp_path / 'cache'))
  config = method_config()
  config.data.update(source='digits', batch_size=32, conditional=True)
  config.model.update(name='unet', channels=(16, 16, 16), attention=False, time_dim=16)
  config.fm.label_dropout = 0.2
  config.train.update(steps=4, ckpt_every=4, log_every=2)
  config.eval.update(num_samples=40, euler_steps=(2,), cfg_scale=2.0, nll_samples=4,
                     nll_divergence='hutchinson', rtol=1e-2, atol=1e-2, classifier_steps=30)
  validate(config)
  result = fm_run.run(config, str(tmp_path / 'digits'))
  assert [r['sampler'] for r in result['rows']] == ['euler-2', 'dopri5']
  assert all(r['fd'] >= 0 and 0 <= r['label_accuracy'] <= 1 for r in result['rows'])
  assert result['bpd'] > 0 and result['classifier_test_accuracy'] > 0.2 and result['step'] == 4
  assert (tmp_path / 'digits' / 'samples_euler-2.png').exists()
  assert len(os.listdir(tmp_path / 'cache' / 'feature_nets')) == 1  # trained once, cached


def test_flow_map_on_images_reports_the_series_jump_likelihood(tmp_path, monkeypatch):
  """Direct FMM with a two-time U-Net on built-in digits; jump NLL by the power series."""
  monkeypatch.setenv('FLOWDISTILL_CACHE', str(tmp_path / 'cache'))
  config = method_config()
  config.method = 'flow_map'
  config.flow_map.update(loss='fmm', scheme='uniform')
  config.data.update(source='digits', batch_size=32)
  config.model.update(name='unet', channels=(16, 16, 16), attention=False, time_dim=16)
  config.train.update(steps=4, ckpt_every=4, log_every=2)
  config.eval.update(num_samples=40, map_steps=(1, 4), nll_samples=4, nll_probes=2,
                     nll_divergence='hutchinson', rtol=1e-2, atol=1e-2, classifier_steps=30)
  validate(config)
  result = flow_map_run.run(config, str(tmp_path / 'fmm'))
  assert [r['sampler'] for r in result['rows']] == ['student 1-jump', 'student 4-jump']
  assert set(result['nll_jumps']) == {'1', '4'}
  assert all(np.isfinite(v['nll']) for v in result['nll_jumps'].values())
  assert 'bits/dim, Hutchinson power-series' in (tmp_path / 'fmm' / 'results.md').read_text()


def _scaled_run(config, workdir):
  """A toy method: flow matching with the loss scaled by `config.scaled.weight`."""
  dataset = sources.load(config.data)
  apply_fn, params, loss_fn = configured.fm_loss(config, dataset)

  def scaled(params, batch, key):
    loss, metrics = loss_fn(params, batch, key)
    return config.scaled.weight * loss, metrics

  state = configured.fit(config, params, scaled, configured.fm_batches(config, dataset), workdir,
                         meta=configured.checkpoint_meta(config, dataset, two_time=False))
  params = common.eval_params(config, state)
  section = report.Section({'weight': config.scaled.weight},
                           f'Loss weight: {config.scaled.weight}')
  samplers = report.velocity_samplers(apply_fn, params, config.eval)
  return common.write_report(config, dataset, samplers, workdir,
                             velocity_model=(apply_fn, params), sections=[section])


def _validate_scaled(flat):
  if not flat['scaled.weight'] > 0:
    raise ValueError(f'config.scaled.weight={flat["scaled.weight"]} must be > 0.')


def test_a_method_added_to_the_registry_gets_config_validation_and_the_run_layer(
    tmp_path, monkeypatch):
  """One registry entry: its section joins base_config, its checks run in validate only when
  it is selected, `fit` trains it resumably and `write_report` reports it with its own section."""
  monkeypatch.setitem(experiments.REGISTRY, 'scaled', common.Method(
      'scaled', _scaled_run, defaults={'weight': 2.0}, validate=_validate_scaled))
  config = _tiny(method_config())
  config.data.name = 'moons'
  config.scaled.weight = -1.0
  validate(config)  # method 'fm': the section of another method is not checked
  config.method = 'scaled'
  with pytest.raises(ValueError, match=r'config.scaled.weight=-1.0 must be > 0'):
    validate(config)
  config.scaled.weight = 0.5
  validate(config)
  workdir = tmp_path / 'scaled'
  result = experiments.get('scaled').run(config, str(workdir))
  assert result['weight'] == 0.5 and 'Loss weight: 0.5' in (workdir / 'results.md').read_text()
  assert [r['sampler'] for r in result['rows']][1:] == ['euler-1', 'euler-2', 'dopri5']
  assert np.isfinite(result['nll'])
  teacher = load_trained(str(workdir))  # its checkpoints serve as a teacher like any run's
  assert teacher.config.method == 'scaled' and teacher.data_shape == (2,)
  with pytest.raises(ValueError, match=r"config.method='nope' is not one of"):
    experiments.get('nope')
