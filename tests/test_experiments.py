"""End to end: the CLI trains and reports; a flow map distils a teacher from its workdir."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from flowdistill.config import base_config, validate
from flowdistill.experiments import flow_map, flow_matching

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
  teacher = _tiny(base_config())
  teacher.data.name = 'moons'
  flow_matching.train(teacher, str(tmp_path / 'teacher'))
  for loss in ('lmd', 'emd'):
    student = _tiny(base_config())
    student.data.name = 'moons'
    student.method = 'flow_map'
    student.flow_map.loss = loss
    student.teacher.workdir = str(tmp_path / 'teacher')
    validate(student)
    result = flow_map.run(student, str(tmp_path / loss))
    labels = [r['sampler'] for r in result['rows']]
    assert {'student 1-jump', 'student 2-jump', 'teacher euler-1', 'teacher dopri5'} <= set(
        labels)
    assert all(v['nll'] > 0 and v['inverse_error'] < 10 for v in result['nll_jumps'].values())
  pfmm = _tiny(base_config())
  pfmm.data.name = 'moons'
  pfmm.method = 'flow_map'
  pfmm.flow_map.loss = 'pfmm'
  pfmm.teacher.workdir = str(tmp_path / 'teacher')
  with pytest.raises(ValueError, match='needs a flow-map teacher'):
    flow_map.run(pfmm, str(tmp_path / 'pfmm'))
  pfmm.teacher.workdir = str(tmp_path / 'lmd')
  result = flow_map.run(pfmm, str(tmp_path / 'pfmm'))
  assert 'teacher 2-jump' in [r['sampler'] for r in result['rows']]


def test_missing_teacher_is_refused_with_the_fix(tmp_path):
  student = _tiny(base_config())
  student.method = 'flow_map'
  student.teacher.workdir = str(tmp_path / 'nothing')
  with pytest.raises(FileNotFoundError, match='config.teacher.workdir'):
    flow_map.run(student, str(tmp_path / 'student'))
  student.teacher.workdir = ''
  with pytest.raises(ValueError, match='distils a teacher'):
    validate(student)


def test_image_pipeline_on_builtin_digits(tmp_path, monkeypatch):
  """Class-conditional U-Net, guidance, feature-net Fréchet distance, bits/dim, sample grid."""
  monkeypatch.setenv('FLOWDISTILL_CACHE', str(tmp_path / 'cache'))
  config = base_config()
  config.data.update(source='digits', batch_size=32, conditional=True)
  config.model.update(name='unet', channels=(16, 16, 16), attention=False, time_dim=16)
  config.fm.label_dropout = 0.2
  config.train.update(steps=4, ckpt_every=4, log_every=2)
  config.eval.update(num_samples=40, euler_steps=(2,), guidance=2.0, nll_samples=4,
                     nll_divergence='hutchinson', rtol=1e-2, atol=1e-2, classifier_steps=30)
  validate(config)
  result = flow_matching.run(config, str(tmp_path / 'digits'))
  assert [r['sampler'] for r in result['rows']] == ['euler-2', 'dopri5']
  assert all(r['fd'] >= 0 and 0 <= r['label_accuracy'] <= 1 for r in result['rows'])
  assert result['bpd'] > 0 and result['classifier_test_accuracy'] > 0.2
  assert (tmp_path / 'digits' / 'samples_euler-2.png').exists()
  assert len(os.listdir(tmp_path / 'cache' / 'feature_nets')) == 1  # trained once, cached


def test_flow_map_on_images_reports_the_series_jump_likelihood(tmp_path, monkeypatch):
  """Direct FMM with a two-time U-Net on built-in digits; jump NLL by the power series."""
  monkeypatch.setenv('FLOWDISTILL_CACHE', str(tmp_path / 'cache'))
  config = base_config()
  config.method = 'flow_map'
  config.flow_map.update(loss='fmm', scheme='uniform')
  config.data.update(source='digits', batch_size=32)
  config.model.update(name='unet', channels=(16, 16, 16), attention=False, time_dim=16)
  config.train.update(steps=4, ckpt_every=4, log_every=2)
  config.eval.update(num_samples=40, map_steps=(1, 4), nll_samples=4, nll_probes=2,
                     nll_divergence='hutchinson', rtol=1e-2, atol=1e-2, classifier_steps=30)
  validate(config)
  result = flow_map.run(config, str(tmp_path / 'fmm'))
  assert [r['sampler'] for r in result['rows']] == ['student 1-jump', 'student 4-jump']
  assert set(result['nll_jumps']) == {'1', '4'}
  assert all(np.isfinite(v['nll']) for v in result['nll_jumps'].values())
  assert 'bits/dim, Hutchinson power-series' in (tmp_path / 'fmm' / 'results.md').read_text()
