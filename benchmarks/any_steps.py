"""The cost of one student for every S: an any-S student's train step
against a per-S student's, same network, batch and teacher.

  python benchmarks/any_steps.py --config=configs/digits.py:stage=cd
  python benchmarks/any_steps.py --config=configs/imagenet64.py:small,cd,smoke

Builds both train steps of the config's student (its `student_steps`, and
`any_steps` (1, 2, 4, 8, 16) unless the config sets others), with the
state's own weights standing in for the teacher's, and times them in
alternating rounds, so that a machine busy with other work slows both
alike; prints ms per step of each and their ratio.
"""

import os
import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))  # For configs that import other configs.
# pylint: disable=g-import-not-at-top,wrong-import-position
from multistep_cm import models
from multistep_cm import run as run_lib
from multistep_cm import train
from multistep_cm.core import config as config_lib
from multistep_cm.core import state as state_lib
import timing

config_flags.DEFINE_config_file('config', 'configs/digits.py:stage=cd',
                                'Config file of a cd or ct student.')
flags.DEFINE_integer('steps', 10, 'Timed steps per round.')
flags.DEFINE_integer('rounds', 3, 'Alternating rounds of both.')
FLAGS = flags.FLAGS


def _step(config):
  """(a call of one train step, parameter count)."""
  run = run_lib.resolve(config)
  tx = state_lib.make_optimizer(config.optim)
  state, state_sh = state_lib.init_state(run, tx)
  batch = timing.random_batch(run, config.batch_size)
  teacher = jax.tree.map(jax.numpy.copy, state.params)
  step_fn = train.make_train_step(run, tx, state_sh)
  holder = [state]

  def call():
    holder[0], out = step_fn(holder[0], batch, teacher)
    return out['loss']
  return call, models.count_params(state.params)


def main(argv):
  del argv
  config = FLAGS.config
  with config.unlocked():
    per_s = config.copy_and_resolve_references()
    per_s.any_steps = ()
    any_s = config.copy_and_resolve_references()
    any_s.any_steps = config.any_steps or config_lib.ANY_STEPS
  calls = {}
  for name, c in (('per-S', per_s), ('any-S', any_s)):
    calls[name] = _step(c)
    timing.seconds_per_call(calls[name][0], 1, warmup=2)  # Compiles.
  seconds = {name: [] for name in calls}
  for _ in range(FLAGS.rounds):
    for name, (call, _) in calls.items():
      seconds[name].append(timing.seconds_per_call(call, FLAGS.steps,
                                                   warmup=0))
  best = {name: min(s) for name, s in seconds.items()}
  print(f'\n{config.stage} student, batch {config.batch_size}, '
        f'{jax.device_count()} x {jax.devices()[0].device_kind}; any-S: '
        f'S in {any_s.any_steps}\n')
  print('| student | parameters | ms/step (best round) |')
  print('|---|---|---|')
  for name, (_, params) in calls.items():
    label = f'per-S (S={per_s.student_steps})' if name == 'per-S' else name
    print(f'| {label} | {params:,} | {1e3 * best[name]:.1f} |')
  print(f'\nany-S / per-S step time: {best["any-S"] / best["per-S"]:.3f}')


if __name__ == '__main__':
  app.run(main)
