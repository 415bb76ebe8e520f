"""SFM (method 'sfm'): statistical flow matching and linear gradient matching for linear probes
on a frozen SimCLR backbone trained by the library, with classifier inheritance.

Arg: 'data[,preset]': data 'mnist' (default; FLOWDISTILL_MNIST_DIR or --config.data.path),
'cifar10' (tfds or data.path; for an accelerator: a wider backbone, longer pre-training) or
'digits' (built-in 8x8, a quick end-to-end look); preset 'paper' (the SFM/LGM protocol: 5000
distillation steps, 1000 probe epochs, 5 runs) or 'cpu' (named reductions for this CPU).

FLOWDISTILL_MNIST_DIR=../shared/data/mnist \
  python -m flowdistill.main --config=configs/sfm.py:mnist,cpu --workdir=runs/sfm-mnist-cpu
"""

from flowdistill.config import MNIST_DATA, check_preset, parse_arg
from flowdistill.experiments import method_config

PRESETS = ('paper', 'cpu')


def get_config(arg: str = ''):
  arg = parse_arg(arg, data='mnist', preset='paper')
  check_preset('configs/sfm.py', arg.preset, PRESETS)
  config = method_config('sfm')
  config.model.name = 'unet'  # unused here; image data sets take the U-Net
  config.dd.update(ipcs=(1, 10), preset=arg.preset)
  if arg.data == 'mnist':
    config.data.update(**MNIST_DATA)
  elif arg.data == 'cifar10':
    config.data.update(source='cifar10', conditional=True)
    config.sfm.ssl.update(widths=(64, 128, 256, 512), steps=50_000)
    config.sfm.update(cross_widths=(64, 128, 256, 384), param='pyramid')
  elif arg.data == 'digits':
    config.data.update(source='digits', conditional=True)
    config.sfm.ssl.update(steps=500, widths=(16, 32, 64))
    config.sfm.cross_widths = (16, 32, 48)
  else:
    raise ValueError(f"configs/sfm.py: data must be 'mnist', 'cifar10' or 'digits'; got "
                     f'{arg.data!r}.')
  if arg.preset == 'cpu':
    config.sfm.update(steps=1000, snapshot_every=100)
    config.sfm.probe.epochs = 300
    if arg.data == 'mnist':
      config.sfm.cross_widths = (16, 32, 64, 128)  # φ_e pre-trains in ~15 min instead of 35
  return config
