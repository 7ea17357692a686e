"""An exported sampler, loaded and run with only `jax` and `numpy`.

`--mode=export` (multistep_cm/export_writer.py) writes a directory holding a
sampler as one serialised program (`jax.export`: noise -> S network
evaluations -> uint8 images, for CPU, CUDA and TPU), its weights and a
manifest. This file reads it. It imports only jax, numpy and the standard
library, never the rest of the package, so a serving program can copy it
next to an artifact and use it on its own (jax reads the program with the
`flatbuffers` package, which it does not install: docs/serving.md gives
the one pip line). An artifact on gs:// is read through etils' epath and
gcsfs, imported only then:

  sampler = exported.load('/tmp/digits/cd_s8/export/step1500_student8')
  images = sampler.sample(0, labels=np.arange(10))  # uint8 (10, 8, 8, 1)

An any-S student's artifact holds a program for each of its step counts
over one copy of the weights: `sampler.sample(0, labels, steps=4)`, any
of `sampler.steps`.

A seed draws the noise (and a stochastic sampler's per-step keys) as
--mode=evaluate draws them, sample i of seed s from (s, start + i) alone, so
the same seed gives the same samples here and there. This jax draws them,
with the exporting process's random-bit settings: jax does not promise the
same bits across its versions, so a seed means the same noise under the
jax that exported (noise passed in is the same under any). An artifact that is
damaged, foreign or written for another reader is one `ArtifactError`
line; inputs that do not fit it are one `InputError` line.
"""

import contextlib
import functools
import hashlib
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = 'multistep_cm.exported'
FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
PROGRAM = 'sampler.jax_exported'  # jax.export.Exported.serialize()'s bytes.
WEIGHTS = 'weights.npz'
# A stochastic sampler's per-step keys are folded with this, apart from the
# initial noise's keys (the twin of core/generation.py's STEP_NOISE).
STEP_NOISE = 1 << 30
# What a reader needs of a manifest (export_writer.py writes more, for people).
FIELDS = ('files', 'weights', 'image_shape', 'labels', 'stochastic',
          'prng_impl', 'threefry_partitionable', 'serialization_version',
          'sampler')


def program_file(steps):
  """The file of an any-S student's program for `steps` other than its
  default (which is PROGRAM)."""
  return f'sampler_s{steps}.jax_exported'


class ArtifactError(ValueError):
  """A directory that is not an intact artifact this reader can run."""


class InputError(ValueError):
  """A seed, noise or labels that do not fit the artifact's sampler."""


# The noise rule of --mode=evaluate (core/generation.py's example_noise and
# example_keys, which this file cannot import): tests pin the two equal.


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def example_noise(seed_start, n, shape, impl):
  """Noise of examples start, ..., start + n - 1 (`seed_start` = int32
  (seed, start)), row j from its own key: a sample's noise does not depend
  on the batch it is drawn in."""
  key = jax.random.key(seed_start[0], impl=impl)
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i),
                                              shape, jnp.float32))(
                                                  seed_start[1] +
                                                  jnp.arange(n))


@functools.partial(jax.jit, static_argnums=(1, 2))
def example_keys(seed_start, n, impl):
  """The raw data of the per-step noise keys of those examples, one each."""
  key = jax.random.key(seed_start[0], impl=impl)
  return jax.random.key_data(jax.vmap(
      lambda i: jax.random.fold_in(jax.random.fold_in(key, i), STEP_NOISE))(
          seed_start[1] + jnp.arange(n)))


def random_bits_as(manifest):
  """A context drawing random bits as the exporting process did: the noise
  is drawn here, by this jax, and jax's `threefry_partitionable` setting
  (whose default changed in jax 0.5) changes the bits of every draw."""
  flag = getattr(jax, 'threefry_partitionable', None)
  if flag is None:  # A jax that has only the partitionable bits.
    return contextlib.nullcontext()
  return flag(bool(manifest['threefry_partitionable']))


def sha256(path):
  """The hex SHA-256 of a file, read in pieces (weights can be large)."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _first_line(e):
  """An exception's message in one line (its type's name if it has none)."""
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _read_manifest(directory):
  if not os.path.isdir(directory):
    raise ArtifactError(f'{directory} is not a directory: an exported sampler '
                        f'is a directory with {MANIFEST}.')
  path = os.path.join(directory, MANIFEST)
  try:
    with open(path, encoding='utf-8') as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise ArtifactError(f'{directory} has no {MANIFEST}: not an exported '
                        'sampler.') from None
  except (OSError, ValueError) as e:
    raise ArtifactError(f'{path} is not readable JSON: {e}') from None
  if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
    raise ArtifactError(f'{path} is not a manifest of {FORMAT}: a foreign '
                        'directory.')
  version = manifest.get('format_version')
  if version != FORMAT_VERSION:
    raise ArtifactError(
        f'{directory} is format {version!r} of {FORMAT}; this reader reads '
        f'format {FORMAT_VERSION}: use the exported.py written with it.')
  missing = [k for k in FIELDS if k not in manifest]
  if missing:
    raise ArtifactError(f'{path} lacks {", ".join(missing)}: damaged.')
  return manifest


def _check_files(directory, manifest):
  files = manifest['files']
  if not isinstance(files, dict) or not {PROGRAM, WEIGHTS} <= set(files):
    raise ArtifactError(f'{directory}/{MANIFEST} does not list the hashes of '
                        f'{PROGRAM} and {WEIGHTS}.')
  for name, digest in files.items():
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      raise ArtifactError(f'{path} is missing.')
    if sha256(path) != digest:
      raise ArtifactError(f'{path} is damaged: its SHA-256 is not the one '
                          f'{MANIFEST} records.')


def _deserialize(directory, manifest, name=PROGRAM):
  """The Exported in file `name`, if this jax can run its calling
  convention version."""
  version = manifest.get('serialization_version')
  low = jax.export.minimum_supported_calling_convention_version
  high = jax.export.maximum_supported_calling_convention_version
  if not isinstance(version, int) or not low <= version <= high:
    raise ArtifactError(
        f'{directory} was serialised with calling convention version '
        f'{version!r} (jax {manifest.get("jax_version")}); jax '
        f'{jax.__version__} runs versions {low} to {high}: export it again '
        'with a jax closer to this one.')
  with open(os.path.join(directory, name), 'rb') as f:
    blob = f.read()
  try:
    return jax.export.deserialize(bytearray(blob))
  except Exception as e:  # pylint: disable=broad-except
    line = _first_line(e)
    if isinstance(e, ImportError):
      # A package this Python lacks, not a fault of the artifact.
      raise ImportError(f'{directory}/{name} cannot be read by jax '
                        f'{jax.__version__} here: {line} (docs/serving.md '
                        'lists what serving needs).') from None
    raise ArtifactError(f'{directory}/{name} cannot be deserialised by jax '
                        f'{jax.__version__}: {line}') from None


def _check_program(directory, manifest, program, name=PROGRAM):
  """The program takes what the manifest says: the weights, noise of the
  image shape, labels, and per-step keys if stochastic."""
  avals = program.in_avals
  names, shape = manifest['weights'], manifest['image_shape']
  if (not isinstance(names, list)
      or len(avals) != len(names) + 2 + bool(manifest['stochastic'])
      or list(avals[len(names)].shape[1:]) != shape):
    raise ArtifactError(f'{directory}/{name} does not take the inputs '
                        f'{MANIFEST} describes.')


def _programs(directory, manifest):
  """{S: file} of the programs the artifact holds: an any-S student's
  `programs`, or its one sampler at its `steps`."""
  default = str(manifest['sampler'].get('steps'))
  programs = manifest.get('programs') or {default: PROGRAM}
  if not (isinstance(programs, dict) and programs.get(default) == PROGRAM
          and all(isinstance(f, str) and f in manifest['files'] and
                  s.isdigit() for s, f in programs.items())):
    raise ArtifactError(f'{directory}/{MANIFEST}: its programs are not '
                        'among its files: damaged.')
  return programs


def _read_weights(directory, manifest, avals):
  """The weights in the order of the program's first argument."""
  names = manifest['weights']
  path = os.path.join(directory, WEIGHTS)
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except Exception as e:  # pylint: disable=broad-except
    line = _first_line(e)
    raise ArtifactError(f'{path} is not a readable .npz: {line}') from None
  if sorted(names) != sorted(arrays):
    raise ArtifactError(f'{path} does not hold the weights {MANIFEST} '
                        'lists.')
  for name, aval in zip(names, avals):
    a = arrays[name]
    if a.shape != aval.shape or a.dtype != aval.dtype:
      raise ArtifactError(f'{path}: {name} is {a.dtype}{list(a.shape)}; the '
                          f'program takes {aval.dtype}{list(aval.shape)}.')
  return [arrays[name] for name in names]


def load(directory):
  """The exported sampler in `directory`, checked: its format, the SHA-256
  of each file, and a calling convention version this jax can run. A URL
  (gs://...) is copied to a temporary directory first, through etils'
  epath (with gcsfs for gs://), which only this needs."""
  directory = os.fspath(directory)
  if '://' not in directory:
    return _load(directory)
  with tempfile.TemporaryDirectory() as local:
    _copy_from(directory, local)
    return _load(local)


def _load(directory):
  manifest = _read_manifest(directory)
  _check_files(directory, manifest)
  programs = {}
  for steps, name in _programs(directory, manifest).items():
    programs[steps] = _deserialize(directory, manifest, name)
    _check_program(directory, manifest, programs[steps], name)
  program = programs[str(manifest['sampler']['steps'])]
  weights = _read_weights(directory, manifest, program.in_avals)
  return Sampler(manifest, programs, weights)


def _copy_from(url, local):
  """The files of the artifact at `url` (its manifest's, and the manifest)
  into `local`."""
  try:
    from etils import epath  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f'reading {url} needs etils: pip install '
                      "'etils[epath]' gcsfs, or copy the directory to a "
                      'local disk first.') from None
  source = epath.Path(url)
  try:
    names = [MANIFEST] + sorted(
        json.loads((source / MANIFEST).read_text()).get('files', {}))
    for name in names:
      if '/' in name or name.startswith('.'):
        raise ArtifactError(f'{url}/{MANIFEST} lists {name!r}: damaged.')
      if (source / name).exists():
        (epath.Path(local) / name).write_bytes((source / name).read_bytes())
  except (ArtifactError, ImportError):
    raise
  except FileNotFoundError:
    raise ArtifactError(f'{url} has no {MANIFEST}: not an exported '
                        'sampler.') from None
  except Exception as e:  # pylint: disable=broad-except
    line = _first_line(e)
    raise ArtifactError(f'{url} cannot be read: {line}') from None


class Sampler:
  """`sample(seed_or_noise, labels)` -> uint8 NHWC images, and the
  `manifest` that says what they are; `steps`, the step counts it can
  sample with (an any-S student's artifact holds several)."""

  def __init__(self, manifest, programs, weights):
    self.manifest = manifest
    self._shape = tuple(manifest['image_shape'])
    self._classes = manifest['labels']['num_classes']
    self._stochastic = manifest['stochastic']
    self._impl = manifest['prng_impl']
    self._weights = jax.device_put(tuple(weights))
    self._default = int(manifest['sampler']['steps'])
    # One compiled program per S and batch size, kept.
    self._calls = {int(s): jax.jit(p.call) for s, p in programs.items()}
    self.steps = tuple(sorted(self._calls))

  def sample(self, seed_or_noise, labels=None, *, num=None, start=0,
             steps=None):
    """Images of `labels` (int (n,), in [0, num_classes); None for an
    unconditional sampler, then n = `num` or the noise's rows), from a seed
    (sample i from (seed, start + i), as --mode=evaluate draws it) or from
    noise (float (n, H, W, C), standard normal), in `steps` steps: one of
    `self.steps` (default the manifest's `steps`). A stochastic sampler also
    draws noise at every step, from the seed: it takes a seed only."""
    call = self._call(steps)
    labels = self._labels(labels)
    if isinstance(seed_or_noise, (int, np.integer)):
      n = self._count(labels, num)
      seed_start = self._seed_start(seed_or_noise, start)
      with random_bits_as(self.manifest):
        noise = example_noise(seed_start, n, self._shape, self._impl)
        extra = ((example_keys(seed_start, n, self._impl),)
                 if self._stochastic else ())
    else:
      if self._stochastic:
        raise InputError(f'{self.manifest["sampler"]["kind"]} draws noise at '
                         'every step: pass a seed, not noise.')
      noise = np.asarray(seed_or_noise)
      if noise.ndim != 1 + len(self._shape) or noise.shape[1:] != self._shape:
        raise InputError(f'noise is {list(noise.shape)}: expected (n, '
                         f'{", ".join(map(str, self._shape))}).')
      if not np.issubdtype(noise.dtype, np.floating):
        raise InputError(f'noise is {noise.dtype}: expected float32.')
      noise = noise.astype(np.float32)
      n = self._count(labels, num, len(noise))
      extra = ()
    if labels is None:
      labels = np.zeros(n, np.int32)  # The network's ignored placeholder.
    return np.asarray(call(self._weights, noise, labels, *extra))

  def _call(self, steps):
    if steps is None:
      return self._calls[self._default]
    if not isinstance(steps, (int, np.integer)) or int(
        steps) not in self._calls:
      held = ', '.join(map(str, self.steps))
      raise InputError(
          f'steps={steps!r}: this artifact holds S = {held} only (an any-S '
          'student exports its trained S and config.student_steps).')
    return self._calls[int(steps)]

  def _labels(self, labels):
    if not self._classes:
      if labels is not None:
        raise InputError('this sampler is unconditional: pass no labels '
                         '(num= sets the number of samples).')
      return None
    if labels is None:
      raise InputError(f'this sampler is class-conditional: pass labels, '
                       f'integers in [0, {self._classes}).')
    labels = np.asarray(labels)
    if (labels.ndim != 1 or not len(labels)
        or not np.issubdtype(labels.dtype, np.integer)):
      raise InputError(f'labels are {labels.dtype}{list(labels.shape)}: '
                       'expected integers of shape (n,), n >= 1.')
    if labels.min() < 0 or labels.max() >= self._classes:
      raise InputError(f'labels span [{labels.min()}, {labels.max()}]: '
                       f'expected classes in [0, {self._classes}).')
    return labels.astype(np.int32)

  @staticmethod
  def _count(labels, num, rows=None):
    """The batch size, from whichever of labels, num and noise are given,
    which must agree."""
    sizes = {s for s in (None if labels is None else len(labels), num, rows)
             if s is not None}
    if len(sizes) != 1:
      raise InputError('the number of samples is ' + (
          'not given: pass labels, noise or num=' if not sizes else
          f'ambiguous: labels, noise and num= give {sorted(sizes)}') + '.')
    n = sizes.pop()
    if not isinstance(n, (int, np.integer)) or n < 1:
      raise InputError(f'{n!r} samples: expected a positive integer.')
    return int(n)

  @staticmethod
  def _seed_start(seed, start):
    """int32 (seed, start), as --mode=evaluate passes them."""
    info = np.iinfo(np.int32)
    if not (isinstance(start, (int, np.integer)) and 0 <= start and
            info.min <= seed <= info.max and start <= info.max):
      raise InputError(f'seed {seed} and start {start}: expected int32 '
                       'values, start >= 0.')
    return np.array([seed, start], np.int32)
