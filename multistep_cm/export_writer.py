"""--mode=export: a stage's sampler as one portable program, for serving
(this module writes it; `exported.py` reads it).

  python -m multistep_cm.main --config=configs/digits.py:stage=cd \
      --workdir=/tmp/digits/cd_s8 --mode=export

writes WORKDIR/export/step<N>_<sampler><steps>/ (an any-S student's:
step<N>_any_student/, every S in one artifact) for the newest checkpoint
(EMA weights unless config.evaluate.ema is False), with the stage's sampler
and config.evaluate's overrides, as --mode=evaluate samples:

  sampler.jax_exported  noise (and a stochastic sampler's per-step keys),
                        labels -> uint8 NHWC images, serialised with
                        `jax.export` for CPU, CUDA and TPU, any batch size
  sampler_s<S>.jax_exported  an any-S student's: the same at each other S
                        it learned (config.any_steps); the manifest's
                        `programs` maps each S to its file
  weights.npz           the weights it takes, in the order the manifest
                        lists them (plain arrays: no pickle)
  manifest.json         what it is: stage, sampler, S, NFE, guidance, image
                        shape, labels, versions, the files' SHA-256

`multistep_cm/exported.py` loads and runs it with only jax and flatbuffers
installed (the format's reader: its constants are the format). The directory is written
under a temporary name and renamed into place, so a re-export replaces it
and a reader never sees a half-written one (for an instant between two
renames, none). On gs://, where renaming a directory moves its objects one
at a time, the manifest leaves the old artifact first and enters the new
one last: a reader finds a whole artifact, or none (no manifest.json), never
a manifest whose files are still moving.
"""

import dataclasses
import hashlib
import io
import json
import os

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np

from multistep_cm import conditioning
from multistep_cm import errors
from multistep_cm import exported
from multistep_cm import run as run_lib
from multistep_cm import weights as weights_lib
from multistep_cm.core import generation
from multistep_cm.core import stages
from multistep_cm.core import state

PLATFORMS = ('cpu', 'cuda', 'tpu')


def check_exportable(run):
  """Raises ConfigError, before anything is loaded, for a dataset whose
  samples the exported program cannot take or give: it takes class labels
  or nothing, and gives uint8 images."""
  config, dataset, condition = run.config, run.dataset, run.condition
  if condition.conditional and not isinstance(condition,
                                              conditioning.ClassLabels):
    raise errors.ConfigError(
        f'--mode=export supports class-labelled and unconditional models; '
        f'dataset {config.dataset.name!r} is conditioned on '
        f'{type(condition).__name__}.')
  if not dataset.images:
    raise errors.ConfigError(f'--mode=export writes image samplers; dataset '
                             f'{config.dataset.name!r} yields points.')


def portable(config):
  """The config with XLA's attention: 'auto' picks cuDNN's kernel on a GPU,
  a custom call that neither the CPU nor the TPU can run, so a program
  exported on a GPU would only run there. The weights are the same."""
  config = config.copy_and_resolve_references()
  if 'attention' in config.model:
    with config.unlocked():
      config.model.attention = 'xla'
  return config


def label_meaning(config, condition):
  """What the program's labels are, for the manifest."""
  if not condition.conditional:
    return {'num_classes': 0,
            'meaning': 'unconditional: the sampler takes no labels'}
  k = condition.num_classes
  return {'num_classes': k,
          'meaning': f'label k in [0, {k}) draws class k of dataset '
                     f'{config.dataset.name!r}, numbered as its training '
                     'labels'}


def prng_impl():
  """The name of the PRNG this process draws keys with: the exported
  program and the reader draw with it too."""
  return str(jax.random.key_impl(jax.random.key(0)))


def program(run, spec, treedef, impl):
  """`(weights, noise, labels[, step key data]) -> uint8 images`: the
  sampler `spec` of the run's network whose parameters are `weights`,
  flattened as `treedef`, followed by the uint8 conversion, as a
  `generation.Generator` with `uint8` runs them after drawing its noise."""
  network, logsnr, condition = run.network, run.logsnr_fn, run.condition

  def sample(weights, noise, labels, *step_keys):
    params = jax.tree.unflatten(treedef, weights)
    keys = (jax.random.wrap_key_data(step_keys[0], impl=impl) if step_keys
            else None)
    return generation.to_uint8(spec(network, params, noise, labels, logsnr,
                                    condition, keys))
  return sample


def export_program(run, spec, params):
  """(jax.export.Exported, {weight name: array} in the order it takes
  them): the sampler over weights shaped as `params`, for every batch size
  and PLATFORMS."""
  flat = weights_lib.flatten(params)
  impl = prng_impl()
  (batch,) = jax.export.symbolic_shape('batch')
  shape = run.shape
  args = [tuple(jax.ShapeDtypeStruct(np.shape(a), a.dtype)
                for a in flat.values()),
          jax.ShapeDtypeStruct((batch,) + shape, np.float32),
          jax.ShapeDtypeStruct((batch,), np.int32)]
  if spec.stochastic:
    key_shape = jax.random.key_data(jax.random.key(0)).shape
    args.append(jax.ShapeDtypeStruct((batch,) + key_shape, np.uint32))
  fn = program(run, spec, jax.tree.structure(params), impl)
  # Source locations name each operation's line only, not the whole Python
  # stack that led to it: the same checkpoint and code then give the same
  # bytes whoever calls this (the command, a test, a notebook).
  full = jax.config.jax_include_full_tracebacks_in_locations
  jax.config.update('jax_include_full_tracebacks_in_locations', False)
  try:
    exp = jax.export.export(jax.jit(fn), platforms=PLATFORMS)(*args)
  finally:
    jax.config.update('jax_include_full_tracebacks_in_locations', full)
  return exp, flat


def _host(x):
  """A parameter as one numpy array, also when sharded over hosts."""
  if not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def manifest(run, spec, step, exp, names):
  """What the artifact is, for its reader and for people; `files` (their
  hashes) is added once they are written."""
  config, stage, dataset = run.config, run.stage, run.dataset
  return {
      'format': exported.FORMAT,
      'format_version': exported.FORMAT_VERSION,
      'stage': config.stage, 'dataset': config.dataset.name,
      'checkpoint_step': step, 'ema': config.evaluate.ema,
      **({'imported_weights': config.imported_weights}
         if config.get('imported_weights') else {}),
      'sampler': {'kind': spec.kind, 'steps': spec.steps,
                  'guidance': spec.guidance},
      'steps': spec.steps, 'nfe': spec.nfe(dataset.condition),
      # Sampled with (a teacher), or distilled with (never guided again).
      'guidance': stage.guidance(config, spec),
      'image_shape': list(dataset.shape),
      'labels': label_meaning(config, dataset.condition),
      'output': 'uint8 NHWC, round((clip(x, -1, 1) + 1) * 127.5)',
      'noise': 'sample i of seed s: normal(fold_in(key(s), i)), as '
               '--mode=evaluate draws it',
      'stochastic': spec.stochastic,
      'prng_impl': prng_impl(),
      'threefry_partitionable': jax.config.jax_threefry_partitionable,
      'platforms': list(exp.platforms),
      'jax_version': jax.__version__,
      'serialization_version': exp.calling_convention_version,
      'weights': names,
  }


def _write(directory, programs, weights, record):
  """The artifact's files in `directory` (`programs`: the Exported of each
  program file), the manifest (with their hashes) last; returns their sizes
  in bytes."""
  npz = io.BytesIO()
  np.savez(npz, **weights)
  files = {**{name: bytes(exp.serialize()) for name, exp in programs.items()},
           exported.WEIGHTS: npz.getvalue()}
  directory.mkdir(parents=True)
  for name, data in files.items():
    (directory / name).write_bytes(data)
  record['files'] = {name: hashlib.sha256(data).hexdigest()
                     for name, data in files.items()}
  text = json.dumps(record, indent=2)
  (directory / exported.MANIFEST).write_text(text)
  return {**{n: len(d) for n, d in files.items()}, exported.MANIFEST: len(text)}


def _replace(tmp, final):
  """`tmp` renamed to `final`; an existing `final` is moved aside first and
  then deleted (a directory cannot be renamed over a full one). On a local
  disk each is one rename; on an object store (a URL: gs://) a directory
  rename moves each object in turn, in no set order, so the manifest, which
  makes a directory an artifact, is taken out first and put in last."""
  old = final.parent / (final.name + '.old')
  manifest = None
  if '://' in os.fspath(final):
    manifest = (tmp / exported.MANIFEST).read_bytes()
    (tmp / exported.MANIFEST).unlink()
    if (final / exported.MANIFEST).exists():
      (final / exported.MANIFEST).unlink()
  if old.exists():
    old.rmtree()
  if final.exists():
    final.rename(old)
  tmp.rename(final)
  if manifest is not None:
    (final / exported.MANIFEST).write_bytes(manifest)
  if old.exists():
    old.rmtree()


def run(config, workdir):
  """Exports the newest checkpoint of `workdir` (see the module docstring);
  returns the artifact's directory. `config`: or its `run.Run`."""
  resolved = run_lib.of(config)
  check_exportable(resolved)
  config = resolved.config
  spec = stages.evaluation_sampler(config)
  if config.model.get('attention', 'xla') != 'xla':
    resolved = run_lib.resolve(portable(config))
  params, _, step = state.load_for_sampling(resolved, workdir,
                                            config.evaluate.ema)
  params = jax.tree.map(_host, params)
  # An any-S student: a program for each S it learned besides its own,
  # all over the same weights, stored once.
  others = sorted(set(resolved.any_steps) - {spec.steps})
  name = spec.kind if others else spec.name
  final = epath.Path(workdir) / 'export' / f'step{step}_{name}'
  if jax.process_index() == 0:
    exp, weights = export_program(resolved, spec, params)
    programs = {exported.PROGRAM: exp}
    for s in others:
      programs[exported.program_file(s)] = export_program(
          resolved, dataclasses.replace(spec, steps=s), params)[0]
    tmp = final.parent / (final.name + '.tmp')
    if tmp.exists():
      tmp.rmtree()  # Left by an export that did not finish.
    record = manifest(resolved, spec, step, exp, list(weights))
    if others:
      record['programs'] = {str(s): exported.program_file(s)
                            for s in others}
      record['programs'][str(spec.steps)] = exported.PROGRAM
      record['trained_steps'] = list(resolved.any_steps)
    sizes = _write(tmp, programs, weights, record)
    _replace(tmp, final)
    logging.info('Exported %s (%s, NFE %d, for %s) to %s: %s.', config.stage,
                 spec.name, spec.nfe(resolved.condition),
                 ', '.join(PLATFORMS), final, ', '.join(
                     f'{k} {v / 1e3:.1f} kB' for k, v in sorted(sizes.items())))
  multihost_utils.sync_global_devices('export written')
  return final
