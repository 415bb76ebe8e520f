"""Errors a user causes and can fix from the message alone.

The command line prints such an error's message without a traceback and exits with status 2
(`flowdistill.main`); any other exception is a defect of the library and keeps its traceback.
`UserError` is a mixin, so an error can also be a `ValueError` or an `OSError` for callers that
catch those.
"""


class UserError(Exception):
  """Mixin: the message names the problem and the fix."""


class BadInput(UserError, ValueError):
  """A config value, data set, array, file or name that cannot be used as given."""


class MissingInput(UserError, FileNotFoundError):
  """A data folder or file, a teacher's workdir or a cache entry that is not where it is named."""
