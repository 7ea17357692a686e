"""The README's commands run as printed: every `python -m multistep_cm...`
line that takes under a minute on a CPU (sampling, evaluating and exporting
the quickstart's checkpoints, the smoke variants) is run exactly as written,
with its /tmp/ directory moved into a temporary one, and so is its Python:
the library example, and serving the exported student."""

import os
import re
import shlex
import shutil
import subprocess
import sys

from etils import epath
import pytest

from configs import digits
from multistep_cm.core import checkpoint
from multistep_cm.core import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One worker makes the checkpoints once for all of them.
pytestmark = pytest.mark.xdist_group('readme')


def readme_commands():
  """The `python -m multistep_cm...` commands of the README's bash blocks,
  continuation lines joined."""
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    text = f.read()
  commands = []
  for block in re.findall(r'```bash\n(.*?)```', text, re.S):
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
  # Sampling the student, evaluating the student and the teacher.
  assert len(CHEAP) >= 3, CHEAP
  assert any('stage=cd' in c and '--mode=sample' in c for c in CHEAP)
  assert any('stage=cd' in c and '--mode=evaluate' in c for c in CHEAP)
  assert any('stage=cd' in c and '--mode=export' in c for c in CHEAP)


def _checkpoint(config, workdir):
  """A freshly initialised train state of `config`, saved as its last step
  in WORKDIR/checkpoints, where training would have left it."""
  mesh = state_lib.make_mesh(config)
  state, _ = state_lib.init_state(config, state_lib.create_model(config),
                                  state_lib.make_optimizer(config.optim), mesh)
  ckpt = checkpoint.Checkpointer(epath.Path(workdir) / 'checkpoints', 1, 1)
  ckpt.save(config.total_steps, state, force=True)
  ckpt.wait()
  ckpt.close()


@pytest.fixture(scope='module')
def quickstart(tmp_path_factory):
  """/tmp/digits as the quickstart leaves it, in miniature: checkpoints of
  the full-size digits teacher and of its 8-step CD student, so that the
  README's commands find the model they configure (trained or not, the
  commands run the same code)."""
  root = tmp_path_factory.mktemp('quickstart')
  _checkpoint(digits.get_config('stage=teacher'), root / 'digits' / 'teacher')
  _checkpoint(digits.get_config('stage=cd'), root / 'digits' / 'cd_s8')
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
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    return re.findall(r'```python\n(.*?)```', f.read(), re.S)


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
