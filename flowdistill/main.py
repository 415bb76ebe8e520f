"""Command line: `python -m flowdistill.main --config=configs/x.py[:arg] --workdir=DIR`.

Overrides: `--config.train.steps=500`. Trains (resuming from DIR), then evaluates as the config
says; checkpoints, metrics (JSON lines, TensorBoard), figures and a results table go to DIR.
The method is `config.method`, looked up in the registry `flowdistill.experiments.REGISTRY`,
which validates the config (shared sections and the method's own) before any work.
"""

import contextlib
import logging as std_logging
import signal

from absl import app, flags, logging
from ml_collections import config_flags

from flowdistill.train import lease, parallel
from flowdistill.train.checkpoint import check_workdir

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and results.')
flags.mark_flags_as_required(['config', 'workdir'])


def _quiet_orbax(record) -> bool:
  return record.levelno >= std_logging.WARNING or 'orbax' not in record.pathname


@contextlib.contextmanager
def _stop_cleanly(workdir: str, distributed: bool):
  """Outside the training loop (which saves a checkpoint first), a stop signal abandons the
  work in progress — evaluation, data preparation — with a message; status as `Preempted`."""
  def stop(signum, frame):
    del frame
    logging.warning('%s outside training: stopped before the results were written; the '
                    'checkpoints in %s are kept. Rerun the same command to resume.',
                    signal.Signals(signum).name, workdir)
    raise SystemExit(130 if signum == signal.SIGINT else 0)

  signals = [s for s in parallel.STOP_SIGNALS if not (distributed and s == signal.SIGTERM)]
  previous = {s: signal.signal(s, stop) for s in signals}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_quiet_orbax)
  config = _CONFIG.value
  check_workdir(_WORKDIR.value)
  parallel.maybe_initialize_distributed(config.distributed)
  import jax  # noqa: PLC0415  (device queries only after the optional distributed start-up)

  # the lease comes first, so that a second run on the workdir is refused within seconds
  with lease.hold(_WORKDIR.value), _stop_cleanly(_WORKDIR.value,
                                                 jax.distributed.is_initialized()):
    from flowdistill import experiments  # noqa: PLC0415

    experiments.validate(config, num_devices=jax.device_count(),
                         num_processes=jax.process_count())
    logging.info('Config:\n%s', config)
    experiments.get(config.method).run(config, _WORKDIR.value)

if __name__ == '__main__':
  app.run(main)
