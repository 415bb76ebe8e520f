"""Config validation: every bad key or value gets one message naming it."""

import pathlib

import ml_collections
import pytest

from flowdistill.config import parse_arg
from flowdistill.experiments import load_config_file, method_config, pgfm_run, validate
from flowdistill.models.factory import build_model

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / 'configs').glob('*.py'))


def _finished_pgfm_run(workdir):
  """What configs/pgfm_student.py reads: a PGFM run's latent flow-matching config."""
  pgfm = load_config_file(CONFIGS[0].parent / 'pgfm.py', 'mnist,cpu')
  flow = pgfm_run.latent_fm_config(pgfm, str(workdir / 'latents.npz'))
  (workdir / 'latent_fm').mkdir(parents=True)
  (workdir / 'latent_fm' / 'config.json').write_text(flow.to_json())
  return str(workdir)


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path, tmp_path):
  arg = _finished_pgfm_run(tmp_path) if path.name == 'pgfm_student.py' else ''
  config = load_config_file(path, arg)
  if config.method == 'reflow' or (config.method == 'flow_map'
                                   and config.flow_map.loss != 'fmm'):
    config.teacher.workdir = 'runs/teacher'  # set on the command line in real use
  validate(config, num_devices=8)


@pytest.mark.parametrize('mutate,message', [
    (lambda c: c.data.__setattr__('batchsize', 3), r'config.data.batchsize.*data.batch_size'),
    (lambda c: c.optim.__setattr__('name', 'sgdd'), r'config.optim.name=.sgdd'),
    (lambda c: c.train.__setattr__('steps', 0), r'config.train.steps=0 must be >= 1'),
    (lambda c: c.data.__setattr__('batch_size', 100), r'not divisible by the 8 devices'),
    (lambda c: c.path.__setattr__('name', 'curvy'), r'config.path.name=.curvy'),
    (lambda c: c.eval.__setattr__('adaptive_solver', 'rk4'), r'config.eval.adaptive_solver'),
    (lambda c: c.fm.__setattr__('coupling', 'greedy'), r'config.fm.coupling'),
    (lambda c: c.fm.__setattr__('label_dropout', 0.1), r'needs config.data.conditional'),
    (lambda c: c.model.__setattr__('name', 'unet'), r'must be "mlp"'),
    (lambda c: c.train.__setattr__('eval_ema', 0.5), r'eval_ema=0.5 is not among'),
    (lambda c: c.fm.__setattr__('ot_block_size', 48), r'ot_block_size=48 must divide'),
    (lambda c: c.optim.__setattr__('lr', -1.0), r'config.optim.lr=-1.0 must be > 0'),
    (lambda c: c.eval.__setattr__('euler_steps', (1, 0, 4)),
     r'config.eval.euler_steps=\(1, 0, 4\): every step count must be >= 1'),
    (lambda c: c.eval.__setattr__('nll_samples', 0), r'config.eval.nll_samples=0 must be >= 1'),
    (lambda c: c.fm.__setattr__('ot_on_host', True), r'ot_on_host=True .*fm.coupling="exact"'),
    (lambda c: c.model.__setattr__('time_dim', 15), r'config.model.time_dim=15 must be 0 .*even'),
])
def test_bad_values_are_named(mutate, message):
  config = method_config()
  with config.unlocked():
    mutate(config)
  with pytest.raises(ValueError, match=message):
    validate(config, num_devices=8)


def test_wrong_type_is_named():
  config = method_config()
  config.data = ml_collections.ConfigDict(dict(config.data.to_dict(), name=3))
  with pytest.raises(ValueError, match=r'config.data.name=3 has the wrong type'):
    validate(config)


def test_parse_arg_fills_typed_fields_by_position_name_and_flag():
  arg = parse_arg('pfmm,mnist', loss='lmd', data='checkerboard')
  assert (arg.loss, arg.data) == ('pfmm', 'mnist')
  assert parse_arg('', loss='lmd', data='checkerboard').to_dict() == {
      'loss': 'lmd', 'data': 'checkerboard'}
  arg = parse_arg('tabular,distill,blocks=3', data='checkerboard', distill=False, blocks=4)
  assert (arg.data, arg.distill, arg.blocks) == ('tabular', True, 3)
  assert parse_arg('scale=0.5', scale=1.0).scale == 0.5


@pytest.mark.parametrize('arg,message', [
    ('a,1.0,True,x', r'too many values; the fields are \['),
    ('lr=x', r"lr='x' is not a float"),
    ('colour=red', r"unknown field 'colour'"),
    ('flag=maybe', r'flag must be True or False'),
])
def test_parse_arg_names_a_bad_argument(arg, message):
  with pytest.raises(ValueError, match=message):
    parse_arg(arg, data='moons', lr=1.0, flag=False)


def test_config_args_reach_their_fields():
  configs = pathlib.Path(__file__).parent.parent / 'configs'
  assert load_config_file(configs / 'flow_map.py', 'fmm,moons').flow_map.loss == 'fmm'
  assert load_config_file(configs / 'flow_map.py', 'data=mnist').data.source == 'mnist'
  assert load_config_file(configs / 'local_fm.py', 'tabular,distill').local_fm.distill_steps
  assert load_config_file(configs / 'reflow.py', 'piecewise-ma').reflow.windows == 2
  with pytest.raises(ValueError, match='choose one of'):
    load_config_file(configs / 'reflow.py', 'sideways')


@pytest.mark.parametrize('name,time_dim,shape,width', [
    ('mlp', 0, (2,), 16), ('mlp', 32, (2,), 32), ('unet', 0, (8, 8, 1), 128),
    ('unet', 16, (8, 8, 1), 16)])
def test_time_dim_zero_takes_the_networks_default(name, time_dim, shape, width):
  model = method_config().model
  model.update(name=name, time_dim=time_dim, channels=(8, 8), attention=False)
  _, params = build_model(model, shape)
  assert params['time']['t_mlp']['layers'][0]['kernel'].shape == (width, width)
