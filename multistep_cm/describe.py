"""--mode=describe: what a config is, without running it.

  python -m multistep_cm.main --config=configs/imagenet64.py:large,cd --mode=describe
  python -m multistep_cm.main --config=configs/imagenet64.py:small --mode=describe --target=v5p-64 [--fit]

prints the config file's variants (its docstring), every resolved field, the
network's parameter count, and the per-device memory of the train step as
XLA compiles it for this process's devices and the config's mesh, with the
number of tensors XLA's partitioner had to replicate whole to reshard them
("involuntary full rematerialization": a sharding that fights the mesh).
Compiled ahead of time from abstract inputs, so nothing is allocated. That
memory is the host's buffer assignment, which on a CPU is 2-4 times what
a TPU's or GPU's compiler assigns (docs/targets.md).

With `--target` (a TPU slice or GPU node, `targets.get`), the train step and
the sampler are compiled by the target's own compiler for its compile-only
devices: memory per device against the chip's, whether it fits and by how
much, model FLOPs, the compiled program's own counts where the target gives
them, a roofline bound on step time, and with `--fit` the largest per-device
batch that fits. Backend-dependent choices (the attention kernel) follow
the target, not this host.
"""

import ast
import dataclasses
import os
import sys
import tempfile
import time

from etils import epath
import jax
from ml_collections import config_dict

from multistep_cm import conditioning
from multistep_cm import errors
from multistep_cm import models
from multistep_cm import run as run_lib
from multistep_cm import targets
from multistep_cm import train
from multistep_cm.core import generation
from multistep_cm.core import sharding
from multistep_cm.core import stages
from multistep_cm.core import state as state_lib

GIB = 2 ** 30
REMAT_WARNING = 'Involuntary full rematerialization'


def compile_counting_remats(lowered, quiet=False, options=None):
  """(the compiled executable, how many times XLA warned of an involuntary
  full rematerialization while compiling it, or None where its warnings are
  hidden). XLA logs from C++ to file descriptor 2, which is read back here
  and passed on (with `quiet`, only those warnings and errors: a target's
  compiler says much else at that level); a compilation cache hit would log
  nothing, so none is used. `options`: XLA's compiler options."""
  jax.config.update('jax_enable_compilation_cache', False)
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as log:
    os.dup2(log.fileno(), 2)
    try:
      compiled = lowered.compile(compiler_options=options)
    finally:
      os.dup2(saved, 2)
      os.close(saved)
    log.seek(0)
    text = log.read().decode(errors='replace')
  if quiet:
    text = ''.join(line for line in text.splitlines(keepends=True)
                   if REMAT_WARNING in line or line[:1] in ('E', 'F'))
  sys.stderr.write(text)
  hidden = os.environ.get('TF_CPP_MIN_LOG_LEVEL', '0') not in ('0', '1')
  return compiled, None if hidden else text.count(REMAT_WARNING)


def variants(config_file):
  """The docstring of a config file (`path` or `path:argument`): where each
  experiment states its arguments."""
  path = config_file.partition(':')[0]
  try:
    return ast.get_docstring(ast.parse(epath.Path(path).read_text())) or ''
  except (OSError, SyntaxError):
    return ''


def fields(config):
  """'name = value' of every leaf of the config, sorted."""
  def walk(node, prefix):
    for key in sorted(node.keys()):
      value = node[key]
      if isinstance(value, config_dict.ConfigDict):
        yield from walk(value, f'{prefix}{key}.')
      else:
        yield f'{prefix}{key} = {value!r}'
  return list(walk(config, ''))


def _train_inputs(run):
  """(jitted train step, its abstract inputs, abstract parameters)."""
  config = run.config
  tx = state_lib.make_optimizer(config.optim)
  _, abstract, shardings = state_lib.state_layout(run, tx)
  batch = {'x': jax.ShapeDtypeStruct(
      (config.batch_size,) + run.shape, jax.numpy.float32),
           conditioning.KEY: jax.eval_shape(
               lambda: run.condition.example(config.batch_size))}
  teacher = abstract.params if run.stage.runs_teacher else None
  return (train.make_train_step(run, tx, shardings),
          (abstract, batch, teacher), abstract.params)


def train_step_memory(config):
  """(parameter count, involuntary rematerializations, {what: bytes per
  device}) of the config's train step, compiled for the config's mesh on
  this process's devices from abstract state and batch. `config`: or its
  `run.Run`."""
  step_fn, inputs, params = _train_inputs(run_lib.of(config))
  compiled, remats = compile_counting_remats(step_fn.lower(*inputs))
  return models.count_params(params), remats, _memory(compiled)


TRAIN_STEP_MEMORY = ('arguments (state, batch, teacher)',
                     'outputs (new state, metrics)',
                     'donated (outputs written over arguments)',
                     'temporaries (activations, gathered weights)')
SAMPLER_MEMORY = ('arguments (parameters, noise key, condition)',
                  'outputs (samples)', 'donated',
                  'temporaries (activations, gathered weights)')


def _memory(compiled, names=TRAIN_STEP_MEMORY):
  memory = compiled.memory_analysis()
  return dict(zip(names, (memory.argument_size_in_bytes,
                          memory.output_size_in_bytes,
                          memory.alias_size_in_bytes,
                          memory.temp_size_in_bytes)))


def _sampler_inputs(run):
  """(Generator, spec, abstract parameters, abstract condition) of the
  sampler --mode=sample and --mode=evaluate draw with, at
  config.evaluate.batch_size rounded up to the mesh."""
  spec = stages.evaluation_sampler(run.config)
  params, shardings = state_lib.param_layout(run)
  n = sharding.mesh_batch_size(run.config.evaluate.batch_size, run.mesh)
  cond = jax.eval_shape(lambda: run.condition.example(n))
  return generation.Generator(run, shardings, spec), spec, params, cond


def _counting_config(config):
  """The config whose host lowering counts model FLOPs: the network
  unscanned (XLA counts a loop's body once), without remat (recomputing is
  not model work) and with XLA's attention (a fused kernel is one opaque
  call), on one device (the program's global work)."""
  config = config.copy_and_resolve_references()
  for field, plain in (('scan', False), ('remat', 'none'),
                       ('attention', 'xla')):
    if field in config.model:
      config.model[field] = plain
  config.mesh.shape = (1,) * len(config.mesh.axes)
  return config


def _cost(analysis):
  """A cost analysis as one dict ({} where the backend gives none): some
  backends give a list of one."""
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return analysis or {}


def lowered_flops(lowered):
  """The FLOPs XLA counts in a lowered (not yet compiled) program."""
  return float(_cost(lowered.cost_analysis())['flops'])


def model_flops(config):
  """{'train step': FLOPs per image of a train step, 'sampler': per image
  of a sampler call}: the program's own work, whatever it is compiled for,
  counted from a lowering of `_counting_config(config)` for this host's CPU
  (never compiled: a program lowered for a TPU reports no count)."""
  with targets.compiling_for(None):
    run = run_lib.resolve(_counting_config(config), jax.devices('cpu')[:1])
    step_fn, inputs, _ = _train_inputs(run)
    _, spec, params, cond = _sampler_inputs(run)
    n = jax.tree.leaves(cond)[0].shape[0]
    forward = jax.jit(run.network).lower(
        params, jax.ShapeDtypeStruct((n,) + run.shape, jax.numpy.float32),
        jax.ShapeDtypeStruct((n,), jax.numpy.float32), cond)
    return {'train step': lowered_flops(step_fn.lower(*inputs)) / config.batch_size,
            'sampler': lowered_flops(forward) * spec.nfe(run.condition) / n}


@dataclasses.dataclass
class Compiled:
  """What a target's compiler made of one program, per device."""
  memory: dict  # What -> bytes.
  flops: float | None  # The compiled program's count, where reported.
  bytes_accessed: float | None
  remats: int | None
  seconds: float
  refused: str = ''  # The compiler's own "does not fit", if it said so.
  note: str = ''  # How the compile departed from the target's defaults.

  @property
  def peak(self):
    m = list(self.memory.values())
    return m[0] + m[1] - m[2] + m[3]

  def fits(self, target):
    return not self.refused and self.peak <= target.usable_bytes


# XLA's GPU compiler sizes its Triton matmul tiles by autotuning on the GPU;
# compiling without one it falls back to a heuristic, which finds no tiles
# for some dots (text2image's cross-attention gradient at 256 images per
# GPU). Such a program is compiled again with cuBLAS's matmuls, which need
# no tiles at compile time.
NO_TILES = "Couldn't find output tile sizes"
NO_TILES_NOTE = ('compiled with cuBLAS\'s matmuls instead of Triton\'s '
                 '(xla_gpu_enable_triton_gemm=false): without a GPU to '
                 'autotune on, XLA found no Triton tiles for one of its dots')


def compile_for(lowered, names=TRAIN_STEP_MEMORY):
  """Compiles `lowered` (for a target's devices) into a Compiled, its memory
  under `names`; a compile the compiler refuses for memory is a Compiled
  saying so."""
  start, note = time.perf_counter(), ''
  try:
    try:
      compiled, remats = compile_counting_remats(lowered, quiet=True)
    except jax.errors.JaxRuntimeError as e:
      if NO_TILES not in str(e):
        raise
      note = NO_TILES_NOTE
      compiled, remats = compile_counting_remats(
          lowered, quiet=True, options={'xla_gpu_enable_triton_gemm': False})
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    line = str(e).strip().splitlines()[0]
    return Compiled({}, None, None, None, time.perf_counter() - start,
                    refused=line, note=note)
  seconds = time.perf_counter() - start
  cost = _cost(compiled.cost_analysis())
  return Compiled(_memory(compiled, names), cost.get('flops'),
                  cost.get('bytes accessed'), remats, seconds, note=note)


# jax asks libcudnn for its version while tracing cuDNN's fused attention,
# and a deviceless compile has no libcudnn: a GPU target's programs are
# compiled with XLA's attention where the run would use cuDNN's.
CUDNN_NOTE = ('compiled here with XLA\'s attention: jax reads libcudnn\'s '
              'version while tracing cuDNN\'s, and compiling without a GPU has '
              'no libcudnn; XLA\'s holds the attention scores in memory, '
              'cuDNN\'s flash attention does not, so the memory below is an '
              'upper bound')


def attention_kernels(config, target):
  """(the attention kernel the config's network uses on the target, the one
  compiled here)."""
  model = config.model
  if 'attention' not in model:
    return None, None
  choice = models.attention_implementation(
      model.attention, model.get('dtype', 'bfloat16'),
      model.get('head_dim', 64), backend=target.platform)
  return choice, 'xla' if choice == 'cudnn' else choice


def _target_run(config, target, batch_size=None):
  """The Run of `config` (at `batch_size`) on the target's devices."""
  config = config.copy_and_resolve_references()
  if batch_size is not None:
    config.batch_size = batch_size
  _, compiled = attention_kernels(config, target)
  if compiled:
    config.model.attention = compiled
  with targets.compiling_for(target):
    return run_lib.resolve(config, targets.devices(target))


def compile_train_step(config, target, batch_size=None):
  run = _target_run(config, target, batch_size)
  with targets.compiling_for(target):
    step_fn, inputs, _ = _train_inputs(run)
    return compile_for(step_fn.lower(*inputs))


def compile_sampler(config, target):
  """(Compiled, its SamplerSpec, its batch) of the evaluation sampler."""
  run = _target_run(config, target)
  with targets.compiling_for(target):
    generator, spec, params, cond = _sampler_inputs(run)
    n = jax.tree.leaves(cond)[0].shape[0]
    return (compile_for(generator.lower(params, cond), SAMPLER_MEMORY), spec,
            n)


MAX_PER_DEVICE_BATCH = 2 ** 14  # Where the search stops doubling.


def fit(config, target, compiled=None):
  """(the largest per-device batch whose train step fits the target, 0 if
  none, up to MAX_PER_DEVICE_BATCH and from 8 up to the grain of 8; its
  Compiled; every per-device batch tried -> Compiled): doubling or halving
  from the config's, then a search between the last batch that fits and
  the first that does not (`_next_batch`), each batch compiled once.
  `compiled`: batches already compiled."""
  tried = dict(compiled or {})

  def fits(per_device):
    if per_device not in tried:
      tried[per_device] = compile_train_step(
          config, target, per_device * target.devices)
      _say(f'  per-device batch {per_device}: '
           f'{_verdict(tried[per_device], target)}')
    return tried[per_device].fits(target)
  low = high = max(1, config.batch_size // target.devices)
  if fits(low):
    while high <= MAX_PER_DEVICE_BATCH and fits(high):
      low, high = high, 2 * high
    if high not in tried:  # Past the cap: the search stops at it.
      return low, tried[low], tried
  else:
    while low > 1 and not fits(low):
      low, high = low // 2, low
    if not fits(low):
      return 0, None, tried
  while high - low > (grain := 8 if low >= 8 else 1):
    middle = _next_batch(tried[low], tried[high], low, high, grain,
                         target.usable_bytes)
    if fits(middle):
      low = middle
    else:
      high = middle
  return low, tried.get(low), tried


def _next_batch(at_low, at_high, low, high, grain, usable):
  """The batch to compile next between `low` (fits) and `high` (does not):
  where the line through their peaks meets the usable memory (memory grows
  about linearly with the batch, so this is close in one or two steps),
  else the middle; on the grain, strictly inside."""
  step = (high - low) // 2
  if not at_high.refused and at_high.peak > at_low.peak:
    per_image = (at_high.peak - at_low.peak) / (high - low)
    step = int((usable - at_low.peak) / per_image)
  return low + min(max(step, grain), high - low - 1) // grain * grain


def _say(line):
  print(line, flush=True)


def _gib(size):
  return f'{size / GIB:.3f} GiB'


def _verdict(compiled, target):
  if compiled.refused:
    return f'does not fit: the compiler refused it ({compiled.refused})'
  margin = target.usable_bytes - compiled.peak
  if margin >= 0:
    return f'fits, {_gib(margin)} to spare (peak {_gib(compiled.peak)})'
  return f'does not fit, {_gib(-margin)} over (peak {_gib(compiled.peak)})'


def moved_bytes(compiled):
  """(bytes a call moves per device at least, where the figure comes from):
  the compiler's count of bytes accessed where it gives one (TPU), else
  every argument read and every output written once."""
  floor = sum(list(compiled.memory.values())[:2])
  if compiled.bytes_accessed is not None and compiled.bytes_accessed >= floor:
    return compiled.bytes_accessed, 'the bytes the compiler counts'
  return floor, 'its arguments read and outputs written once'


def roofline(flops, compiled, chip):
  """(lower bound on seconds per call, 'compute' or 'memory', the MFU that
  bound implies) of a call doing `flops` per device, compiled as
  `compiled`."""
  compute = flops / chip.peak_flops
  memory = moved_bytes(compiled)[0] / chip.bandwidth
  bound = max(compute, memory)
  return bound, 'compute' if compute >= memory else 'memory', compute / bound


def _remats_line(remats):
  return 'Involuntary full rematerializations: ' + (
      "not counted (TF_CPP_MIN_LOG_LEVEL hides XLA's warnings: set it to 0 "
      'or 1)' if remats is None else
      f"{remats} (XLA's warnings above say which tensors)" if remats else
      '0')


def _program_lines(what, compiled, target, flops, images):
  """The report of one program compiled for `target`; `flops` the model
  FLOPs of one call over all devices, `images` per call."""
  if compiled.refused:
    return [f'{what}: {_verdict(compiled, target)}',
            f'Compiled in {compiled.seconds:.0f} s on this host.']
  platform = 'TPU' if target.platform == 'tpu' else 'GPU'
  lines = [f'Per device, as the {platform} compiler compiles it for '
           f'{target.name}:']
  lines += [f'  {k}: {_gib(v)}' for k, v in compiled.memory.items()]
  lines += [f'  peak (arguments + outputs - donated + temporaries): '
            f'{_gib(compiled.peak)}',
            f'  usable per device: {_gib(target.usable_bytes)}',
            f'{what}: {_verdict(compiled, target)}.']
  per_device = flops / target.devices
  lines.append(f'Model FLOPs per call: {flops:.4g} ({flops / images / 1e9:.4g}'
               ' GFLOP per image; the network unscanned, without remat, '
               'counted on this host).')
  if compiled.flops is not None:
    lines.append(f'The compiler\'s count per device: {compiled.flops:.4g} '
                 f'FLOPs, {compiled.bytes_accessed:.4g} bytes accessed (a '
                 'loop\'s body counted once).')
  else:
    lines.append('The compiler\'s count per device: not reported by the '
                 f'{platform} compiler.')
  bound, limit, mfu = roofline(per_device, compiled, target.chip)
  lines.append(
      f'Roofline: at least {bound * 1e3:.4g} ms per call, at most '
      f'{images / target.devices / bound:.4g} images/s per device '
      f'({limit}-bound: {per_device:.4g} model FLOPs at '
      f'{target.chip.peak_flops / 1e12:g} TFLOP/s, '
      f'{moved_bytes(compiled)[1]} at {target.chip.bandwidth / 1e9:g} '
      f'GB/s); MFU {100 * mfu:.0f} % at the bound.')
  lines.append(_remats_line(compiled.remats))
  if compiled.note:
    lines.append(f'Note: {compiled.note}.')
  lines.append(f'Compiled in {compiled.seconds:.1f} s on this host.')
  return lines


def _target_lines(config, target, fit_batch, fit_remat):
  """The report for `target`: the train step and the sampler, and with
  `fit_batch` the largest per-device batch that fits (`fit_remat`: with
  each remat policy)."""
  run = _target_run(config, target)
  with targets.compiling_for(target):
    params = models.count_params(state_lib.param_layout(run)[0])
  mesh = dict(run.mesh.shape)
  flops = model_flops(config)
  chosen, compiled = attention_kernels(config, target)
  attention = ('' if chosen is None else f'; attention {chosen} (config '
               f'{config.model.attention!r} on {target.platform})' +
               ('' if chosen == compiled else f', {CUDNN_NOTE}'))
  lines = ['', f'## On {target.name}', '', target.describe(),
           f'{params:,} parameters; mesh {mesh}{attention}.']
  _say('\n'.join(lines))
  batch = config.batch_size
  step = compile_train_step(config, target)
  out = ['', f'### Train step (stage {config.stage}, batch {batch}, '
         f'{batch / target.devices:g} per device)', '']
  out += _program_lines('Train step', step, target,
                        flops['train step'] * batch, batch)
  _say('\n'.join(out))
  lines += out
  sample, spec, n = compile_sampler(config, target)
  out = ['', f'### Sampler ({spec.label}, batch {n})', '']
  out += _program_lines('Sampler', sample, target, flops['sampler'] * n, n)
  _say('\n'.join(out))
  lines += out
  if fit_batch:
    _say('\n### Largest batch that fits\n')
    per_device = batch // target.devices
    out = []
    remats = [config.model.get('remat', 'none')]
    if fit_remat and 'remat' in config.model:
      remats += [r for r in models.REMAT if r not in remats]
    best = 0
    for remat in remats:
      tuned = config.copy_and_resolve_references()
      if 'remat' in tuned.model:
        tuned.model.remat = remat
      known = None
      if remat == remats[0] and batch % target.devices == 0:
        known = {per_device: step}
      elif best:  # Another policy: from the batch the last one reached.
        tuned.batch_size = best * target.devices
      best, compiled, _ = fit(tuned, target, known)
      out.append(_fit_line(best, compiled, target, remat,
                           flops['train step']))
      _say(out[-1])
    lines += ['', '### Largest batch that fits', ''] + out
  return lines


def _fit_line(best, compiled, target, remat, flops_per_image):
  if not best:
    return (f'With remat {remat!r}: no per-device batch fits {target.name}, '
            '1 included.')
  bound, limit, _ = roofline(flops_per_image * best, compiled, target.chip)
  capped = (f' (the search stops at {MAX_PER_DEVICE_BATCH})'
            if best >= MAX_PER_DEVICE_BATCH else '')
  return (f'With remat {remat!r}: largest per-device batch that fits '
          f'{best}{capped} (global {best * target.devices}), peak '
          f'{_gib(compiled.peak)} of {_gib(target.usable_bytes)}; roofline '
          f'{bound * 1e3:.4g} ms per step ({limit}-bound, '
          f'{best / bound:.4g} images/s per device).')


def run(config, config_file, target=None, fit_batch=False, fit_remat=False):
  """Prints the description; returns it as text. `target`: a name of
  `targets.get`, to compile for it; `fit_batch`: also search the largest
  per-device batch that fits it, `fit_remat` with each remat policy too."""
  if (fit_batch or fit_remat) and not target:
    raise errors.ConfigError('--fit searches a target\'s largest batch: give '
                             '--target too.')
  if target:
    target = targets.get(target)
    targets.devices(target)  # Its compiler installed, or one line now.
    lines = [f'# {config_file}', '', variants(config_file) or
             '(no docstring)', '', '## Resolved fields', '', *fields(config)]
    _say('\n'.join(lines))
    lines += _target_lines(config, target, fit_batch or fit_remat, fit_remat)
    return '\n'.join(lines)
  run = run_lib.resolve(config)
  params, remats, memory = train_step_memory(run)
  mesh = dict(run.mesh.shape)
  lines = [f'# {config_file}', '', variants(config_file) or '(no docstring)',
           '', '## Resolved fields', '', *fields(config), '',
           '## Train step', '',
           f'stage {config.stage}; {params:,} parameters; batch '
           f'{config.batch_size} over mesh {mesh} of '
           f'{jax.device_count()} {jax.devices()[0].platform} devices.',
           'Per device, as XLA compiles it here (this host\'s buffer '
           'assignment, not an accelerator\'s: --target=NAME compiles for '
           'one):']
  lines += [f'  {what}: {size / GIB:.3f} GiB' for what, size in memory.items()]
  lines.append(_remats_line(remats))
  text = '\n'.join(lines)
  print(text, flush=True)
  return text
