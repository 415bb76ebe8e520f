"""Reflow and piecewise reflow of a trained teacher, with or without marginal alignment.

Arg: 'variant,data' (`config.parse_arg` fields, both optional) with variant in reflow |
piecewise | reflow-ma | piecewise-ma (default reflow) and data a toy set (default
checkerboard) or 'mnist' (a class-conditional U-Net student of a configs/mnist.py teacher,
which it distils with that teacher's guidance). 'piecewise' uses 2 windows; '-ma' adds the
marginal-alignment regulariser, time-consistent by default; `--config.reflow.align_time=clipped`
gives the earlier form (the last window's map runs to t = 1 while the teacher's score is taken
at 1 - score_eps) for comparison.
Teacher pairs are cached in WORKDIR/pairs, or in --config.reflow.pairs_dir to share them:

python -m flowdistill.main --config=configs/quickstart.py --workdir=runs/teacher
python -m flowdistill.main --config=configs/reflow.py:piecewise-ma \
    --config.teacher.workdir=runs/teacher --workdir=runs/piecewise-ma
python -m flowdistill.main --config=configs/reflow.py:reflow \
    --config.teacher.workdir=runs/reflow --workdir=runs/2-rectified   # reflow again
"""

from flowdistill.config import MNIST_DATA, MNIST_EVAL, MNIST_UNET, parse_arg
from flowdistill.experiments import method_config

VARIANTS = ('reflow', 'piecewise', 'reflow-ma', 'piecewise-ma')


def get_config(arg: str = ''):
  arg = parse_arg(arg, variant='reflow', data='checkerboard')
  variant = arg.variant
  if variant not in VARIANTS:
    raise ValueError(f'configs/reflow.py:{variant!r}: choose one of {list(VARIANTS)}.')
  config = method_config('reflow')
  config.data.name = arg.data
  # the -ma settings are those chosen on validation W2 on the three 2-D sets and on validation
  # FD on MNIST (benchmarks/RESULTS.md, issue 34)
  config.reflow.update(windows=2 if variant.startswith('piecewise') else 1, num_pairs=50_000,
                       align_weight=1e-4 if variant.endswith('-ma') else 0.0, score_eps=0.05,
                       align_warmup=250, align_logdet='hutchinson', align_time='consistent')
  config.optim.update(lr=1e-3, schedule='cosine', warmup_steps=200)
  config.train.update(steps=3000, ckpt_every=1000, log_every=200)
  config.eval.update(num_samples=2000, nll_samples=1000, euler_steps=(1, 2, 4, 8))
  if arg.data == 'mnist':
    config.data.update(**MNIST_DATA)
    config.model.update(**MNIST_UNET)
    config.reflow.update(num_pairs=20_000, pair_chunk=500, pair_rtol=1e-4, pair_atol=1e-4,
                         kl_samples=256)
    config.optim.update(lr=2e-4, warmup_steps=500)
    config.train.update(steps=20_000, log_every=100)
    config.eval.update(**MNIST_EVAL, cfg_scale=1.5)
  return config
