"""Preemption notices. A preempted Cloud TPU VM gets SIGTERM; a Slurm job gets
the signal of `--signal` before its time limit (launch/slurm.sbatch asks for
SIGTERM). The train loop then finishes its step, saves that step and exits
with EXIT_CODE, which the launchers read as "rerun to resume".

One process catches the signal itself. Under jax.distributed, jax's
preemption service catches SIGTERM on any host and has all hosts agree on
the step to save at (orbax's `reached_preemption`), so that every host
saves the same step.
"""

import signal

import jax

from multistep_cm import errors

EXIT_CODE = errors.RESTART_EXIT_CODE  # The same command resumes.
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
  """Training stopped for a preemption notice after saving `step`."""

  def __init__(self, step):
    super().__init__(f'preempted at step {step}, saved; rerun to resume')
    self.step = step


class Notice:
  """A context in which a preemption notice is recorded, not fatal.
  `reached(step, ckpt)`: whether to save at `step` and stop."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    if jax.process_count() == 1:
      for s in SIGNALS:
        self._previous[s] = signal.signal(s, self._record)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def _record(self, signum, frame):
    del frame
    self.signal = signum

  def reached(self, step, ckpt):
    if jax.process_count() == 1:
      return self.signal is not None
    return ckpt.reached_preemption(step)
