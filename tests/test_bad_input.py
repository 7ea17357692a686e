"""Every way to start a run wrongly ends in one clear line, before anything in
the workdir changes (tests run on 8 fake CPU devices, conftest.py)."""

import os
import subprocess
import sys

import pytest

from configs import digits
from configs import toy2d
from multistep_cm import train
from multistep_cm import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (what is wrong, the config's overrides, a phrase the one line must hold).
BAD = [
    ('batch not split over 8 devices', {'batch_size': 12},
     'batch_size 12 does not split over the 8 devices'),
    ('log_every 0', {'log_every': 0}, 'config.log_every is 0'),
    ('no steps', {'total_steps': 0}, 'config.total_steps is 0'),
    ('negative steps', {'total_steps': -5}, 'config.total_steps is -5'),
    ('ckpt_every 0', {'ckpt_every': 0}, 'config.ckpt_every is 0'),
    ('negative eval_every', {'eval_every': -1}, 'config.eval_every is -1'),
    ('keep no checkpoints', {'keep_checkpoints': 0},
     'config.keep_checkpoints is 0'),
    ('no quick-evaluation samples', {'train_eval.num_samples': 0},
     'config.train_eval.num_samples is 0'),
    ('mesh larger than the devices', {'mesh.shape': (3, 1)},
     'needs 3 devices, there are 8'),
    ('mesh axes and shape differ', {'mesh.shape': (8,)}, 'differ in length'),
    ('unknown dataset', {'dataset.name': 'mnist'}, "Unknown dataset 'mnist'"),
    ('unknown stage', {'stage': 'distill'}, "Unknown stage 'distill'"),
    ('student without a teacher', {'stage': 'cd'},
     'set config.teacher_checkpoint'),
    ('teacher sampler without steps', {'sampler.steps': 0},
     'config.sampler: A sampler needs at least one step'),
    ('negative pseudo-Huber delta',
     {'stage': 'ct', 'teacher_checkpoint': '/any', 'consistency.huber_delta':
      -1e-4}, 'huber_delta must be >= 0'),
    ('multiscale past the image', {'loss.multiscale': 4},
     'config.loss.multiscale is 4'),
    ('unknown teacher sampler', {'sampler.kind': 'euler'},
     "Unknown sampler 'euler'"),
]


@pytest.fixture
def used_workdir(tmp_path):
  """A workdir a previous run left: its files must survive a bad start."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text('{"from": "the previous run"}')
  (workdir / 'notes.txt').write_text('kept')
  return workdir


def _snapshot(directory):
  return {p: open(os.path.join(r, p), 'rb').read()
          for r, _, files in os.walk(directory) for p in files}


def _assert_one_line_and_untouched(run, workdir, phrase):
  before = _snapshot(workdir)
  with pytest.raises(errors.UserError) as e:
    run()
  message = str(e.value)
  assert '\n' not in message and phrase in message, message
  assert _snapshot(workdir) == before


@pytest.mark.parametrize('what,overrides,phrase', BAD, ids=[b[0] for b in BAD])
def test_bad_config(what, overrides, phrase, used_workdir):
  del what
  config = toy2d.get_config('smoke,stage=teacher')
  config.update_from_flattened_dict(overrides)
  _assert_one_line_and_untouched(
      lambda: train.train_and_evaluate(config, str(used_workdir)),
      used_workdir, phrase)


def test_workdir_under_a_file(tmp_path):
  (tmp_path / 'file').write_text('not a directory')
  config = toy2d.get_config('smoke,stage=teacher')
  with pytest.raises(errors.ConfigError, match='file is a file'):
    train.train_and_evaluate(config, str(tmp_path / 'file' / 'run'))


def test_teacher_checkpoint_missing(used_workdir, tmp_path):
  config = toy2d.get_config('smoke,stage=cd')
  config.teacher_checkpoint = str(tmp_path / 'no_teacher_here')
  _assert_one_line_and_untouched(
      lambda: train.train_and_evaluate(config, str(used_workdir)),
      used_workdir, 'No checkpoint at')


def test_teacher_of_another_model(digits_teacher, used_workdir):
  _, teacher_dir = digits_teacher
  config = digits.get_config('smoke,stage=cd')
  config.teacher_checkpoint = teacher_dir
  config.model.emb_dim = 48
  _assert_one_line_and_untouched(
      lambda: train.train_and_evaluate(config, str(used_workdir)),
      used_workdir, 'does not match config.model')


def _main(*args, **env):
  env = dict(os.environ, PYTHONPATH=ROOT, **env)
  return subprocess.run([sys.executable, '-m', 'multistep_cm.main', *args],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300, check=False)


def test_command_line_batch_on_8_devices(used_workdir):
  """Through the command line: one `error:` line, exit 1, nothing written."""
  before = _snapshot(used_workdir)
  proc = _main('--config=configs/toy2d.py:smoke,stage=teacher',
               f'--workdir={used_workdir}', '--config.batch_size=12',
               XLA_FLAGS='--xla_force_host_platform_device_count=8')
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: config.batch_size 12 does not split over the 8 devices: use a '
      'multiple of 8.')
  assert _snapshot(used_workdir) == before


def test_command_line_partial_multi_host_settings(tmp_path):
  proc = _main('--config=configs/toy2d.py:smoke', f'--workdir={tmp_path}',
               '--num_processes=2', JAX_COORDINATOR_ADDRESS='localhost:1')
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  line = proc.stderr.strip().splitlines()[-1]
  # No cluster to detect the process id from.
  assert line.startswith('error: a multi-host start with '
                         '--coordinator_address, --num_processes needs'), line
  assert line.endswith('give --process_id ($JAX_PROCESS_ID) too.'), line
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize('attention,phrase', [
    ('cudnn', "'cudnn' needs an NVIDIA GPU; this run's devices are cpu"),
    ('flash', "config.model: attention is 'flash': expected one of auto, xla, "
              'cudnn, splash.'),
])
def test_attention_the_devices_cannot_run(attention, phrase, used_workdir):
  config = digits.get_config('smoke,stage=teacher')
  config.model.attention = attention
  _assert_one_line_and_untouched(
      lambda: train.train_and_evaluate(config, str(used_workdir)),
      used_workdir, phrase)


def test_unknown_remat_policy(used_workdir):
  config = digits.get_config('smoke,stage=teacher')
  config.model.remat = 'dots'
  _assert_one_line_and_untouched(
      lambda: train.train_and_evaluate(config, str(used_workdir)),
      used_workdir, "config.model: remat is 'dots': expected one of none, "
      'full, dots_saveable.')
