"""The Stable Diffusion AutoencoderKL port: diffusers' weight layout, the loader, and the
resumable latent cache that `data.source='latent'` encodes with it."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from flowdistill.condense import latents
from flowdistill.data import sources
from flowdistill.experiments import fm_run, load_config_file, method_config, validate
from flowdistill.models import autoencoder_kl as akl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8,
            latent_channels=4, in_channels=3, out_channels=3, scaling_factor=0.5,
            sample_size=32, act_fn='silu')  # a diffusers config.json; unknown keys ignored


def diffusers_layout(widths, layers, latent=4, channels=3) -> dict[str, tuple[int, ...]]:
  """{key: PyTorch shape} of diffusers' AutoencoderKL state dict, written out from its module
  structure (Encoder / DownEncoderBlock2D / UNetMidBlock2D / Decoder / UpDecoderBlock2D)."""
  keys = {}

  def conv(name, i, o, k=3):
    keys[f'{name}.weight'], keys[f'{name}.bias'] = (o, i, k, k), (o,)

  def norm(name, c):
    keys[f'{name}.weight'], keys[f'{name}.bias'] = (c,), (c,)

  def resnet(name, i, o):
    norm(f'{name}.norm1', i)
    conv(f'{name}.conv1', i, o)
    norm(f'{name}.norm2', o)
    conv(f'{name}.conv2', o, o)
    if i != o:
      conv(f'{name}.conv_shortcut', i, o, 1)

  def mid(name, c):
    resnet(f'{name}.resnets.0', c, c)
    resnet(f'{name}.resnets.1', c, c)
    norm(f'{name}.attentions.0.group_norm', c)
    for proj in ('to_q', 'to_k', 'to_v', 'to_out.0'):
      keys[f'{name}.attentions.0.{proj}.weight'] = (c, c)
      keys[f'{name}.attentions.0.{proj}.bias'] = (c,)

  conv('encoder.conv_in', channels, widths[0])
  out = widths[0]
  for i, w in enumerate(widths):
    for j in range(layers):
      resnet(f'encoder.down_blocks.{i}.resnets.{j}', out if j == 0 else w, w)
    out = w
    if i < len(widths) - 1:
      conv(f'encoder.down_blocks.{i}.downsamplers.0.conv', w, w)
  mid('encoder.mid_block', widths[-1])
  norm('encoder.conv_norm_out', widths[-1])
  conv('encoder.conv_out', widths[-1], 2 * latent)
  conv('quant_conv', 2 * latent, 2 * latent, 1)
  conv('post_quant_conv', latent, latent, 1)
  rev = widths[::-1]
  conv('decoder.conv_in', latent, rev[0])
  mid('decoder.mid_block', rev[0])
  out = rev[0]
  for i, w in enumerate(rev):
    for j in range(layers + 1):
      resnet(f'decoder.up_blocks.{i}.resnets.{j}', out if j == 0 else w, w)
    out = w
    if i < len(rev) - 1:
      conv(f'decoder.up_blocks.{i}.upsamplers.0.conv', w, w)
  norm('decoder.conv_norm_out', rev[-1])
  conv('decoder.conv_out', rev[-1], channels)
  return keys


def _write_checkpoint(folder, layout=None, seed=0):
  """A random AutoencoderKL checkpoint in diffusers' layout, with its config.json."""
  layout = layout or diffusers_layout(TINY['block_out_channels'], TINY['layers_per_block'])
  rng = np.random.default_rng(seed)
  weights = {k: (0.2 * rng.standard_normal(shape)).astype(np.float32)
             for k, shape in layout.items()}
  for k in weights:
    if k.endswith(('norm1.weight', 'norm2.weight', 'group_norm.weight', 'norm_out.weight')):
      weights[k] = 1 + weights[k]
  folder.mkdir(parents=True, exist_ok=True)
  save_file(weights, str(folder / 'diffusion_pytorch_model.safetensors'))
  (folder / 'config.json').write_text(json.dumps(TINY))
  return folder / 'diffusion_pytorch_model.safetensors', weights


def test_the_ports_parameters_are_diffusers_keys_and_shapes():
  for widths, layers in (((16, 32), 1), ((128, 256, 512, 512), 2)):
    config = akl.AutoencoderKLConfig(block_out_channels=widths, layers_per_block=layers,
                                     norm_num_groups=8)
    module = akl.AutoencoderKL(config, (64, 64, 3), rngs=akl.nnx.Rngs(0))
    params = akl.nnx.to_pure_dict(akl.nnx.split(module)[1])
    layout = {k: shape for k, (_, shape) in akl.weight_layout(params).items()}
    assert layout == diffusers_layout(list(widths), layers)
  # SD's vae/diffusion_pytorch_model.safetensors: 248 tensors, 83,653,863 parameters.
  assert len(layout) == 248 and sum(np.prod(s) for s in layout.values()) == 83_653_863


def test_loaded_weights_encode_and_decode_like_the_pytorch_layout(tmp_path):
  path, weights = _write_checkpoint(tmp_path / 'vae')
  config = akl.read_config(str(path))
  assert config.block_out_channels == (16, 32) and config.scaling_factor == 0.5
  module, fingerprint = akl.load_autoencoder_kl(str(path), (8, 8, 3), config)
  assert len(fingerprint) == 16
  x = np.random.default_rng(1).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  # conv_in by hand in PyTorch's layout: NCHW cross-correlation with [out, in, kh, kw].
  w, b = weights['encoder.conv_in.weight'], weights['encoder.conv_in.bias']
  padded = np.pad(x.transpose(0, 3, 1, 2), ((0, 0), (0, 0), (1, 1), (1, 1)))
  expected = np.zeros((2, 16, 8, 8), np.float32)
  for i in range(8):
    for j in range(8):
      expected[:, :, i, j] = np.einsum('bchw,ochw->bo', padded[:, :, i:i + 3, j:j + 3], w) + b
  np.testing.assert_allclose(np.asarray(module.encoder.conv_in(x)),
                             expected.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
  mean, logvar = module.encode(x)
  assert mean.shape == logvar.shape == (2, 4, 4, 4) == (2, *module.latent_shape)
  assert module.decode(mean).shape == x.shape
  assert np.all(np.isfinite(np.asarray(module.decode(mean))))


def test_missing_or_misshaped_weight_is_refused_by_name(tmp_path):
  layout = diffusers_layout([16, 32], 1)
  del layout['decoder.up_blocks.1.resnets.0.conv_shortcut.weight']
  path, _ = _write_checkpoint(tmp_path / 'missing', layout)
  with pytest.raises(ValueError, match=r"no weight 'decoder.up_blocks.1.resnets.0.conv_shortcut"
                                       r".weight' \(shape \[16, 32, 1, 1\]\)"):
    akl.load_autoencoder_kl(str(path), (8, 8, 3), akl.read_config(str(path)))
  layout = diffusers_layout([16, 32], 1)
  layout['encoder.mid_block.attentions.0.to_q.weight'] = (32, 16)
  path, _ = _write_checkpoint(tmp_path / 'shape', layout)
  with pytest.raises(ValueError, match=r"weight 'encoder.mid_block.attentions.0.to_q.weight' "
                                       r'has shape \[32, 16\], but .* needs \[32, 32\]'):
    akl.load_autoencoder_kl(str(path), (8, 8, 3), akl.read_config(str(path)))
  with pytest.raises(FileNotFoundError, match='No AutoencoderKL weights at'):
    akl.load_autoencoder_kl(str(tmp_path / 'none.safetensors'), (8, 8, 3))


def test_latent_source_encodes_once_and_resumes_after_a_kill(tmp_path, monkeypatch):
  path, _ = _write_checkpoint(tmp_path / 'vae')
  config = method_config()
  config.data.update(source='latent', path=str(tmp_path / 'latents.npz'), conditional=True)
  config.data.encode.update(vae=str(path), source='digits')
  encoded = []
  original = latents.FrozenVAE.latents

  def dies_after_two_chunks(self, x, **kw):
    if len(encoded) == 2:
      raise KeyboardInterrupt  # the run is killed while encoding the third chunk
    encoded.append(len(x))
    return original(self, x, **kw)

  monkeypatch.setattr(latents.FrozenVAE, 'latents', dies_after_two_chunks)
  with pytest.raises(KeyboardInterrupt):
    sources.load(config.data)
  assert not (tmp_path / 'latents.npz').exists()
  assert len(list((tmp_path / 'latents.npz.parts').glob('*.npy'))) == 2
  monkeypatch.setattr(latents.FrozenVAE, 'latents', original)
  resumed = sources.load(config.data)
  assert not (tmp_path / 'latents.npz.parts').exists()

  config.data.path = str(tmp_path / 'straight.npz')
  straight = sources.load(config.data)
  np.testing.assert_array_equal(resumed.train['x'], straight.train['x'])
  np.testing.assert_array_equal(resumed.test['label'], straight.test['label'])
  assert resumed.shape == (4, 4, 4) and resumed.num_classes == 10
  assert latents.load(str(tmp_path / 'latents.npz'))['scale'] == 0.5


def test_imagenet_latent_config_runs_on_cpu_with_fsdp_bf16_and_a_tiny_vae(tmp_path, monkeypatch):
  """configs/imagenet_latent.py as a pod would run it (latent cache encoded on first use, DiT,
  bfloat16, FSDP over 8 devices), shrunk: a tiny VAE in SD's layout and the built-in digits."""
  monkeypatch.setenv('FLOWDISTILL_CACHE', str(tmp_path / 'cache'))
  path, _ = _write_checkpoint(tmp_path / 'vae')
  config = load_config_file(os.path.join(ROOT, 'configs', 'imagenet_latent.py'), 'tiny')
  assert (config.model.dit, config.model.dtype, config.train.mesh.fsdp) == ('tiny', 'bfloat16', 8)
  config.data.update(path=str(tmp_path / 'latents.npz'), batch_size=32)
  config.data.encode.update(vae=str(path), source='digits', path='')
  config.train.update(steps=10, ckpt_every=10, log_every=5)
  config.eval.update(num_samples=40, euler_steps=(2,), nll_samples=4, classifier_steps=30)
  validate(config, num_devices=8)
  result = fm_run.run(config, str(tmp_path / 'run'))
  assert result['step'] == 10 and [r['sampler'] for r in result['rows']] == ['euler-2', 'dopri5']
  assert (tmp_path / 'latents.npz').exists()
