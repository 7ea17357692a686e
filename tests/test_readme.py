"""The commands of the README and of docs/ run as printed: every
`python -m multistep_cm...` line that takes under a minute on a CPU
(sampling, evaluating and exporting the quickstart's checkpoints, the smoke
variants) is run exactly as written, with its /tmp/ directory moved into a
temporary one, and so is their Python: the library example, and serving the
exported student. The README keeps the quickstart's two commands, every
relative link of the documentation resolves, the figures other pages quote
from the README agree with it, and every converter flag is documented."""

import glob
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys

from etils import epath
import pytest

from configs import digits
from multistep_cm import run as run_lib
from multistep_cm.core import checkpoint
from multistep_cm.core import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The pages whose commands and Python are run: the README, then docs/.
PAGES = ['README.md'] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'docs', '*.md')))
# The pages whose links are checked.
LINKED_PAGES = PAGES + ['launch/README.md']
# One worker makes the checkpoints once for all of them.
pytestmark = pytest.mark.xdist_group('readme')


def _read(page):
  with open(os.path.join(ROOT, page), encoding='utf-8') as f:
    return f.read()


def _blocks(language, pages=PAGES):
  """The ```LANGUAGE blocks of `pages`, in order."""
  return [block for page in pages
          for block in re.findall(rf'```{language}\n(.*?)```', _read(page),
                                  re.S)]


def readme_commands():
  """The `python -m multistep_cm...` commands of the bash blocks of the README
  and of docs/, continuation lines joined."""
  commands = []
  for block in _blocks('bash'):
    for command in block.replace('\\\n', ' ').splitlines():
      command = ' '.join(command.split())
      if command.startswith('python -m multistep_cm.'):
        commands.append(command)
  return commands


def _cheap(command):
  """Sampling, evaluating or exporting a checkpoint of the quickstart
  (/tmp/digits), describing the digits config, or a smoke variant."""
  config = re.search(r'--config=(\S+)', command)
  smoke = config and re.search(r'[:,]smoke\b', config.group(1))
  mode = re.search(r'--mode=(sample|evaluate|export)\b', command)
  describe = '--mode=describe' in command and 'configs/digits.py' in command
  return bool(smoke or describe or (
      mode and '--workdir=/tmp/digits' in command))


CHEAP = [c for c in readme_commands() if _cheap(c)]


def test_the_readme_has_cheap_commands_to_run():
  # Sampling, evaluating and exporting the student, evaluating the teacher,
  # describing a config.
  assert len(CHEAP) >= 5, CHEAP
  assert any('stage=cd' in c and '--mode=sample' in c for c in CHEAP)
  assert any('stage=cd' in c and '--mode=evaluate' in c for c in CHEAP)
  assert any('stage=cd' not in c and '--mode=evaluate' in c for c in CHEAP)
  assert any('stage=cd' in c and '--mode=export' in c for c in CHEAP)
  assert any('--mode=describe' in c for c in CHEAP)


def test_the_readme_keeps_the_quickstart_and_the_ci_test_command():
  """The quickstart is two commands on a fresh machine, the second the one
  CI runs."""
  with open(os.path.join(ROOT, '.ci', 'run'), encoding='utf-8') as f:
    ci = [line for line in f.read().splitlines()
          if line.startswith('pip install -e ')]
  assert ci == ["pip install -e '.[test]' && python -m multistep_cm.targets "
                "install && python -m pytest -q tests"]
  quickstart = _read('README.md').split('\n## ')[1]
  assert quickstart.startswith('Quickstart\n')
  assert re.findall(r'```bash\n(.*?)\n```', quickstart, re.S)[:2] == [
      'pip install -e . && python -m multistep_cm.main '
      '--config=configs/digits.py --workdir=/tmp/digits', ci[0]]


def _checkpoint(config, workdir):
  """A freshly initialised train state of `config`, saved as its last step
  in WORKDIR/checkpoints, where training would have left it."""
  state, _ = state_lib.init_state(run_lib.resolve(config),
                                  state_lib.make_optimizer(config.optim))
  ckpt = checkpoint.Checkpointer(epath.Path(workdir) / 'checkpoints', 1, 1)
  ckpt.save(config.total_steps, state, force=True)
  ckpt.wait()
  ckpt.close()


@pytest.fixture(scope='module')
def quickstart(tmp_path_factory):
  """/tmp/digits as the quickstart leaves it, in miniature: checkpoints of
  the full-size digits teacher, its 8-step CD student and an any-S one
  (docs/any_steps.md), so that the
  README's commands find the model they configure (trained or not, the
  commands run the same code)."""
  root = tmp_path_factory.mktemp('quickstart')
  _checkpoint(digits.get_config('stage=teacher'), root / 'digits' / 'teacher')
  _checkpoint(digits.get_config('stage=cd'), root / 'digits' / 'cd_s8')
  _checkpoint(digits.get_config('stage=cd,any'), root / 'digits' / 'cd_any')
  return root


def _run(command, quickstart):
  """A README command in `quickstart` instead of /tmp/: the process."""
  args = shlex.split(command.replace('/tmp/', f'{quickstart}/'))
  assert args[:2] == ['python', '-m']
  env = dict(os.environ, XLA_FLAGS='', PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, *args[1:]], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.mark.parametrize('command', CHEAP)
def test_readme_command_runs_as_printed(command, quickstart):
  proc = _run(command, quickstart)
  if '--target=' in command:  # Compiled for a TPU slice: docs/targets.md.
    out = proc.stdout
    assert out.count('Per device, as the TPU compiler compiles it for') == 2
    assert 'Train step: fits, ' in out and 'Sampler: fits, ' in out
    assert out.count('Roofline: at least ') == 2
    return
  if '--mode=describe' in command:
    assert 'parameters; batch' in proc.stdout
    return
  workdir = re.search(r'--workdir=(\S+)', command).group(1).replace(
      '/tmp/', f'{quickstart}/')
  if '--mode=sample' in command:
    assert any(f.endswith('.png') and f.startswith('samples_step')
               for f in os.listdir(workdir))
  if '--mode=evaluate' in command:
    assert 'Evaluation step' in proc.stderr
  if '--mode=export' in command:
    assert os.listdir(os.path.join(workdir, 'export'))


def _python_blocks():
  return _blocks('python')


def test_readme_serving_runs_as_printed(quickstart):
  """The export command, exported.py copied as the README says, then its
  serving snippet, in a process that imports nothing of the package."""
  (block,) = [b for b in _python_blocks() if 'exported' in b]
  (command,) = [c for c in CHEAP if '--mode=export' in c]
  _run(command, quickstart)
  shutil.copy(os.path.join(ROOT, 'multistep_cm', 'exported.py'),
              quickstart / 'digits' / 'cd_s8' / 'export')
  proc = subprocess.run([sys.executable, '-c',
                         block.replace('/tmp/', f'{quickstart}/')],
                        cwd=quickstart, env=dict(os.environ, XLA_FLAGS=''),
                        capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ['8', '(10,', '8,', '8,', '1)', 'uint8']


def test_readme_python_runs():
  blocks = [b for b in _python_blocks() if 'exported' not in b]
  assert blocks
  env = dict(os.environ, XLA_FLAGS='', PYTHONPATH=ROOT)
  for block in blocks:
    proc = subprocess.run([sys.executable, '-c', block], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == '16'


def _slug(heading):
  """GitHub's anchor of a heading: its text lowercased, punctuation dropped,
  spaces as hyphens."""
  text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading)
  return re.sub(r'[^\w\- ]', '', text.lower()).replace(' ', '-')


def _prose(text):
  """`text` without its fenced blocks and code spans."""
  text = re.sub(r'^```.*?^```', '', text, flags=re.S | re.M)
  return re.sub(r'`[^`\n]*`', '', text)


def _anchors(page):
  anchors, seen = set(), {}
  for heading in re.findall(r'^#{1,6} +(.*?) *#*$', _prose(_read(page)),
                            re.M):
    slug = _slug(heading)
    anchors.add(slug if slug not in seen else f'{slug}-{seen[slug]}')
    seen[slug] = seen.get(slug, 0) + 1
  return anchors


def test_every_relative_link_of_the_documentation_resolves():
  """Every link of the README, docs/ and launch/README.md that is not a URL
  names a file of the repository, and its #anchor a heading of it."""
  broken, links = [], 0
  for page in LINKED_PAGES:
    for target in re.findall(r'\]\(([^)\s]+)(?: "[^"]*")?\)',
                             _prose(_read(page))):
      if re.match(r'[a-z][a-z0-9+.-]*:', target):
        continue  # https:, mailto:
      links += 1
      path, _, anchor = target.partition('#')
      path = os.path.normpath(os.path.join(os.path.dirname(page), path)
                              if path else page)
      if not os.path.exists(os.path.join(ROOT, path)):
        broken.append(f'{page}: {target} (no file {path})')
      elif anchor and (not path.endswith('.md') or
                       anchor not in _anchors(path)):
        broken.append(f'{page}: {target} (no heading #{anchor} in {path})')
  assert links > 20
  assert not broken, '\n'.join(broken)


@pytest.mark.parametrize('converter', ['convert_adm', 'convert_clip',
                                       'convert_dinov2', 'convert_inception'])
def test_every_flag_of_the_converters_is_documented(converter, capsys):
  module = importlib.import_module(f'multistep_cm.tools.{converter}')
  with pytest.raises(SystemExit):
    module.main(['--help'])
  flags = re.findall(r'^  (--\w+)', capsys.readouterr().out, re.M)
  assert '--out' in flags  # The help was read.
  docs = ''.join(_read(page) for page in PAGES)
  missing = [f for f in flags if not re.search(rf'{f}\b', docs)]
  assert not missing, f'{converter}: {missing} only in --help'


def _words(text):
  return ' '.join(text.split())


def _machines():
  """{row name: (FD-digits, accuracy) per machine column} of
  docs/results.md's table of the quickstart on each machine."""
  page = _read('docs/results.md')
  table = page[page.index('## Why the numbers depend on the machine'):]
  rows = {}
  for line in table.splitlines():
    cells = [c.strip() for c in line.strip('|').split('|')]
    if len(cells) == 4 and re.match(r'[\d.]', cells[1]):
      rows[cells[0]] = [tuple(re.findall(r'[\d.]+', c)) for c in cells[1:]]
  return rows


def _range(values):
  """'lo–hi' as the front page prints it, rounded to 2 decimals (1 for a
  percentage), or one value where they round alike."""
  digits = 1 if '%' in values[0] else 2
  rounded = sorted({f'{float(v.rstrip("%")):.{digits}f}' for v in values},
                   key=float)
  return '–'.join([rounded[0], rounded[-1]] if len(rounded) > 1 else rounded)


def test_figures_quoted_from_the_readme_agree_with_it():
  """The quickstart's measurements, where other pages quote them: each
  range on the front page spans machines A and B of docs/results.md."""
  readme = _words(_read('README.md'))
  row = lambda name: re.search(
      rf'\| {re.escape(name)} \| [^|]+ \| \**([\d.–]+)\** \| ([\d.–]+) %',
      readme).groups()
  machines = _machines()
  names = {'**8-step CD student**': '8-step CD student',
           'teacher, aDDIM, 8 steps': 'teacher, aDDIM, 8 steps',
           'teacher, DDIM, 8 steps': 'teacher, DDIM, 8 steps',
           'teacher, aDDIM, 512 steps': 'teacher, aDDIM, 512 steps',
           'teacher, DDIM, 512 steps': 'teacher, DDIM, 512 steps',
           'real held-out digits (the floor)': 'real held-out digits'}
  for front, detail in names.items():
    a, b = machines[detail][:2]
    assert row(front) == (_range([a[0], b[0]]),
                          _range([a[1] + '%', b[1] + '%'])), front
  a, b = machines['teacher at step 4000, aDDIM, 128 steps'][:2]
  minutes = re.search(r'teacher 4000 steps ≈ (\d+) min', readme).group(1)
  score = re.search(r'at step 4000 scores ([\d.–]+) with 128 aDDIM',
                    readme).group(1)
  assert score == _range([a[0], b[0]])
  config = _words(digits.__doc__)
  assert (f'4000 steps, about {minutes} minutes on a 2-core CPU; FD-digits '
          f'{score} with 128 aDDIM steps') in config
  floor = row('real held-out digits (the floor)')
  assert f'FD-digits {floor[0]} and {floor[1]}% accuracy' in config
  evaluation = _words(_read('docs/evaluation.md'))
  student, teacher8 = (machines['8-step CD student'][0],
                       machines['teacher, aDDIM, 8 steps'][0])
  assert (f'{student[0]} and {student[1]} % for the student, {teacher8[0]} '
          f'and {teacher8[1]} % for the teacher (machine A') in evaluation
  # And the README quotes --mode=evaluate's accuracies as that page has them.
  measured = re.search(r'student scores FD-digits [\d.]+, class accuracy '
                       r'([\d.]+) %; the teacher with 8 aDDIM steps [\d.]+ '
                       r'and ([\d.]+) %', evaluation).groups()
  assert (f'gives the student {measured[0]} % and the 8-step aDDIM teacher '
          f'{measured[1]} %') in readme


def test_every_page_of_docs_is_linked_from_the_readme_or_the_index():
  linked = set(re.findall(r'\]\(docs/([^)#]+)', _read('README.md')))
  linked |= set(re.findall(r'\]\(([^)#/]+\.md)', _read('docs/README.md')))
  pages = {os.path.basename(p) for p in PAGES if p.startswith('docs')}
  assert pages - {'README.md'} <= linked, pages - linked


def test_the_front_page_s_hardware_figures_are_the_table_s():
  """The front page's compiled ImageNet64 figures, as docs/targets.md's
  table (benchmarks/targets_table.py's output) has them."""
  readme = _read('README.md').split('### Before booking hardware')[1]
  table = _read('docs/targets.md')
  rows = re.findall(r'\| (small|large) \([\d.]+[MB]\) \| (\S+) \| (\d+) \| '
                    r'([\d.]+) of ([\d.]+) GiB[^|]*\| (yes|no)[^|]*\| (\d+) \|',
                    readme)
  assert len(rows) == 4, rows
  for size, target, per_chip, peak, usable, fits, largest in rows:
    target = {'8×H100': '8xh100'}.get(target, target)
    assert (f'| configs/imagenet64.py:{size} | {target} | {per_chip} | '
            f'{peak} ({usable}) | {fits} | {largest} |') in table, (size,
                                                                    target)


def test_the_front_page_s_any_s_table_is_the_docs():
  """The front page's FD-digits of the any-S and per-S students, as
  docs/any_steps.md has them (one measurement, quoted twice)."""
  section = _read('README.md').split('### One student for every step count')
  rows = [line for line in section[1].split('\n### ')[0].splitlines()
          if line.startswith('| CD')]
  assert len(rows) == 4, rows
  docs = _read('docs/any_steps.md')
  for line in rows:
    assert line in docs, line
