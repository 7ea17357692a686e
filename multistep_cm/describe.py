"""--mode=describe: what a config is, without running it.

  python -m multistep_cm.main --config=configs/imagenet64.py:large,cd --mode=describe

prints the config file's variants (its docstring), every resolved field, the
network's parameter count, and the per-device memory of the train step as
XLA compiles it for this process's devices and the config's mesh, with the
number of tensors XLA's partitioner had to replicate whole to reshard them
("involuntary full rematerialization": a sharding that fights the mesh).
Compiled ahead of time from abstract inputs, so nothing is allocated and a
pod's config can be checked on a laptop with
`XLA_FLAGS=--xla_force_host_platform_device_count=N`.
"""

import ast
import os
import sys
import tempfile

from etils import epath
import jax
from ml_collections import config_dict

from multistep_cm import conditioning
from multistep_cm import models
from multistep_cm import run as run_lib
from multistep_cm import train
from multistep_cm.core import state as state_lib

GIB = 2 ** 30
REMAT_WARNING = 'Involuntary full rematerialization'


def compile_counting_remats(lowered):
  """(the compiled executable, how many times XLA warned of an involuntary
  full rematerialization while compiling it, or None where its warnings are
  hidden). XLA logs from C++ to file descriptor 2, which is read back here
  and passed on; a compilation cache hit would log nothing, so none is used."""
  jax.config.update('jax_enable_compilation_cache', False)
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as log:
    os.dup2(log.fileno(), 2)
    try:
      compiled = lowered.compile()
    finally:
      os.dup2(saved, 2)
      os.close(saved)
    log.seek(0)
    text = log.read().decode(errors='replace')
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


def train_step_memory(config):
  """(parameter count, involuntary rematerializations, {what: bytes per
  device}) of the config's train step, compiled for the config's mesh on
  this process's devices from abstract state and batch. `config`: or its
  `run.Run`."""
  run = run_lib.of(config)
  config = run.config
  tx = state_lib.make_optimizer(config.optim)
  _, abstract, shardings = state_lib.state_layout(run, tx)
  batch = {'x': jax.ShapeDtypeStruct(
      (config.batch_size,) + run.shape, jax.numpy.float32),
           conditioning.KEY: jax.eval_shape(
               lambda: run.condition.example(config.batch_size))}
  teacher = abstract.params if run.stage.runs_teacher else None
  step_fn = train.make_train_step(run, tx, shardings)
  compiled, remats = compile_counting_remats(
      step_fn.lower(abstract, batch, teacher))
  memory = compiled.memory_analysis()
  return models.count_params(abstract.params), remats, {
      'arguments (state, batch, teacher)': memory.argument_size_in_bytes,
      'outputs (new state, metrics)': memory.output_size_in_bytes,
      'donated (outputs written over arguments)': memory.alias_size_in_bytes,
      'temporaries (activations, gathered weights)':
          memory.temp_size_in_bytes}


def run(config, config_file):
  """Prints the description; returns it as text."""
  run = run_lib.resolve(config)
  params, remats, memory = train_step_memory(run)
  mesh = dict(run.mesh.shape)
  lines = [f'# {config_file}', '', variants(config_file) or '(no docstring)',
           '', '## Resolved fields', '', *fields(config), '',
           '## Train step', '',
           f'stage {config.stage}; {params:,} parameters; batch '
           f'{config.batch_size} over mesh {mesh} of '
           f'{jax.device_count()} {jax.devices()[0].platform} devices.',
           'Per device, as XLA compiles it here:']
  lines += [f'  {what}: {size / GIB:.3f} GiB' for what, size in memory.items()]
  lines.append('Involuntary full rematerializations: ' + (
      'not counted (TF_CPP_MIN_LOG_LEVEL hides XLA\'s warnings: set it to 0 '
      'or 1)' if remats is None else
      f'{remats} (XLA\'s warnings above say which tensors)' if remats else
      '0'))
  text = '\n'.join(lines)
  print(text, flush=True)
  return text
