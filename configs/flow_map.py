"""Flow map matching: distil a trained teacher, or learn a map from scratch.

Arg: 'loss,data' (`config.parse_arg` fields, both optional): loss in lmd | emd | pfmm | fmm
(default lmd), data a toy set (default checkerboard) or 'mnist' (a class-conditional U-Net
student of a configs/mnist.py teacher, distilling the teacher's guided velocity). LMD/EMD
distil a velocity teacher, PFMM a flow-map teacher (a previous stage), FMM needs none:

python -m flowdistill.main --config=configs/quickstart.py --workdir=runs/teacher
python -m flowdistill.main --config=configs/flow_map.py:lmd \
    --config.teacher.workdir=runs/teacher --workdir=runs/lmd
python -m flowdistill.main --config=configs/flow_map.py:pfmm \
    --config.teacher.workdir=runs/lmd --workdir=runs/pfmm
python -m flowdistill.main --config=configs/flow_map.py:fmm --workdir=runs/fmm
"""

from flowdistill.config import MNIST_DATA, MNIST_EVAL, MNIST_UNET, parse_arg
from flowdistill.experiments import method_config


def get_config(arg: str = ''):
  arg = parse_arg(arg, loss='lmd', data='checkerboard')
  config = method_config('flow_map')
  config.data.name = arg.data
  config.flow_map.update(loss=arg.loss, scheme='uniform' if arg.loss == 'fmm' else 'ordered')
  config.optim.update(lr=1e-3, schedule='cosine', warmup_steps=200)
  config.train.update(steps=4000, ckpt_every=1000, log_every=200)
  config.eval.update(num_samples=2000, nll_samples=500, map_steps=(1, 2, 4, 8))
  if arg.data == 'mnist':
    config.data.update(**MNIST_DATA)
    config.model.update(**MNIST_UNET)
    config.optim.update(lr=2e-4, warmup_steps=500)
    config.train.update(steps=20_000, log_every=100)
    config.eval.update(**MNIST_EVAL, cfg_scale=1.5)
  return config
