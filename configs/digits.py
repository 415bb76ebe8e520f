"""Class-conditional flow matching on scikit-learn's built-in 8x8 digits (no files).

Arg: 'unet' (default) or 'dit' (the tiny DiT of `flowdistill.models.dit.PRESETS`, patch 2:
16 tokens).

python -m flowdistill.main --config=configs/digits.py --workdir=runs/digits
python -m flowdistill.main --config=configs/digits.py:dit --workdir=runs/digits-dit
"""

from flowdistill.config import parse_arg
from flowdistill.experiments import method_config


def get_config(arg: str = ''):
  arg = parse_arg(arg, model='unet')
  config = method_config()
  config.data.update(source='digits', batch_size=128, conditional=True)
  if arg.model == 'unet':
    config.model.update(name='unet', channels=(32, 64, 64), num_res_blocks=1, attention=False,
                        time_dim=64)
  elif arg.model == 'dit':
    config.model.update(name='dit', dit='tiny', patch_size=2)
  else:
    raise ValueError(f"configs/digits.py: model must be 'unet' or 'dit'; got {arg.model!r}.")
  config.fm.label_dropout = 0.1
  config.optim.update(lr=1e-3, schedule='cosine', warmup_steps=200)
  config.train.update(steps=3000, log_every=100, ckpt_every=1000, ema_rates=(0.995,),
                      eval_ema=0.995)
  config.eval.update(num_samples=297, euler_steps=(1, 2, 4, 8, 16, 100), cfg_scale=1.5,
                     nll_samples=297, nll_divergence='hutchinson', rtol=1e-4, atol=1e-4,
                     classifier_steps=500)
  return config
