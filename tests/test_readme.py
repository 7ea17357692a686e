"""The README's commands run as printed: every `python -m multistep_cm...`
line that takes under a minute on a CPU (sampling and evaluating the
quickstart's checkpoints, the smoke variants) is run exactly as written,
with its /tmp/ directory moved into a temporary one."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from configs import digits
from multistep_cm import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
  """Sampling or evaluating a checkpoint of the quickstart (/tmp/digits),
  or a smoke variant."""
  config = re.search(r'--config=(\S+)', command)
  smoke = config and re.search(r'[:,]smoke\b', config.group(1))
  mode = re.search(r'--mode=(sample|evaluate)\b', command)
  return bool(smoke or (mode and '--workdir=/tmp/digits' in command))


CHEAP = [c for c in readme_commands() if _cheap(c)]


def test_the_readme_has_cheap_commands_to_run():
  # Sampling the student, evaluating the student and the teacher.
  assert len(CHEAP) >= 3, CHEAP
  assert any('stage=cd' in c and '--mode=sample' in c for c in CHEAP)
  assert any('stage=cd' in c and '--mode=evaluate' in c for c in CHEAP)


@pytest.fixture(scope='module')
def quickstart(tmp_path_factory):
  """/tmp/digits as the quickstart leaves it, in miniature: the full-size
  digits teacher and its 8-step CD student after a few steps each, so that
  the README's commands find checkpoints of the model they configure."""
  root = tmp_path_factory.mktemp('quickstart')
  few = {'total_steps': 2, 'eval_every': 2, 'batch_size': 16,
         'train_eval.num_samples': 8, 'train_eval.batch_size': 8,
         'sampler.steps': 2}
  teacher = digits.get_config('stage=teacher')
  teacher.update_from_flattened_dict(few)
  train.train_and_evaluate(teacher, str(root / 'digits' / 'teacher'))
  student = digits.get_config('stage=cd')
  student.update_from_flattened_dict(
      {**few, 'teacher_checkpoint': str(root / 'digits' / 'teacher')})
  train.train_and_evaluate(student, str(root / 'digits' / 'cd_s8'))
  return root


@pytest.mark.parametrize('command', CHEAP)
def test_readme_command_runs_as_printed(command, quickstart):
  args = shlex.split(command.replace('/tmp/', f'{quickstart}/'))
  assert args[:2] == ['python', '-m']
  env = dict(os.environ, XLA_FLAGS='', PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, *args[1:]], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  workdir = re.search(r'--workdir=(\S+)', command).group(1).replace(
      '/tmp/', f'{quickstart}/')
  if '--mode=sample' in command:
    assert any(f.endswith('.png') and f.startswith('samples_step')
               for f in os.listdir(workdir))
  if '--mode=evaluate' in command:
    assert 'Evaluation step' in proc.stderr


def test_readme_python_runs():
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    blocks = re.findall(r'```python\n(.*?)```', f.read(), re.S)
  assert blocks
  env = dict(os.environ, XLA_FLAGS='', PYTHONPATH=ROOT)
  for block in blocks:
    proc = subprocess.run([sys.executable, '-c', block], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == '16'
