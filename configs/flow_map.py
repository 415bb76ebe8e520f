"""Flow map matching on a 2-D set: distil a quickstart teacher, or learn a map from scratch.

Arg: '<loss>' or '<loss>,<toy set>' with loss in lmd | emd | pfmm | fmm (default lmd,
checkerboard). LMD/EMD distil a velocity teacher, PFMM a flow-map teacher (a previous stage),
FMM needs none:

python -m flowdistill.main --config=configs/quickstart.py --workdir=runs/teacher
python -m flowdistill.main --config=configs/flow_map.py:lmd \
    --config.teacher.workdir=runs/teacher --workdir=runs/lmd
python -m flowdistill.main --config=configs/flow_map.py:pfmm \
    --config.teacher.workdir=runs/lmd --workdir=runs/pfmm
python -m flowdistill.main --config=configs/flow_map.py:fmm --workdir=runs/fmm
"""

from flowdistill.config import base_config


def get_config(arg: str = 'lmd'):
  loss, _, name = (arg or 'lmd').partition(',')
  config = base_config()
  config.method = 'flow_map'
  config.data.name = name or 'checkerboard'
  config.flow_map.update(loss=loss, scheme='uniform' if loss == 'fmm' else 'ordered')
  config.optim.update(lr=1e-3, schedule='cosine', warmup_steps=200)
  config.train.update(steps=4000, ckpt_every=1000, log_every=200)
  config.eval.update(num_samples=2000, nll_samples=500, map_steps=(1, 2, 4, 8))
  return config
