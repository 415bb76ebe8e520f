"""Experiment `pgfm`: distil an image set into IPC images per class with path-to-prototype
guided latent flow matching (METHODS.md §4), and score the sets with the protocol of
`dd_eval`.

Stages, each cached or checkpointed so a rerun resumes where the last one stopped:

    VAE            `$FLOWDISTILL_CACHE/vaes/<fingerprint>` (trained once per data and settings)
    latents        `$FLOWDISTILL_CACHE/latents/<VAE fingerprint>-<mode>.npz`
    WORKDIR/config.json  this run's config
    WORKDIR/latent_fm/   the class-conditional latent flow-matching run (config.model/train/fm;
                         its own config.json)
    WORKDIR/prototypes_ipc<n>.npz   k-means prototypes, with the VAE fingerprint
    WORKDIR/cells/<set>_ipc<n>.json WORKDIR/sets/   scored sets, as `dd_eval` writes them

Sets per IPC: `pgfm` (guided), `unguided` (the same sampler with w = 0), `prototypes` (the
decoded k-means centres) and `random` (real images, one subset per run).
"""

import copy
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from flowdistill import files
from flowdistill.condense import coverage, evaluate, latents, pgfm, vae
from flowdistill.data import sources
from flowdistill.eval import feature_net, report
from flowdistill.experiments import common, dd_eval_run, fm_run
from flowdistill.train.teacher import Trained, load_trained

SETS = ('pgfm', 'unguided', 'prototypes', 'random')
DEFAULTS = dict(
    vae_beta=1e-3, vae_steps=6000, vae_batch_size=128, vae_lr=1e-3, vae_latent_channels=4,
    vae_widths=(16, 32, 64),
    latent='mean',             # latents of the train split: posterior 'mean' or a 'sample'
    form='denoiser', w0=1.0, schedule='constant', t_stop=1.0, delta=0.05,  # pgfm.Guidance
    solver='euler', steps=8,   # the guided sampler
    cfg=1.0,                   # classifier-free guidance weight (1: the conditional model)
    prototype_n_init=3,        # k-means restarts per class
    sets=SETS,
    check_samples=1000,        # unguided samples whose labels the feature net checks
)


def guidance(pgfm_config) -> pgfm.Guidance:
  return pgfm.Guidance(form=pgfm_config.form, w0=pgfm_config.w0,
                       schedule=pgfm_config.schedule, t_stop=pgfm_config.t_stop,
                       delta=pgfm_config.delta)


def vae_config(pgfm_config, seed: int) -> vae.VAEConfig:
  return vae.VAEConfig(beta=pgfm_config.vae_beta, steps=pgfm_config.vae_steps,
                       batch_size=pgfm_config.vae_batch_size, lr=pgfm_config.vae_lr,
                       latent_channels=pgfm_config.vae_latent_channels,
                       widths=tuple(pgfm_config.vae_widths), seed=seed)


def validate(flat: dict) -> None:
  if not flat['data.conditional']:
    raise ValueError('config.method="pgfm" needs a class-conditional latent flow: set '
                     'config.data.conditional=True.')
  unknown = [s for s in flat['pgfm.sets'] if s not in SETS]
  if unknown:
    raise ValueError(f'config.pgfm.sets has {unknown}; choose from {list(SETS)}.')
  common.check_choice(flat, 'pgfm.latent', latents.MODES)
  common.check_choice(flat, 'pgfm.solver', ('euler', 'midpoint', 'heun'))
  common.check_positive(flat, ints=('pgfm.vae_steps', 'pgfm.vae_batch_size',
                                    'pgfm.vae_latent_channels', 'pgfm.steps',
                                    'pgfm.prototype_n_init', 'pgfm.check_samples'),
                        floats=('pgfm.vae_lr', 'pgfm.cfg'))
  pgfm.Guidance(form=flat['pgfm.form'], w0=flat['pgfm.w0'], schedule=flat['pgfm.schedule'],
                t_stop=flat['pgfm.t_stop'], delta=flat['pgfm.delta'])


def latent_fm_config(config, latent_path: str):
  """The latent flow-matching run: this config with the latent cache as its data."""
  sub = copy.deepcopy(config)
  sub.method = 'fm'
  sub.data.update(source='latent', path=latent_path, path_env='')
  return sub


def _sampler(apply_fn, config, num_classes: int):
  """Jitted `(params, key, labels, prototypes, w0) -> (latents, nfe)` of config.pgfm."""
  p = config.pgfm
  cfg = None if p.cfg == 1.0 else p.cfg

  @functools.partial(jax.jit, static_argnames=('guided',))
  def sample(params, key, labels, prototypes, guided: bool):
    g = guidance(p) if guided else dataclasses.replace(guidance(p), w0=0.0)
    return pgfm.sample(apply_fn, params, key, labels, prototypes, g, solver=p.solver,
                       steps=p.steps, cfg=cfg, null_label=num_classes if cfg else None)[0]

  return sample


def load_or_make_prototypes(workdir: str, lat: dict, ipc: int, config,
                            fingerprint: str) -> np.ndarray:
  """`workdir/prototypes_ipc<ipc>.npz` [C, IPC, h, w, c], computed from the latents `lat` and
  saved where missing; refused where another VAE (`fingerprint`) made it."""
  path = files.join(workdir, f'prototypes_ipc{ipc}.npz')
  if files.exists(path):
    f = files.load_npz(path)
    if str(f['fingerprint']) != fingerprint:
      raise ValueError(f'{path} holds prototypes of VAE {f["fingerprint"]}, but the VAE in '
                       f'use is {fingerprint}; delete it to recompute them.')
    return f['prototypes']
  protos = pgfm.class_prototypes(lat['train']['x'], lat['train']['label'], ipc,
                                 seed=config.dd.seed, n_init=config.pgfm.prototype_n_init)
  files.save_npz(path, prototypes=protos, fingerprint=fingerprint)
  return protos


@dataclasses.dataclass
class FinishedRun:
  """A finished `pgfm` workdir read back: its config, the image data, the frozen VAE, the
  scaled latents, the latent flow and the feature net that judges samples."""
  config: ml_collections.ConfigDict
  dataset: sources.Dataset
  frozen: vae.FrozenVAE
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
    the test 'split' and the evaluator 'protocol' with `runs` and `epochs`."""
    protos = self.prototypes(ipc)
    classes = self.dataset.num_classes
    train = self.dataset.train
    protocol = dd_eval_run.protocol(self.config.dd, 0, channels=self.dataset.shape[-1])
    return {'labels': np.repeat(np.arange(classes), ipc).astype(np.int32),
            'assigned': np.tile(np.arange(ipc), classes), 'prototypes': protos,
            'targets': jnp.asarray(protos.reshape(-1, *protos.shape[2:])),
            'modes': coverage.class_modes(self.judge.features(train['x']), train['label'], ipc,
                                          seed=self.config.dd.seed),
            'split': evaluate.test_split(train, self.dataset.test),
            'protocol': dataclasses.replace(protocol, runs=runs, epochs=epochs)}


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
  dataset = sources.load(config.data)
  settings = vae_config(config.pgfm, config.seed)
  frozen = vae.load_cached(dataset.train, settings)
  if frozen is None:
    folder = vae.cache_folder(dataset.train, settings)[1]
    raise FileNotFoundError(f'No VAE of this run is cached ({folder} does not exist); train it '
                            f'with {make}.')
  flow_dir = files.join(workdir, 'latent_fm')
  if not files.isdir(files.join(flow_dir, 'checkpoints')):
    raise FileNotFoundError(f'{flow_dir} holds no latent flow; train it with {make}.')
  lat = latents.load_or_encode(frozen, dataset.train, dataset.test, mode=config.pgfm.latent,
                               seed=config.seed)
  flow = load_trained(flow_dir)
  check_flow(flow, lat['train']['x'].shape[1:], flow_dir)
  judge = feature_net.load_or_train(dataset.train, dataset.test,
                                    steps=config.eval.classifier_steps, seed=config.seed)
  return FinishedRun(config, dataset, frozen, lat, flow, judge, workdir)


def run(config, workdir: str) -> dict:
  start = time.perf_counter()
  files.makedirs(workdir)
  # what benchmarks/pgfm_efficiency.py rebuilds the run from
  files.write_bytes(files.join(workdir, 'config.json'), config.to_json().encode())
  dataset = sources.load(config.data)
  p = config.pgfm
  bar = tqdm.tqdm(total=p.vae_steps, desc='VAE', unit='step', leave=False,
                  disable=jax.process_index() > 0)
  frozen = vae.load_or_train(dataset.train, vae_config(p, config.seed),
                             on_progress=lambda done: bar.update(done - bar.n))
  bar.close()
  lat = latents.load_or_encode(frozen, dataset.train, dataset.test, mode=p.latent,
                               seed=config.seed)
  fm_config = latent_fm_config(config, latents.cache_path(frozen, p.latent))
  files.makedirs(files.join(workdir, 'latent_fm'))
  # what configs/pgfm_student.py builds a student from
  files.write_bytes(files.join(workdir, 'latent_fm', 'config.json'), fm_config.to_json().encode())
  _, apply_fn, state = fm_run.train(fm_config, files.join(workdir, 'latent_fm'))
  if jax.process_index() != 0:
    return {}
  params = common.eval_params(config, state)
  sample = _sampler(apply_fn, config, dataset.num_classes)
  judge = feature_net.load_or_train(dataset.train, dataset.test,
                                    steps=config.eval.classifier_steps, seed=config.seed)
  key = jax.random.key(config.seed)
  num_classes = dataset.num_classes

  # Unguided samples: does the latent flow make the right digits?
  n = p.check_samples
  check_labels = jnp.arange(n, dtype=jnp.int32) % num_classes
  check = frozen.decode_scaled(sample(params, jax.random.fold_in(key, 0), check_labels,
                                      jnp.zeros((n, *lat['train']['x'].shape[1:])), False))
  label_accuracy = float(np.mean(judge.predict(check) == np.asarray(check_labels)))
  recon = frozen.decode(frozen.encode(dataset.test['x'])[0])
  recon_accuracy = float(np.mean(judge.predict(recon) == dataset.test['label']))

  split = evaluate.test_split(dataset.train, dataset.test)
  real_features = judge.features(dataset.train['x'])
  cells = []
  files.makedirs(files.join(workdir, 'cells'))
  for ipc_index, ipc in enumerate(config.dd.ipcs):
    protos = load_or_make_prototypes(workdir, lat, ipc, config, frozen.fingerprint)
    flat_protos = protos.reshape(-1, *protos.shape[2:])
    labels = np.repeat(np.arange(num_classes), ipc).astype(np.int32)
    assigned = np.tile(np.arange(ipc), num_classes)
    feature_modes = coverage.class_modes(real_features, dataset.train['label'], ipc,
                                         seed=config.dd.seed)
    latent_modes = coverage.class_modes(lat['train']['x'], lat['train']['label'], ipc,
                                        seed=config.dd.seed)
    set_key = jax.random.fold_in(key, ipc)
    for name in p.sets:
      cell_path = files.join(workdir, 'cells', f'{name}_ipc{ipc}.json')
      if files.exists(cell_path):
        cells.append(files.read_json(cell_path))
        continue
      extra = {}
      if name == 'random':
        synsets = dd_eval_run.baseline_sets('random', ipc, dataset, None, config, set_key)
        z = [frozen.latents(s['x']) for s in synsets]
      else:
        if name == 'prototypes':
          z, seconds = flat_protos, 0.0
        else:
          t0 = time.perf_counter()
          z = np.asarray(sample(params, jax.random.fold_in(set_key, 1), jnp.asarray(labels),
                                jnp.asarray(flat_protos), name == 'pgfm'))
          seconds = time.perf_counter() - t0
          extra['nfe'] = p.steps * (2 if p.solver in ('midpoint', 'heun') else 1)
        extra['landing_rate'] = coverage.landing_rate(z, labels, assigned, protos)
        extra['sample_seconds'] = seconds
        synsets = [{'x': frozen.decode_scaled(z), 'label': labels}]
        z = [z]
      first = synsets[0]
      features = judge.features(first['x'])
      extra['mc_feature'] = coverage.mode_coverage(features, first['label'], feature_modes)['mc']
      extra['fd_per_class'] = coverage.per_class_frechet(features, first['label'], real_features,
                                                         dataset.train['label'])
      extra['mc_latent'] = coverage.mode_coverage(z[0], first['label'], latent_modes)['mc']
      extra['diversity'] = coverage.diversity(z[0], first['label'], lat['train']['x'],
                                              lat['train']['label'])
      synsets[0] = dict(first, extra=extra)
      cell = dd_eval_run.score(name, ipc, synsets, split, config.dd, ipc_index, set_key,
                               workdir)
      files.write_json(cell_path, cell)
      cells.append(cell)
  result = {'cells': cells, 'vae': {**frozen.info, 'fingerprint': frozen.fingerprint,
                                    'recon_label_accuracy': recon_accuracy},
            'unguided_label_accuracy': label_accuracy, 'preset': config.dd.preset,
            'guidance': dataclasses.asdict(guidance(p)),
            'reductions': dd_eval_run.reductions(config),
            'wall_seconds': time.perf_counter() - start}
  report.save_results(workdir, result, _markdown(result, config))
  return result


def _markdown(result: dict, config) -> str:
  rows = []
  for c in result['cells']:
    rows.append({'set': c['set'], 'IPC': c['ipc'],
                 'accuracy %': f'{100 * c["mean"]:.1f} ± {100 * c["std"]:.1f}',
                 'MC feature': c.get('mc_feature'), 'MC latent': c.get('mc_latent'),
                 'landing': c.get('landing_rate', ''), 'diversity': c.get('diversity'),
                 'FD per class': c.get('fd_per_class') or '',
                 'NFE': c.get('nfe', ''), 's/run': c['seconds_per_run']})
  g = result['guidance']
  lines = [f'# PGFM on {config.data.source}, preset `{config.dd.preset}`', '',
           f'Guidance: {g["form"]}, w0 = {g["w0"]} ({g["schedule"]}), t_stop = {g["t_stop"]}, '
           f'δ = {g["delta"]}; {config.pgfm.solver}, {config.pgfm.steps} steps. Accuracy of '
           f'ConvNet-3 trained on each set (mean ± std over {config.dd.runs} runs).', '',
           report.markdown_table(rows, ['set', 'IPC', 'accuracy %', 'MC feature', 'MC latent',
                                        'landing', 'diversity', 'FD per class', 'NFE', 's/run']),
           '',
           f'VAE: scale {result["vae"]["scale"]:.4f}, the feature net labels '
           f'{100 * result["vae"]["recon_label_accuracy"]:.2f} % of test reconstructions '
           'correctly. Unguided latent-FM samples: label accuracy '
           f'{100 * result["unguided_label_accuracy"]:.2f} %.', '']
  if result['reductions']:
    lines += ['Reductions from the paper protocol:', '']
    lines += [f'- `{k}`: {v["here"]} (paper {v["paper"]})'
              for k, v in result['reductions'].items()]
    lines.append('')
  lines.append(f'Wall-clock time of this command: {result["wall_seconds"]:.0f} s.')
  return '\n'.join(lines)


METHOD = common.Method('pgfm', run, DEFAULTS, validate, sources=sources.IMAGE_SOURCES)
