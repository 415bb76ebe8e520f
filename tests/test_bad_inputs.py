"""A catalogue of bad inputs: each gets one clear error naming the problem, and no checkpoint
already saved (in the run's workdir or a teacher's) is lost or changed.

Every case runs end to end as `python -m flowdistill.main` would (validate, then the
experiment's `run`) on a copy of a workdir that holds a good run's checkpoints, unless the case
says otherwise (the library's training loop, the distributed start-up).
"""

import hashlib
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from flowdistill import experiments, fm, ode, paths
from flowdistill.condense import (
  frozen_vae,
  latents,
  linear_probe,
  pgfm,
  pgfm_workdir,
  protocol,
  sfm,
  sfm_setup,
  synset_eval,
)
from flowdistill.data import sources
from flowdistill.experiments import load_config_file, method_config, validate
from flowdistill.models.convnet import ConvNet
from flowdistill.models.factory import build_model
from flowdistill.train import configured, loop, parallel
from flowdistill.train.checkpoint import (
  Checkpointer,
  CheckpointMismatchError,
  UnreadableCheckpointsError,
)
from flowdistill.train.identity import ConfigChangedError
from flowdistill.train.step import make_train_step
from flowdistill.train.teacher import load_trained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
  config = method_config()
  config.data.name, config.data.batch_size = 'moons', 64
  config.model.hidden, config.model.depth, config.model.time_dim = 32, 2, 16
  config.train.update(steps=6, ckpt_every=3, log_every=3)
  return config


def _train(config, workdir, batches=None):
  dataset = sources.load(config.data)
  _, loss_fn, optimizer, state = configured.fm_setup(config, dataset)
  batches = batches or sources.batch_source(dataset, config.data.batch_size, seed=config.seed,
                                            conditional=False)
  return loop.train(state, make_train_step(loss_fn, optimizer), batches,
                    mesh=parallel.make_mesh(config.train.num_devices), workdir=str(workdir),
                    num_steps=config.train.steps, ckpt_every=config.train.ckpt_every,
                    meta=configured.checkpoint_meta(config, dataset, two_time=False),
                    progress=False)


def _main(config, workdir):
  """What `flowdistill.main` does after parsing flags."""
  validate(config, num_devices=jax.device_count(), num_processes=jax.process_count())
  experiments.get(config.method).run(config, str(workdir))


@pytest.fixture(scope='module')
def good_run(tmp_path_factory):
  """A finished 6-step run (checkpoints at steps 3 and 6), usable as a teacher."""
  workdir = tmp_path_factory.mktemp('good')
  _train(_config(), workdir)
  return workdir


def _corrupt(checkpoints, part, steps=None):
  for step in steps or [p.name for p in checkpoints.iterdir() if p.name.isdigit()]:
    for root, _, files in os.walk(checkpoints / str(step) / part):
      for name in files:
        path = pathlib.Path(root) / name
        path.write_bytes(path.read_bytes()[:max(path.stat().st_size // 2, 1)][::-1])


def _npz(path, **arrays):
  n = 64
  data = {'x_train': np.zeros((n, 8, 8), np.uint8), 'y_train': np.zeros(n, np.int64),
          'x_test': np.zeros((n, 8, 8), np.uint8), 'y_test': np.zeros(n, np.int64)}
  data.update(arrays)
  np.savez(path, **{k: v for k, v in data.items() if v is not None})
  return str(path)


def _images(c, path='', source='mnist'):
  c.data.update(source=source, path=path, batch_size=64)
  c.model.update(name='unet', channels=(8,), num_res_blocks=1, attention=False)


def _set(section, **values):
  def setup(c, ctx):
    with c.unlocked():
      c[section].update(values)
  return setup


def _method(name, loss='lmd'):
  def setup(c, ctx):
    c.method, c.flow_map.loss = name, loss
  return setup


def _teacher(loss, workdir_key='good', **data):
  def setup(c, ctx):
    c.method = 'flow_map'
    c.flow_map.loss = loss
    c.teacher.workdir = str(ctx[workdir_key])
    if data:
      _images(c, source='digits')
  return setup


def _poisoned_run(c, workdir):
  """The library's loop fed a NaN batch at step 8 (resuming from the good run's step 6)."""
  c.train.update(steps=12, allow_config_change='train.steps')
  clean = sources.batch_source(sources.load(c.data), 64, seed=0, conditional=False)

  def batches(start):
    for step, batch in enumerate(clean(start), start=start + 1):
      yield {'x': np.full_like(batch['x'], np.nan)} if step == 8 else batch

  _train(c, workdir, batches)


def _distributed_env(c, workdir):
  del c, workdir
  os.environ['JAX_COORDINATOR_ADDRESS'] = '127.0.0.1:1'
  try:
    parallel.maybe_initialize_distributed(True)
  finally:
    del os.environ['JAX_COORDINATOR_ADDRESS']


def _steps_per_call_change(c, ctx):
  c.train.update(steps=12, steps_per_call=4, allow_config_change='train.steps')


def _wrong_type(c, ctx):
  c.train = ml_collections.ConfigDict(dict(c.train.to_dict(), steps='100'))


def _unknown_key(c, ctx):
  with c.unlocked():
    c.train.stpes = 10


def _workdir_is_a_file(c, ctx):
  blocked = ctx['tmp'] / 'file'
  blocked.write_text('not a folder')
  ctx['workdir'] = blocked / 'run'


def _workdir_is_a_url(c, ctx):
  ctx['workdir'] = 's3://bucket/run'


def _fresh_workdir(c, ctx):
  ctx['workdir'] = ctx['tmp'] / 'fresh'


def _all_state_corrupt(c, ctx):
  _corrupt(ctx['workdir'] / 'checkpoints', 'state')


def _all_meta_corrupt(c, ctx):
  _corrupt(ctx['workdir'] / 'checkpoints', 'meta')


def _teacher_corrupt(c, ctx):
  _corrupt(ctx['workdir'] / 'checkpoints', 'state')
  _teacher('lmd', 'workdir')(c, ctx)


def _teacher_without_checkpoints(c, ctx):
  (ctx['tmp'] / 'empty' / 'checkpoints').mkdir(parents=True)
  ctx['empty'] = ctx['tmp'] / 'empty'
  _teacher('lmd', 'empty')(c, ctx)


def _teacher_missing(c, ctx):
  ctx['missing'] = ctx['tmp'] / 'no-such-run'
  _teacher('lmd', 'missing')(c, ctx)


def _with(setup, *more):
  def both(c, ctx):
    setup(c, ctx)
    for m in more:
      m(c, ctx)
  return both


CASES = [
    # id, setup(config, ctx), runner (None: the command line), error, message
    ('unknown-key', _unknown_key, None, ValueError,
     r'Unknown config key config.train.stpes. Did you mean config.train.steps'),
    ('wrong-type', _wrong_type, None, ValueError,
     r"config.train.steps='100' has the wrong type; expected a int"),
    ('unknown-optimizer', _set('optim', name='sgdd'), None, ValueError,
     r"config.optim.name='sgdd' is not one of"),
    ('zero-steps', _set('train', steps=0), None, ValueError, r'config.train.steps=0 must be >= 1'),
    ('zero-euler-steps', _set('eval', euler_steps=(1, 0)), None, ValueError,
     r'config.eval.euler_steps=\(1, 0\): every step count must be >= 1'),
    ('zero-nll-samples', _set('eval', nll_samples=0), None, ValueError,
     r'config.eval.nll_samples=0 must be >= 1'),
    ('negative-guidance', _set('eval', cfg_scale=-1.0), None, ValueError,
     r'config.eval.cfg_scale=-1.0 must be >= 0'),
    ('negative-lr', _set('optim', lr=-1.0), None, ValueError, r'config.optim.lr=-1.0 must be > 0'),
    ('batch-not-divisible', _set('data', batch_size=100), None, ValueError,
     r'batch_size=100 is not divisible by the 8 devices'),
    ('too-many-devices', _set('train', num_devices=16), None, ValueError,
     r'config.train.num_devices=16 but only 8 devices exist; set it to 0'),
    ('eval-ema-not-trained', _set('train', eval_ema=0.5), None, ValueError,
     r'eval_ema=0.5 is not among'),
    ('unet-on-2d', _set('model', name='unet'), None, ValueError, r'must be "mlp"'),
    ('labels-on-toy', _set('data', conditional=True), None, ValueError,
     r'conditional needs labelled'),
    ('label-dropout-unconditional', _set('fm', label_dropout=0.1), None, ValueError,
     r'needs config.data.conditional=True'),
    ('ot-block-not-dividing', _set('fm', coupling='exact', ot_block_size=7), None, ValueError,
     r'ot_block_size=7 must divide the per-device batch 8'),
    ('unknown-toy', _set('data', name='moonz'), None, ValueError,
     r"config.data.name='moonz' is not a toy set"),
    ('steps-per-call-on-resume', _steps_per_call_change, None, ValueError,
     r'resumed step \(6\) must be multiples of config.train.steps_per_call \(4\)'),
    ('distillation-without-teacher', _method('flow_map'), None, ValueError,
     r'distils a teacher: set config.teacher.workdir'),
    # data
    ('missing-data-folder', lambda c, ctx: _images(c, '/no/such/folder'), None,
     FileNotFoundError, r'/no/such/folder'),
    ('unset-data-env-var', lambda c, ctx: (_images(c), c.data.__setattr__(
        'path_env', 'FLOWDISTILL_TEST_UNSET_DIR')), None, FileNotFoundError,
     r'FLOWDISTILL_TEST_UNSET_DIR is not set'),
    ('nan-pixels-in-file', lambda c, ctx: _images(c, _npz(
        ctx['tmp'] / 'nan.npz', x_train=np.full((64, 8, 8), np.nan, np.float32))), None,
     ValueError, r'x_train must hold integer pixels 0..255, got dtype float32'),
    ('npz-missing-key', lambda c, ctx: _images(c, _npz(ctx['tmp'] / 'm.npz', y_train=None)),
     None, ValueError, r"missing keys \['y_train'\]"),
    ('images-flattened', lambda c, ctx: _images(c, _npz(
        ctx['tmp'] / 'flat.npz', x_train=np.zeros((64, 64), np.uint8))), None, ValueError,
     r'x_train must have shape \[N, H, W\] or \[N, H, W, C\], got \(64, 64\)'),
    ('labels-length', lambda c, ctx: _images(c, _npz(
        ctx['tmp'] / 'y.npz', y_train=np.zeros(10, np.int64))), None, ValueError,
     r'y_train must be integers of shape \[64\]'),
    ('empty-split', lambda c, ctx: _images(c, _npz(
        ctx['tmp'] / 'e.npz', x_test=np.zeros((0, 8, 8), np.uint8), y_test=np.zeros(0, np.int64))),
     None, ValueError, r'e.npz: the test split holds no images'),
    ('negative-labels', lambda c, ctx: _images(c, _npz(
        ctx['tmp'] / 'n.npz', y_train=np.arange(64) % 3 - 1)), None, ValueError,
     r'train labels span -1..1, but the classes are 0..1 .*class indices starting at 0'),
    ('test-label-beyond-classes', lambda c, ctx: _images(c, _npz(
        ctx['tmp'] / 'c.npz', y_test=np.full(64, 7))), None, ValueError,
     r'test labels span 7..7, but the classes are 0..0 \(from the train labels\)'),
    ('not-an-npz', lambda c, ctx: (ctx['tmp'].joinpath('bad.npz').write_bytes(b'junk'),
                                   _images(c, str(ctx['tmp'] / 'bad.npz'))), None, ValueError,
     r'not a readable .npz file'),
    ('batch-larger-than-data', _with(lambda c, ctx: _images(c, source='digits'),
                                     _set('data', batch_size=2048), _fresh_workdir), None,
     ValueError, r'global_batch_size=2048 exceeds the 1500 examples; lower the batch size'),
    ('nan-batch', lambda c, ctx: None, _poisoned_run, loop.NonFiniteLossError,
     r'Non-finite loss or parameters at step 8.*last good checkpoint: step 6.*check the data'),
    # checkpoints and shapes
    ('resume-with-another-lr', _set('optim', lr=2e-3), None, ConfigChangedError,
     (r'checkpoint at step 6 in .*run/checkpoints was made with another config \(optim.lr: '
      r'0.001 -> 0.002\).*--config.train.allow_config_change=optim.lr')),
    ('resume-with-a-shorter-budget', _set('train', steps=3), None, ConfigChangedError,
     r'train.steps: 6 -> 3.*allow_config_change=train.steps'),
    ('resume-on-other-data', _set('data', name='checkerboard'), None, ConfigChangedError,
     r"data.name: 'moons' -> 'checkerboard'"),
    ('resume-with-another-batch', _set('data', batch_size=32), None,
     ConfigChangedError, r'data.batch_size: 64 -> 32.*allow_config_change=data.batch_size'),
    ('allow-change-of-an-evaluation-key', _set('train', allow_config_change='eval.num_samples'),
     None, ValueError, r"allow_config_change names \['eval.num_samples'\], which do not define"),
    ('checkpoint-of-wider-model', _set('model', hidden=48), None, CheckpointMismatchError,
     (r'does not match this configuration.*params.*checkpoint \[.*32\] vs config \[.*48\].*'
      r'fresh --workdir')),
    ('checkpoint-of-other-ema-rates', _set('train', ema_rates=(0.99, 0.999)), None,
     CheckpointMismatchError, r"ema/0.99.*checkpoint None vs config"),
    ('checkpoint-without-grad-clip', _set('optim', grad_clip=0.0), None,
     CheckpointMismatchError, r'does not match this configuration'),
    ('checkpoint-of-another-method', _method('flow_map', 'fmm'), None, CheckpointMismatchError,
     r'does not match this configuration'),
    ('all-checkpoints-truncated', _all_state_corrupt, None, UnreadableCheckpointsError,
     r'None of the checkpoints .* \(steps \[3, 6\]\) reads back; they are left untouched'),
    ('all-checkpoint-metadata-garbled', _all_meta_corrupt, None, UnreadableCheckpointsError,
     r'None of the checkpoints'),
    ('workdir-is-a-file', _workdir_is_a_file, None, PermissionError,
     r'Cannot write checkpoints to .*file/run/checkpoints.*choose a writable --workdir'),
    ('workdir-is-an-s3-url', _workdir_is_a_url, None, ValueError,
     r"'s3://bucket/run/checkpoints'.*local paths and to gs:// buckets.*pass its local path"),
    # teachers that do not fit the student
    ('teacher-missing', _teacher_missing, None, FileNotFoundError,
     r'No checkpoints in .*no-such-run.*set config.teacher.workdir'),
    ('teacher-not-trained-yet', _teacher_without_checkpoints, None, FileNotFoundError,
     r'holds no checkpoint yet; train the teacher first'),
    ('teacher-of-other-data', _with(_teacher('lmd', data='digits'), _fresh_workdir), None,
     ValueError, (r'trained on samples of shape \(2,\) with 0 classes; this config has '
                  r'\(8, 8, 1\)')),
    ('teacher-of-other-data-same-shape', _with(_teacher('lmd'), _set('data', name='checkerboard'),
                                               _fresh_workdir), None, ValueError,
     (r"trained on \{'source': 'toy', 'name': 'moons'\}; this config distils \{'source': "
      r"'toy', 'name': 'checkerboard'\}")),
    ('teacher-velocity-for-pfmm', _with(_teacher('pfmm'), _fresh_workdir), None, ValueError,
     r'pfmm" needs a flow-map teacher'),
    ('teacher-unreadable', _with(_teacher_corrupt, _fresh_workdir), None,
     UnreadableCheckpointsError, r'None of the teacher checkpoints .* reads back; retrain'),
    # start-up
    ('distributed-env-incomplete', lambda c, ctx: None, _distributed_env, ValueError,
     r"JAX_COORDINATOR_ADDRESS is set but \['JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'\] are not"),
]


def _fingerprint(root: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob('*')) if p.is_file() and 'checkpoints' in p.parts}


def test_the_catalogue_is_large_enough():
  assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize('setup,runner,error,message', [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_error_and_keeps_checkpoints(good_run, tmp_path, setup, runner,
                                                            error, message):
  ctx = {'tmp': tmp_path, 'good': tmp_path / 'good_copy', 'workdir': tmp_path / 'run'}
  shutil.copytree(good_run, ctx['good'])
  shutil.copytree(good_run, ctx['workdir'])
  config = _config()
  setup(config, ctx)
  before = _fingerprint(tmp_path)
  with pytest.raises(error, match=message):
    (runner or _main)(config, ctx['workdir'])
  after = _fingerprint(tmp_path)
  assert {k: after.get(k) for k in before} == before
  if runner is None and ctx['workdir'] == tmp_path / 'run':
    ckpt = Checkpointer(str(ctx['workdir'] / 'checkpoints'))
    assert ckpt.all_steps() == [3, 6]
    ckpt.close()


def test_a_teacher_with_unreadable_newest_metadata_falls_back_and_stays_as_it_was(
    good_run, tmp_path, caplog):
  teacher, older = tmp_path / 'teacher', tmp_path / 'older'
  shutil.copytree(good_run, teacher)
  shutil.copytree(good_run, older)
  _corrupt(teacher / 'checkpoints', 'meta', steps=[6])
  shutil.rmtree(older / 'checkpoints' / '6')
  before = _fingerprint(teacher)
  with caplog.at_level('WARNING'):
    trained = load_trained(str(teacher))
  assert _fingerprint(teacher) == before
  assert 'Teacher checkpoint at step 6' in caplog.text and 'skipping it' in caplog.text
  expected = load_trained(str(older))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trained.params),
                                                   jax.tree.leaves(expected.params), strict=True))


# The dataset-distillation protocol: bad sets, IPCs and settings.


def _dd_main(tmp_path, **sections):
  config = load_config_file(os.path.join(ROOT, 'configs', 'dd_protocol.py'), 'digits')
  config.dd_eval.update(baselines=('random',), whole_data=False)
  for section, values in sections.items():
    config[section].update(values)
  _main(config, tmp_path / 'dd')


def _score(x, label=None):
  split = synset_eval.TestSplit(np.zeros((4, 8, 8, 1), np.float32), np.arange(4) % 2,
                                np.zeros(1, np.float32), np.ones(1, np.float32))
  label = np.arange(len(x)) % 2 if label is None else np.asarray(label)
  synset_eval.evaluate_synset(x, label, split, jax.random.key(0), synset_eval.Protocol(runs=1))


def _synset_file(tmp_path):
  np.savez(tmp_path / 'set.npz', images=np.zeros((2, 8, 8, 1)), labels=np.arange(2))
  _dd_main(tmp_path, dd_eval={'synsets': (str(tmp_path / 'set.npz'),)})


_GOOD = np.zeros((4, 8, 8, 1), np.float32)
DD_CASES = [
    ('ipc-zero', lambda t: _dd_main(t, dd={'ipcs': (0,)}), ValueError,
     r'config.dd: Plan.ipcs=\(0,\) must be images per class >= 1'),
    ('ipc-above-smallest-class', lambda t: _dd_main(t, dd={'ipcs': (160,)}), ValueError,
     r'IPC 160 is larger than class \d, which has only 1\d\d images; use IPC <= 1\d\d'),
    ('runs-zero', lambda t: _dd_main(t, dd={'runs': 0}), ValueError,
     r'config.dd: Protocol.runs must be >= 1; got 0'),
    ('unknown-dsa-family', lambda t: _dd_main(t, dd={'strategy': 'color_blur'}), ValueError,
     r"Unknown DSA family \['blur'\].*valid families are \('color', 'crop'"),
    ('unknown-preset', lambda t: load_config_file(
        os.path.join(ROOT, 'configs', 'dd_protocol.py'), 'mnist,gpu'), ValueError,
     r"unknown preset 'gpu'; choose one of \('paper', 'cpu'\)"),
    ('synset-file-without-x-and-label', _synset_file, ValueError,
     r"set.npz lacks \['x', 'label'\] \(it has \['images', 'labels'\]\)"),
    ('synset-lacks-a-class', lambda t: _score(_GOOD, [0, 0, 0, 0]), ValueError,
     r'no image of class 1'),
    ('synset-unbalanced', lambda t: _score(_GOOD[:3], [0, 0, 1]), ValueError,
     r'unbalanced: images per class \[2, 1\]'),
    ('synset-label-out-of-range', lambda t: _score(_GOOD, [0, 1, 2, 1]), ValueError,
     r'Synthetic label 2 is out of range \[0, 2\)'),
    ('synset-channels-first', lambda t: _score(np.zeros((4, 1, 8, 8), np.float32)), ValueError,
     r'looks channels-first: transpose to \[N, H, W, C\]'),
    ('synset-uint8', lambda t: _score(np.zeros((4, 8, 8, 1), np.uint8)), ValueError,
     r'are uint8; the evaluator takes float images in \[-1, 1\]'),
    ('synset-0-255-floats', lambda t: _score(np.full((4, 8, 8, 1), 200.0, np.float32)),
     ValueError, r'pixels span \[200, 200\]; the library range is \[-1, 1\]'),
    ('synset-nan', lambda t: _score(np.full((4, 8, 8, 1), np.nan, np.float32)), ValueError,
     r'hold 256 NaN or Inf pixels'),
    ('convnet-too-deep', lambda t: ConvNet((28, 28, 1), 10, depth=6, rngs=nnx.Rngs(0)),
     ValueError, r'depth 6 halves images .* below 1x1 pixel; the largest depth that fits is 5'),
]


def _pgfm_validate(sections=None, pull=None, **values):
  config = load_config_file(os.path.join(ROOT, 'configs', 'pgfm.py'), 'digits')
  config.pgfm.update(values)
  config.pgfm.prototype_guidance.update(pull or {})
  for section, settings in (sections or {}).items():
    config[section].update(settings)
  validate(config)


def _foreign_latent_cache(tmp_path):
  path = tmp_path / 'latents.npz'
  np.savez(path, x_train=np.zeros((2, 2, 2, 4)), label_train=[0, 1], x_test=np.zeros((2, 2, 2, 4)),
           label_test=[0, 1], fingerprint='aaaa', scale=1.0)
  latents.load(str(path), fingerprint='bbbb')


PGFM_CASES = [
    ('t-stop-outside-0-1', lambda t: _pgfm_validate(pull={'t_stop': 1.5}), ValueError,
     r'config.pgfm.prototype_guidance: PrototypeGuidance.t_stop must lie in \[0, 1\]; got 1.5'),
    ('negative-delta', lambda t: _pgfm_validate(pull={'delta': -0.1}), ValueError,
     r'config.pgfm.prototype_guidance: PrototypeGuidance.delta must be >= 0'),
    ('straight-w0-above-1', lambda t: _pgfm_validate(pull={'form': 'straight', 'w0': 1.5}),
     ValueError, r'PrototypeGuidance.w0 must be \[0, 1\] for the straight form'),
    ('unknown-guidance-form', lambda t: _pgfm_validate(pull={'form': 'curved'}), ValueError,
     r"config.pgfm.prototype_guidance: PrototypeGuidance.form='curved' is not one of"),
    ('unknown-schedule', lambda t: _pgfm_validate(pull={'schedule': 'step'}), ValueError,
     r"PrototypeGuidance.schedule='step' is not one of"),
    ('zero-sampling-steps', lambda t: _pgfm_validate(steps=0), ValueError,
     r'config.pgfm.steps=0 must be >= 1'),
    ('ipc-above-class-latents', lambda t: pgfm.class_prototypes(
        np.zeros((3, 2, 2, 4)), np.array([0, 0, 1]), 2), ValueError,
     r'IPC must be in \[1, 1\] \(class 1 has 1 latents\); got 2'),
    ('latent-cache-of-another-vae', _foreign_latent_cache, ValueError,
     r'latents of VAE aaaa, but the VAE in use is bbbb; delete the file'),
    ('ipc-below-1', lambda t: pgfm.class_prototypes(np.zeros((3, 2, 2, 4)), np.zeros(3, int), 0),
     ValueError, r'IPC must be in \[1, 3\] \(class 0 has 3 latents\); got 0'),
    ('unconditional-pgfm', lambda t: _pgfm_validate(
        {'data': {'conditional': False}, 'fm': {'label_dropout': 0.0}}), ValueError,
     r'pgfm" needs a class-conditional latent flow: set config.data.conditional=True'),
    ('latent-cache-missing', lambda t: latents.load(str(t / 'none.npz')), FileNotFoundError,
     r'none.npz does not exist; make it with flowdistill.condense.latents.load_or_encode'),
]


def test_pgfm_finished_run_refuses_missing_or_foreign_parts(tmp_path, monkeypatch, good_run):
  """What the PGFM benchmarks read back (`load_finished`): each missing or foreign stage is
  named with the command that makes it, in the order the run makes them."""
  monkeypatch.setenv('FLOWDISTILL_CACHE', str(tmp_path / 'cache'))
  config = load_config_file(os.path.join(ROOT, 'configs', 'pgfm.py'), 'digits')
  config.pgfm.vae.steps = 2
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text(config.to_json())
  make = r'train it with `python -m flowdistill.main --config=configs/pgfm.py:digits'
  with pytest.raises(FileNotFoundError, match=r'No VAE of this run is cached .*' + make):
    pgfm_workdir.load_finished(str(workdir))
  dataset = protocol.with_validation(sources.load(config.data), config.dd)[0]  # as the run
  frozen = frozen_vae.load_or_train(dataset.train, pgfm_workdir.vae_settings(config))
  with pytest.raises(FileNotFoundError, match=r'latent_fm holds no latent flow; ' + make):
    pgfm_workdir.load_finished(str(workdir))
  shutil.copytree(good_run, workdir / 'latent_fm')
  with pytest.raises(ValueError, match=r'models data of shape \(2,\), but the VAE latents have '
                     r'shape \(2, 2, 4\): it was trained on another VAE'):
    pgfm_workdir.load_finished(str(workdir))
  shutil.rmtree(workdir / 'latent_fm')
  unconditional = method_config()
  unconditional.data.update(source='latent', path=latents.cache_path(frozen, 'mean'),
                            batch_size=16)
  unconditional.model.update(name='unet', channels=(8, 8), attention=False, time_dim=8)
  unconditional.train.update(steps=1, ckpt_every=1)
  configured.train_fm(unconditional, str(workdir / 'latent_fm'))
  with pytest.raises(ValueError, match=r'latent_fm is not class-conditional; PGFM guides'):
    pgfm_workdir.load_finished(str(workdir))


def _sfm_validate(**values):
  config = load_config_file(os.path.join(ROOT, 'configs', 'sfm.py'), 'digits')
  config.sfm.update(values)
  validate(config)


def _foreign_statistics(tmp_path):
  path = tmp_path / 'statistics.npz'
  np.savez(path, fingerprint='aaaa', mu=np.zeros((2, 3)), nu=np.zeros((2, 3)),
           flow=np.zeros((2, 3)), weight=np.zeros((3, 2)), bias=np.zeros(2), golden_accuracy=0.5)
  sfm_setup.load_statistics(str(path), 'bbbb')


def _probe(images, **kwargs):
  x = jnp.asarray(images)
  golden = linear_probe.Head(jnp.zeros((kwargs.pop('golden_dim', 3), 2)), jnp.zeros(2))
  protocol = linear_probe.ProbeProtocol(runs=1, epochs=1, **kwargs)
  linear_probe.evaluate_probe(lambda z: z.reshape(len(z), -1), x, np.arange(2),
                              np.zeros((2, 3)), np.arange(2), 2, jax.random.key(0), protocol,
                              augment=lambda z, k: z, teacher_embed=lambda z: z.reshape(
                                  len(z), -1), golden=golden)


SFM_CASES = [
    ('statistics-of-another-backbone', _foreign_statistics, ValueError,
     r'statistics of backbone aaaa, but the backbone in use is bbbb; delete the file and rerun '
     r'method="sfm"'),
    ('one-class', lambda t: sfm.real_statistics(np.zeros((3, 2)), np.zeros(3, int), 1),
     ValueError, r'at least 2 classes \(ν_c, the mean of the other classes, is undefined for '
     r'C = 1\)'),
    ('ipc-0', lambda t: sfm.make_sfm_loss(None, {}, 2, 0, augment=None), ValueError,
     r'IPC \(images per class\) must be >= 1; got 0'),
    ('zero-copies', lambda t: _sfm_validate(copies=0), ValueError,
     r'config.sfm.copies=0 must be >= 1'),
    ('lgm-zero-copies', lambda t: sfm.make_lgm_loss(None, 2, 1, augment=None, copies=0),
     ValueError, r'augmented copies A must be >= 1; got 0'),
    ('projector-dims-mismatch', lambda t: _probe(np.zeros((2, 3)), mode='ci', golden_dim=4),
     ValueError, r'golden head W\* takes 4 features but the distillation backbone gives 3'),
    ('unknown-method', lambda t: _sfm_validate(sets=('sfm', 'mtt')), ValueError,
     r"config.sfm.sets has \['mtt'\]"),
    ('unknown-denominator', lambda t: _sfm_validate(nontarget_denominator='all'), ValueError,
     r"config.sfm.nontarget_denominator='all' is not one of"),
    ('unknown-ci-mode', lambda t: _sfm_validate(probes=('normal', 'inherit')), ValueError,
     r"config.sfm.probes has \['inherit'\]"),
    ('probe-epoch-chosen-on-test', lambda t: _sfm_validate(probe_best_epoch=True), ValueError,
     r'Unknown config key config.sfm.probe_best_epoch'),
    ('images-out-of-range', lambda t: _probe(np.full((2, 3), 2.0)), ValueError,
     r'Synthetic images must lie in \[-1, 1\]; got values in \[2, 2\]'),
]




def _api_model():
  model = method_config().model
  model.update(hidden=16, depth=1, time_dim=8)
  return build_model(model, (2,))


def _api_loss(batch):
  apply_fn, params = _api_model()
  loss_fn = fm.make_loss(apply_fn, paths.get_path('linear'))
  return loss_fn(params, batch, jax.random.key(0))


def _nan_params_sample(t):
  apply_fn, params = _api_model()
  params = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
  return ode.sample(apply_fn, params, jax.random.key(0), 4, (2,), steps=2, check_finite=True)


def _nan_params_likelihood(t):
  apply_fn, params = _api_model()
  params = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
  return ode.log_likelihood(apply_fn, params, jnp.zeros((3, 2)), solver='euler', steps=2,
                            check_finite=True)


API_CASES = [
    # the Python API used from another codebase: one error naming the argument
    ('apply-fn-not-callable', lambda t: fm.make_loss(_api_model()[1], paths.get_path('linear')),
     TypeError, r'`apply_fn` must be callable as apply_fn\(params, x, t, \*, cond=None\); got '
                r'a dict'),
    ('batch-without-x', lambda t: _api_loss({'data': jnp.zeros((4, 2))}), TypeError,
     r"`batch` must be a dict with 'x' .*got \['data'\]"),
    ('batch-not-a-dict', lambda t: _api_loss(jnp.zeros((4, 2))), TypeError,
     r"`batch` must be a dict with 'x' .*got ArrayImpl"),
    ('integer-data', lambda t: _api_loss({'x': jnp.zeros((4, 2), jnp.int32)}), TypeError,
     r"`batch\['x'\]` must be floating-point data; got dtype int32"),
    ('data-without-batch-axis', lambda t: ode.log_likelihood(*_api_model(), jnp.zeros(2)),
     ValueError, r'`x` must be \[B, ...\] .*got shape \(2,\). For B one-dimensional points'),
    ('data-of-another-dimension', lambda t: _api_loss({'x': jnp.zeros((4, 3))}), ValueError,
     r'`apply_fn` failed on x of shape \(4, 3\) \(TypeError: .*the shape, and the labels'),
    ('sampler-start-of-another-dimension',
     lambda t: ode.solve(ode.velocity_fn(*_api_model()), jnp.zeros((4, 5)), steps=2),
     ValueError, r'`apply_fn` failed on x of shape \(4, 5\)'),
    ('model-output-of-another-shape',
     lambda t: ode.solve(ode.velocity_fn(lambda p, x, t, cond=None: x[:, :1], None),
                         jnp.zeros((4, 2)), steps=1),
     ValueError, r'`apply_fn` returned \(4, 1\) for x of \(4, 2\)'),
    ('nan-parameters-sampled', _nan_params_sample, FloatingPointError,
     r'4 of 4 samples are NaN or infinite; check the model parameters'),
    ('nan-parameters-likelihood', _nan_params_likelihood, FloatingPointError,
     r'3 of 3 log-likelihoods are NaN or infinite'),
]


CALL_CASES = [(f'{group}-{name}', *rest) for group, cases in (
    ('pgfm', PGFM_CASES), ('sfm', SFM_CASES), ('dd', DD_CASES), ('api', API_CASES))
              for name, *rest in cases]


@pytest.mark.parametrize('case,error,message', [c[1:] for c in CALL_CASES],
                         ids=[c[0] for c in CALL_CASES])
def test_a_bad_call_gets_one_clear_error(tmp_path, case, error, message):
  """PGFM and SFM settings and stages, synthetic sets, and the Python API used from another
  codebase: one error naming the argument or key."""
  with pytest.raises(error, match=message):
    case(tmp_path)
