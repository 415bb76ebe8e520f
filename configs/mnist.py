"""Class-conditional U-Net flow matching on MNIST, with classifier-free guidance.

Local files (no download): set FLOWDISTILL_MNIST_DIR to a folder of the four idx .gz files, or
pass --config.data.path=DIR; with internet and prepared tfds data, set
--config.data.path_env='' to read tensorflow-datasets instead. Arg: 'mnist' or 'fashion_mnist'.

python -m flowdistill.main --config=configs/mnist.py --workdir=runs/mnist
"""

from flowdistill.config import base_config


def get_config(arg: str = 'mnist'):
  config = base_config()
  source = arg or 'mnist'
  config.data.update(source=source, path_env=f'FLOWDISTILL_{source.upper()}_DIR',
                     batch_size=128, conditional=True)
  config.model.update(name='unet', channels=(32, 64, 64), num_res_blocks=1, attention=True,
                      time_dim=128)
  config.fm.label_dropout = 0.1
  config.optim.update(lr=5e-4, schedule='cosine', warmup_steps=500)
  config.train.update(steps=20_000, log_every=100, ckpt_every=1000, ema_rates=(0.999,))
  config.eval.update(num_samples=1000, euler_steps=(1, 2, 4, 8, 16, 100), guidance=1.5,
                     nll_samples=256, nll_divergence='hutchinson', adaptive_solver='dopri5',
                     rtol=1e-4, atol=1e-4, classifier_steps=1500)
  return config
