"""Silences what orbax's background machinery prints around a failure that
the main thread already reports in one line.

A save that fails for lack of space, say, is logged by orbax with its
traceback once for each array, thread and stage it passes (tens of them),
then by asyncio once for each future orbax left unretrieved, then by
tensorstore's callbacks into the event loop orbax closed. core/checkpoint.py
turns the same failure into one StorageError, and reports a step without
metadata as damaged in one warning line, which orbax's own warning before it
only repeats. Which errors are the storage's is checkpoint.py's to say: it
passes its classifier to `quiet`.
"""

import logging as py_logging
import sys

from absl import logging

# orbax's warning on a step without its item metadata, which the one line
# naming the step says better.
_RESTORE_NOISE = 'call `restore` with an appropriate `CheckpointArgs` subclass.'


class _DropBackgroundFailures(py_logging.Filter):
  """Drops orbax's and asyncio's records of an error that `storage_failure`
  (an error -> the storage's failure in words, or None) names, and orbax's
  warning before a step without metadata. Records of any other error pass."""

  def __init__(self, storage_failure):
    super().__init__()
    self._storage_failure = storage_failure

  def filter(self, record):
    if '/orbax/' in record.pathname and record.getMessage().endswith(
        _RESTORE_NOISE):
      return False
    exc = record.exc_info[1] if record.exc_info else None
    if exc is None or not ('/orbax/' in record.pathname or
                           record.name == 'asyncio'):
      return True
    return self._storage_failure(exc) is None


def _drop_closed_loop_callbacks(hook):
  """`hook` (a sys.unraisablehook) without tensorstore's calls into an event
  loop that orbax closed after an error: each prints a traceback ending in
  "Event loop is closed", with nothing to report that the error did not."""
  def unraisable(u):
    if not (u.object is None and isinstance(u.exc_value, RuntimeError) and
            str(u.exc_value) == 'Event loop is closed'):
      hook(u)
  unraisable.drops_closed_loop_callbacks = True
  return unraisable


def quiet(storage_failure):
  """Installs the two above, once per process: every Checkpointer and load
  calls this, and a second filter would only test each record twice."""
  if not getattr(sys.unraisablehook, 'drops_closed_loop_callbacks', False):
    sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)
  for logger in (logging.get_absl_logger(), py_logging.getLogger('asyncio')):
    if not any(isinstance(f, _DropBackgroundFailures)
               for f in logger.filters):
      logger.addFilter(_DropBackgroundFailures(storage_failure))
