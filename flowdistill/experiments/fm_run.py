"""Experiment `fm`: train a flow-matching model, then report quality and NLL versus NFE.

Its workdir serves as a teacher for the distillation methods.
"""

import jax

from flowdistill.eval import report
from flowdistill.experiments import common
from flowdistill.train import configured


def run(config, workdir: str) -> dict:
  """Trains (resuming from `workdir`), evaluates, writes results; returns the results dict."""
  dataset, apply_fn, state = configured.train_fm(config, workdir)
  if jax.process_index() != 0:
    return {}
  apply_fn = common.eval_apply_fn(config, dataset, apply_fn)
  params = common.eval_params(config, state)
  samplers = report.velocity_samplers(apply_fn, params, config.eval,
                                      **common.cfg_kwargs(config, dataset))
  return common.write_report(config, dataset, samplers, workdir, step=int(state.step),
                             velocity_model=(apply_fn, params))


METHOD = common.Method('fm', run)
