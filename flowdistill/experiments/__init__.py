"""The experiments that `python -m flowdistill.main` runs: one module per method, registered
here by its `METHOD` record (`common.Method`: name, run, config section, validation, data
sources). The registry builds a method's full config (`method_config`: the shared sections of
`flowdistill.config` plus every method's section), validates it and runs it, so adding a
method is its module plus one entry below.
"""

import importlib.util
import os

import ml_collections

from flowdistill import cache, files
from flowdistill import config as shared
from flowdistill.condense import latents
from flowdistill.data import sources
from flowdistill.errors import BadInput
from flowdistill.experiments import (
  dd_eval_run,
  flow_map_run,
  fm_run,
  local_fm_run,
  pgfm_run,
  reflow_run,
  sfm_run,
)
from flowdistill.experiments.common import Method

REGISTRY: dict[str, Method] = {m.name: m for m in (
    fm_run.METHOD, flow_map_run.METHOD, local_fm_run.METHOD, reflow_run.METHOD,
    dd_eval_run.METHOD, pgfm_run.METHOD, sfm_run.METHOD,
)}
sources.register('latent', latents.load_source)


def get(name: str) -> Method:
  """The registered method called `name` (the value of `config.method`)."""
  if name not in REGISTRY:
    raise BadInput(f'config.method={name!r} is not one of {sorted(REGISTRY)}.')
  return REGISTRY[name]


def method_config(name: str = 'fm') -> ml_collections.ConfigDict:
  """Every key with its default, for `config.method = name`: the shared sections and each
  registered method's own section (what every `configs/*.py` starts from)."""
  get(name)
  config = shared.base_config()
  config.method = name
  for method in REGISTRY.values():
    if method.defaults is not None:
      config[method.name] = method.defaults
  return config


def validate(config, num_devices: int | None = None, num_processes: int = 1) -> None:
  """Raises `BadInput` naming the first unknown key or inconsistent value: the shared checks
  (`flowdistill.config.validate`), the data sources the method takes, then its own checks."""
  method = get(config.method)
  shared.validate(config, method_config(config.method), num_devices=num_devices,
                  num_processes=num_processes)
  if config.data.source not in method.sources:
    takers = [m.name for m in REGISTRY.values() if config.data.source in m.sources]
    raise BadInput(f'config.method={method.name!r} does not take config.data.source='
                   f'{config.data.source!r} (it takes {list(method.sources)}); methods that '
                   f'do: {takers}.')
  method.validate(config)


def check_paths(config, workdir: str) -> None:
  """Refuses, before any work, a local data path that does not exist (`MissingInput`), a
  `workdir` that cannot be written and, for a run on images or latents (its evaluation's feature
  network, the dataset-distillation methods' VAE, backbones and reference networks live there),
  a cache root (`$FLOWDISTILL_CACHE`) that cannot; a bucket that does not answer within
  `files.PROBE_TIMEOUT_S` is refused too (`files.check_writable`).
  """
  sources.check_path(config.data)
  if config.data.source in sources.IMAGE_SOURCES + sources.LATENT_SOURCES:
    files.check_writable(cache.cache_root(), what='the cache FLOWDISTILL_CACHE',
                         fix='set FLOWDISTILL_CACHE to a writable folder or gs:// bucket')
  files.check_writable(workdir, what='--workdir', fix='choose a writable --workdir')


def run(config, workdir: str) -> dict:
  """Validates `config` and runs its method in `workdir` (trains, resuming; evaluates)."""
  validate(config)
  return get(config.method).run(config, workdir)


def load_config_file(path: str | os.PathLike, arg: str = ''):
  """`get_config(arg)` of a config file, as `--config=path:arg` would load it."""
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0],
                                                path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
