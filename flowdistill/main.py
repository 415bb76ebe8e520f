"""Command line: `python -m flowdistill.main --config=configs/x.py[:arg] --workdir=DIR`.

Overrides: `--config.train.steps=500`. Trains (resuming from DIR), then evaluates as the config
says; checkpoints, metrics (JSON lines, TensorBoard), figures and a results table go to DIR.
The method is `config.method`, looked up in `flowdistill.experiments.METHODS`.
"""

import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

from flowdistill.train import parallel
from flowdistill.train.checkpoint import check_local_path

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and results.')
flags.mark_flags_as_required(['config', 'workdir'])


def _quiet_orbax(record) -> bool:
  return record.levelno >= std_logging.WARNING or 'orbax' not in record.pathname


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_quiet_orbax)
  config = _CONFIG.value
  check_local_path(_WORKDIR.value)
  parallel.maybe_initialize_distributed(config.distributed)
  import jax  # noqa: PLC0415  (device queries only after the optional distributed start-up)

  from flowdistill import experiments  # noqa: PLC0415
  from flowdistill.config import validate  # noqa: PLC0415

  validate(config, num_devices=jax.device_count(), num_processes=jax.process_count())
  logging.info('Config:\n%s', config)
  experiments.get(config.method).run(config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
