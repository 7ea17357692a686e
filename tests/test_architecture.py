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
# and the converted-weights format of imported networks.
BASE = {'errors', 'weights'}
PAPER = {'schedules', 'ddim', 'conditioning', 'guidance', 'losses',
         'samplers', 'models', 'toy2d', 'karras', 'adm', 'networks'}
LAYERS = ('standalone', 'base', 'paper', 'core', 'evaluation', 'train', 'workflows',
          'main')


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
  if parts[0] in ('core', 'evaluation', 'train', 'main'):
    return parts[0]
  if parts[0] == 'datasets':
    return 'core'  # The dataset table: what training and evaluation share.
  if parts[0] in ('pipeline', 'sweep', 'export', 'describe', 'tools'):
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


def test_dependencies_point_one_way():
  wrong = []
  for module, tree in _modules():
    mine = LAYERS.index(_layer(module))
    for imported, _ in _imports(module, tree):
      if imported.split('.')[0] != 'multistep_cm' or imported == 'multistep_cm':
        continue
      if LAYERS.index(_layer(imported)) > mine:
        wrong.append(f'{module} imports {imported}')
  assert not wrong, wrong


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
