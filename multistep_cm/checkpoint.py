"""Checkpoints: every use of orbax goes through this file.

Saves are asynchronous and atomic (a step directory appears only once it is
complete), the newest `keep` are kept, and restoring always targets abstract
arrays carrying the *current* mesh's shardings, so a checkpoint written on one
topology restores on another.
"""

import os

import jax
import orbax.checkpoint as ocp

from orbax.checkpoint import checkpoint_managers as policies


class Checkpointer:
  """A CheckpointManager over `directory` saving one pytree per step."""

  def __init__(self, directory, every_steps, keep):
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(every_steps),
            policies.PreemptionCheckpointingPolicy()]),
        preservation_policy=policies.LatestN(keep),
        enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory), options=options)

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
