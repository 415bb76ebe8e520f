"""Local flow matching: a chain of small flow-matching blocks (METHODS.md section 3).

Arg: 'data[,distill]' (`config.parse_arg` fields): data a 2-D toy name (default
checkerboard), 'tabular' (the 16-D Gaussian mixture with exact density), 'mnist', or 'digits'
(built-in 8x8, for a quick image run); add ',distill' to distil every block into a one-jump
flow map afterwards (NFE = blocks x jumps):

python -m flowdistill.main --config=configs/local_fm.py --workdir=runs/lfm
python -m flowdistill.main --config=configs/local_fm.py:tabular,distill --workdir=runs/lfm-tab
FLOWDISTILL_MNIST_DIR=../shared/data/mnist \
  python -m flowdistill.main --config=configs/local_fm.py:mnist --workdir=runs/lfm-mnist

Each of the 4 blocks is a quarter-size model (MLP width 120 vs the quickstart's 256: 93 % of
the quickstart's parameters in total on 2-D data, 98 % on the 16-D tabular set), trained
`train.steps` steps; OU steps 0.1, 0.15, 0.225 and a free last block.
`--config.local_fm.num_blocks=1` is global flow matching.
"""

from flowdistill.config import MNIST_EVAL, MNIST_UNET, parse_arg
from flowdistill.experiments import method_config


def get_config(arg: str = ''):
  arg = parse_arg(arg, data='checkerboard', distill=False)
  name = arg.data
  config = method_config('local_fm')
  config.local_fm.update(num_blocks=4, h0=0.1, growth=1.5, warm_start=True, train_size=50_000,
                         distill_steps=2000 if arg.distill else 0)
  config.model.update(hidden=120, depth=3)
  config.optim.update(lr=2e-3, schedule='cosine', warmup_steps=200)
  config.train.update(steps=2000, ckpt_every=1000, log_every=200)
  config.eval.update(num_samples=2000, nll_samples=1000, euler_steps=(1, 2, 4, 8, 25),
                     map_steps=(1, 2))
  if name == 'tabular':
    config.data.update(source='tabular', name='mixture16')
  elif name in ('mnist', 'digits'):
    config.data.update(source=name, batch_size=128,
                       path_env='FLOWDISTILL_MNIST_DIR' if name == 'mnist' else '')
    config.model.update(**MNIST_UNET)
    config.local_fm.update(pushforward_chunk=1000, pushforward_tol=1e-4)
    config.optim.update(lr=2e-4, warmup_steps=500)
    config.train.update(steps=10_000 if name == 'mnist' else 2000, log_every=100)
    config.eval.update(**MNIST_EVAL, euler_steps=(1, 2, 4, 25))
    if name == 'digits':
      config.model.update(channels=(32, 64), attention=False)
  else:
    config.data.name = name
  return config
