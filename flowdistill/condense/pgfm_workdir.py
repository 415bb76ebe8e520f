"""A PGFM run's settings and workdir as the library reads them: the VAE and prototype-guidance
settings of a config (`vae_settings`, `prototype_guidance`), the k-means prototypes saved in a
workdir, and a finished workdir read back (`load_finished`: what the PGFM benchmarks start
from; nothing is retrained).
"""

import dataclasses
import json

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from flowdistill import cache, files
from flowdistill.condense import coverage, frozen_vae, latents, pgfm, protocol, synset_eval
from flowdistill.data import sources
from flowdistill.eval import feature_net
from flowdistill.sections import from_section
from flowdistill.train.teacher import Trained, load_trained


def vae_settings(config) -> frozen_vae.VAEConfig:
  """The frozen VAE's settings: `config.pgfm.vae`, seeded by `config.seed`."""
  return from_section(frozen_vae.VAEConfig, config.pgfm.vae, 'pgfm.vae', seed=config.seed)


def prototype_guidance(config) -> pgfm.PrototypeGuidance:
  """The pull toward the prototypes: `config.pgfm.prototype_guidance`."""
  return from_section(pgfm.PrototypeGuidance, config.pgfm.prototype_guidance,
                      'pgfm.prototype_guidance')


def load_or_make_prototypes(workdir: str, lat: dict, ipc: int, config,
                            fingerprint: str) -> np.ndarray:
  """`workdir/prototypes_ipc<ipc>.npz` [C, IPC, h, w, c], k-means of the latents `lat`: read
  where the file matches its manifest and its recipe (the VAE `fingerprint`, the latent mode,
  `dd.seed`, `pgfm.prototype_n_init`), else computed and saved (with one warning where a file
  of another recipe or a damaged one is replaced)."""
  recipe = json.dumps({'vae': fingerprint, 'latent': config.pgfm.latent, 'seed': config.dd.seed,
                       'n_init': config.pgfm.prototype_n_init}, sort_keys=True)
  path = files.join(workdir, f'prototypes_ipc{ipc}.npz')

  def build(p):
    protos = pgfm.class_prototypes(lat['train']['x'], lat['train']['label'], ipc,
                                   seed=config.dd.seed, n_init=config.pgfm.prototype_n_init)
    files.save_npz(p, prototypes=protos, recipe=recipe)
    return protos

  def load(p):
    f = files.load_npz(p)
    return f['prototypes'] if str(f.get('recipe')) == recipe else None

  protos = cache.load_or_build_file(path, build, load, describe='k-means prototypes')
  if protos is None:
    logging.warning('%s holds prototypes of another VAE or k-means recipe; computing them '
                    'again.', path)
    protos = build(path)
    cache.write_file_manifest(path)
  return protos


@dataclasses.dataclass
class FinishedRun:
  """A finished `pgfm` workdir read back: its config, the image data (train: what may be
  distilled), the validation split held out of train, the frozen VAE, the scaled latents, the
  latent flow and the feature net that judges samples."""
  config: ml_collections.ConfigDict
  dataset: sources.Dataset
  validation: dict | None
  frozen: frozen_vae.FrozenVAE
  latents: dict
  flow: Trained
  judge: feature_net.FeatureNet

  workdir: str

  def prototypes(self, ipc: int) -> np.ndarray:
    """[C, IPC, h, w, c], as the run saved them (computed and saved now if it did not)."""
    return load_or_make_prototypes(self.workdir, self.latents, ipc, self.config,
                                   self.frozen.fingerprint)

  def scoring(self, ipc: int, *, runs: int, epochs: int) -> dict:
    """What a benchmark needs to make and score one set of IPC per class: 'labels' int
    [C * IPC], 'assigned' (each sample's prototype index in its class), 'prototypes'
    [C, IPC, ...], 'targets' (each sample's prototype, [C * IPC, ...]), feature-space 'modes',
    the test 'split' (with the validation split) and the evaluator 'protocol' with `runs` and
    `epochs`."""
    protos = self.prototypes(ipc)
    classes = self.dataset.num_classes
    train = self.dataset.train
    proto = protocol.scoring(self.config.dd, ipc, channels=self.dataset.shape[-1])
    return {'labels': np.repeat(np.arange(classes), ipc).astype(np.int32),
            'assigned': np.tile(np.arange(ipc), classes), 'prototypes': protos,
            'targets': jnp.asarray(protos.reshape(-1, *protos.shape[2:])),
            'modes': coverage.class_modes(self.judge.features(train['x']), train['label'], ipc,
                                          seed=self.config.dd.seed),
            'split': synset_eval.test_split(train, self.dataset.test, self.validation),
            'protocol': dataclasses.replace(proto, runs=runs, epochs=epochs)}


def check_flow(flow: Trained, latent_shape: tuple[int, ...], where: str) -> None:
  """Refuses a latent flow PGFM cannot guide: unconditional, or made for other latents."""
  if tuple(flow.data_shape) != tuple(latent_shape):
    raise ValueError(f'The flow in {where} models data of shape {tuple(flow.data_shape)}, but '
                     f'the VAE latents have shape {tuple(latent_shape)}: it was trained on '
                     f'another VAE\'s latents. Delete {where} and rerun method="pgfm" to '
                     'train it on these.')
  if not flow.num_classes:
    raise ValueError(f'The flow in {where} is not class-conditional; PGFM guides a flow '
                     'trained with config.data.conditional=True (method="pgfm" trains one).')


def load_finished(workdir: str) -> FinishedRun:
  """Reads back what `run` trained in `workdir` (nothing is retrained: the VAE and the
  latents come from their caches, the flow from `workdir/latent_fm`)."""
  path = files.join(workdir, 'config.json')
  if not files.exists(path):
    raise FileNotFoundError(f'{path} does not exist: run method="pgfm" with '
                            f'--workdir={workdir} first.')
  config = ml_collections.ConfigDict(files.read_json(path))
  make = (f'`python -m flowdistill.main --config=configs/pgfm.py:{config.data.source} '
          f'--workdir={workdir}` (with the config of that run)')
  dataset, validation = protocol.with_validation(sources.load(config.data), config.dd)
  settings = vae_settings(config)
  frozen = frozen_vae.load_cached(dataset.train, settings)
  if frozen is None:
    folder = frozen_vae.cache_folder(dataset.train, settings)[1]
    raise FileNotFoundError(f'No VAE of this run is cached ({folder} holds no complete entry); '
                            f'train it with {make}.')
  flow_dir = files.join(workdir, 'latent_fm')
  if not files.isdir(files.join(flow_dir, 'checkpoints')):
    raise FileNotFoundError(f'{flow_dir} holds no latent flow; train it with {make}.')
  lat = latents.load_or_encode(frozen, dataset.train, dataset.test, mode=config.pgfm.latent,
                               seed=config.seed)
  flow = load_trained(flow_dir)
  check_flow(flow, lat['train']['x'].shape[1:], flow_dir)
  judge = feature_net.load_or_train(dataset.train, dataset.test,
                                    steps=config.eval.classifier_steps, seed=config.seed)
  return FinishedRun(config, dataset, validation, frozen, lat, flow, judge, workdir)
