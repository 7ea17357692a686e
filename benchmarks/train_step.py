"""Train-step throughput, and the framework's overhead over a bare step.

  python benchmarks/train_step.py --config=configs/digits.py

Times, on the same model and batch, (a) the framework's jitted train step
(loss, AdamW, clipping, EMA, sharded in/out, donation) and (b) a bare jitted
forward + backward of the network on a squared error, and prints a table.
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from multistep_cm import datasets
from multistep_cm import models
from multistep_cm import run as run_lib
from multistep_cm import train
from multistep_cm.core import sharding
from multistep_cm.core import state as state_lib
import timing

config_flags.DEFINE_config_file('config', 'configs/digits.py', 'Config file.')
flags.DEFINE_integer('steps', 50, 'Timed steps (after two warm-up steps).')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = FLAGS.config
  run = run_lib.resolve(config)
  mesh, network = run.mesh, run.network
  tx = state_lib.make_optimizer(config.optim)
  state, state_sh = state_lib.init_state(run, tx)
  batch = sharding.global_batch(next(datasets.train_batches(
      config, config.batch_size, config.seed)), mesh)

  step_fn = train.make_train_step(run, tx, state_sh)
  holder = [state]

  def framework():
    holder[0], out = step_fn(holder[0], batch, None)
    return out['loss']

  t = jnp.full((config.batch_size,), 0.5)
  rng = jax.random.key(0)

  @jax.jit
  def bare_grad(params, x, labels):
    def loss(p):
      return jnp.mean(jnp.square(network(p, x, t, labels, rng) - x))
    return jax.value_and_grad(loss)(params)

  params = jax.tree.map(jnp.copy, holder[0].params)
  s_framework = timing.seconds_per_call(framework, FLAGS.steps, warmup=2)
  s_bare = timing.seconds_per_call(
      lambda: bare_grad(params, batch['x'], batch['cond'])[0], FLAGS.steps,
      warmup=2)

  n = config.batch_size
  print(f'\n{models.count_params(params):,} parameters, batch {n}, '
        f'{jax.device_count()} x {jax.devices()[0].device_kind}\n')
  print('| step | ms/step | examples/s |')
  print('|---|---|---|')
  for name, s in (('bare forward+backward', s_bare),
                  ('framework train step', s_framework)):
    print(f'| {name} | {1e3 * s:.1f} | {n / s:.0f} |')
  print(f'\nframework overhead: {100 * (s_framework / s_bare - 1):+.1f}%')


if __name__ == '__main__':
  app.run(main)
