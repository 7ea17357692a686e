"""Checkpoints: every use of orbax goes through this file.

Saves are asynchronous and atomic (a step directory appears only once it is
complete), the newest `keep` are kept, and restoring always targets abstract
arrays carrying the *current* mesh's shardings, so a checkpoint written on one
topology restores on another.

A step that cannot be restored (truncated, partly deleted, empty) is skipped
with one warning line, so a run resumes from its newest intact step; a run
moves such a step into `damaged/` beside the steps, never deleting it. A read
that fails because of the storage (EIO, ESTALE, a time-out, HTTP 429 or 5xx
after the GCS clients' own retries) is no sign of damage: it is tried again
with backoff, and a step that still fails is moved aside only if the rest of
the storage answers; if it does not, the run ends in one StorageError line,
moving nothing.

A save that cannot be written (a full disk, no permission, storage gone)
fails in orbax's background threads and surfaces at the next save, wait or
close, which raise errors.StorageError in one line: the step, the directory,
the cause and the newest good step, which is intact and which a rerun resumes
from. A failure that may pass (as above) is tried again first, at the next
save, and then ends the run as StorageUnavailableError (exit 75, restart).
The background threads' own reports of that failure (a traceback for each
array, thread and never-retrieved future) are dropped (core/orbax_noise.py).
"""

import collections
import contextlib
import errno
import functools
import os
import re
import sys
import time

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from multistep_cm import errors
from multistep_cm.core import orbax_noise

DAMAGED = 'damaged'
_DAMAGED_README = ('Checkpoint steps that could not be restored, moved here '
                   'by multistep_cm (never deleted): see the run\'s log.\n')
# The file orbax writes into a step last, just before renaming it into place.
_COMMITTED = 'commit_success.txt'
# An array is split among the devices holding a copy of it, each writing a
# part, only where each part is at least this big: every split of a small
# array (biases, norms, the step) compiles a slicing program of its own,
# hundreds of them, seconds at each start on a many-device host, and writes
# no faster. Large arrays keep orbax's replica-parallel save.
MIN_REPLICA_SLICE_BYTES = 1 << 20
# Status codes of tensorstore's errors (orbax passes them on as ValueErrors)
# that blame the storage, not the data; a local file's error also carries the
# OS's error code.
_STORAGE_STATUS = ('RESOURCE_EXHAUSTED', 'PERMISSION_DENIED', 'UNAVAILABLE',
                   'DEADLINE_EXCEEDED', 'DATA_LOSS', 'UNAUTHENTICATED')
_OS_ERROR_CODE = re.compile(r"\[os_error_code='?(\d+)'?\]")
# A read failing with one of these may succeed when asked again: a network
# file system's stale handle or time-out, a disk's or server's I/O error, a
# GCS server's 429 or 5xx (tensorstore's UNAVAILABLE, after its own retries).
_TRANSIENT_ERRNO = frozenset((
    errno.EIO, errno.ESTALE, errno.EAGAIN, errno.ETIMEDOUT, errno.EINTR,
    errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE,
    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN))
_TRANSIENT_STATUS = ('UNAVAILABLE', 'DEADLINE_EXCEEDED', 'ABORTED',
                     'RESOURCE_EXHAUSTED')
# The pauses between tries of a read that failed as above. tensorstore and
# gcsfs retry a GCS request for up to about a minute themselves; nothing
# retries a local or network file system's read, nor a whole step.
RETRY_DELAYS_S = (1, 4, 16)


class CheckpointMismatchError(errors.UserError, ValueError):
  """A checkpoint whose parameters do not fit the configured model."""


class DamagedCheckpointError(errors.UserError):
  """No step of a checkpoint directory can be restored."""


class Checkpointer:
  """A CheckpointManager over `directory` saving one pytree per step."""

  def __init__(self, directory, every_steps, keep):
    self._directory = _path(directory)
    self._every = every_steps
    self._keep = keep
    self._manager = self._open()
    self._in_flight = None  # The step of a save not known to be written.
    self._failed = False  # Whether a StorageError was raised.
    self._failed_in_a_row = 0  # Saves that failed and were tried again.
    orbax_noise.quiet(_storage_failure)

  def _open(self):
    options = ocp.CheckpointManagerOptions(
        # Preemption saves are the train loop's (core/preemption.py).
        save_decision_policy=policies.FixedIntervalPolicy(self._every),
        preservation_policy=policies.LatestN(self._keep),
        enable_async_checkpointing=True,
        # Saves killed midway leave `<step>.orbax-checkpoint-tmp*` behind:
        # removed by process 0 in the background, before the first save.
        cleanup_tmp_directories=True)
    # A declared handler lets item_metadata read a step before any save.
    return ocp.CheckpointManager(
        self._directory, item_handlers=ocp.PyTreeCheckpointHandler(
            type_handler_registry=_type_handlers()), options=options)

  def latest_step(self):
    """The newest finished step, or None. Orbax lists every step-named
    directory, an empty one too."""
    return next((s for s in reversed(self._manager.all_steps())
                 if _unfinished(self._directory / str(s)) is None), None)

  def should_save(self, step):
    """Whether `step` is a multiple of the interval not saved yet. (Orbax's
    should_save would also query the preemption service, which the loop
    does once per step itself.)"""
    if step % self._every:
      return False
    latest = self.latest_step()
    return latest is None or step > latest

  def save(self, step, state, force=False):
    """Saves if the policy says so (or `force`); returns whether it saved.
    Waits for the save before it first: if that one failed as storage that
    may recover fails (`_transient`), this one tries again, up to
    len(RETRY_DELAYS_S) times in a row; otherwise, or after that, raises
    StorageError naming the failed step. So does a save that cannot start."""
    self._wait(retry='at the next save')
    with self._storage_errors(step):
      saved = self._manager.save(step, args=ocp.args.PyTreeSave(state),
                                 force=force)
    if saved:
      self._in_flight = step
    return saved

  def save_now(self, step, state):
    """Saves `step` and waits until it is written: the last step, or the one
    a preemption notice stopped at. A failure that may pass is tried again
    after each of RETRY_DELAYS_S, from `state`, still at hand."""
    for delay in (*RETRY_DELAYS_S, None):
      self.save(step, state, force=True)
      if self._wait(retry=delay and f'in {delay:g} s'):
        return
      time.sleep(delay)

  def reached_preemption(self, step):
    return self._manager.reached_preemption(step)

  def restore(self, abstract_state, step=None):
    """Restores `step` (default: newest) onto the shardings in `abstract_state`."""
    step = self.latest_step() if step is None else step
    return self._manager.restore(step, args=_restore_args(abstract_state))

  def restore_latest_intact(self, abstract_state):
    """(state, step) of the newest step that restores, or (None, None) when
    there is none to resume from.

    Each step that cannot be restored is logged in one warning line and moved
    to `damaged/`, so that saving its step again does not collide and the
    `keep` rotation does not count it. Raises CheckpointMismatchError, moving
    nothing, if a step reads but does not fit `abstract_state` (a changed
    config), DamagedCheckpointError if no step is left but damaged ones:
    starting afresh then would silently drop the run, and StorageError if the
    storage fails beyond a step.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      state, failure = _try_restore(self._manager, self._directory, step,
                                    abstract_state, _restore_args)
      failure = _agreed(failure)
      if failure is None:
        return state, step
      if failure.kind == _STORAGE:
        raise _unreadable(step, self._directory, failure)
      moved = self._move_aside(step)
      _warn_damaged(step, self._directory, failure.reason,
                    f'moved it to {moved} and', steps[i + 1:])
    damaged = self._directory / DAMAGED
    if damaged.is_dir() and any(damaged.iterdir()):
      raise DamagedCheckpointError(
          f'No checkpoint in {self._directory} can be restored: the damaged '
          f'steps are in {damaged}; move that directory away to start the run '
          'from scratch.')
    return None, None

  def _move_aside(self, step):
    target = self._directory / DAMAGED / str(step)
    n = 1
    while target.exists():
      target = self._directory / DAMAGED / f'{step}-{n}'
      n += 1
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      if not target.parent.exists():
        # An object store (gs://) keeps no empty directories, and a move
        # needs its target's to exist.
        (target.parent / 'README').write_text(_DAMAGED_README)
      (self._directory / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'checkpoint: moved step {step}')
    self._manager.reload()  # Orbax caches its list of steps.
    return target

  def wait(self):
    """Waits for the save in flight; raises StorageError if it failed."""
    self._wait(retry=None)

  def _wait(self, retry):
    """Waits for the save in flight: whether it was written (or none was in
    flight). With `retry` (when it is tried again, in words), a failure that
    may pass is one warning line and False, up to len(RETRY_DELAYS_S) in a
    row; else StorageError."""
    with self._storage_errors(self._in_flight, retry):
      self._manager.wait_until_finished()
      if self._in_flight is not None:
        self._in_flight, self._failed_in_a_row = None, 0
      return True
    return False

  def close(self):
    """Waits for the save in flight and closes. A StorageError has closed
    the Checkpointer already: nothing is saved after it."""
    if not self._failed:
      with self._storage_errors(self._in_flight):
        self._manager.close()
    self._in_flight = None

  @contextlib.contextmanager
  def _storage_errors(self, step, retry=None):
    """Turns the failure of the save of `step` to write, from whichever
    thread it comes, into one StorageError line, and closes. With `retry`
    (when it is tried again, in words) and a single process, a failure that
    may pass (`_transient`) is instead one warning line and a fresh manager
    for the next save, up to len(RETRY_DELAYS_S) in a row.
    Other exceptions are bugs and keep their tracebacks.

    In a multi-host job one process's failure is not retried: the others
    wait for it in orbax's commit; its StorageUnavailableError stops the job
    for a restart instead (core/liveness.py)."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-exception-caught
      failure = _storage_failure(e)
      if failure is None:
        raise
      cause = _transient(e)
      self._in_flight = None
      if (retry and cause and jax.process_count() == 1 and
          self._failed_in_a_row < len(RETRY_DELAYS_S)):
        self._failed_in_a_row += 1
        logging.warning('Saving step %s to %s failed (%s); trying again %s.',
                        step, self._directory, cause, retry)
        self._close_after_failure()
        self._manager = self._open()
        return
      self._failed = True
      tries = self._failed_in_a_row + 1
      message = (f'Cannot save step {step} to {self._directory}: {failure}'
                 f'{f" ({tries} saves in a row)" if tries > 1 else ""}; '
                 f'{self._newest_good()}')
      self._close_after_failure()
      error = errors.StorageUnavailableError if cause else errors.StorageError
      raise error(message) from e

  def _close_after_failure(self):
    """Lets orbax's threads end now rather than at the interpreter's exit,
    where each still running would log a traceback of its own. Orbax raises
    a failure once from each of its layers: the first is being reported."""
    try:
      self._manager.close()
    except Exception as e:  # pylint: disable=broad-exception-caught
      if _storage_failure(e) is None:
        raise

  def _newest_good(self):
    """The newest finished step, as the end of a StorageError's message."""
    try:
      good = self.latest_step()
    except Exception as e:  # pylint: disable=broad-exception-caught
      return f'its steps cannot be listed either ({_reason(e)}).'
    if good is None:
      return 'no step was saved before it, so a rerun starts afresh.'
    return (f'the newest good checkpoint is step {good}, and a rerun resumes '
            'from it.')


def _type_handlers():
  """orbax's handlers, with arrays saved as MIN_REPLICA_SLICE_BYTES says."""
  others = (int, float, bytes, np.number, np.ndarray, str)
  return ocp.type_handlers.create_type_handler_registry(
      *[(t, ocp.type_handlers.get_type_handler(t)) for t in others],
      (jax.Array, ocp.type_handlers.ArrayHandler(
          min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)))


def _restore_args(item, partial=False):
  """Restores onto `item`'s abstract arrays, their shardings included."""
  return ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(
          item), partial_restore=partial)


def abstract_like(tree, shardings):
  """ShapeDtypeStructs with the given shardings, the target for `restore`."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


def _path(path):
  """Orbax wants absolute paths; os.path.abspath would mangle gs:// ones."""
  return epath.Path(path if '://' in str(path) else os.path.abspath(path))


def _locate(path):
  """(checkpoint directory, step or None) for a workdir, a checkpoints
  directory or one step's directory."""
  path = _path(path)
  if (path / 'checkpoints').is_dir():
    return path / 'checkpoints', None
  if path.name.isdigit() and path.is_dir():
    return path.parent, int(path.name)
  return path, None


def newest_finished(workdir):
  """(step, checkpoint directory) of the newest finished save under
  `workdir` (its checkpoints/, or a pipeline stage's), or None. Reads the
  files alone: for a process that can wait neither on orbax nor on its
  peers."""
  root = epath.Path(workdir)
  found = []
  for pattern in ('checkpoints', '*/checkpoints', '*/*/checkpoints'):
    for directory in root.glob(pattern):
      for step_dir in directory.iterdir():
        if step_dir.name.isdigit() and _unfinished(step_dir) is None:
          found.append((step_dir.stat().mtime, int(step_dir.name), directory))
  return max(found)[1:] if found else None


def _agreed(failure):
  """This process's _Failure (or None), made the worst of every process's:
  a process reads only its own shards, and all must take the same step."""
  if jax.process_count() == 1:
    return failure
  kind = failure.kind if failure else _OK
  worst = int(multihost_utils.process_allgather(np.int32(kind)).max())
  if worst == kind:
    return failure
  return _Failure(worst, 'another process could not read it' if
                  worst == _DAMAGED else 'another process cannot reach it')


def _unreadable(step, directory, failure):
  return errors.StorageUnavailableError(
      f'Cannot read checkpoint step {step} in {directory}: {failure.reason}; '
      f'nothing was moved, and a rerun resumes from step {step} once the '
      'storage answers.')


def _unfinished(step_dir):
  """Why `step_dir` is not a finished save, or None if it is one."""
  if not step_dir.is_dir() or not any(step_dir.iterdir()):
    return 'empty directory'
  if not (step_dir / _COMMITTED).exists():
    return f'unfinished save: no {_COMMITTED}'
  return None


def _reason(e):
  """`e` in one short line: orbax wraps the telling tensorstore error, and
  tensorstore appends its whole spec."""
  while e.__cause__ is not None:
    e = e.__cause__
  text = str(e).split(' [tensorstore_spec', 1)[0].strip()
  text = text.splitlines()[0] if text else ''
  return f'{type(e).__name__}: {text}'[:300]


def _storage_failure(e):
  """The storage's failure behind `e` in a few words ("No space left on
  device"), or None if `e` is not one. Orbax raises a background save's error
  as it was: an OSError of Python's writes, or a ValueError of tensorstore's
  carrying a status code (and a local file's OS error code); one that may
  pass (`_transient`) is one too, whatever client raised it.

  orbax_noise drops the background threads' reports of exactly these
  errors: one test, so that nothing is dropped that no StorageError says."""
  transient = _transient(e)
  if transient:
    return transient
  while e is not None:
    if isinstance(e, OSError):
      return e.strerror or _reason(e).split(': ', 1)[-1]
    code = _OS_ERROR_CODE.search(str(e))
    if code:
      return os.strerror(int(code.group(1)))
    if str(e).startswith(_STORAGE_STATUS):
      return _reason(e).split(': ', 1)[-1]
    e = e.__cause__
  return None


def _shapes(tree):
  return {'/'.join(k): tuple(getattr(v, 'shape', np.shape(v)))
          for k, v in ocp.tree.to_flat_dict(tree).items()}


def _mismatch(saved, wanted):
  """(how many arrays differ, one example) between two `_shapes`, or None."""
  diffs = sorted(set(saved) ^ set(wanted)) or sorted(
      k for k in wanted if saved[k] != wanted[k])
  if not diffs:
    return None
  first = diffs[0]
  if first in saved and first in wanted:
    return len(diffs), (f'{first} has shape {saved[first]} there and '
                        f'{wanted[first]} in the config')
  return len(diffs), (f'{first} is only in the '
                      f'{"checkpoint" if first in saved else "config"}')


class _Failure(collections.namedtuple('_Failure', 'kind reason')):
  """Why a step did not restore: _DAMAGED (its files) or _STORAGE (the
  storage beyond it), and in a few words."""


_OK, _DAMAGED, _STORAGE = 0, 1, 2  # Ordered: the worst outcome wins.


def _try_restore(manager, directory, step, target, restore_args, key=None):
  """(restored tree, None), or (None, _Failure).

  A read that fails as the storage fails (`_transient`) is tried again after
  each of RETRY_DELAYS_S; one that still fails is the step's damage only if
  the storage beyond it answers. Raises CheckpointMismatchError if the step
  reads but its arrays do not fit `target` (the tree under `key` of the
  checkpoint when a key is given).
  """
  for delay in (*RETRY_DELAYS_S, None):
    try:
      return _restore_step(manager, directory, step, target, restore_args,
                           key), None
    except CheckpointMismatchError:
      raise
    except _NotRestorable as e:
      return None, _Failure(_DAMAGED, str(e))
    # Damage surfaces as OSError, ValueError, TypeError, tensorstore errors
    # and orbax's bare Exception around them.
    except Exception as e:  # pylint: disable=broad-exception-caught
      cause = _transient(e)
      if cause is None:
        return None, _Failure(_DAMAGED, _reason(e))
      if delay is not None:
        logging.warning('Reading checkpoint step %d in %s failed (%s); '
                        'trying again in %g s.', step, directory, cause, delay)
        time.sleep(delay)
        continue
      tries = (f'{cause}, {len(RETRY_DELAYS_S) + 1} times over '
               f'{sum(RETRY_DELAYS_S):g} s')
      if _storage_answers(directory, step):
        return None, _Failure(_DAMAGED, f'{tries}, while the storage around '
                              'it answers')
      return None, _Failure(_STORAGE, f'{tries}, and the storage around it '
                            'does not answer either')


class _NotRestorable(Exception):
  """A step that is no checkpoint (its message says why)."""


def _restore_step(manager, directory, step, target, restore_args, key):
  reason = _unfinished(directory / str(step))
  if reason:
    raise _NotRestorable(reason)
  saved = manager.item_metadata(step)
  if saved is None:
    raise _NotRestorable('no readable metadata')
  where = f'Checkpoint {directory} (step {step})'
  if key and key not in saved:
    raise CheckpointMismatchError(f'{where} holds no {key}.')
  diff = _mismatch(_shapes(saved[key] if key else saved),
                   _shapes(target[key] if key else target))
  if diff:
    raise CheckpointMismatchError(
        f'{where} does not match {"config.model" if key else "the config"}'
        f': {diff[0]} {"parameter" if key else "array"}(s) differ, e.g. '
        f'{diff[1]}.')
  return manager.restore(step, args=restore_args(target))


def _storage_answers(directory, step):
  """Whether the storage around a step that keeps failing still answers:
  its directory is listed and the step's commit marker read. On a storage
  that has gone (a server down, a lost mount) these fail too."""
  try:
    list(directory.iterdir())
    (directory / str(step) / _COMMITTED).read_text()
    return True
  except Exception as e:  # pylint: disable=broad-exception-caught
    if _transient(e) is None:
      raise
    return False


def _transient(e):
  """`e`'s cause in a few words if it is a storage's that may answer when
  asked again (_TRANSIENT_ERRNO, _TRANSIENT_STATUS, the GCS client's
  retriable errors), else None."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNO:
      return e.strerror or os.strerror(e.errno)
    if isinstance(e, (ConnectionError, TimeoutError)) or _gcs_retriable(e):
      return _reason(e)
    code = _OS_ERROR_CODE.search(str(e))
    if code:  # A local file's: its OS error decides (a full disk is
      # tensorstore's RESOURCE_EXHAUSTED too).
      code = int(code.group(1))
      return os.strerror(code) if code in _TRANSIENT_ERRNO else None
    if str(e).startswith(_TRANSIENT_STATUS):
      return _reason(e).split(': ', 1)[-1]
    e = e.__cause__ or e.__context__
  return None


def _gcs_retriable(e):
  """Whether gcsfs (epath's gs:// files) counts `e` as worth retrying."""
  retry = sys.modules.get('gcsfs.retry')
  return retry is not None and retry.is_retriable(e)


def _warn_damaged(step, directory, reason, done, older):
  logging.warning(
      'Checkpoint step %d in %s cannot be restored (%s); %s %s.', step,
      directory, reason, done,
      f'trying step {older[0]}' if older else 'no older step is left')


def load_params(path, abstract_params, key='ema_params'):
  """Restores only `key` ('ema_params' or 'params') of a train-state
  checkpoint onto `abstract_params` (ShapeDtypeStructs with the shardings to
  restore into): the given step, else the newest step that restores. A
  damaged step is skipped with one warning and left where it is (the
  directory may be another run's). Raises CheckpointMismatchError, in one
  line, if the saved parameters do not have exactly the expected names and
  shapes."""
  directory, step = _locate(path)
  if not directory.is_dir():
    raise errors.CheckpointNotFoundError(
        f'No checkpoint at {path}: give a workdir, its checkpoints/ '
        'directory or one step directory.')
  manager = ocp.CheckpointManager(
      directory, item_handlers=ocp.PyTreeCheckpointHandler(),
      options=ocp.CheckpointManagerOptions(create=False))
  orbax_noise.quiet(_storage_failure)
  steps = [step] if step is not None else sorted(manager.all_steps(),
                                                 reverse=True)
  if not steps:
    raise errors.CheckpointNotFoundError(
        f'No checkpoint at {path}: {directory} holds no finished step.')
  target = {key: abstract_params}
  restore_args = functools.partial(_restore_args, partial=True)

  try:
    for i, s in enumerate(steps):
      restored, failure = _try_restore(manager, directory, s, target,
                                       restore_args, key)
      failure = _agreed(failure)
      if failure is None:
        return restored[key], s
      if failure.kind == _STORAGE:
        raise _unreadable(s, directory, failure)
      if step is not None:
        raise DamagedCheckpointError(
            f'Checkpoint step {s} in {directory} cannot be restored '
            f'({failure.reason}).')
      _warn_damaged(s, directory, failure.reason, 'left it there and',
                    steps[i + 1:])
    raise DamagedCheckpointError(
        f'No checkpoint in {directory} can be restored: every step is '
        'damaged (see the warnings above).')
  finally:
    manager.close()
