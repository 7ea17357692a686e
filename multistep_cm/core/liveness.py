"""A process of a multi-host job that dies (kill -9, a lost host, the OOM
killer) must stop the others soon, in one line, with a code the launchers
read as "restart and resume".

jax's coordination service notices a process whose heartbeats stop, but it
then aborts every other process from C++ (SIGABRT, exit 134, after a
fatal-error dump), and no Python code runs to say what happened: its client
takes a missed-heartbeat callback, but jaxlib 0.10 cannot hand the status to
a Python one (std::bad_cast, the same abort). So the processes keep a
heartbeat of their own, a counter in the coordination service's key-value
store that a thread of each process raises and reads; jax's own timeout is
set longer, as the backstop. A process whose counter stops for TIMEOUT
seconds is named, with the newest checkpoint, and the others exit with
EXIT_CODE. A process that ends says so first: "done" (finished or
preempted) is not waited for, "failed" (an error, which it reports itself)
stops the others at once with exit 1, "restart" (storage it could not reach
after its retries) with EXIT_CODE. A process that meets an unexpected
error first waits for the others to end or to be found lost, saying "error"
meanwhile: on CPUs a collective whose peer died fails at once, and only the
watch can then tell that a process was lost.
"""

import os
import sys
import threading
import time

import jax

from multistep_cm.core import checkpoint
from multistep_cm import errors
from multistep_cm.core import preemption

EXIT_CODE = preemption.EXIT_CODE  # Restart: the run resumes by itself.
DEFAULT_TIMEOUT_S = 100  # jax's default heartbeat timeout.
JAX_TIMEOUT_FACTOR = 2  # jax's own heartbeat timeout, the backstop.
KEY = 'multistep_cm/alive/'
DONE, FAILED, ERROR = 'done', 'failed', 'error'
# Failed in a way a restart may mend (its storage, a transient error).
RESTART = 'restart'


def newest_checkpoint(workdir):
  """'step N in DIR' of the newest finished checkpoint in the workdir (a
  pipeline's stages have their own), or a phrase saying there is none."""
  newest = checkpoint.newest_finished(workdir)
  if newest is None:
    return f'there is no checkpoint in {workdir} yet'
  step, directory = newest
  return f'the newest checkpoint is step {step} in {directory}'


def _client():
  """jax's client of the coordination service, whose key-value store holds
  the beats. jax has no public API for it (jax.distributed offers only
  initialize, is_initialized and shutdown), so it is taken from where jax's
  own multihost_utils takes it, at run time: a jax that moved it stops a
  multi-host run in one line, and single-process runs never look."""
  # pylint: disable=g-import-not-at-top,protected-access
  try:
    from jax._src import distributed
    return distributed.global_state.client
  except (ImportError, AttributeError):
    raise errors.UserError(
        "multi-host liveness needs jax's distributed client "
        '(jax._src.distributed.global_state.client), which jax '
        f'{jax.__version__} does not have: install the jax setup.py names '
        "(pip install -e .).") from None


class Watch:
  """While open, a thread of this process beats, and watches the others'
  beats; `timeout_s` without one from a process ends this one."""

  def __init__(self, workdir, timeout_s=DEFAULT_TIMEOUT_S):
    self.workdir = workdir
    self.timeout_s = timeout_s
    self._stop = threading.Event()
    self._error = threading.Event()
    self._thread = None
    self._client = None

  def __enter__(self):
    if jax.process_count() > 1:
      self._client = _client()
      self._thread = threading.Thread(target=self._run, daemon=True,
                                      name='liveness')
      self._thread.start()
    return self

  def __exit__(self, exc_type, exc, tb):
    if self._thread is None:
      return
    if exc_type is None or issubclass(exc_type, preemption.Preempted):
      self._say(DONE)
    elif issubclass(exc_type, errors.UserError):
      self._say(RESTART if exc.exit_code == EXIT_CODE else FAILED)
    else:
      # The thread ends when every other process has ended too, or exits
      # naming the one that was lost.
      self._error.set()
      self._thread.join(self.timeout_s + 2 * self._interval())
      self._say(FAILED)

  def _interval(self):
    return max(self.timeout_s / 10, 0.2)

  def _say(self, value):
    self._stop.set()
    try:
      self._client.key_value_set(f'{KEY}{jax.process_index()}', value,
                                 allow_overwrite=True)
    except Exception:  # pylint: disable=broad-exception-caught
      pass  # The coordinator is gone: nobody is left to tell.

  def _run(self):
    me, n = jax.process_index(), jax.process_count()
    beats = {i: (None, time.monotonic()) for i in range(n) if i != me}
    reached = time.monotonic()  # The coordinator, last answering.
    count = 0
    while beats and not self._stop.wait(self._interval()):
      now = time.monotonic()
      count += 1
      mine = ERROR if self._error.is_set() else str(count)
      try:
        self._client.key_value_set(f'{KEY}{me}', mine, allow_overwrite=True)
        values = dict(self._client.key_value_dir_get(KEY))
        reached = now
      except Exception:  # pylint: disable=broad-exception-caught
        if now - reached > self.timeout_s:
          self._exit(0, n, f'stopped answering {now - reached:.0f} s ago (it '
                           'runs the coordinator; killed, or its host lost)')
        continue
      for i, (seen, since) in list(beats.items()):
        value = values.get(f'{KEY}{i}')
        if value in (DONE, ERROR) or (value == FAILED and
                                      self._error.is_set()):
          beats.pop(i)  # Ended, and says why itself.
        elif value == FAILED:
          self._exit(i, n, 'failed (its log says why)', code=1)
        elif value == RESTART:
          self._exit(i, n, 'failed to reach its storage (its log says why)')
        elif value != seen:
          beats[i] = (value, now)
        elif now - since > self.timeout_s:
          self._exit(i, n, f'stopped answering {now - since:.0f} s ago '
                           '(killed, or its host lost)')

  def _exit(self, lost, n, what, code=EXIT_CODE):
    if self._stop.is_set():
      return  # This process is ending by itself.
    try:
      where = newest_checkpoint(self.workdir)
    except Exception as e:  # pylint: disable=broad-exception-caught
      where = f'the checkpoints in {self.workdir} cannot be listed ({e})'
    then = ('restart the job to resume from it' if code == EXIT_CODE
            else 'a rerun resumes from it')
    print(f'error: process {lost} of {n} {what}; {where}: {then} '
          f'(exit {code}).', file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Not sys.exit: this is not the main thread, which may be waiting on the
    # lost process in a collective; nor the interpreter's exit, where jax's
    # shutdown would wait on it too.
    os._exit(code)  # pylint: disable=protected-access
