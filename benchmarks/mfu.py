"""Model FLOPs utilisation of the train steps and samplers, in one table.

  python benchmarks/mfu.py --config=configs/imagenet64.py:small --per_device_batch=128
  python benchmarks/mfu.py --config=configs/digits.py:smoke --per_device_batch=8   # the CPU

For the teacher, CD, CT and PD train steps (the project's own
`train.make_train_step`, on random data; a student's teacher is the network
itself, which costs the same) and for the 8-step student and the config's
aDDIM sampler: ms per call, the compute bound on it (model FLOPs at the
chip's bf16 peak: the roofline `--mode=describe --target` gives), images/s
per chip, model FLOPs, achieved TFLOP/s
per chip, MFU against the chip's bf16 dense peak, compile time, the compiled
program's scratch memory (activations: what remat saves) and the device's
peak memory so far (where the backend reports it). Also a bare jitted
forward+backward pass of the network (the teacher step's overhead over it is
the framework's) and the EMA update alone. `--config.model.*` overrides try
the levers: scan, remat, attention, norm_float32 (benchmarks/NOTES.md).

FLOPs are counted once, on the host, from each train step's lowered program
(`jit(...).lower(...).cost_analysis()`: before compilation, so cuBLAS and
cuDNN calls are counted, which the compiled GPU program's analysis misses),
lowered unscanned and without remat: XLA counts a scanned loop's body once,
and recomputation is not model work. A sampler's are its network
evaluations times the forward pass's, counted the same way. Unknown chips
(the CPU) get achieved TFLOP/s only.
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from multistep_cm import describe
from multistep_cm import run as run_lib
from multistep_cm import samplers
from multistep_cm import targets
from multistep_cm import train
from multistep_cm import errors
from multistep_cm.core import generation
from multistep_cm.core import stages
from multistep_cm.core import state as state_lib
import timing

config_flags.DEFINE_config_file('config', 'configs/digits.py:smoke',
                                'Config file.')
flags.DEFINE_integer('per_device_batch', 8, 'Images per chip per call.')
flags.DEFINE_integer('repeats', 5, 'Timed calls per program.')
flags.DEFINE_list('stages', list(stages.NAMES), 'Train steps to measure.')
flags.DEFINE_integer('student_steps', 8, 'Steps of the student sampler.')
flags.DEFINE_list('samplers', ['student', 'addim'],
                  'Samplers to measure: student (S steps), addim '
                  '(config.sampler.steps).')
flags.DEFINE_bool('ema', True, "Also time the train step's EMA update alone.")
flags.DEFINE_bool('bare', True, 'Also time a bare forward and backward pass.')
flags.DEFINE_string('label', '', 'Names this run in the table header.')
FLAGS = flags.FLAGS

def peak_tflops(device_kind):
  """bf16 dense peak, TFLOP/s per chip, from the targets' table."""
  chip = targets.chip_of(device_kind)
  return chip.peak_flops / 1e12 if chip else None


def _peak_memory_gb():
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return None if peak is None else peak / 2**30


def _temp_gb(compiled):
  """The compiled program's scratch memory: mostly the activations kept for
  the backward pass, what remat trades for compute. Known on every backend,
  before anything runs."""
  analysis = compiled.memory_analysis()
  return None if analysis is None else analysis.temp_size_in_bytes / 2**30


def _model_config(config):
  """The config whose lowered programs count the model FLOPs: unscanned
  (XLA's analysis counts a loop's body once) and without remat (recomputing
  is not model work). Its programs are lowered, never compiled."""
  config = config.copy_and_resolve_references()
  if config.model.get('scan'):
    config.model.scan = False
  if config.model.get('remat', 'none') != 'none':
    config.model.remat = 'none'
  return config


def _model_network(config):
  """(network, abstract parameters) of `_model_config(config)`."""
  config = _model_config(config)
  run = run_lib.resolve(config)
  abstract, _ = state_lib.param_layout(run)
  return run.network, abstract


def _step_flops(config, batch):
  """Model FLOPs of one train step of `config` on `batch`."""
  run = run_lib.resolve(_model_config(config))
  tx = state_lib.make_optimizer(run.config.optim)
  _, abstract, shardings = state_lib.state_layout(run, tx)
  teacher = abstract.params if run.stage.runs_teacher else None
  step_fn = train.make_train_step(run, tx, shardings)
  return describe.lowered_flops(step_fn.lower(abstract, batch, teacher))


def _train_step(config, stage, batch_size):
  """(flops per call, compile seconds, seconds per call, scratch GiB) of one
  train step."""
  config = config.copy_and_resolve_references()
  config.stage = stage
  config.batch_size = batch_size
  run = run_lib.resolve(config)
  tx = state_lib.make_optimizer(config.optim)
  state, state_sh = state_lib.init_state(run, tx)
  teacher = (jax.tree.map(jnp.copy, state.params)
             if run.stage.runs_teacher else None)
  batch = timing.random_batch(run, batch_size)
  step_fn = train.make_train_step(run, tx, state_sh)
  lowered = step_fn.lower(state, batch, teacher)
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  holder = [state]

  def call():
    holder[0], out = compiled(holder[0], batch, teacher)
    return out['loss']
  return (_step_flops(config, batch), compile_s,
          timing.seconds_per_call(call, FLAGS.repeats), _temp_gb(compiled))


def _bare_step(config, batch_size):
  """The same for a bare jitted forward and backward pass of the network (a
  squared error, no optimizer, no EMA): what the teacher step adds to it is
  the framework's overhead."""
  run = run_lib.resolve(config)
  network = run.network
  state, _ = state_lib.init_state(run, state_lib.make_optimizer(config.optim))
  shape = (batch_size,) + run.shape
  z = jax.random.normal(jax.random.key(1), shape)
  t = jax.random.uniform(jax.random.key(2), (batch_size,))
  labels = run.condition.example(batch_size)

  def grad(network):
    return jax.jit(jax.grad(lambda p: jnp.mean(
        (network(p, z, t, labels, jax.random.key(3)) - z) ** 2)))
  t0 = time.perf_counter()
  compiled = grad(network).lower(state.params).compile()
  compile_s = time.perf_counter() - t0
  counting, abstract = _model_network(config)
  return (describe.lowered_flops(grad(counting).lower(abstract)), compile_s,
          timing.seconds_per_call(lambda: compiled(state.params),
                                  FLAGS.repeats), _temp_gb(compiled))


def _ema_update(config):
  """(0 FLOPs counted, compile seconds, seconds per call) of the EMA update
  of the train step, on its own: its cost is memory traffic."""
  state, shardings = state_lib.init_state(
      run_lib.resolve(config), state_lib.make_optimizer(config.optim))
  update = jax.jit(
      lambda e, p: jax.tree.map(lambda a, b: 0.999 * a + 0.001 * b, e, p),
      in_shardings=(shardings.ema_params, shardings.params),
      out_shardings=shardings.ema_params, donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled = update.lower(state.ema_params, state.params).compile()
  compile_s = time.perf_counter() - t0
  holder = [state.ema_params]

  def call():
    holder[0] = compiled(holder[0], state.params)
    return holder[0]
  return (0., compile_s, timing.seconds_per_call(call, FLAGS.repeats),
          _temp_gb(compiled))


def _sampler(config, spec, batch_size):
  """(flops per call, compile seconds, seconds per call) of one sampler call:
  FLOPs as network evaluations times the lowered forward pass's."""
  run = run_lib.resolve(config)
  state, shardings = state_lib.init_state(
      run, state_lib.make_optimizer(config.optim))
  shape = (batch_size,) + run.shape
  labels = jax.device_get(run.condition.example(batch_size))
  counting, abstract = _model_network(config)
  forward = jax.jit(counting).lower(
      abstract, jnp.zeros(shape), jnp.full((batch_size,), 0.5), labels)
  generator = generation.Generator(run, shardings.ema_params, spec)
  sample = lambda: next(generator.batches(state.ema_params, labels, 0,
                                          batch_size))[0]
  t0 = time.perf_counter()
  jax.block_until_ready(sample())  # Compiles.
  compile_s = time.perf_counter() - t0
  return (describe.lowered_flops(forward) * spec.nfe(), compile_s,
          timing.seconds_per_call(sample, FLAGS.repeats, warmup=0), None)


def main(argv):
  del argv
  config = FLAGS.config
  chips = jax.device_count()
  batch = FLAGS.per_device_batch * chips
  kind = jax.devices()[0].device_kind
  peak = peak_tflops(kind)
  steps = {'student': FLAGS.student_steps, 'addim': config.sampler.steps}
  unknown = set(FLAGS.samplers) - set(steps)
  if unknown:
    raise app.UsageError(f'Unknown sampler(s) {sorted(unknown)}: expected '
                         'student or addim.')
  rows = []
  if FLAGS.bare:
    rows.append(('bare forward+backward', batch, *_bare_step(config, batch),
                 _peak_memory_gb()))
    _print_row(rows[-1], chips, peak)
  for stage in FLAGS.stages:
    try:
      row = _train_step(config, stage, batch)
    except errors.ConfigError as e:
      # A stage this config cannot train, e.g. gd without a guidance scale.
      print(f'{stage} train step: skipped ({e})')
      continue
    rows.append((f'{stage} train step', batch, *row, _peak_memory_gb()))
    _print_row(rows[-1], chips, peak)
  for name in FLAGS.samplers:
    spec = samplers.SamplerSpec(name, steps[name])
    rows.append((f'{spec.name} sampler', batch,
                 *_sampler(config, spec, batch), _peak_memory_gb()))
    _print_row(rows[-1], chips, peak)
  if FLAGS.ema:
    rows.append(('EMA update alone', batch, *_ema_update(config), None))
    _print_row(rows[-1], chips, peak)

  model = config.model
  print(f'\n{FLAGS.label or "run"}: {chips} x {kind}; per-device batch '
        f'{FLAGS.per_device_batch}; peak {peak or "unknown"} TFLOP/s bf16 per '
        f'chip; attention {model.get("attention", "xla")}, scan '
        f'{model.get("scan", False)}, remat {model.get("remat", "none")}, '
        f'float32 norm statistics {model.get("norm_float32", True)}\n')
  print('| program | ms/call | bound ms | images/s per chip | GFLOP per image | '
        'TFLOP/s per chip | MFU | compile s | scratch GiB | peak GiB |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for row in rows:
    print(_row(row, chips, peak))


def _row(row, chips, peak):
  name, n, flops, compile_s, sec, scratch, mem = row
  achieved = flops / sec / chips / 1e12
  mfu = f'{100 * achieved / peak:.0f} %' if peak and flops else '-'
  # The compute roofline --mode=describe --target gives before booking the
  # chip: the model FLOPs at its dense bf16 peak.
  bound = (f'{1e3 * flops / chips / (peak * 1e12):.1f}' if peak and flops
           else '-')
  gib = lambda x: '-' if x is None else f'{x:.3g}'
  return (f'| {name} | {1e3 * sec:.1f} | {bound} | {n / sec / chips:.1f} | '
          f'{flops / n / 1e9:.3g} | {achieved:.3g} | {mfu} | {compile_s:.1f} | '
          f'{gib(scratch)} | {gib(mem)} |')


def _print_row(row, chips, peak):
  """Each row as soon as it is measured: a run cut short keeps them."""
  print('measured:', _row(row, chips, peak), flush=True)


if __name__ == '__main__':
  app.run(main)
