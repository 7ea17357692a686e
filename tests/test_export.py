"""--mode=export and its reader: the exported sampler gives the in-process
sampler's images bit for bit, from one artifact at any batch size, in a
process without the package; a damaged or foreign artifact, or bad input,
is one line."""

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import urllib.parse

import jax
import numpy as np
import pytest

from configs import captioned_digits
from configs import digits
from multistep_cm import export_writer
from multistep_cm import exported
from multistep_cm import run as run_lib
from multistep_cm.core import checkpoint
from multistep_cm import errors
from multistep_cm.core import generation
from multistep_cm.core import sharding
from multistep_cm.core import stages
from multistep_cm.core import state as state_lib
from tests import test_readme

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Virtualenvs holding only what docs/serving.md says to install, one per
# requirements line and Python, kept across runs: building one installs jax
# and its jaxlib (20 s and 600 MB on the 2-core CI machine, more where pip
# downloads them), using one costs nothing.
SERVING_VENVS = pathlib.Path(
    os.environ.get('XDG_CACHE_HOME') or pathlib.Path.home() / '.cache'
) / 'multistep_cm' / 'serving_venvs'
STEP = 3
SEED = 11


def _config():
  return digits.get_config('smoke,stage=cd,steps=4')


def _random_weight(path, leaf, rng):
  """A weight of a working network, at random: kernels scaled by their fan
  in, norm scales near 1, every other weight (the zero-initialised output
  layer too) away from 0, so that each one shapes the images."""
  name = path[-1].key
  noise = rng.standard_normal(leaf.shape).astype(leaf.dtype)
  if name == 'kernel':
    return noise / np.sqrt(np.prod(leaf.shape[:-1]))
  if name == 'scale':
    return 1. + 0.1 * noise
  return noise if name == 'embedding' else 0.1 * noise


@pytest.fixture(scope='module')
def student(tmp_path_factory):
  """(config, workdir) of a digits smoke CD student's checkpoint, laid out as
  training saves it, with random EMA weights: built from the state's shapes
  without compiling anything, in a second, where training a teacher and a
  student takes a minute. What is tested is how weights become images, not
  their quality."""
  config = _config()
  workdir = tmp_path_factory.mktemp('cd_s4')
  _, abstract, _ = state_lib.state_layout(
      run_lib.resolve(config), state_lib.make_optimizer(config.optim))
  rng = np.random.default_rng(1)
  zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  ema = jax.tree_util.tree_map_with_path(
      lambda path, a: _random_weight(path, a, rng), abstract.ema_params)
  ckpt = checkpoint.Checkpointer(workdir / 'checkpoints', 1, 1)
  ckpt.save(STEP, zeros.replace(params=ema, ema_params=ema), force=True)
  ckpt.close()
  return config, workdir


@pytest.fixture(scope='module')
def artifact(student):
  config, workdir = student
  return export_writer.run(config, str(workdir))


@pytest.fixture(scope='module')
def loaded(artifact):
  """The artifact, loaded once: its compiled programs are shared."""
  return exported.load(artifact)


def _labels(n):
  return (np.arange(n) % 10).astype(np.int32)


def test_noise_is_drawn_as_evaluate_draws_it():
  """exported.py's copy of --mode=evaluate's noise rule draws the same bits:
  an exported sampler and --mode=evaluate with the same seed draw from the
  same noise."""
  seed_start = np.array([SEED, 5], np.int32)
  ours = exported.example_noise(seed_start, 6, (8, 8, 1), 'threefry2x32')
  theirs = generation.example_noise(seed_start, 6, (8, 8, 1))
  np.testing.assert_array_equal(ours, theirs)
  np.testing.assert_array_equal(
      exported.example_keys(seed_start, 6, 'threefry2x32'),
      jax.random.key_data(generation.example_keys(seed_start, 6)))
  assert exported.STEP_NOISE == generation.STEP_NOISE


def in_process(config, workdir, sizes, spec=None):
  """{n: the images of samples 0..n-1 of SEED as --mode=evaluate draws them
  (per-example noise, uint8), in one batch of n on one device}.

  One device, not the test's mesh of 8: XLA:CPU compiles a program for the
  rows each device holds, and its float results depend on that count (rows
  of a batch of 7 differ from the same rows of a batch of 64 in the last
  bit, measured), so a batch of 7 over 8 devices (1 row each) is not 7 rows
  on one device, and a last bit can flip a uint8 rounding. The exported
  program runs its whole batch on one device: compared with the same batch
  on one device, it is bit for bit the same."""
  mesh = sharding.make_mesh(('data', 'fsdp'), (1, 1), jax.devices()[:1])
  run = dataclasses.replace(run_lib.resolve(config), mesh=mesh)
  params, shardings, _ = state_lib.load_for_sampling(run, str(workdir))
  spec = spec or stages.evaluation_sampler(config)
  generator = generation.Generator(run, shardings, spec,
                                   per_example_noise=True, uint8=True)
  return {n: generator(params, _labels(n), SEED, n)['samples'] for n in sizes}


def test_bit_for_bit_at_any_batch_size(student, loaded):
  config, workdir = student
  sizes = (1, 7, 64)
  expected = in_process(config, workdir, sizes)
  for n in sizes:
    images = loaded.sample(SEED, _labels(n))
    assert images.dtype == np.uint8 and images.shape == (n, 8, 8, 1)
    np.testing.assert_array_equal(images, expected[n], err_msg=f'batch {n}')
  noise = generation.example_noise(np.array([SEED, 0], np.int32), 7,
                                   (8, 8, 1))
  np.testing.assert_array_equal(loaded.sample(noise, _labels(7)),
                                loaded.sample(SEED, _labels(7)))
  assert len(np.unique(images)) > 50  # The weights shape the images.


def test_manifest(artifact, loaded):
  m = loaded.manifest
  assert os.path.basename(artifact) == f'step{STEP}_student4'
  assert sorted(os.listdir(artifact)) == sorted(
      [exported.MANIFEST, exported.PROGRAM, exported.WEIGHTS])
  assert (m['stage'], m['checkpoint_step'], m['ema']) == ('cd', STEP, True)
  assert m['sampler'] == {'kind': 'student', 'steps': 4, 'guidance': 0.}
  assert (m['steps'], m['nfe'], m['guidance']) == (4, 4, 0.)
  assert m['image_shape'] == [8, 8, 1] and not m['stochastic']
  assert m['labels']['num_classes'] == 10
  assert m['platforms'] == ['cpu', 'cuda', 'tpu']
  assert m['jax_version'] == jax.__version__
  assert m['format_version'] == exported.FORMAT_VERSION
  assert m['serialization_version'] == jax.export.deserialize(bytearray(
      (artifact / exported.PROGRAM).read_bytes())).calling_convention_version
  for name, digest in m['files'].items():
    assert digest == hashlib.sha256((artifact / name).read_bytes()).hexdigest()
  with np.load(artifact / exported.WEIGHTS, allow_pickle=False) as f:
    assert sorted(f.files) == sorted(m['weights'])
    assert len(m['weights']) == len(set(m['weights']))
  # No kernel of one platform (cuDNN's attention, say): the one custom call
  # is jax's check of the batch size.
  module = jax.export.deserialize(bytearray(
      (artifact / exported.PROGRAM).read_bytes())).mlir_module()
  assert set(re.findall(r'custom_call @(\w+)', module)) == {'shape_assertion'}


def test_attention_is_portable():
  """'auto' (and 'cudnn') attention would put cuDNN's kernel in a program
  exported on a GPU, which the CPU and the TPU cannot run."""
  config = _config()
  config.model.attention = 'cudnn'
  assert export_writer.portable(config).model.attention == 'xla'
  assert config.model.attention == 'cudnn'  # The caller's config is kept.


def _one_line(excinfo):
  message = str(excinfo.value)
  assert message and '\n' not in message, message
  return message


def _copy(artifact, tmp_path):
  copy = tmp_path / 'artifact'
  shutil.copytree(artifact, copy)
  return copy


def _flip_a_byte(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 1
  path.write_bytes(bytes(data))


@pytest.mark.parametrize('name', [exported.WEIGHTS, exported.PROGRAM])
def test_a_flipped_byte_is_one_line(artifact, tmp_path, name):
  copy = _copy(artifact, tmp_path)
  _flip_a_byte(copy / name)
  with pytest.raises(exported.ArtifactError) as e:
    exported.load(copy)
  assert f'{name} is damaged' in _one_line(e)


def _manifest_edit(copy, drop=(), **changes):
  m = json.loads((copy / exported.MANIFEST).read_text())
  m.update(changes)
  for key in drop:
    del m[key]
  (copy / exported.MANIFEST).write_text(json.dumps(m))


def _listed(copy):
  """The weights' names, in the order the manifest lists them."""
  return json.loads((copy / exported.MANIFEST).read_text())['weights']


@pytest.mark.parametrize('damage, message', [
    (lambda c: (c / exported.WEIGHTS).unlink(), 'weights.npz is missing'),
    (lambda c: (c / exported.MANIFEST).unlink(), 'no manifest.json'),
    (lambda c: (c / exported.MANIFEST).write_text('{'), 'not readable JSON'),
    (lambda c: _manifest_edit(c, format='other'), 'a foreign directory'),
    (lambda c: _manifest_edit(c, format_version=2),
     'is format 2 of multistep_cm.exported; this reader reads format 1'),
    (lambda c: _manifest_edit(c, serialization_version=99),
     'calling convention version 99'),
    (lambda c: _manifest_edit(c, weights=_listed(c)[:-1] + ['a']),
     'does not hold the weights'),
    (lambda c: _manifest_edit(c, weights=_listed(c)[::-1]),
     '; the program takes float32'),
    (lambda c: _manifest_edit(c, image_shape=[8, 8, 3]),
     'does not take the inputs manifest.json describes'),
    (lambda c: _manifest_edit(c, drop=['prng_impl']),
     'lacks prng_impl: damaged'),
])
def test_a_damaged_or_foreign_artifact_is_one_line(artifact, tmp_path, damage,
                                                   message):
  copy = _copy(artifact, tmp_path)
  damage(copy)
  with pytest.raises(exported.ArtifactError) as e:
    exported.load(copy)
  assert message in _one_line(e)


def test_not_an_artifact_is_one_line(tmp_path):
  with pytest.raises(exported.ArtifactError) as e:
    exported.load(tmp_path)
  assert 'no manifest.json' in _one_line(e)
  (tmp_path / 'file').write_text('x')
  with pytest.raises(exported.ArtifactError) as e:
    exported.load(tmp_path / 'file')
  assert 'is not a directory' in _one_line(e)


@pytest.mark.parametrize('args, kwargs, message', [
    ((SEED, np.array([0, 10])), {}, 'expected classes in [0, 10)'),
    ((SEED, np.array([-1])), {}, 'expected classes in [0, 10)'),
    ((SEED, np.zeros((2, 1), int)), {}, 'expected integers of shape (n,)'),
    ((SEED, np.array([0.5])), {}, 'expected integers of shape (n,)'),
    ((SEED, None), {}, 'class-conditional: pass labels'),
    ((SEED, _labels(3)), {'num': 4}, 'ambiguous'),
    ((np.zeros((2, 8, 8)), _labels(2)), {}, 'expected (n, 8, 8, 1)'),
    ((np.zeros((2, 8, 8, 1)), _labels(3)), {}, 'ambiguous'),
    ((2**40, _labels(3)), {}, 'expected int32'),
])
def test_bad_input_is_one_line(loaded, args, kwargs, message):
  with pytest.raises(exported.InputError) as e:
    loaded.sample(*args, **kwargs)
  assert message in _one_line(e)


def test_an_unconditional_sampler_takes_no_labels(artifact, loaded,
                                                  tmp_path):
  """The program of an unconditional network takes labels it ignores: the
  reader passes zeros. (This artifact's network does not ignore them, which
  shows they are zeros.)"""
  copy = _copy(artifact, tmp_path)
  _manifest_edit(copy, labels={'num_classes': 0, 'meaning': 'unconditional'})
  sampler = exported.load(copy)
  np.testing.assert_array_equal(sampler.sample(SEED, num=7),
                                loaded.sample(SEED, np.zeros(7, int)))
  with pytest.raises(exported.InputError) as e:
    sampler.sample(SEED, _labels(7))
  assert 'unconditional: pass no labels' in _one_line(e)
  with pytest.raises(exported.InputError) as e:
    sampler.sample(SEED)
  assert 'not given: pass labels, noise or num=' in _one_line(e)


def test_runs_where_only_jax_is_installed(artifact, loaded, tmp_path):
  """exported.py copied next to the artifact and loaded by its path, in a
  process where the package and the libraries only training needs cannot
  be imported."""
  served = tmp_path / 'served'
  shutil.copytree(artifact, served / 'artifact')
  shutil.copy(ROOT / 'multistep_cm' / 'exported.py', served / 'exported.py')
  script = f'''
import sys

class NotInstalled:
  """As if these were not installed: importing them fails."""
  BLOCKED = ('flax', 'optax', 'orbax', 'ml_collections', 'multistep_cm')

  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in self.BLOCKED:
      raise ImportError(f'{{name}} is not installed here')
    return None

sys.meta_path.insert(0, NotInstalled())
import importlib.util
import numpy as np
spec = importlib.util.spec_from_file_location('exported', 'exported.py')
exported = importlib.util.module_from_spec(spec)
spec.loader.exec_module(exported)
sampler = exported.load('artifact')
np.save('images.npy', sampler.sample({SEED}, np.arange(7) % 10))
print('MODULES', sorted(m for m in sys.modules
                        if m.split('.')[0] in NotInstalled.BLOCKED))
'''
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  proc = subprocess.run([sys.executable, '-c', script], cwd=served, env=env,
                        capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split('MODULES')[-1].split() == ['[]']
  np.testing.assert_array_equal(np.load(served / 'images.npy'),
                                loaded.sample(SEED, _labels(7)))


def _serving_requirements():
  """The arguments of docs/serving.md's `pip install` line."""
  lines = [line for block in test_readme._blocks('bash', ['docs/serving.md'])
           for line in block.splitlines() if line.startswith('pip install ')]
  assert len(lines) == 1, lines
  return shlex.split(lines[0])[2:]


def _serving_python(requirements):
  """The Python of a virtualenv into which pip installed `requirements` and
  nothing else, built the first time and then taken from SERVING_VENVS."""
  key = hashlib.sha256(json.dumps(
      [sys.version, sys.base_prefix, requirements]).encode()).hexdigest()[:16]
  venv = SERVING_VENVS / key
  if not venv.exists():
    SERVING_VENVS.mkdir(parents=True, exist_ok=True)
    # Built beside it and renamed into place: an interrupted build is never
    # taken for a finished one.
    building = pathlib.Path(tempfile.mkdtemp(prefix=f'{key}.',
                                             dir=SERVING_VENVS))
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', building],
                   check=True, timeout=120)
    proc = subprocess.run(
        [sys.executable, '-m', 'pip', '--python', building / 'bin' / 'python',
         'install', '--quiet', *requirements],
        capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode:
      shutil.rmtree(building, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    try:
      building.rename(venv)
    except OSError:  # Another process built it meanwhile.
      shutil.rmtree(building, ignore_errors=True)
  return venv / 'bin' / 'python'


def test_serving_runs_with_only_the_documented_requirements(artifact,
                                                            tmp_path):
  """docs/serving.md's pip line in a virtualenv of its own, then its Python
  as printed, with the artifact and exported.py where it says: the line
  installs all that serving needs. It holds setup.py's versions, so
  serving runs the jax that exported."""
  requirements = _serving_requirements()
  assert f'jax=={jax.__version__}' in requirements
  setup = (ROOT / 'setup.py').read_text(encoding='utf-8')
  assert [r for r in requirements
          if f"'{r}'" not in setup and not r.startswith('jax==')] == []
  python = _serving_python(requirements)
  (block,) = [b for b in test_readme._blocks('python', ['docs/serving.md'])
              if 'exported' in b]
  block = block.replace('/tmp/', f'{tmp_path}/')
  (copied_to,) = re.findall(r"sys\.path\.insert\(0, '([^']+)'\)", block)
  (loaded_from,) = re.findall(r"exported\.load\('([^']+)'\)", block)
  shutil.copytree(artifact, loaded_from)
  shutil.copy(ROOT / 'multistep_cm' / 'exported.py', copied_to)
  env = dict({k: v for k, v in os.environ.items() if k != 'PYTHONPATH'},
             XLA_FLAGS='')
  proc = subprocess.run([python, '-I', '-c', block], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  nfe = json.loads((pathlib.Path(artifact) / exported.MANIFEST).read_text(
      encoding='utf-8'))['nfe']
  assert proc.stdout.split() == [str(nfe), '(10,', '8,', '8,', '1)', 'uint8']
  # Reading from gs:// is the one thing that needs more, and says what.
  proc = subprocess.run(
      [python, '-I', '-c', f'import sys; sys.path.insert(0, {copied_to!r}); '
       "import exported; exported.load('gs://bucket/artifact')"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  assert proc.stderr.strip().splitlines()[-1] == (
      "ImportError: reading gs://bucket/artifact needs etils: pip install "
      "'etils[epath]' gcsfs, or copy the directory to a local disk first."), (
          proc.stderr[-3000:])


def test_without_flatbuffers_loading_says_so_in_one_line(artifact):
  """jax deserialises with flatbuffers but does not install it: a Python
  without it is told so, not that the artifact is damaged."""
  script = f'''
import importlib.util
import sys

class NotInstalled:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] == 'flatbuffers':
      raise ImportError(f'No module named {{name!r}}')
    return None

sys.meta_path.insert(0, NotInstalled())
spec = importlib.util.spec_from_file_location('exported', {str(ROOT / 'multistep_cm' / 'exported.py')!r})
exported = importlib.util.module_from_spec(spec)
spec.loader.exec_module(exported)
try:
  exported.load({str(artifact)!r})
except ImportError as e:
  print('ImportError', e)
'''
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  proc = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout == (
      f'ImportError {artifact}/{exported.PROGRAM} cannot be read by jax '
      f"{jax.__version__} here: Please install 'flatbuffers' in order to use "
      'Exported serialization (docs/serving.md lists what serving needs).\n')


def test_the_command_replaces_the_artifact(student, artifact, tmp_path):
  """--mode=export again on the same checkpoint: the same files, renamed
  into place over the old ones, nothing left beside them."""
  _, workdir = student
  copy = tmp_path / 'cd_s4'
  shutil.copytree(workdir, copy)
  before = {p.name: p.read_bytes() for p in artifact.iterdir()}
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  proc = subprocess.run(
      [sys.executable, '-m', 'multistep_cm.main',
       '--config=configs/digits.py:smoke,stage=cd,steps=4',
       f'--workdir={copy}', '--mode=export'], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  again = copy / 'export' / artifact.name
  assert str(again) in proc.stderr  # The log line names it.
  assert {p.name: p.read_bytes() for p in again.iterdir()} == before
  assert os.listdir(copy / 'export') == [artifact.name]


def test_captions_are_refused_in_one_line(tmp_path):
  config = captioned_digits.get_config('smoke,stage=cd')
  with pytest.raises(errors.ConfigError) as e:
    export_writer.run(config, str(tmp_path))
  assert ('supports class-labelled and unconditional models'
          in _one_line(e))
  assert not os.listdir(tmp_path)


def test_a_stochastic_sampler_takes_its_step_keys(student, tmp_path):
  """The ancestral sampler draws noise at every step: its program takes the
  per-step keys --mode=evaluate draws, from the seed."""
  config, trained = student
  workdir = tmp_path / 'cd_s4'
  shutil.copytree(trained, workdir)
  config = config.copy_and_resolve_references()
  config.evaluate.sampler, config.evaluate.steps = 'ddpm', 2
  directory = export_writer.run(config, str(workdir))
  sampler = exported.load(directory)
  assert sampler.manifest['stochastic']
  assert directory.name == f'step{STEP}_ddpm2'
  np.testing.assert_array_equal(
      sampler.sample(SEED, _labels(7)),
      in_process(config, workdir, [7], stages.evaluation_sampler(config))[7])
  with pytest.raises(exported.InputError) as e:
    sampler.sample(np.zeros((7, 8, 8, 1)), _labels(7))
  assert 'pass a seed, not noise' in _one_line(e)


def _changes(proxy, prefix):
  """The changes to the objects under `prefix` that the proxy saw, in order:
  ('write', name), ('delete', name) or ('move', name, new name), the names
  relative to `prefix`."""
  out = []
  for r in proxy.requests:
    path, _, query = r['path'].partition('?')
    path = urllib.parse.unquote(path)
    if r['status'] not in (200, 204):
      continue
    if r['method'] == 'DELETE':
      out.append(('delete', path.split('/o/', 1)[1]))
    elif r['method'] == 'POST' and '/moveTo/o/' in path:
      out.append(('move', *path.split('/o/', 1)[1].split('/moveTo/o/')))
    elif r['method'] == 'POST' and 'upload_id=' in query:  # An upload's end.
      out.append(('write', urllib.parse.parse_qs(query)['name'][0]))
  return [(what, *(n[len(prefix):] for n in names))
          for what, *names in out if names[0].startswith(prefix)]


def test_export_to_gs_and_load_from_it(student, artifact, loaded, gcs_bucket):
  """A workdir on gs://: --mode=export writes the artifact there and
  exported.load reads it back (its files copied to a temporary directory
  through etils.epath): the local artifact's files byte for byte, and its
  images. A directory rename on GCS moves one object after another, in no
  set order: the manifest leaves the old artifact first and enters the new
  one last, so a reader never finds a manifest whose files are moving."""
  config, workdir = student
  remote = gcs_bucket.path('cd')
  gcs_bucket.upload(workdir / 'checkpoints', 'cd', 'checkpoints')
  proxy = gcs_bucket.proxy
  name = artifact.name
  files = sorted([exported.MANIFEST, exported.PROGRAM, exported.WEIGHTS])
  moved = sorted(set(files) - {exported.MANIFEST})
  for again in (False, True):
    proxy.reset()
    directory = export_writer.run(config, remote)
    assert os.fspath(directory) == f'{remote}/export/{name}'
    assert gcs_bucket.names('cd/export/') == [
        f'cd/export/{name}/{f}' for f in files]
    for f in files:
      assert (directory / f).read_bytes() == (artifact / f).read_bytes()
    changes = _changes(proxy, 'cd/export/')
    into = [i for i, c in enumerate(changes)
            if c[0] == 'move' and c[2].startswith(name + '/')]
    assert sorted(changes[i][2] for i in into) == [f'{name}/{f}'
                                                   for f in moved]
    assert changes.index(('write', f'{name}/{exported.MANIFEST}')) > max(into)
    if again:  # The old artifact: no longer one before its files move.
      out = [i for i, c in enumerate(changes)
             if c[0] == 'move' and c[1].startswith(name + '/')]
      assert sorted(changes[i][2] for i in out) == [f'{name}.old/{f}'
                                                    for f in moved]
      assert (changes.index(('delete', f'{name}/{exported.MANIFEST}')) <
              min(out) and max(out) < min(into))
    else:
      sampler = exported.load(os.fspath(directory))
      assert sampler.manifest == loaded.manifest
      np.testing.assert_array_equal(sampler.sample(SEED, _labels(7)),
                                    loaded.sample(SEED, _labels(7)))


def test_an_any_s_student_exports_every_s_in_one_artifact(tmp_path):
  """One artifact, the weights once: a program per S the student learned
  and its own S (an untrained one), each the in-process sampler bit for bit;
  an S it does not hold is one line."""
  config = digits.get_config('smoke,stage=cd,any,steps=3')
  config.any_steps = (1, 2, 4)
  workdir = tmp_path / 'cd_any'
  _, abstract, _ = state_lib.state_layout(
      run_lib.resolve(config), state_lib.make_optimizer(config.optim))
  rng = np.random.default_rng(2)
  ema = jax.tree_util.tree_map_with_path(
      lambda path, a: _random_weight(path, a, rng), abstract.ema_params)
  ckpt = checkpoint.Checkpointer(workdir / 'checkpoints', 1, 1)
  ckpt.save(STEP, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                               abstract).replace(params=ema, ema_params=ema),
            force=True)
  ckpt.close()
  directory = export_writer.run(config, str(workdir))
  assert directory.name == f'step{STEP}_any_student'
  sampler = exported.load(directory)
  assert sampler.steps == (1, 2, 3, 4)
  manifest = sampler.manifest
  assert manifest['steps'] == 3 and manifest['trained_steps'] == [1, 2, 4]
  assert sorted(os.listdir(directory)) == sorted(
      [exported.MANIFEST, exported.WEIGHTS, exported.PROGRAM] +
      [exported.program_file(s) for s in (1, 2, 4)])
  images = {}
  for s in (None, 1, 2, 4):
    config.student_steps = s or 3
    images[s] = sampler.sample(SEED, _labels(7), steps=s)
    np.testing.assert_array_equal(
        images[s], in_process(config, workdir, [7])[7])
  assert len({im.tobytes() for im in images.values()}) == 4
  for s in (8, 0, 2.):
    with pytest.raises(exported.InputError) as e:
      sampler.sample(SEED, _labels(7), steps=s)
    assert 'this artifact holds S = 1, 2, 3, 4 only' in _one_line(e)
