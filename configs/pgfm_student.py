"""A flow-map student (LMD distillation) of a finished PGFM run's latent flow: PGFM's guided
sampler at 1, 2 and 4 jumps (`pgfm.jump_sample`; benchmarks/pgfm_efficiency.py --student).

Arg: the PGFM run's --workdir (default runs/pgfm-mnist-cpu). The student takes that run's
latent data, model and path, and is warm-started from its flow.

FLOWDISTILL_MNIST_DIR=../shared/data/mnist python -m flowdistill.main \
    --config=configs/pgfm_student.py:runs/pgfm-mnist-cpu --workdir=runs/pgfm-mnist-cpu-student
"""

import json
import os

import ml_collections

from flowdistill.config import MNIST_EVAL, parse_arg
from flowdistill.experiments import method_config


def get_config(arg: str = ''):
  pgfm_workdir = parse_arg(arg, workdir='runs/pgfm-mnist-cpu').workdir
  flow_dir = os.path.join(pgfm_workdir, 'latent_fm')
  path = os.path.join(flow_dir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'configs/pgfm_student.py: {path} does not exist; run '
                            f'--config=configs/pgfm.py:mnist,cpu --workdir={pgfm_workdir} first.')
  with open(path) as f:
    flow = ml_collections.ConfigDict(json.load(f))
  config = method_config('flow_map')
  config.seed = flow.seed
  for section in ('data', 'model', 'path'):
    config[section].update(flow[section])
  config.teacher.workdir = flow_dir
  config.flow_map.update(loss='lmd', scheme='ordered')
  config.optim.update(lr=2e-4, schedule='cosine', warmup_steps=200)
  config.train.update(steps=1000, log_every=100, ckpt_every=250, ema_rates=(0.99,),
                      eval_ema=0.99)  # 0.999 would keep 37 % of the warm start after 1000 steps
  config.eval.update(dict(MNIST_EVAL, nll_samples=64), map_steps=(1, 2, 4, 8),
                     euler_steps=(1, 2, 4, 8, 100), classifier_steps=1500, cfg_scale=1.0)
  return config
