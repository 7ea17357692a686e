"""Model FLOPs utilisation of the train steps and samplers, in one table.

  python benchmarks/mfu.py --config=configs/imagenet64.py:small --per_device_batch=128
  python benchmarks/mfu.py --config=configs/digits.py:smoke --per_device_batch=8   # the CPU

For the teacher, CD, CT and PD train steps (the project's own
`train.make_train_step`, on random data; a student's teacher is the network
itself, which costs the same) and for the 8-step student and the config's
aDDIM sampler: ms per call, images/s per chip, model FLOPs, achieved TFLOP/s
per chip, MFU against the chip's bf16 dense peak, compile time and peak
device memory.

FLOPs are counted once, on the host, from each train step's lowered program
(`jit(...).lower(...).cost_analysis()`: before compilation, so cuBLAS and
cuDNN calls are counted, which the compiled GPU program's analysis misses);
a sampler's are its network evaluations times the forward pass's, counted
the same way. Unknown chips (the CPU) get achieved TFLOP/s only.
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from multistep_cm import models
from multistep_cm import samplers
from multistep_cm import train
from multistep_cm.core import generation
from multistep_cm.core import sharding
from multistep_cm.core import stages
from multistep_cm.core import state as state_lib
import timing

config_flags.DEFINE_config_file('config', 'configs/digits.py:smoke',
                                'Config file.')
flags.DEFINE_integer('per_device_batch', 8, 'Images per chip per call.')
flags.DEFINE_integer('repeats', 5, 'Timed calls per program.')
flags.DEFINE_list('stages', list(stages.NAMES), 'Train steps to measure.')
flags.DEFINE_integer('student_steps', 8, 'Steps of the student sampler.')
FLAGS = flags.FLAGS

# bf16 dense peak, TFLOP/s per chip, by a substring of `device_kind`.
PEAK_TFLOPS = (('H100', 989.), ('H200', 989.), ('A100', 312.),
               ('TPU v5 lite', 197.), ('TPU v5e', 197.), ('TPU v5p', 459.),
               ('TPU v5', 459.), ('TPU v6', 918.))


def peak_tflops(device_kind):
  return next((p for k, p in PEAK_TFLOPS if k in device_kind), None)


def _flops(lowered):
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


def _peak_memory_gb():
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return None if peak is None else peak / 2**30


def _train_step(config, stage, batch_size):
  """(flops per call, compile seconds, seconds per call) of one train step."""
  config = config.copy_and_resolve_references()
  config.stage = stage
  config.batch_size = batch_size
  mesh = state_lib.make_mesh(config)
  model = state_lib.create_model(config)
  network = models.network_fn(model)
  tx = state_lib.make_optimizer(config.optim)
  state, state_sh = state_lib.init_state(config, model, tx, mesh)
  teacher = (jax.tree.map(jnp.copy, state.params)
             if stages.get(stage).runs_teacher else None)
  shape = (batch_size,) + state_lib.data_shape(config)
  batch = {'x': jax.random.normal(jax.random.key(1), shape),
           'label': jnp.arange(batch_size) % max(1, config.dataset.num_classes)}
  batch = sharding.global_batch(jax.device_get(batch), mesh)
  step_fn = train.make_train_step(config, network, tx, state_sh, mesh)
  lowered = step_fn.lower(state, batch, teacher)
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  holder = [state]

  def call():
    holder[0], out = compiled(holder[0], batch, teacher)
    return out['loss']
  return _flops(lowered), compile_s, timing.seconds_per_call(
      call, FLAGS.repeats)


def _sampler(config, spec, batch_size):
  """(flops per call, compile seconds, seconds per call) of one sampler call:
  FLOPs as network evaluations times the lowered forward pass's."""
  mesh = state_lib.make_mesh(config)
  model = state_lib.create_model(config)
  network = models.network_fn(model)
  state, shardings = state_lib.init_state(
      config, model, state_lib.make_optimizer(config.optim), mesh)
  shape = (batch_size,) + state_lib.data_shape(config)
  labels = generation.eval_labels(config, batch_size)
  forward = jax.jit(network).lower(
      state.ema_params, jnp.zeros(shape), jnp.full((batch_size,), 0.5),
      jnp.asarray(labels))
  generator = generation.Generator(config, network, shardings.ema_params, mesh,
                                   spec)
  run = lambda: next(generator.batches(state.ema_params, labels, 0,
                                       batch_size))[0]
  t0 = time.perf_counter()
  jax.block_until_ready(run())  # Compiles.
  compile_s = time.perf_counter() - t0
  return (_flops(forward) * spec.nfe(), compile_s,
          timing.seconds_per_call(run, FLAGS.repeats, warmup=0))


def main(argv):
  del argv
  config = FLAGS.config
  chips = jax.device_count()
  batch = FLAGS.per_device_batch * chips
  kind = jax.devices()[0].device_kind
  peak = peak_tflops(kind)
  rows = []
  for stage in FLAGS.stages:
    rows.append((f'{stage} train step', batch,
                 *_train_step(config, stage, batch), _peak_memory_gb()))
  for spec in (samplers.SamplerSpec('student', FLAGS.student_steps),
               samplers.SamplerSpec('addim', config.sampler.steps)):
    rows.append((f'{spec.name} sampler', batch,
                 *_sampler(config, spec, batch), _peak_memory_gb()))

  print(f'\n{chips} x {kind}; per-device batch {FLAGS.per_device_batch}; '
        f'peak {peak or "unknown"} TFLOP/s bf16 per chip\n')
  print('| program | ms/call | images/s per chip | GFLOP per image | '
        'TFLOP/s per chip | MFU | compile s | peak GiB |')
  print('|---|---|---|---|---|---|---|---|')
  for name, n, flops, compile_s, sec, mem in rows:
    achieved = flops / sec / chips / 1e12
    mfu = f'{100 * achieved / peak:.0f} %' if peak else '-'
    print(f'| {name} | {1e3 * sec:.1f} | {n / sec / chips:.1f} | '
          f'{flops / n / 1e9:.3g} | {achieved:.3g} | {mfu} | {compile_s:.1f} | '
          f'{"-" if mem is None else f"{mem:.1f}"} |')


if __name__ == '__main__':
  app.run(main)
