"""Class-conditional U-Net flow matching on scikit-learn's built-in 8x8 digits (no files).

python -m flowdistill.main --config=configs/digits.py --workdir=runs/digits
"""

from flowdistill.config import base_config


def get_config(arg: str = ''):
  del arg
  config = base_config()
  config.data.update(source='digits', batch_size=128, conditional=True)
  config.model.update(name='unet', channels=(32, 64, 64), num_res_blocks=1, attention=False,
                      time_dim=64)
  config.fm.label_dropout = 0.1
  config.optim.update(lr=1e-3, schedule='cosine', warmup_steps=200)
  config.train.update(steps=3000, log_every=100, ckpt_every=1000, ema_rates=(0.995,),
                      eval_ema=0.995)
  config.eval.update(num_samples=297, euler_steps=(1, 2, 4, 8, 16, 100), guidance=1.5,
                     nll_samples=297, nll_divergence='hutchinson', rtol=1e-4, atol=1e-4,
                     classifier_steps=500)
  return config
