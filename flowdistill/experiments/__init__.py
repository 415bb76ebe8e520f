"""The experiments that `python -m flowdistill.main` runs: one module per method, registered
here by its `METHOD` record (`common.Method`: name, run, config defaults, validation, data
sources). `config.base_config()` and `config.validate()` and the command line read this
registry, so adding a method is its module plus one entry below.
"""

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

METHODS: dict[str, Method] = {m.name: m for m in (
    fm_run.METHOD, flow_map_run.METHOD, local_fm_run.METHOD, reflow_run.METHOD,
    dd_eval_run.METHOD, pgfm_run.METHOD, sfm_run.METHOD,
)}


def get(name: str) -> Method:
  """The registered method called `name` (the value of `config.method`)."""
  if name not in METHODS:
    raise ValueError(f'config.method={name!r} is not one of {sorted(METHODS)}.')
  return METHODS[name]
