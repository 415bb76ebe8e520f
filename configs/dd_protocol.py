"""The dataset-distillation protocol (method 'dd_eval'): baselines and saved synthetic sets
scored by ConvNet-3 trained with DSA, as in the DC/DSA/DM reference code.

Arg: 'data[,preset]' (`config.parse_arg` fields): data 'mnist' (default), 'cifar10' (3
channels, flip on, no ZCA; for an accelerator) or 'digits' (built-in 8x8, depth 2, for a quick
look); preset 'paper' (the default) keeps the reference values, 'cpu' makes the named
reductions below, each listed in results.md:

FLOWDISTILL_MNIST_DIR=../shared/data/mnist \
  python -m flowdistill.main --config=configs/dd_protocol.py:mnist,cpu --workdir=runs/dd-cpu
python -m flowdistill.main --config=configs/dd_protocol.py:cifar10 --workdir=runs/dd-cifar \
  --config.dd_eval.synsets='("pgfm_ipc10.npz",)'
"""

from flowdistill.config import CPU_DM, MNIST_DATA, check_preset, parse_arg
from flowdistill.experiments import method_config

# Reductions of the `cpu` preset (2-core CPU): 3 runs instead of 20, 300 epochs instead of
# 1000, a 3-epoch whole-data ConvNet, and DM with 1000 iterations of 64 real images per class.
CPU_DD = dict(runs=3, epochs=(300,), whole_data_epochs=3)
PRESETS = ('paper', 'cpu')


def get_config(arg: str = ''):
  arg = parse_arg(arg, data='mnist', preset='paper')
  check_preset('configs/dd_protocol.py', arg.preset, PRESETS)
  config = method_config('dd_eval')
  config.model.name = 'unet'  # unused here; image data sets take the U-Net
  if arg.data == 'mnist':
    config.data.update(**MNIST_DATA)
  elif arg.data == 'cifar10':
    config.data.update(source='cifar10', conditional=True)  # tfds, or set data.path
  elif arg.data == 'digits':
    config.data.update(source='digits', conditional=True)
    config.dd.update(depth=2, ipcs=(1, 10))
  else:
    raise ValueError(f"configs/dd_protocol.py: data must be 'mnist', 'cifar10' or 'digits'; got "
                     f'{arg.data!r}.')
  if arg.preset == 'cpu':
    config.dd.update(preset='cpu', **CPU_DD)
    config.dd_eval.dm.update(**CPU_DM)
  return config
