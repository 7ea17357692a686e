"""Errors a user can fix: the command line reports each in one `error:` line,
without a traceback."""


class UserError(Exception):
  """Bad input (a config, a path, a file): the message says what to change."""


class ConfigError(UserError, ValueError):
  """A config that cannot run."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
  """No finished checkpoint where one was expected."""


class DatasetNotPreparedError(UserError):
  """A dataset that is not prepared where the run looks for it."""


class StorageError(UserError):
  """A file that could not be written (no space, no permission, storage
  unreachable): what was written before it is intact."""
