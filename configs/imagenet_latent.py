"""Class-conditional latent flow matching (SiT) on ImageNet at 256 px in Stable Diffusion's VAE
latent (32x32x4), with a DiT-B/2 or XL/2, bfloat16 compute and FSDP: the pod-scale run.

Arg: 'model[,fsdp=N]': model 'B' (default) or 'XL' (`flowdistill.models.dit.PRESETS`); fsdp the
devices that share one sharded copy of the state (default 8: one v5e/v4 host); the rest of the
pod is data parallel. The latent cache (config.data.path, on a mount every host sees) is
encoded on the first run from the 256x256 image folder `data.encode.path/<split>/<class>/` with
the SD VAE weights `data.encode.vae` (diffusers' vae/diffusion_pytorch_model.safetensors; its
config.json beside it), split over the hosts and resumable.

launch/tpu.sh --pod --tpu my-v5e-64 --zone us-west4-a start -- \
  --config=configs/imagenet_latent.py:XL --workdir=/mnt/shared/runs/sit-xl \
  --config.data.path=/mnt/shared/latents/imagenet256.npz \
  --config.data.encode.vae=/mnt/shared/sd-vae-ft-mse/diffusion_pytorch_model.safetensors \
  --config.data.encode.path=/mnt/shared/imagenet256
"""

from flowdistill.config import parse_arg
from flowdistill.experiments import method_config
from flowdistill.models.dit import PRESETS


def get_config(arg: str = ''):
  arg = parse_arg(arg, model='B', fsdp=8)
  if arg.model not in PRESETS:
    raise ValueError(f'configs/imagenet_latent.py: model must be one of {list(PRESETS)}; got '
                     f'{arg.model!r}.')
  config = method_config()
  config.data.update(source='latent', batch_size=256, conditional=True,
                     path='/mnt/shared/latents/imagenet256.npz')
  config.data.encode.update(source='imagenet2012', path='/mnt/shared/imagenet256', vae='')
  config.model.update(name='dit', dit=arg.model, patch_size=2, dtype='bfloat16')
  config.fm.label_dropout = 0.1  # the null label of classifier-free guidance
  config.optim.update(name='adamw', lr=1e-4, schedule='constant', weight_decay=0.0,
                      grad_clip=1.0)
  config.train.update(steps=400_000, log_every=100, ckpt_every=5000, keep=3,
                      ema_rates=(0.9999,), eval_ema=0.9999)
  config.train.mesh.update(data=-1, fsdp=arg.fsdp)
  config.eval.update(num_samples=10_000, euler_steps=(32, 250), cfg_scale=1.5, nll_samples=256,
                     nll_divergence='hutchinson', rtol=1e-3, atol=1e-3, plot=False)
  return config
