"""Sampling speed: the multistep student at S = 1...16 against the teacher's
512-step aDDIM sampler, on the same network and batch, in one run.

  python benchmarks/sampling.py --config=configs/digits.py

Timing needs no trained weights, so the network is freshly initialised. Each
sampler is one compiled program (a lax loop); times exclude compilation.
"""

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from multistep_cm import models
from multistep_cm import run as run_lib
from multistep_cm import samplers
from multistep_cm.core import generation
from multistep_cm.core import sharding
from multistep_cm.core import state as state_lib
import timing

config_flags.DEFINE_config_file('config', 'configs/digits.py', 'Config file.')
flags.DEFINE_integer('batch', None, 'Samples per call; default '
                     'train_eval.batch_size.')
flags.DEFINE_integer('teacher_steps', 512, 'Steps of the teacher sampler.')
flags.DEFINE_integer('repeats', 3, 'Timed calls per sampler.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = FLAGS.config
  batch = FLAGS.batch or config.train_eval.batch_size
  run = run_lib.resolve(config)
  batch = sharding.mesh_batch_size(batch, run.mesh)
  state, shardings = state_lib.init_state(
      run, state_lib.make_optimizer(config.optim))
  _, labels = generation.eval_inputs(run.dataset, batch)
  runs = [('teacher aDDIM', samplers.SamplerSpec('addim', FLAGS.teacher_steps))
         ] + [(f'student S={s}', samplers.SamplerSpec('student', s))
              for s in (1, 2, 4, 8, 16)]
  rows = []
  for name, spec in runs:
    generator = generation.Generator(run, shardings.ema_params, spec)
    # One batch: the compiled sampler and nothing but its inputs' transfer.
    sec = timing.seconds_per_call(
        lambda: next(generator.batches(state.ema_params, labels, 0,
                                       batch))[0], FLAGS.repeats)
    rows.append((name, spec.nfe(), sec))
  teacher_sec = rows[0][2]
  print(f'\n{models.count_params(state.params):,} parameters, batch {batch}, '
        f'{jax.device_count()} x {jax.devices()[0].device_kind}\n')
  print('| sampler | NFE | latency (s/batch) | samples/s | speed-up vs teacher |')
  print('|---|---|---|---|---|')
  for name, n, sec in rows:
    print(f'| {name} | {n} | {sec:.3f} | {batch / sec:.0f} | '
          f'{teacher_sec / sec:.1f}x |')


if __name__ == '__main__':
  app.run(main)
