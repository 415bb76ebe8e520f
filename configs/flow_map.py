"""Flow map matching: distil a trained teacher, or learn a map from scratch.

Arg: '<loss>' or '<loss>,<data>' with loss in lmd | emd | pfmm | fmm (default lmd) and data a
toy set (default checkerboard) or 'mnist' (a class-conditional U-Net student of a
configs/mnist.py teacher). LMD/EMD distil a velocity teacher, PFMM a flow-map teacher (a
previous stage), FMM needs none:

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
  if name == 'mnist':
    config.data.update(source='mnist', path_env='FLOWDISTILL_MNIST_DIR', batch_size=128,
                       conditional=True)
    config.model.update(name='unet', channels=(32, 64, 64), num_res_blocks=1, attention=True,
                        time_dim=128)
    config.optim.update(lr=2e-4, warmup_steps=500)
    config.train.update(steps=20_000, log_every=100)
    config.eval.update(num_samples=1000, nll_samples=256, nll_divergence='hutchinson',
                       rtol=1e-4, atol=1e-4, guidance=1.0)
  return config
