"""Runs on gs://, end to end, against a GCS emulator on loopback with a
fault-injecting proxy in front (tests/gcs.py): the command line exactly as a
user types it, with nothing but the emulator's address in its environment.

Which layer rides through what: tensorstore (orbax's arrays) retries 408,
429, 5xx, resets and stalls itself (32 times, up to 32 s apart); gcsfs
(epath's files: metadata, commit markers, events, PNGs) retries 408, 429,
500-504 and connection errors 5 times over about 30 s, and a stalled read
once core/storage.py gives it a time-out; core/checkpoint.py retries what is
left: a whole restore, and a save at the next save.
"""

import os
import re
import signal
import subprocess
import sys
import time

from etils import epath
from PIL import Image

from multistep_cm.core import preemption
from multistep_cm.core import storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = 'configs/toy2d.py:smoke,stage=teacher'
LONG = ('--config.total_steps=100000', '--config.eval_every=100000',
        '--config.log_every=10', '--config.ckpt_every=20')
# absl's INFO lines; anything else on stderr is a warning or an error.
INFO = re.compile(r'I\d{4} [\d:.]+ +\d+ \S+:\d+\] ')


def _main(env, *args, timeout=300):
  return subprocess.run(
      [sys.executable, '-m', 'multistep_cm.main', *args], cwd=ROOT,
      env=dict(env, PYTHONPATH=ROOT), capture_output=True, text=True,
      timeout=timeout, check=False)


def _not_info(stderr):
  return [line for line in stderr.splitlines() if not INFO.match(line)]


def _committed(gcs_bucket, directory):
  """The steps of `directory` (an object prefix) with a commit marker."""
  return sorted(int(m.group(1)) for m in (
      re.fullmatch(rf'{directory}/(\d+)/commit_success\.txt', n)
      for n in gcs_bucket.names(directory)) if m)


def test_a_pipeline_on_gs_rides_through_transient_faults(gcs_bucket,
                                                        gcs_env):
  """The toy2d smoke pipeline (a teacher, then a CD student that reads it)
  with --workdir=gs://..., while the proxy answers some uploads and reads
  with 503, 429 and 500 and resets some connections: everything is written,
  nothing is lost, and no warning or traceback reaches the log."""
  proxy = gcs_bucket.proxy
  uploads = r'^/upload/'
  rules = [proxy.add('status', method='POST', path=uploads, status=503,
                     count=3, skip=5),
           proxy.add('status', method='POST', path=uploads, status=429,
                     count=2, skip=40),
           proxy.add('status', method='GET', path=r'alt=media', status=500,
                     count=2, skip=10),
           proxy.add('reset', method='GET', path=r'/o/', count=2, skip=30),
           proxy.add('reset', method='POST', path=uploads, count=1,
                     skip=80)]
  workdir = gcs_bucket.path('run')
  proc = _main(gcs_env, '--config=configs/toy2d.py:smoke',
               f'--workdir={workdir}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert [r.injected for r in rules] == [3, 2, 2, 2, 1]
  # A retried upload can hold a save up until the next: orbax says so.
  assert [line for line in _not_info(proc.stderr) if 'Waiting for previous '
          'save to complete' not in line] == [], proc.stderr[-3000:]
  names = set(gcs_bucket.names('run'))
  for stage in ('teacher', 'cd_s8'):
    assert f'run/{stage}/config.json' in names
    assert any(n.startswith(f'run/{stage}/events.out.tfevents.')
               for n in names)
    assert _committed(gcs_bucket, f'run/{stage}/checkpoints')
  for name in ('comparison.md', 'comparison.json', 'comparison.png'):
    assert f'run/{name}' in names
  with epath.Path(workdir, 'comparison.png').open('rb') as f:
    assert Image.open(f).size[0] > 100
  assert '| student (CD, S=8) | 8 |' in epath.Path(
      workdir, 'comparison.md').read_text()


def test_sigterm_kill_9_and_resume_on_gs(gcs_bucket, gcs_env):
  """A preemption notice during a run on gs:// saves its step and exits 75;
  kill -9 after a later checkpoint loses nothing but the steps since; each
  rerun resumes from the newest committed step, through read faults."""
  workdir = gcs_bucket.path('run')
  directory = 'run/checkpoints'
  argv = [sys.executable, '-m', 'multistep_cm.main', f'--config={TEACHER}',
          f'--workdir={workdir}', *LONG]
  env = dict(gcs_env, PYTHONPATH=ROOT)

  def start():
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)

  def wait_for(proc, steps):
    started = time.time()
    while len(_committed(gcs_bucket, directory)) < steps:
      assert proc.poll() is None, proc.stderr.read()[-3000:]
      assert time.time() - started < 240, 'no checkpoint'
      time.sleep(0.2)

  proc = start()
  wait_for(proc, 1)
  proc.send_signal(signal.SIGTERM)
  code = proc.wait(timeout=120)
  err = proc.stderr.read()
  assert code == preemption.EXIT_CODE, err[-3000:]
  (saved,) = re.findall(r'preempted at step (\d+), saved', err)
  assert int(saved) in _committed(gcs_bucket, directory)

  proc = start()
  wait_for(proc, len(_committed(gcs_bucket, directory)) + 1)
  proc.kill()
  proc.communicate()
  newest = _committed(gcs_bucket, directory)[-1]
  assert newest > int(saved)

  # The rerun's reads meet 503s and resets: tried again, nothing moved.
  proxy = gcs_bucket.proxy
  rules = [proxy.add('status', method='GET', path=r'alt=media', status=503,
                     count=3),
           proxy.add('reset', method='GET', path=r'alt=media', count=2,
                     skip=5)]
  rerun = _main(gcs_env, f'--config={TEACHER}', f'--workdir={workdir}',
                f'--config.total_steps={newest + 2}',
                '--config.eval_every=100000')
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f'Resuming from the checkpoint of step {newest}.' in rerun.stderr
  assert [r.injected for r in rules] == [3, 2]
  assert not any('/damaged/' in n for n in gcs_bucket.names('run'))
  assert newest + 2 in _committed(gcs_bucket, directory)


def test_a_stalled_gcsfs_request_is_retried(gcs_bucket, monkeypatch):
  """A read that stalls (the connection open, no bytes) fails after
  storage.READ_TIMEOUT_S and gcsfs tries it again, instead of waiting
  forever, its default."""
  import fsspec.config  # pylint: disable=g-import-not-at-top
  path = epath.Path(gcs_bucket.path('stalled.txt'))
  path.write_text('intact')
  monkeypatch.setitem(fsspec.config.conf, 'gcs',
                      dict(fsspec.config.conf.get('gcs', {})))
  monkeypatch.setattr(storage, 'READ_TIMEOUT_S', 1)
  storage.configure()
  from tests import gcs  # pylint: disable=g-import-not-at-top
  gcs.clear_client_caches()
  rule = gcs_bucket.proxy.add('stall', method='GET', path=r'stalled\.txt',
                              seconds=30, count=1)
  started = time.time()
  assert path.read_text() == 'intact'
  assert rule.injected == 1 and time.time() - started < 15


def test_a_damaged_step_on_gs_is_moved_aside(gcs_bucket, caplog):
  """The quarantine on gs://, where moving a step is a move of each of its
  objects: a step whose metadata is gone is moved to damaged/, the step
  before restores, and the damaged step's number can be saved again."""
  from tests import test_checkpoint  # pylint: disable=g-import-not-at-top
  from multistep_cm.core import checkpoint  # pylint: disable=g-import-not-at-top
  directory = gcs_bucket.path('checkpoints')
  test_checkpoint._save(directory)  # pylint: disable=protected-access
  for name in gcs_bucket.names('checkpoints/30/'):
    if name.endswith('/_METADATA'):
      epath.Path(gcs_bucket.path(name)).unlink()
  ckpt = checkpoint.Checkpointer(directory, every_steps=10, keep=3)
  with caplog.at_level('WARNING'):
    state, step = ckpt.restore_latest_intact(test_checkpoint.ABSTRACT)
  assert step == 20
  test_checkpoint._assert_equal(state, test_checkpoint._state(20))  # pylint: disable=protected-access
  assert _committed(gcs_bucket, 'checkpoints/damaged') == [30]
  assert _committed(gcs_bucket, 'checkpoints') == [10, 20]
  assert ckpt.save(30, test_checkpoint._state(31))  # pylint: disable=protected-access
  ckpt.wait()
  assert _committed(gcs_bucket, 'checkpoints') == [10, 20, 30]
  ckpt.close()
