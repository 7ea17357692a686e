"""Checkpoints: every use of orbax goes through this file.

Saves are asynchronous and atomic (a step directory appears only once it is
complete), the newest `keep` are kept, and restoring always targets abstract
arrays carrying the *current* mesh's shardings, so a checkpoint written on one
topology restores on another.

A step that cannot be restored (truncated, partly deleted, empty) is skipped
with one warning line, so a run resumes from its newest intact step; a run
moves such a step into `damaged/` beside the steps, never deleting it.
"""

import contextlib
import functools
import os
import sys
import time

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from multistep_cm.core import errors

DAMAGED = 'damaged'
# The file orbax writes into a step last, just before renaming it into place.
_COMMITTED = 'commit_success.txt'
# An array is split among the devices holding a copy of it, each writing a
# part, only where each part is at least this big: every split of a small
# array (biases, norms, the step) compiles a slicing program of its own,
# hundreds of them, seconds at each start on a many-device host, and writes
# no faster. Large arrays keep orbax's replica-parallel save.
MIN_REPLICA_SLICE_BYTES = 1 << 20


class CheckpointMismatchError(errors.UserError, ValueError):
  """A checkpoint whose parameters do not fit the configured model."""


class DamagedCheckpointError(errors.UserError):
  """No step of a checkpoint directory can be restored."""


class Checkpointer:
  """A CheckpointManager over `directory` saving one pytree per step."""

  def __init__(self, directory, every_steps, keep):
    self._directory = _path(directory)
    self._every = every_steps
    options = ocp.CheckpointManagerOptions(
        # Preemption saves are the train loop's (core/preemption.py).
        save_decision_policy=policies.FixedIntervalPolicy(every_steps),
        preservation_policy=policies.LatestN(keep),
        enable_async_checkpointing=True,
        # Saves killed midway leave `<step>.orbax-checkpoint-tmp*` behind:
        # removed by process 0 in the background, before the first save.
        cleanup_tmp_directories=True)
    # A declared handler lets item_metadata read a step before any save.
    self._manager = ocp.CheckpointManager(
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
    """Saves if the policy says so (or `force`); returns whether it saved."""
    return self._manager.save(step, args=ocp.args.PyTreeSave(state),
                              force=force)

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
    config), and DamagedCheckpointError if no step is left but damaged ones:
    starting afresh then would silently drop the run.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      state, reason = _try_restore(self._manager, self._directory, step,
                                   abstract_state, _restore_args)
      # A process reads only its own shards: every process must agree.
      if _on_every_process(reason is None):
        return state, step
      moved = self._move_aside(step)
      _warn_damaged(step, self._directory, reason or 'another process '
                    'could not read it', f'moved it to {moved} and',
                    steps[i + 1:])
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
      (self._directory / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'checkpoint: moved step {step}')
    self._manager.reload()  # Orbax caches its list of steps.
    return target

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()


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


def _on_every_process(ok):
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.process_allgather(np.int32(ok)).min())


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


def _try_restore(manager, directory, step, target, restore_args, key=None):
  """(restored tree, None), or (None, why `step` cannot be restored).

  Raises CheckpointMismatchError if the step reads but its arrays do not fit
  `target` (the tree under `key` of the checkpoint when a key is given).
  """
  reason = _unfinished(directory / str(step))
  if reason:
    return None, reason
  try:
    with _stderr_muted():
      saved = manager.item_metadata(step)
      if saved is None:
        return None, 'no readable metadata'
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
      return manager.restore(step, args=restore_args(target)), None
  except CheckpointMismatchError:
    raise
  # Damage surfaces as OSError, ValueError, TypeError, tensorstore errors and
  # orbax's bare Exception around them.
  except Exception as e:  # pylint: disable=broad-exception-caught
    return None, _reason(e)


@contextlib.contextmanager
def _stderr_muted(drain_s=0.5):
  """Keeps a failed restore to the one warning line: when one read of a
  damaged step fails, tensorstore completes the step's other reads into
  orbax's closed event loop, and each prints a traceback ("Event loop is
  closed") straight to file descriptor 2. The outcome is reported from the
  exception, so fd 2 is muted while a restore runs (and, after a failure,
  settles)."""
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    yield
  except Exception:
    time.sleep(drain_s)
    raise
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


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
  steps = [step] if step is not None else sorted(manager.all_steps(),
                                                 reverse=True)
  if not steps:
    raise errors.CheckpointNotFoundError(
        f'No checkpoint at {path}: {directory} holds no finished step.')
  target = {key: abstract_params}
  restore_args = functools.partial(_restore_args, partial=True)

  try:
    for i, s in enumerate(steps):
      restored, reason = _try_restore(manager, directory, s, target,
                                      restore_args, key)
      if reason is None:
        return restored[key], s
      if step is not None:
        raise DamagedCheckpointError(
            f'Checkpoint step {s} in {directory} cannot be restored '
            f'({reason}).')
      _warn_damaged(s, directory, reason, 'left it there and', steps[i + 1:])
    raise DamagedCheckpointError(
        f'No checkpoint in {directory} can be restored: every step is '
        'damaged (see the warnings above).')
  finally:
    manager.close()
