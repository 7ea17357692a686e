"""The module boundaries: dependencies point one way, from the method up to
the entry point, nothing reaches into another module's private names, the
library never imports the experiments, and no dataset is asked for by name
outside the dataset table."""

import ast
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / 'multistep_cm'

# Layers, lowest first: a module may import its own layer and those below.
# 'standalone' is exported.py, the reader of exported samplers, which is
# copied next to an artifact and used without the package: it imports none
# of it (and only jax, numpy and the standard library, tested below).
STANDALONE = {'exported'}
# 'base' is what every layer may raise or read: the errors a user can fix,
# the converted-weights format of imported networks, and the accelerator
# targets (the platform backend-dependent choices follow).
BASE = {'errors', 'weights', 'targets'}
PAPER = {'schedules', 'ddim', 'conditioning', 'guidance', 'losses',
         'samplers', 'models', 'toy2d', 'karras', 'adm', 'networks'}
# 'datasets' is the dataset table, above what every mode shares ('core');
# 'run' resolves a config into all of them once, at the top of a mode.
LAYERS = ('standalone', 'base', 'paper', 'core', 'datasets', 'run',
          'evaluation', 'train', 'workflows', 'main')


def _layer(module):
  """The layer of a dotted module name inside the package."""
  parts = module.split('.')[1:]
  if not parts:
    return 'paper'  # The package itself holds nothing.
  if parts[0] in STANDALONE:
    return 'standalone'
  if parts[0] in BASE:
    return 'base'
  if parts[0] in PAPER:
    return 'paper'
  if parts[0] in ('core', 'datasets', 'run', 'evaluation', 'train', 'main'):
    return parts[0]
  if parts[0] in ('pipeline', 'sweep', 'export_writer', 'describe', 'tools'):
    return 'workflows'
  raise AssertionError(f'{module}: not placed in a layer')


def _modules():
  for path in sorted(PACKAGE.rglob('*.py')):
    rel = path.relative_to(ROOT).with_suffix('')
    name = '.'.join(rel.parts)
    yield name.removesuffix('.__init__'), ast.parse(path.read_text())


def _imports(module, tree):
  """(imported module, names imported from it) of every import, function
  bodies included."""
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        yield a.name, ()
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # Relative: resolved against the importing package.
        base = '.'.join(module.split('.')[:-node.level] + [base]).strip('.')
      for a in node.names:
        sub = f'{base}.{a.name}'
        yield (sub, ()) if _is_module(sub) else (base, (a.name,))


def _is_module(name):
  path = ROOT.joinpath(*name.split('.'))
  return path.with_suffix('.py').exists() or (path / '__init__.py').exists()


def upward_imports(modules):
  """'a imports b' for each import of `modules` ((name, tree) pairs) that
  runs up a layer: a module or a folder (`from multistep_cm import
  datasets`) above the importer's."""
  wrong = []
  for module, tree in modules:
    mine = LAYERS.index(_layer(module))
    for imported, _ in _imports(module, tree):
      if imported.split('.')[0] != 'multistep_cm' or imported == 'multistep_cm':
        continue
      if LAYERS.index(_layer(imported)) > mine:
        wrong.append(f'{module} imports {imported}')
  return wrong


def test_dependencies_point_one_way():
  wrong = upward_imports(_modules())
  assert not wrong, wrong


@pytest.mark.parametrize('mutation', [
    'from multistep_cm import datasets\n',
    'from multistep_cm.datasets import base\n',
    'import multistep_cm.run\n',
    'def f():\n  from multistep_cm.evaluation import quick\n',
])
def test_the_layer_rule_catches_an_import_running_up(mutation):
  """core/ importing the dataset table (a folder, or a module in it), the
  run, or evaluation, even inside a function, is caught."""
  source = (PACKAGE / 'core' / 'generation.py').read_text() + '\n' + mutation
  assert upward_imports([('multistep_cm.core.generation',
                          ast.parse(source))])


# What resolving a config means: looking its dataset, schedule and network
# up. Only `run.resolve` does it; everything below a mode is given the Run.
RESOLVERS = {('datasets', 'get'), ('schedules', 'get_logsnr_fn'),
             ('networks', 'create_model')}


def resolutions(module, tree):
  return [f'{module}:{node.lineno} {node.func.value.id}.{node.func.attr}'
          for node in ast.walk(tree)
          if isinstance(node, ast.Call) and isinstance(node.func,
                                                       ast.Attribute)
          and isinstance(node.func.value, ast.Name)
          and (node.func.value.id, node.func.attr) in RESOLVERS]


def test_a_config_is_resolved_in_one_place():
  wrong = [hit for module, tree in _modules() if module != 'multistep_cm.run'
           for hit in resolutions(module, tree)]
  assert not wrong, wrong
  source = (PACKAGE / 'evaluation' / 'quick.py').read_text()
  mutated = source + '\nlogsnr = schedules.get_logsnr_fn(**config.schedule)\n'
  assert not resolutions('quick', ast.parse(source))
  assert resolutions('quick', ast.parse(mutated))


def _network_names():
  from multistep_cm import networks  # pylint: disable=g-import-not-at-top
  return set(networks.TABLE)


def network_mentions(module, tree, names):
  """Where `tree` names a network: a string constant that is a network's
  name, or an import of a module that defines one."""
  found = [f'{module}:{node.lineno} {node.value!r}' for node in ast.walk(tree)
           if isinstance(node, ast.Constant) and node.value in names]
  found += [f'{module} imports {imported}'
            for imported, _ in _imports(module, tree)
            if imported.split('.')[1:2] in (['models'], ['adm'])]
  return found


def test_core_names_no_network():
  """What is particular to a network is in its row of the network table:
  core/ neither names one nor imports the modules that define them."""
  names = _network_names()
  wrong = [hit for module, tree in _modules()
           if module.startswith('multistep_cm.core.')
           for hit in network_mentions(module, tree, names)]
  assert not wrong, wrong
  source = (PACKAGE / 'core' / 'state.py').read_text()
  for mutation in ("if config.model.name != 'uvit':\n  pass\n",
                   'from multistep_cm import adm\n'):
    assert network_mentions('state', ast.parse(source + mutation), names)


def test_no_module_uses_another_modules_private_names():
  wrong = []
  for module, tree in _modules():
    bound = {}  # Local name -> imported module of the package.
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or '').startswith(
          'multistep_cm'):
        for a in node.names:
          if a.name.startswith('_'):
            wrong.append(f'{module} imports {node.module}.{a.name}')
          bound[a.asname or a.name] = f'{node.module}.{a.name}'
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and node.attr.startswith('_')
          and not node.attr.startswith('__')
          and isinstance(node.value, ast.Name) and node.value.id in bound):
        wrong.append(f'{module} uses {bound[node.value.id]}.{node.attr}')
  assert not wrong, wrong


def test_the_library_never_imports_the_experiments():
  wrong = [f'{module} imports {imported}' for module, tree in _modules()
           for imported, _ in _imports(module, tree)
           if imported.split('.')[0] == 'configs']
  assert not wrong, wrong


def _strings(node):
  """The string constants of an expression: itself, or a tuple, list or set
  of them."""
  if isinstance(node, ast.Constant) and isinstance(node.value, str):
    return {node.value}
  if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
    return set().union(*(_strings(e) for e in node.elts))
  return set()


def dataset_branches(module, tree, names):
  """Where `tree` branches on one of the dataset `names`: a comparison or
  membership test against it, a `case` of it, or a dict keyed by it."""
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Compare):
      hit = set().union(*(_strings(n) for n in [node.left] +
                          node.comparators)) & names
    elif isinstance(node, ast.MatchValue):
      hit = _strings(node.value) & names
    elif isinstance(node, ast.Dict):
      hit = set().union(*(_strings(k) for k in node.keys if k)) & names
    else:
      continue
    found += [f'{module}:{node.lineno} {name!r}' for name in sorted(hit)]
  return found


def _dataset_names():
  from multistep_cm import datasets  # pylint: disable=g-import-not-at-top
  return set(datasets.TABLE)


def test_no_dataset_is_branched_on_outside_the_table():
  names = _dataset_names()
  wrong = [hit for module, tree in _modules()
           if not module.startswith('multistep_cm.datasets')
           for hit in dataset_branches(module, tree, names)]
  assert not wrong, wrong


@pytest.mark.parametrize('mutation', [
    "if config.dataset.name == 'digits':\n  pass\n",
    "SCORERS = {'toy2d': 1}\n",
    "x = cfg.name in ('imagenet64', 'cifar10')\n",
    "match name:\n  case 'captioned_digits':\n    pass\n",
])
def test_the_dataset_rule_catches_a_branch(mutation):
  """The rule above can fail: a module with one added branch on a dataset
  name is caught."""
  source = (PACKAGE / 'core' / 'generation.py').read_text() + '\n' + mutation
  hits = dataset_branches('mutated', ast.parse(source), _dataset_names())
  assert hits, hits


def test_the_paper_modules_import_nothing_of_the_framework():
  for module, tree in _modules():
    if _layer(module) == 'paper':
      for imported, _ in _imports(module, tree):
        if imported.startswith('multistep_cm.'):
          assert imported.split('.')[1] in PAPER | BASE, (module, imported)


def test_the_standalone_modules_import_only_jax_numpy_and_the_stdlib():
  """A module copied next to an artifact runs where only jax is installed:
  the package, flax and the rest are not there. Reading an artifact from a
  URL (gs://) alone needs etils, imported in the function that does it
  (test_export runs a local one in a virtualenv without it)."""
  allowed = {'jax', 'numpy'} | set(sys.stdlib_module_names)
  when_used = {'etils'}
  wrong = []
  for module, tree in _modules():
    if _layer(module) != 'standalone':
      continue
    top = {imported for imported, _ in _imports(module, ast.Module(
        body=[n for n in tree.body if isinstance(n, (ast.Import,
                                                     ast.ImportFrom))],
        type_ignores=[]))}
    for imported, _ in _imports(module, tree):
      root = imported.split('.')[0]
      if root not in allowed and (root not in when_used or imported in top):
        wrong.append(f'{module} imports {imported}')
  assert not wrong, wrong


def test_evaluation_runs_without_the_train_loop(digits_teacher, tmp_path):
  """--mode=evaluate, --mode=sample and the pipeline's comparison on a
  trained checkpoint, in a process where the train loop (and the workflows
  that import it) cannot be imported."""
  _, trained = digits_teacher
  workdir = tmp_path / 'teacher'
  shutil.copytree(trained, workdir)
  script = f'''
import sys
for name in ('multistep_cm.train', 'multistep_cm.pipeline',
             'multistep_cm.sweep'):
  sys.modules[name] = None  # Importing it now raises ImportError.
from configs import digits
from multistep_cm.evaluation import evaluate, quick, reports
config = digits.get_config('smoke')
config.evaluate.num_samples = config.evaluate.chunk_size = 12
record = evaluate.run(config, {str(workdir)!r})
png, _ = quick.write_samples(config, {str(workdir)!r}, 10)
rows = reports.compare(config, {str(workdir)!r}, config, {str(workdir)!r},
                       {str(tmp_path)!r})
print('RESULT', len(rows), record['nfe'], png)
'''
  env = dict(os.environ, XLA_FLAGS='', PYTHONPATH=str(ROOT))
  proc = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = proc.stdout.split('RESULT')[-1].split()
  assert result[:2] == ['5', '4']  # Four teacher rows and the "student".
  assert os.path.exists(result[2])
  assert json.loads((tmp_path / 'comparison.json').read_text())


def test_training_needs_no_tensorflow(tmp_path):
  """A training run, its checkpoints, evaluation and TensorBoard scalars
  included, where TensorFlow, tfds and clu are missing (an accelerator
  machine without them): only tfds datasets need them."""
  script = f'''
import sys
for name in ('tensorflow', 'tensorflow_datasets', 'clu'):
  sys.modules[name] = None  # As if not installed: importing it fails.
import glob
from configs import toy2d
from multistep_cm import train
state, scores = train.train_and_evaluate(toy2d.get_config('smoke'),
                                         {str(tmp_path)!r})
print('RESULT', int(state.step), scores['swd'] > 0,
      len(glob.glob({str(tmp_path / 'events.out.tfevents.*')!r})),
      [m for m, v in sys.modules.items()
       if v is not None and m.startswith(('tensorflow', 'clu'))])
'''
  env = dict(os.environ, XLA_FLAGS='', PYTHONPATH=str(ROOT))
  proc = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split('RESULT')[-1].split() == ['4', 'True', '1', '[]']


def _importers(target):
  """Package files that import the module `target` (dotted), and its own."""
  files = {target}
  for module, tree in _modules():
    if any(imported == target for imported, _ in _imports(module, tree)):
      files.add(module)
  return files


def _users(*names):
  """Package files that define or use one of the identifiers `names`."""
  files = set()
  for module, tree in _modules():
    for node in ast.walk(tree):
      if ((isinstance(node, ast.Name) and node.id in names) or
          (isinstance(node, ast.Attribute) and node.attr in names) or
          (isinstance(node, (ast.FunctionDef, ast.ClassDef))
           and node.name in names)):
        files.add(module)
  return files


def _path(module):
  return module.removeprefix('multistep_cm.').replace('.', '/') + (
      '/__init__.py' if module.endswith('.datasets') else '.py')


# Each kind of extension's built-in example, and how to find the files it
# touches: the files that import its module, or that use its names.
FOOTPRINTS = {
    'dataset': lambda: _importers('multistep_cm.datasets.captioned_images'),
    'stage': lambda: _users('guidance_distillation_loss',
                            '_guidance_distillation_loss'),
    'native network': lambda: _users('MLP', 'MLPConfig'),
    'imported network': lambda: _importers('multistep_cm.adm'),
    'metric on a feature network': lambda: _importers(
        'multistep_cm.evaluation.clip'),
}


def _documented_extensions():
  """{extension: (count, text of its files)} of docs/architecture.md's
  table of files touched per kind of extension."""
  text = (ROOT / 'docs' / 'architecture.md').read_text()
  table = text.split('## Files touched per kind of extension')[1].split(
      '\n## ')[0]
  rows = {}
  for line in table.splitlines():
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if len(cells) == 4 and cells[1].isdigit():
      rows[cells[0]] = (int(cells[1]), cells[3])
  return rows


@pytest.mark.parametrize('kind', sorted(FOOTPRINTS))
def test_the_documented_files_per_extension_are_the_files_touched(kind):
  """The count docs/architecture.md gives, and the files it names, are the
  package files the built-in example of that kind touches."""
  count, files = _documented_extensions()[kind]
  touched = {_path(m) for m in FOOTPRINTS[kind]()}
  assert len(touched) == count, (kind, sorted(touched))
  for path in touched:
    assert f'`{path}`' in files or f'`{path.split("/")[-1]}`' in files, (
        kind, path, files)


def test_every_documented_extension_is_checked():
  """A row of the table is checked here, or (the sampler, one row) by the
  extension test that adds one from outside the package."""
  documented = _documented_extensions()
  assert set(documented) == set(FOOTPRINTS) | {'sampler'}
  assert documented['sampler'][0] == 1
  assert 'def test_a_new_sampler_is_one_row' in (
      ROOT / 'tests' / 'test_extension.py').read_text()
