"""Experiment `pgfm`: distil an image set into IPC images per class with path-to-prototype
guided latent flow matching (METHODS.md §4), and score the sets with the protocol of
`dd_eval` (`condense.protocol`).

Stages, each cached or checkpointed so a rerun resumes where the last one stopped:

    VAE            `$FLOWDISTILL_CACHE/vaes/<fingerprint>` (trained once per data and settings)
    latents        `$FLOWDISTILL_CACHE/latents/<VAE fingerprint>-<mode>.npz`
    WORKDIR/config.json  this run's config
    WORKDIR/latent_fm/   the class-conditional latent flow-matching run (config.model/train/fm;
                         its own config.json)
    WORKDIR/prototypes_ipc<n>.npz   k-means prototypes, with the VAE fingerprint
    WORKDIR/cells/<set>_ipc<n>.json WORKDIR/sets/   scored sets, as `dd_eval` writes them (a
                         cell is reused while its set's bytes and the protocol are the same)

Sets per IPC: `pgfm` (guided), `unguided` (the same sampler with w = 0, still warm-started
from the prototypes), `flow` (the conditional flow alone: from noise at t = 0, no pull, no
prototype), `prototypes` (the decoded k-means centres), `random` (real images, one subset per
run) and `dm`.
"""

import copy
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from flowdistill import files, ode
from flowdistill.condense import coverage, frozen_vae, latents, pgfm, protocol, synset_eval
from flowdistill.condense.pgfm_workdir import (
  load_or_make_prototypes,
  prototype_guidance,
  vae_settings,
)
from flowdistill.config import check_choice, check_positive
from flowdistill.data import sources
from flowdistill.errors import BadInput
from flowdistill.eval import feature_net, report
from flowdistill.experiments import common
from flowdistill.sections import section
from flowdistill.train import configured, identity, stop

SETS = ('pgfm', 'unguided', 'flow', 'prototypes', 'random', 'dm')  # dm: config.dd_eval.dm
DEFAULTS = dict(
    vae=section(frozen_vae.VAEConfig, exclude=('seed',)),  # the frozen VAE (seeded by config.seed)
    latent='mean',             # latents of the train split: posterior 'mean' or a 'sample'
    prototype_guidance=section(pgfm.PrototypeGuidance),
    solver='euler', steps=8,   # the guided sampler
    cfg_scale=1.0,             # classifier-free guidance weight (1: the conditional model)
    prototype_n_init=3,        # k-means restarts per class
    sets=('pgfm', 'unguided', 'flow', 'prototypes', 'random'),
    check_samples=1000,        # `flow` samples whose labels the feature net checks
)


def validate(config) -> None:
  if not config.data.conditional:
    raise BadInput('config.method="pgfm" needs a class-conditional latent flow: set '
                   'config.data.conditional=True.')
  unknown = [s for s in config.pgfm.sets if s not in SETS]
  if unknown:
    raise BadInput(f'config.pgfm.sets has {unknown}; choose from {list(SETS)}.')
  flat = identity.flatten(config)
  check_choice(flat, 'pgfm.latent', latents.MODES)
  check_choice(flat, 'pgfm.solver', ode.FIXED_SOLVERS)
  check_positive(flat, ints=('pgfm.steps', 'pgfm.prototype_n_init', 'pgfm.check_samples'),
                 floats=('pgfm.cfg_scale',))
  vae_settings(config)
  prototype_guidance(config)


def latent_fm_config(config, latent_path: str):
  """The latent flow-matching run: this config with the latent cache as its data."""
  sub = copy.deepcopy(config)
  sub.method = 'fm'
  sub.data.update(source='latent', path=latent_path, path_env='')
  return sub


def _sampler(apply_fn, config, num_classes: int):
  """Jitted `(params, key, labels, prototypes, name) -> (latents, nfe)` of config.pgfm, for the
  sampled sets `name`: 'pgfm', 'unguided' (w = 0) or 'flow' (w = 0 from noise at t = 0)."""
  p = config.pgfm
  cfg_scale = None if p.cfg_scale == 1.0 else p.cfg_scale
  pull = prototype_guidance(config)
  pulls = {'pgfm': pull, 'unguided': dataclasses.replace(pull, w0=0.0),
           'flow': dataclasses.replace(pull, w0=0.0, warm_start=0.0)}

  @functools.partial(jax.jit, static_argnames=('name',))
  def sample(params, key, labels, prototypes, name: str):
    g = pulls[name]
    z, info = pgfm.sample(apply_fn, params, key, labels, prototypes, g, solver=p.solver,
                          steps=p.steps, cfg_scale=cfg_scale,
                          null_label=num_classes if cfg_scale else None)
    return z, info['nfe']

  return sample


def run(config, workdir: str) -> dict:
  start = time.perf_counter()
  files.makedirs(workdir)
  # what `condense.pgfm_workdir.load_finished` (the PGFM benchmarks) rebuilds the run from
  files.write_bytes(files.join(workdir, 'config.json'), config.to_json().encode())
  # the VAE, latents, flow, prototypes and judge see only what may be distilled
  dataset, validation = protocol.with_validation(sources.load(config.data), config.dd)
  p = config.pgfm
  settings = vae_settings(config)
  bar = protocol.progress_bar('VAE', settings.steps, unit='step')
  frozen = frozen_vae.load_or_train(dataset.train, settings,
                                    on_progress=lambda done: bar.update(done - bar.n))
  bar.close()
  lat = latents.load_or_encode(frozen, dataset.train, dataset.test, mode=p.latent,
                               seed=config.seed)
  fm_config = latent_fm_config(config, latents.cache_path(frozen, p.latent))
  files.makedirs(files.join(workdir, 'latent_fm'))
  # what configs/pgfm_student.py builds a student from
  files.write_bytes(files.join(workdir, 'latent_fm', 'config.json'), fm_config.to_json().encode())
  stop.check(where='before the latent flow matching')  # its loop handles signals on its own
  _, apply_fn, state = configured.train_fm(fm_config, files.join(workdir, 'latent_fm'))
  if jax.process_index() != 0:
    return {}
  params = common.eval_params(config, state)
  sample = _sampler(apply_fn, config, dataset.num_classes)
  judge = feature_net.load_or_train(dataset.train, dataset.test,
                                    steps=config.eval.classifier_steps, seed=config.seed)
  key = jax.random.key(config.seed)
  num_classes = dataset.num_classes

  # Samples of the flow alone (from noise): does the latent flow make the right digits?
  n = p.check_samples
  check_labels = jnp.arange(n, dtype=jnp.int32) % num_classes
  check = frozen.decode_scaled(sample(params, jax.random.fold_in(key, 0), check_labels,
                                      jnp.zeros((n, *lat['train']['x'].shape[1:])), 'flow')[0])
  label_accuracy = float(np.mean(judge.predict(check) == np.asarray(check_labels)))
  recon = frozen.decode(frozen.encode(dataset.test['x'])[0])
  recon_accuracy = float(np.mean(judge.predict(recon) == dataset.test['label']))

  split = synset_eval.test_split(dataset.train, dataset.test, validation)
  dm_settings = protocol.dm_settings(config.dd_eval.dm, config.dd, dataset.shape[-1])
  real_features = judge.features(dataset.train['x'])

  def make_set(name, ipc, protos, set_key, dm_state=None):
    """(synsets as `protocol.score` takes them, latents of the first) of one set; `dm_state`:
    DM's resume file."""
    flat_protos = protos.reshape(-1, *protos.shape[2:])
    labels = np.repeat(np.arange(num_classes), ipc).astype(np.int32)
    extra = {}
    if name in ('random', 'dm'):
      synsets = protocol.baseline_sets(name, ipc, dataset.train, None, config.dd, set_key,
                                       dm_settings, dm_state=dm_state)
      return synsets, frozen.latents(synsets[0]['x']), extra
    if name == 'prototypes':
      z, seconds = flat_protos, 0.0
    else:
      t0 = time.perf_counter()
      z, nfe = sample(params, jax.random.fold_in(set_key, 1), jnp.asarray(labels),
                      jnp.asarray(flat_protos), name)
      z = np.asarray(z)
      seconds = time.perf_counter() - t0
      extra['nfe'] = int(nfe)
    extra['landing_rate'] = coverage.landing_rate(z, labels, np.tile(np.arange(ipc), num_classes),
                                                  protos)
    extra['sample_seconds'] = seconds
    return [{'x': frozen.decode_scaled(z), 'label': labels}], z, extra

  def cells():
    for ipc in config.dd.ipcs:
      protos = load_or_make_prototypes(workdir, lat, ipc, config, frozen.fingerprint)
      feature_modes = coverage.class_modes(real_features, dataset.train['label'], ipc,
                                           seed=config.dd.seed)
      latent_modes = coverage.class_modes(lat['train']['x'], lat['train']['label'], ipc,
                                          seed=config.dd.seed)
      set_key = jax.random.fold_in(key, ipc)
      proto = protocol.scoring(config.dd, ipc, channels=dataset.shape[-1])
      for name in p.sets:
        # sets made in seconds are keyed by their bytes; DM (minutes) by its recipe
        made = None if name == 'dm' else make_set(name, ipc, protos, set_key)
        content = ({'dm': dataclasses.asdict(dm_settings)} if made is None else
                   protocol.content_hash(*[a for s in made[0] for a in (s['x'], s['label'])]))
        identity = {'set': content, 'protocol': dataclasses.asdict(proto),
                    'seed': config.dd.seed, 'validation': config.dd.validation}

        def make(name=name, ipc=ipc, made=made, protos=protos, feature_modes=feature_modes,
                 latent_modes=latent_modes, proto=proto, set_key=set_key, identity=identity):
          synsets, z, extra = made or make_set(
              name, ipc, protos, set_key,
              dm_state=protocol.state_path(cells_folder, name, ipc, identity))
          first = synsets[0]
          features = judge.features(first['x'])
          extra['mc_feature'] = coverage.mode_coverage(features, first['label'],
                                                       feature_modes)['mc']
          extra['fd_per_class'] = coverage.per_class_frechet(
              features, first['label'], real_features, dataset.train['label'])
          extra['mc_latent'] = coverage.mode_coverage(z, first['label'], latent_modes)['mc']
          extra['diversity'] = coverage.diversity(z, first['label'], lat['train']['x'],
                                                  lat['train']['label'])
          return protocol.score(name, ipc, [dict(first, extra=extra)] + synsets[1:], split,
                                proto, set_key, workdir)

        yield protocol.Cell(name, ipc, identity, make)

  cells_folder = files.join(workdir, 'cells')
  results = protocol.run_cells(cells_folder, cells())
  result = {'cells': results, 'vae': {**frozen.info, 'fingerprint': frozen.fingerprint,
                                      'recon_label_accuracy': recon_accuracy},
            'flow_label_accuracy': label_accuracy, 'preset': config.dd.preset,
            'prototype_guidance': dataclasses.asdict(prototype_guidance(config)),
            'reductions': protocol.reductions(config.dd),
            'wall_seconds': time.perf_counter() - start}
  report.save_results(workdir, result, _markdown(result, config))
  return result


def _markdown(result: dict, config) -> str:
  rows = []
  for c in result['cells']:
    val = f'{100 * c["val_mean"]:.1f} ± {100 * c["val_std"]:.1f}' if 'val_mean' in c else ''
    rows.append({'set': c['set'], 'IPC': c['ipc'], 'val %': val,
                 'test %': f'{100 * c["mean"]:.1f} ± {100 * c["std"]:.1f}',
                 'MC feature': c.get('mc_feature'), 'MC latent': c.get('mc_latent'),
                 'landing': c.get('landing_rate', ''), 'diversity': c.get('diversity'),
                 'FD per class': c.get('fd_per_class') or '',
                 'NFE': c.get('nfe', ''), 's/run': c['seconds_per_run']})
  g = result['prototype_guidance']
  lines = [f'# PGFM on {config.data.source}, preset `{config.dd.preset}`', '',
           f'Prototype guidance: {g["form"]}, w0 = {g["w0"]} ({g["schedule"]}), '
           f't_stop = {g["t_stop"]}, δ = {g["delta"]}, trust {g["trust"] or "off"}, warm start '
           f'{g["warm_start"]}; {config.pgfm.solver}, {config.pgfm.steps} steps. Accuracy of '
           f'ConvNet-3 trained on each set (mean ± std over {config.dd.runs} runs) on the '
           f'validation split held out of train ({config.dd.validation:.0%}; what settings are '
           'chosen on) and on the test split.', '',
           report.markdown_table(rows, ['set', 'IPC', 'val %', 'test %', 'MC feature', 'MC latent',
                                        'landing', 'diversity', 'FD per class', 'NFE', 's/run']),
           '',
           f'VAE: scale {result["vae"]["scale"]:.4f}, the feature net labels '
           f'{100 * result["vae"]["recon_label_accuracy"]:.2f} % of test reconstructions '
           'correctly. Samples of the latent flow alone (from noise, no prototype): label '
           f'accuracy {100 * result["flow_label_accuracy"]:.2f} %.', '']
  lines += protocol.reductions_markdown(result['reductions'])
  lines.append(f'Wall-clock time of this command: {result["wall_seconds"]:.0f} s.')
  return '\n'.join(lines)


METHOD = common.Method('pgfm', run, DEFAULTS, validate, sources=sources.IMAGE_SOURCES)
