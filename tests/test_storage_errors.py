"""Storage that fails under a training run: the run stops with one line
naming the step it could not save, why, and the newest good checkpoint, which
is kept and which a rerun resumes from; a preemption notice whose save fails
exits as an error, not as "rerun to resume"."""

import os
import re
import signal
import subprocess
import sys

import pytest

from configs import toy2d
from multistep_cm import datasets
from multistep_cm import train
from multistep_cm import errors
from tests import test_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'configs/toy2d.py:smoke,stage=teacher'

# Put first on PYTHONPATH, the storage of a run fails once its first
# checkpoint is in place: from then on the OS refuses to grow any file of the
# process past 16 KiB (EFBIG, "File too large"). A step's array files are
# larger, the TensorBoard file, written only at log steps, stays smaller.
# Tensorstore's writes meet this error as they would a full disk: in C++, in
# orbax's background threads. SIGXFSZ would kill the process instead of
# failing the write; the setting is made in the thread that renames the
# step's directory into place, a signal's only in the main one.
FULL_AFTER_FIRST_CHECKPOINT = '''
import os
import resource
import signal

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
_rename = os.rename


def _rename_then_fill_up(src, dst, *args, **kwargs):
  _rename(src, dst, *args, **kwargs)
  if '.orbax-checkpoint-tmp' in str(src):
    resource.setrlimit(resource.RLIMIT_FSIZE,
                       (16 << 10, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


os.rename = _rename_then_fill_up
'''


def _main(workdir, *args, pythonpath=()):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([*pythonpath, ROOT]))
  return subprocess.run(
      [sys.executable, '-m', 'multistep_cm.main', f'--config={CONFIG}',
       f'--workdir={workdir}', '--config.eval_every=1000',
       '--config.log_every=1000', *args],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
      check=False)


def test_a_full_disk_stops_the_run_in_one_line_and_a_rerun_resumes(tmp_path):
  site = tmp_path / 'site'
  site.mkdir()
  (site / 'sitecustomize.py').write_text(FULL_AFTER_FIRST_CHECKPOINT)
  workdir = tmp_path / 'run'
  proc = _main(workdir, '--config.total_steps=8', pythonpath=[str(site)])
  assert proc.returncode == 1, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert lines[-1] == (
      f'error: Cannot save step 4 to {workdir}/checkpoints: File too large; '
      'the newest good checkpoint is step 2, and a rerun resumes from it.')
  # Nothing but absl's INFO lines before it; without the quieting, about 200
  # lines of orbax's and tensorstore's tracebacks (and on a full tmpfs, 500
  # to 1200).
  others = [line for line in lines[:-1]
            if not re.match(r'I\d{4} [\d:.]+ +\d+ \S+:\d+\] ', line)]
  assert len(others) < 10 and 'Traceback' not in proc.stderr, others
  assert sorted(os.listdir(workdir / 'checkpoints')) == [
      '2', '4.orbax-checkpoint-tmp']

  rerun = _main(workdir, '--config.total_steps=4')
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert 'Resuming from the checkpoint of step 2.' in rerun.stderr
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']


def test_a_failed_save_on_a_preemption_notice_is_an_error(tmp_path,
                                                           monkeypatch):
  """SIGTERM during step 3, whose save then fails: StorageError (exit 1),
  not Preempted (exit 75, "saved; rerun to resume")."""
  config = toy2d.get_config('smoke,stage=teacher')
  config.total_steps, config.eval_every = 100, 1000
  checkpoints = tmp_path / 'checkpoints'
  cls = type(datasets.get(config))
  real = cls.train_batches

  def batches(self, *args, **kwargs):
    for i, batch in enumerate(real(self, *args, **kwargs)):
      if i == 2:  # Step 3's batch: the notice comes during that step.
        test_checkpoint.no_space_left(monkeypatch,
                                      checkpoints / '3.orbax-checkpoint-tmp')
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch
  monkeypatch.setattr(cls, 'train_batches', batches)
  with pytest.raises(errors.StorageError) as e:
    train.train_and_evaluate(config, str(tmp_path))
  assert str(e.value) == (
      f'Cannot save step 3 to {checkpoints}: No space left on device; the '
      'newest good checkpoint is step 2, and a rerun resumes from it. A '
      'preemption notice stopped the run at step 3, which is not saved.')
  assert sorted(os.listdir(checkpoints)) == ['2', '3.orbax-checkpoint-tmp']
