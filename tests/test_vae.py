"""The frozen VAE of PGFM: shapes, the KL term, the latent scale and the cache."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flowdistill.condense import frozen_vae, latents
from flowdistill.data import images
from flowdistill.experiments import method_config, validate
from flowdistill.models.vae import VAE
from flowdistill.train import configured, stop


@pytest.mark.parametrize('shape,latent', [((28, 28, 1), (8, 8, 4)), ((32, 32, 3), (8, 8, 4)),
                                          ((8, 8, 1), (2, 2, 4))])
def test_latent_and_reconstruction_shapes(shape, latent):
  model = VAE(shape, rngs=nnx.Rngs(0))
  x = jnp.zeros((2, *shape))
  mean, logvar = model.encode(x)
  assert model.latent_shape == latent and mean.shape == logvar.shape == (2, *latent)
  assert model.decode(mean).shape == x.shape


def test_kl_matches_a_monte_carlo_estimate_of_log_q_minus_log_p():
  key = jax.random.key(0)
  mean = jax.random.normal(key, (3, 2, 2, 1))
  logvar = 0.5 * jax.random.normal(jax.random.fold_in(key, 1), (3, 2, 2, 1))
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(jax.random.fold_in(key, 2),
                                                       (20000, *mean.shape))
  log_q = -0.5 * ((z - mean)**2 / jnp.exp(logvar) + logvar + jnp.log(2 * jnp.pi))
  log_p = -0.5 * (z**2 + jnp.log(2 * jnp.pi))
  samples = (log_q - log_p).reshape(20000, 3, -1).sum(-1)
  se = samples.std(0) / np.sqrt(20000)
  np.testing.assert_array_less(jnp.abs(samples.mean(0) - frozen_vae.kl_divergence(mean, logvar)),
                               4 * se)


def _digits():
  x, y = images.load('digits', 'train')
  return {'x': images.to_float(x), 'label': y}


def test_trained_vae_reconstructs_scales_to_unit_std_and_is_cached(tmp_path):
  train = _digits()
  config = frozen_vae.VAEConfig(steps=300, batch_size=64, lr=3e-3)
  frozen = frozen_vae.load_or_train(train, config, cache_dir=str(tmp_path))
  assert frozen.info['final_recon'] < 0.5 * vae_loss_at_init(train['x'], config)
  z = frozen.latents(train['x'])
  assert z.shape == (len(train['x']), 2, 2, 4)
  assert z.std() == pytest.approx(1.0, rel=1e-4)
  recon = frozen.decode_scaled(z)
  assert recon.shape == train['x'].shape and np.abs(recon).max() <= 1
  again = frozen_vae.load_or_train(train, config, cache_dir=str(tmp_path))
  assert again.scale == frozen.scale and again.fingerprint == frozen.fingerprint
  np.testing.assert_array_equal(again.latents(train['x']), z)


def vae_loss_at_init(x, config):
  model = VAE(x.shape[1:], rngs=nnx.Rngs(config.seed))
  return float(frozen_vae.vae_loss(model, jnp.asarray(x[:256]), jax.random.key(0), config.beta)[1]
               ['recon'])


def test_latent_cache_feeds_the_trainer_and_refuses_another_vae(tmp_path, monkeypatch):
  monkeypatch.setenv('FLOWDISTILL_CACHE', str(tmp_path / 'cache'))
  train = _digits()
  x, y = images.load('digits', 'test')
  test = {'x': images.to_float(x), 'label': y}
  frozen = frozen_vae.load_or_train(train, frozen_vae.VAEConfig(steps=5))
  cached = latents.load_or_encode(frozen, train, test)
  path = latents.cache_path(frozen, 'mean')
  np.testing.assert_allclose(cached['train']['x'], frozen.latents(train['x']), rtol=1e-6)
  assert cached['fingerprint'] == frozen.fingerprint and cached['scale'] == frozen.scale

  config = method_config()
  config.data.update(source='latent', path=path, batch_size=16, conditional=True)
  config.model.update(name='unet', channels=(8, 8), attention=False, time_dim=8)
  config.fm.label_dropout = 0.1
  config.train.update(steps=2, ckpt_every=2, log_every=1)
  validate(config)
  dataset, _, state = configured.train_fm(config, str(tmp_path / 'latent-fm'))
  assert dataset.shape == (2, 2, 4) and dataset.num_classes == 10 and int(state.step) == 2

  other = frozen_vae.load_or_train(train, frozen_vae.VAEConfig(steps=5, seed=1))
  with pytest.raises(ValueError, match=f'VAE {frozen.fingerprint}.*{other.fingerprint}'):
    latents.load_or_encode(other, train, test, path=path)


def test_a_stopped_vae_training_resumes_to_the_same_weights(tmp_path):
  """A stop signal during the VAE's training keeps its fitting state beside the cache entry; the
  rerun continues from it to the weights of a run that never stopped, and removes it."""
  train = _digits()
  config = frozen_vae.VAEConfig(steps=200, batch_size=32)
  entry = str(tmp_path / 'vae')

  def signal_at_100(done):
    if done == 100:
      signal.raise_signal(signal.SIGTERM)

  with stop.watch(), pytest.raises(stop.Stopped):
    frozen_vae.load_or_train(train, config, cache_dir=entry, on_progress=signal_at_100)
  assert os.path.exists(entry + '.partial.npz')
  resumed = frozen_vae.load_or_train(train, config, cache_dir=entry)
  assert not os.path.exists(entry + '.partial.npz')
  fresh = frozen_vae.load_or_train(train, config, cache_dir=str(tmp_path / 'fresh'))
  np.testing.assert_array_equal(resumed.latents(train['x']), fresh.latents(train['x']))
