"""PGFM (method 'pgfm'): a frozen VAE, class-conditional latent flow matching, k-means
prototypes and path-to-prototype guided sampling, scored by the dataset-distillation protocol.

Arg: 'data[,preset]': data 'mnist' (default; FLOWDISTILL_MNIST_DIR or --config.data.path),
'cifar10' (tfds or data.path; for an accelerator: wider VAE and U-Net, longer training) or
'digits' (built-in 8x8, a quick end-to-end look); preset 'paper' (protocol reference values) or
'cpu' (the named reductions of configs/dd_protocol.py: R = 3, E = 300, DM 1000 iterations of
64 real images per class; IPC 1 and 10).

FLOWDISTILL_MNIST_DIR=../shared/data/mnist \
  python -m flowdistill.main --config=configs/pgfm.py:mnist,cpu --workdir=runs/pgfm-mnist-cpu
"""

from flowdistill.config import CPU_DM, MNIST_DATA, check_preset, parse_arg
from flowdistill.experiments import method_config

PRESETS = ('paper', 'cpu')
CPU_DD = dict(preset='cpu', runs=3, epochs=(300,), whole_data_epochs=3, ipcs=(1, 10))


def get_config(arg: str = ''):
  arg = parse_arg(arg, data='mnist', preset='paper')
  check_preset('configs/pgfm.py', arg.preset, PRESETS)
  config = method_config('pgfm')
  config.fm.label_dropout = 0.1
  config.optim.update(lr=1e-3, schedule='cosine', warmup_steps=200)
  config.model.update(name='unet', channels=(32, 64, 64), num_res_blocks=1, attention=True,
                      time_dim=128)
  config.train.update(steps=6000, log_every=100, ckpt_every=500, ema_rates=(0.999,))
  config.eval.update(classifier_steps=1500)
  if arg.data == 'mnist':
    config.data.update(**MNIST_DATA)
  elif arg.data == 'cifar10':
    config.data.update(source='cifar10', conditional=True, batch_size=256)
    config.pgfm.vae.update(widths=(64, 128, 256), steps=50_000)
    config.model.update(channels=(128, 256, 256), num_res_blocks=2)
    config.train.update(steps=100_000, ckpt_every=2000)
  elif arg.data == 'digits':
    config.data.update(source='digits', conditional=True, batch_size=64)
    config.pgfm.vae.steps = 500
    config.pgfm.check_samples = 200
    config.model.update(channels=(32, 32), attention=False)
    config.train.update(steps=500)
    config.dd.update(depth=2, ipcs=(1, 10))
  else:
    raise ValueError(f"configs/pgfm.py: data must be 'mnist', 'cifar10' or 'digits'; got "
                     f'{arg.data!r}.')
  if arg.preset == 'cpu':
    config.dd.update(**CPU_DD)
    config.dd_eval.dm.update(**CPU_DM)
  return config
