"""Class-conditional U-Net flow matching on MNIST, with classifier-free guidance.

Local files (no download): set FLOWDISTILL_MNIST_DIR to a folder of the four idx .gz files, or
pass --config.data.path=DIR; with internet and prepared tfds data, set
--config.data.path_env='' to read tensorflow-datasets instead. Arg: 'mnist' (default) or
'fashion_mnist' (then FLOWDISTILL_FASHION_MNIST_DIR).

python -m flowdistill.main --config=configs/mnist.py --workdir=runs/mnist
"""

from flowdistill.config import MNIST_DATA, MNIST_EVAL, MNIST_UNET, parse_arg
from flowdistill.experiments import method_config


def get_config(arg: str = ''):
  source = parse_arg(arg, source='mnist').source
  config = method_config()
  config.data.update(**MNIST_DATA)
  config.data.update(source=source, path_env=f'FLOWDISTILL_{source.upper()}_DIR')
  config.model.update(**MNIST_UNET)
  config.fm.label_dropout = 0.1
  config.optim.update(lr=5e-4, schedule='cosine', warmup_steps=500)
  config.train.update(steps=20_000, log_every=100, ckpt_every=1000, ema_rates=(0.999,))
  config.eval.update(**MNIST_EVAL, euler_steps=(1, 2, 4, 8, 16, 100), cfg_scale=1.5,
                     adaptive_solver='dopri5', classifier_steps=1500)
  return config
