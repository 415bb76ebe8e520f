"""Command line: `python -m flowdistill.main --config=configs/x.py[:arg] --workdir=DIR`.

Overrides: `--config.train.steps=500`. Trains (resuming from DIR), then evaluates as the config
says; checkpoints, metrics (JSON lines, TensorBoard), figures and a results table go to DIR.
The method is `config.method`, looked up in the registry `flowdistill.experiments.REGISTRY`,
which validates the config (shared sections and the method's own) before any work: a bad config
creates no workdir, and the workdir and the cache are checked writable before training.

A user error (`flowdistill.errors.UserError`: a bad config key or value, bad data, an unusable
path, a refused resume, a workdir in use) prints its message as one line on stderr and exits
with status 2; `--traceback` (or `FLOWDISTILL_TRACEBACK=1`) prints its traceback as well. Any
other exception is a defect and keeps its traceback. Malformed flags keep absl's short message
(status 1).
"""

import contextlib
import logging as std_logging
import os
import signal
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from flowdistill.errors import BadInput, UserError
from flowdistill.train import lease, parallel, stop
from flowdistill.train.checkpoint import check_workdir

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and results.')
_TRACEBACK = flags.DEFINE_bool('traceback', False, 'Print the traceback of a user error too '
                               '(also: FLOWDISTILL_TRACEBACK=1).')
flags.mark_flags_as_required(['config', 'workdir'])


def _quiet_libraries(record) -> bool:
  """Drops Orbax's info lines and gcsfs's retry warnings (a failed bucket probe names the
  network and credentials itself)."""
  if 'gcsfs' in record.pathname:
    return record.levelno >= std_logging.ERROR
  return record.levelno >= std_logging.WARNING or 'orbax' not in record.pathname


def _wants_traceback(argv: list[str]) -> bool:
  """`--traceback` or FLOWDISTILL_TRACEBACK=1; from `argv` when the flags did not parse."""
  if os.environ.get('FLOWDISTILL_TRACEBACK') == '1':
    return True
  return _TRACEBACK.value if flags.FLAGS.is_parsed() else '--traceback' in argv


def _exit_user_error(error: UserError, argv: list[str]):
  """Prints `error` as one line (with its traceback when asked) and exits with status 2."""
  if _wants_traceback(argv):
    traceback.print_exception(error)
  else:
    sys.stderr.write('Error: ' + ' '.join(str(error).split()) + '\n')
  sys.exit(2)


def _user_cause(error: BaseException) -> UserError | None:
  """The innermost `UserError` among `error` and its causes (absl and ml_collections wrap a
  config file's errors twice), or None."""
  found = None
  while error is not None:
    if isinstance(error, UserError):
      found = error
    error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
  return found


def _unknown_override(error: LookupError | AttributeError, argv: list[str]) -> BadInput | None:
  """The override in `argv` of a key the config lacks, as ml_collections reports it
  ("'trian'\\nDid you mean "train" instead of "trian"?"); None if no override names that key
  (then `error` is a defect of the config file)."""
  message = error
  while isinstance(message, BaseException):  # AttributeError(KeyError(message))
    message = message.args[0] if message.args else ''
  key, _, hint = str(message).partition('\n')
  key = key.strip('\'"')
  for arg in argv:
    path = arg.lstrip('-').partition('=')[0].split('.')
    if path[0] == _CONFIG.name and key in path[1:]:
      return BadInput(f'{arg}: config.{".".join(path[1:])} does not exist: no key {key!r}. '
                      f'{hint}'.strip())
  return None


def _parse_config_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, raising the config's user errors — an override of a key it lacks,
  a config file's `BadInput` (e.g. an unknown preset) — as such."""
  try:
    return flags.FLAGS(argv)
  except (LookupError, AttributeError) as e:  # ml_collections: an override of a missing key
    user = _unknown_override(e, argv)
    if user is None:
      raise
    raise user from e
  except flags.Error as e:
    user = _user_cause(e)
    if user is None:
      sys.stderr.write(f'FATAL Flags parsing error: {e}\n'  # as absl's own parser says it
                       'Pass --helpshort or --helpfull to see help on flags.\n')
      sys.exit(1)
    raise user from None  # its own traceback runs through the config file


def _parse_flags(argv: list[str]) -> list[str]:
  """The flags parser of `app.run`: a user error in the flags exits as one line, status 2."""
  try:
    return _parse_config_flags(argv)
  except UserError as e:
    _exit_user_error(e, argv)


def _loaded_config():
  """The parsed `--config`; a file that does not load is a `BadInput`."""
  config = _CONFIG.value
  try:
    getattr(config, 'method', None)
  except OSError as e:  # ml_collections defers a missing file's error to the first access
    reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
    raise BadInput(f'Cannot load the config file of --config ({reason}).') from e
  return config


@contextlib.contextmanager
def _stop_cleanly(workdir: str, distributed: bool):
  """Outside the training loop (which saves a checkpoint and raises `loop.Preempted` itself),
  a stop signal is recorded and acted on at the next safe point of the long loops
  (`stop.check`: between cells, evaluation runs and epochs, fitting steps), which save what
  they can resume from; then one warning, and the status of `Preempted`. A signal that comes
  after the last safe point stops the command once the run has finished."""
  try:
    with stop.watch(distributed):
      yield
      stop.check(where='after the run had finished')
  except stop.Stopped as e:
    logging.warning('%s outside training: stopped %s; the finished work in %s is kept. Rerun '
                    'the same command to resume.', signal.Signals(e.signum).name,
                    e.where or 'at a safe point', workdir)
    raise


def _run(config, workdir: str) -> None:
  """Validates `config` and checks its paths (nothing is created before), then holds the
  workdir's lease and runs the method."""
  check_workdir(workdir)
  parallel.maybe_initialize_distributed(config.distributed)
  import jax  # noqa: PLC0415  (device queries only after the optional distributed start-up)

  from flowdistill import experiments  # noqa: PLC0415

  experiments.validate(config, num_devices=jax.device_count(),
                       num_processes=jax.process_count())
  experiments.check_paths(config, workdir)
  # the lease comes before any work, so that a second run on the workdir is refused within seconds
  with lease.hold(workdir), _stop_cleanly(workdir, jax.distributed.is_initialized()):
    logging.info('Config:\n%s', config)
    experiments.get(config.method).run(config, workdir)


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_quiet_libraries)
  try:
    _run(_loaded_config(), _WORKDIR.value)
  except UserError as e:
    _exit_user_error(e, sys.argv)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
