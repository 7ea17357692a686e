"""Checkpoints: every use of orbax goes through this file.

Saves are asynchronous and atomic (a step directory appears only once it is
complete), the newest `keep` are kept, and restoring always targets abstract
arrays carrying the *current* mesh's shardings, so a checkpoint written on one
topology restores on another.
"""

import os

from etils import epath
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from multistep_cm.core import errors


class Checkpointer:
  """A CheckpointManager over `directory` saving one pytree per step."""

  def __init__(self, directory, every_steps, keep):
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(every_steps),
            policies.PreemptionCheckpointingPolicy()]),
        preservation_policy=policies.LatestN(keep),
        enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(_path(directory), options=options)

  def latest_step(self):
    return self._manager.latest_step()

  def save(self, step, state, force=False):
    """Saves if the policy says so (or `force`); returns whether it saved."""
    return self._manager.save(step, args=ocp.args.StandardSave(state),
                              force=force)

  def reached_preemption(self, step):
    return self._manager.reached_preemption(step)

  def restore(self, abstract_state, step=None):
    """Restores `step` (default: newest) onto the shardings in `abstract_state`."""
    step = self.latest_step() if step is None else step
    return self._manager.restore(
        step, args=ocp.args.StandardRestore(abstract_state))

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs with the given shardings, the target for `restore`."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


class CheckpointMismatchError(errors.UserError, ValueError):
  """A checkpoint whose parameters do not fit the configured model."""


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


def _shapes(tree):
  return {jax.tree_util.keystr(k): tuple(v.shape)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_params(path, abstract_params, key='ema_params'):
  """Restores only `key` ('ema_params' or 'params') of a train-state
  checkpoint onto `abstract_params` (ShapeDtypeStructs with the shardings to
  restore into). Raises CheckpointMismatchError, in one line, if the saved
  parameters do not have exactly the expected names and shapes."""
  directory, step = _locate(path)
  if not directory.is_dir():
    raise errors.CheckpointNotFoundError(
        f'No checkpoint at {path}: give a workdir, its checkpoints/ '
        'directory or one step directory.')
  manager = ocp.CheckpointManager(
      directory, item_handlers=ocp.PyTreeCheckpointHandler(),
      options=ocp.CheckpointManagerOptions(create=False))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise errors.CheckpointNotFoundError(
        f'No checkpoint at {path}: {directory} holds no finished step.')
  saved = _shapes(manager.item_metadata(step)[key])
  wanted = _shapes(abstract_params)
  if saved != wanted:
    diffs = sorted(set(saved) ^ set(wanted)) or sorted(
        k for k in wanted if saved[k] != wanted[k])
    first = diffs[0]
    detail = (f'{first} has shape {saved[first]} there and {wanted[first]} in '
              'the config' if first in saved and first in wanted else
              f'{first} is only in the {"checkpoint" if first in saved else "config"}')
    raise CheckpointMismatchError(
        f'Checkpoint {path} (step {step}) does not match config.model: '
        f'{len(diffs)} parameter(s) differ, e.g. {detail}.')
  target = {key: abstract_params}
  restored = manager.restore(step, args=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(
          target), partial_restore=True))
  manager.close()
  return restored[key], step
