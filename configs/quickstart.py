"""Quickstart: flow matching on a 2-D toy set (default checkerboard), ~1-3 min on 2 CPU cores.

python -m flowdistill.main --config=configs/quickstart.py --workdir=/tmp/fd-quickstart
python -m flowdistill.main --config=configs/quickstart.py:moons --workdir=/tmp/fd-moons
"""

from flowdistill.config import parse_arg
from flowdistill.experiments import method_config


def get_config(arg: str = ''):
  config = method_config()
  config.data.name = parse_arg(arg, data='checkerboard').data
  config.data.batch_size = 1024
  config.train.steps = 4000
  config.train.ckpt_every = 1000
  config.train.log_every = 200
  config.train.steps_per_call = 10  # Same result as 1 here; the loop keeps up with its step.
  config.optim.lr = 2e-3
  config.optim.schedule = 'cosine'
  config.optim.warmup_steps = 200
  config.eval.num_samples = 2000
  config.eval.nll_samples = 1000
  return config
