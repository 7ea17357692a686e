"""The entry point as a user meets it: bad input ends in one clear line."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys

import multistep_cm


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  env = dict(os.environ, XLA_FLAGS='', PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 'multistep_cm.main', *args],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300, check=False)


def _last_line(proc):
  return proc.stderr.strip().splitlines()[-1]


def test_mistyped_config_field(tmp_path):
  proc = _run('--config=configs/digits.py:smoke', f'--workdir={tmp_path}',
              '--config.optim.lrr=0.1')
  assert proc.returncode != 0
  assert 'Traceback' not in proc.stderr
  line = _last_line(proc)
  assert line.startswith('error: no such config field'), line
  assert 'Did you mean "lr"' in line and '--config.optim.lrr=0.1' in line


def test_mistyped_variant(tmp_path):
  proc = _run('--config=configs/digits.py:smok', f'--workdir={tmp_path}')
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr
  assert "Unknown config argument 'smok'" in proc.stderr


def test_missing_dataset(tmp_path):
  proc = _run('--config=configs/imagenet64.py:smoke', f'--workdir={tmp_path}',
              f'--config.dataset.data_dir={tmp_path}/tfds')
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr
  line = _last_line(proc)
  assert line.startswith("error: Dataset 'imagenet_resized/64x64' is not "
                         'prepared'), line
  assert 'tfds build imagenet_resized/64x64' in line
  assert 'TFDS_DATA_DIR' in line


def test_sample_without_checkpoint(tmp_path):
  proc = _run('--config=configs/digits.py:smoke', f'--workdir={tmp_path}',
              '--mode=sample')
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr
  assert _last_line(proc).startswith('error: No checkpoint in')


def test_help_is_printed_and_succeeds():
  for flag in ('--help', '--helpshort'):
    proc = _run(flag)
    assert proc.returncode == 0, (flag, proc.stderr[-2000:])
    assert '--workdir: Directory for checkpoints' in proc.stdout, flag
    assert '--mode: <train|sample|evaluate' in proc.stdout, flag


def test_the_package_has_its_distributions_version():
  with open(os.path.join(ROOT, 'setup.py'), encoding='utf-8') as f:
    (declared,) = re.findall(r"version='([^']+)'", f.read())
  installed = importlib.metadata.version('multistep_cm')
  assert installed == declared, 'setup.py changed since `pip install -e .`'
  assert multistep_cm.__version__ == installed


def test_missing_config_file(tmp_path):
  proc = _run('--config=configs/nope.py', f'--workdir={tmp_path}')
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr
  assert _last_line(proc) == ("error: cannot load --config: [Errno 2] No such "
                              "file or directory: 'configs/nope.py'")


def test_evaluate_without_inception_weights(tmp_path):
  env_free = os.environ.pop('MULTISTEP_CM_INCEPTION', None)
  try:
    proc = _run('--config=configs/imagenet64.py:smoke', f'--workdir={tmp_path}',
                '--mode=evaluate')
  finally:
    if env_free is not None:
      os.environ['MULTISTEP_CM_INCEPTION'] = env_free
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr
  line = _last_line(proc)
  assert line.startswith('error: No Inception weights configured.'), line
  assert 'python -m multistep_cm.tools.convert_inception' in line


def test_reference_of_wrong_weights_file(tmp_path):
  bogus = tmp_path / 'inception.npz'
  bogus.write_bytes(b'not an npz')
  proc = _run('--config=configs/digits.py:smoke', f'--workdir={tmp_path}',
              '--mode=reference',
              f'--config.evaluate.inception_weights={bogus}')
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr
  assert 'is not a readable .npz' in _last_line(proc)


def test_overrides_reach_every_stage_of_the_pipeline(tmp_path):
  """`--config.X` means the same for the teacher and for the student: each
  stage runs with the config its own command would get."""
  proc = _run('--config=configs/toy2d.py:smoke', f'--workdir={tmp_path}',
              '--config.total_steps=3', '--config.optim.lr=0.002')
  assert proc.returncode == 0, proc.stderr[-3000:]
  for stage in ('teacher', 'cd_s8'):
    config = json.loads((tmp_path / stage / 'config.json').read_text())
    assert config['total_steps'] == 3 and config['optim']['lr'] == 0.002
    assert (tmp_path / stage / 'checkpoints' / '3').is_dir()
  assert '| student (CD, S=8) | 8 |' in proc.stdout


def test_describe_needs_no_workdir_and_writes_nothing(tmp_path):
  # FSDP on a 2-D mesh of 8 devices, the embedding table sharded: XLA
  # replicated tensors to reshard them (the warnings describe counts) until
  # the network gathered the table whole.
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='1',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  proc = subprocess.run(
      [sys.executable, '-m', 'multistep_cm.main', '--mode=describe',
       '--config=configs/imagenet64.py:small,smoke',
       '--config.mesh.shape=(2,4)', '--config.batch_size=16'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  assert 'smoke' in out  # The config file's variants, from its docstring.
  assert '\nbatch_size = 16\n' in out and "\nstage = 'teacher'\n" in out
  assert ("parameters; batch 16 over mesh {'data': 2, 'fsdp': 4} of 8 cpu "
          'devices.') in out
  assert 'temporaries (activations, gathered weights):' in out
  assert '\nInvoluntary full rematerializations: 0\n' in out + '\n', (
      proc.stderr[-3000:])
  proc = _run('--config=configs/digits.py:smoke', f'--workdir={tmp_path}',
              '--mode=sample', '--mode=train', '--workdir=')
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr
  assert '--workdir is required (except with --mode=describe)' in (
      _last_line(proc))
  assert not os.listdir(tmp_path)

