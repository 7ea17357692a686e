"""Errors a user can fix: the command line reports each in one `error:` line,
without a traceback, and exits with its `exit_code`."""

# EX_TEMPFAIL: a temporary failure; the same command, rerun, resumes. The
# launchers restart a job that exits with it.
RESTART_EXIT_CODE = 75


class UserError(Exception):
  """Bad input (a config, a path, a file): the message says what to change."""
  exit_code = 1


class ConfigError(UserError, ValueError):
  """A config that cannot run."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
  """No finished checkpoint where one was expected."""


class DatasetNotPreparedError(UserError):
  """A dataset that is not prepared where the run looks for it."""


class StorageError(UserError):
  """A file that could not be written (no space, no permission, storage
  unreachable): what was written before it is intact."""


class StorageUnavailableError(StorageError):
  """Storage that failed as it may not when asked again (an I/O error, a
  stale handle, a time-out, HTTP 429 or 5xx) and kept failing: restarting
  resumes from the newest good step, which is intact."""
  exit_code = RESTART_EXIT_CODE
