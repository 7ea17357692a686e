"""A damaged newest checkpoint: resuming falls back to the newest intact step,
with one warning, moving the damaged one aside and losing nothing. A save
that cannot be written stops with one line naming the newest good step,
which is kept."""

import errno
import logging
import os

from etils import epath
import jax
import numpy as np
import orbax.checkpoint
import pytest

from multistep_cm.core import checkpoint
from multistep_cm import errors

# A failed tensorstore read leaves orbax's asyncio tasks to fail on a closed
# loop later: noise, not a failure of the code under test.
pytestmark = pytest.mark.filterwarnings(
    'ignore::pytest.PytestUnraisableExceptionWarning')

# Random float32 arrays: params/w is the largest file of a step, and the one
# that load_params(key='params') certainly reads.
SHAPES = {'w': (64, 64), 'b': (64,)}


def _state(step):
  rng = np.random.default_rng(step)
  params = {k: rng.standard_normal(s).astype(np.float32)
            for k, s in SHAPES.items()}
  return {'params': params, 'ema_params': {'b': params['b'] * 0.5},
          'step': step}


def _abstract(tree):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
      if isinstance(x, np.ndarray) else x, tree)


ABSTRACT = _abstract(_state(0))


def _assert_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _save(directory, steps=(10, 20, 30)):
  ckpt = checkpoint.Checkpointer(directory, every_steps=10, keep=3)
  for step in steps:
    assert ckpt.save(step, _state(step))
  ckpt.wait()
  ckpt.close()


def _files(directory):
  return [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]


def _truncate_largest(step_dir):
  path = max(_files(step_dir), key=os.path.getsize)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _delete(name):
  def damage(step_dir):
    found = [p for p in _files(step_dir) if os.path.basename(p) == name]
    assert found
    for p in found:
      os.remove(p)
  return damage


# (damage, the step it damages, the step a restart resumes from)
DAMAGES = {
    'truncated data': (_truncate_largest, 30, 20),
    'no manifest.ocdbt': (_delete('manifest.ocdbt'), 30, 20),
    'no _METADATA': (_delete('_METADATA'), 30, 20),
    'empty directory': (os.mkdir, 40, 30),
}


def _damage(directory, kind):
  damage, step, resumed = DAMAGES[kind]
  damage(str(directory / str(step)))
  return step, resumed


def _warnings(caplog):
  """This module's warnings: orbax logs its own besides."""
  return [r.getMessage() for r in caplog.records
          if r.levelno == logging.WARNING and
          os.path.samefile(r.pathname, checkpoint.__file__)]


@pytest.mark.parametrize('kind', DAMAGES)
def test_resumes_from_newest_intact_step(tmp_path, caplog, kind):
  _save(tmp_path)
  damaged, resumed = _damage(tmp_path, kind)

  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=10, keep=3)
  with caplog.at_level(logging.WARNING):
    state, step = ckpt.restore_latest_intact(ABSTRACT)
  assert step == resumed
  _assert_equal(state, _state(resumed))
  [warning] = _warnings(caplog)
  assert '\n' not in warning
  assert f'step {damaged} in {tmp_path} cannot be restored' in warning
  assert warning.endswith(
      f'moved it to {tmp_path}/damaged/{damaged} and trying step {resumed}.')
  assert os.listdir(tmp_path / 'damaged') == [str(damaged)]
  assert not os.path.exists(tmp_path / str(damaged))
  assert {'10', '20'} <= set(os.listdir(tmp_path))
  assert ckpt.latest_step() == resumed

  # Its step number is free again, and keep=3 keeps three intact steps.
  assert ckpt.should_save(damaged)
  assert ckpt.save(damaged, _state(damaged + 1))
  ckpt.wait()
  _assert_equal(ckpt.restore(ABSTRACT), _state(damaged + 1))
  assert ckpt.latest_step() == damaged
  assert sorted(int(n) for n in os.listdir(tmp_path) if n.isdigit()) == (
      [10, 20, 30] if damaged == 30 else [20, 30, 40])
  ckpt.close()


def test_latest_step_skips_an_unfinished_directory(tmp_path):
  _save(tmp_path)
  os.mkdir(tmp_path / '40')
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=10, keep=3)
  assert ckpt.latest_step() == 30
  _assert_equal(ckpt.restore(ABSTRACT), _state(30))
  ckpt.close()


def test_should_save_follows_the_interval(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=10, keep=3)
  assert [s for s in range(1, 31) if ckpt.should_save(s)] == [10, 20, 30]
  ckpt.save(10, _state(10))
  ckpt.wait()
  assert not ckpt.should_save(10) and ckpt.should_save(20)
  ckpt.close()


def test_no_checkpoint_starts_afresh(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=10, keep=3)
  assert ckpt.restore_latest_intact(ABSTRACT) == (None, None)
  assert ckpt.latest_step() is None
  ckpt.close()


def test_stray_temporary_directories_are_removed(tmp_path):
  """A save killed midway leaves `<step>.orbax-checkpoint-tmp*` behind."""
  _save(tmp_path)
  for name in ('35.orbax-checkpoint-tmp', '45.orbax-checkpoint-tmp-1700000'):
    os.makedirs(tmp_path / name / 'default')
    (tmp_path / name / 'default' / 'partial').write_bytes(b'\0' * 100)
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=10, keep=3)
  assert ckpt.restore_latest_intact(ABSTRACT)[1] == 30
  ckpt.save(40, _state(40))  # Orbax finishes its clean-up before a save.
  ckpt.wait()
  ckpt.close()
  assert sorted(os.listdir(tmp_path)) == ['20', '30', '40']


def test_every_step_damaged_is_one_line_error(tmp_path, caplog):
  _save(tmp_path)
  for step in (10, 20, 30):
    _truncate_largest(tmp_path / str(step))
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=10, keep=3)
  with caplog.at_level(logging.WARNING):
    with pytest.raises(errors.UserError, match='can be restored') as e:
      ckpt.restore_latest_intact(ABSTRACT)
  assert '\n' not in str(e.value) and f'{tmp_path}/damaged' in str(e.value)
  assert len(_warnings(caplog)) == 3
  assert _warnings(caplog)[-1].endswith('no older step is left.')
  assert sorted(os.listdir(tmp_path / 'damaged')) == ['10', '20', '30']
  ckpt.close()
  # A restart does not quietly start the run from scratch either.
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=10, keep=3)
  with pytest.raises(checkpoint.DamagedCheckpointError):
    ckpt.restore_latest_intact(ABSTRACT)
  ckpt.close()


def test_another_config_moves_nothing(tmp_path):
  """A step that reads but does not fit is a config error, not damage."""
  _save(tmp_path)
  before = sorted(_files(tmp_path))
  abstract = _abstract(_state(0))
  abstract['params']['w'] = jax.ShapeDtypeStruct((32, 64), np.float32)
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=10, keep=3)
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r'\(step 30\) does not match the config: 1 '
                     r'array\(s\) differ, e.g. params/w has shape'):
    ckpt.restore_latest_intact(abstract)
  ckpt.close()
  assert sorted(_files(tmp_path)) == before


@pytest.mark.parametrize('kind', ['truncated data', 'empty directory'])
def test_load_params_skips_a_damaged_step_in_place(tmp_path, caplog, kind):
  _save(tmp_path / 'checkpoints')
  damaged, resumed = _damage(tmp_path / 'checkpoints', kind)
  before = sorted(_files(tmp_path)) + sorted(os.listdir(tmp_path /
                                                        'checkpoints'))
  with caplog.at_level(logging.WARNING):
    params, step = checkpoint.load_params(
        tmp_path, ABSTRACT['params'], key='params')
  assert step == resumed
  _assert_equal(params, _state(resumed)['params'])
  [warning] = _warnings(caplog)
  assert warning.endswith(f'left it there and trying step {resumed}.')
  assert f'step {damaged} in {tmp_path}/checkpoints' in warning
  assert sorted(_files(tmp_path)) + sorted(
      os.listdir(tmp_path / 'checkpoints')) == before
  # An explicit step is never swapped for another.
  with pytest.raises(checkpoint.DamagedCheckpointError,
                     match=f'step {damaged} .* cannot be restored'):
    checkpoint.load_params(tmp_path / 'checkpoints' / str(damaged),
                           ABSTRACT['params'], key='params')


def test_small_replicated_arrays_save_without_compiling(tmp_path,
                                                        count_compiles):
  """Arrays with a copy on each of the 8 devices: splitting each small one
  among its copies would compile a slicing program per array; a large one
  is still split."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  small = {f'a{i}': jax.device_put(np.full((i + 1, 3), i, np.float32),
                                   replicated) for i in range(12)}
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=1, keep=2)
  with count_compiles() as events:
    ckpt.save(1, small, force=True)
    ckpt.wait()
  assert not events
  rows = checkpoint.MIN_REPLICA_SLICE_BYTES // 4 // 16 * 8  # 8 slices' worth.
  large = {'w': jax.device_put(np.ones((rows, 16), np.float32), replicated)}
  with count_compiles() as events:
    ckpt.save(2, large, force=True)
    ckpt.wait()
  assert events
  ckpt.close()
  _assert_equal(checkpoint.Checkpointer(tmp_path, 1, 2).restore(
      _abstract(jax.device_get(large))), jax.device_get(large))


def no_space_left(monkeypatch, prefix):
  """From now on orbax's own file writes (its metadata and commit files,
  written by Python) fail as on a full disk under `prefix`, a path or the
  start of one: a step's temporary directory, say. Tensorstore writes the
  arrays from C++; one failed write fails the save all the same."""
  path_type = type(epath.Path(str(prefix)))
  for name in ('write_text', 'write_bytes'):
    real = getattr(path_type, name)

    def write(self, *args, real=real, **kwargs):
      if str(self).startswith(str(prefix)):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      return real(self, *args, **kwargs)
    monkeypatch.setattr(path_type, name, write)


@pytest.mark.parametrize('surfaces_at', ['next save', 'wait', 'close'])
def test_a_failed_save_is_one_line_and_keeps_the_good_steps(
    tmp_path, monkeypatch, caplog, surfaces_at):
  """Step 30's save fails in orbax's background threads; whichever call
  comes next reports it in one line naming step 30, the cause and step 20,
  the newest good one, which a rerun resumes from. Orbax's own reports of
  the failure (tracebacks from each of its threads) are dropped."""
  _save(tmp_path, steps=(10, 20))
  before = sorted(_files(tmp_path))
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=10, keep=3)
  with monkeypatch.context() as m, caplog.at_level(logging.WARNING):
    no_space_left(m, tmp_path / '30')
    assert ckpt.save(30, _state(30))  # It fails in the background.
    with pytest.raises(errors.StorageError) as e:
      if surfaces_at == 'next save':
        ckpt.save(40, _state(40))
      elif surfaces_at == 'wait':
        ckpt.wait()
      else:
        ckpt.close()
    ckpt.close()  # The error closed it: nothing is raised twice.
  assert str(e.value) == (
      f'Cannot save step 30 to {tmp_path}: No space left on device; the '
      'newest good checkpoint is step 20, and a rerun resumes from it.')
  assert not caplog.records, [r.getMessage() for r in caplog.records]
  assert sorted(_files(tmp_path)) == before + sorted(
      _files(tmp_path / '30.orbax-checkpoint-tmp'))

  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=10, keep=3)
  state, step = ckpt.restore_latest_intact(ABSTRACT)
  assert step == 20
  _assert_equal(state, _state(20))
  assert ckpt.save(30, _state(30))  # With space again; the partial one goes.
  ckpt.close()
  assert sorted(os.listdir(tmp_path)) == ['10', '20', '30']


def test_only_storage_failures_of_orbax_threads_are_dropped(tmp_path, caplog):
  """The records dropped are orbax's and asyncio's reports of a write that
  failed; the same records of any other error, and a storage error logged
  by anything else, pass."""
  checkpoint.Checkpointer(tmp_path, every_steps=10, keep=3).close()
  full = ValueError('RESOURCE_EXHAUSTED: Failed writing: "x/d/1": Failed to '
                    "write 10745 bytes to file 9: No space left on device "
                    "[os_error_code='28']")
  bug = ValueError('Unsupported type: <class object>')
  orbax_file = os.path.join(os.path.dirname(orbax.checkpoint.__file__),
                            '_src', 'futures', 'future.py')
  cases = [('absl', orbax_file, full, False),
           ('absl', orbax_file, OSError(errno.EACCES, 'Permission denied'),
            False),
           ('asyncio', '/usr/lib/python3/asyncio/base_events.py', full,
            False),
           ('absl', orbax_file, bug, True),
           ('asyncio', '/usr/lib/python3/asyncio/base_events.py', bug, True),
           ('absl', __file__, full, True)]
  with caplog.at_level(logging.ERROR):
    for i, (name, path, exc, _) in enumerate(cases):
      logger = logging.getLogger(name)
      logger.handle(logger.makeRecord(name, logging.ERROR, path, 1, str(i),
                                      (), (type(exc), exc, None)))
  assert [r.getMessage() for r in caplog.records] == [
      str(i) for i, case in enumerate(cases) if case[-1]]


def _failing(monkeypatch, error, times, method='restore'):
  """The next `times` calls of the CheckpointManager's `method` raise
  `error`, as a read of a flaky storage would; returns the calls' count."""
  real = getattr(orbax.checkpoint.CheckpointManager, method)
  calls = []

  def flaky(self, *args, **kwargs):
    calls.append(args)
    if len(calls) <= times:
      raise error
    return real(self, *args, **kwargs)
  monkeypatch.setattr(orbax.checkpoint.CheckpointManager, method, flaky)
  return calls


TRANSIENT = {
    'EIO': OSError(errno.EIO, os.strerror(errno.EIO)),
    'ESTALE': OSError(errno.ESTALE, os.strerror(errno.ESTALE)),
    # tensorstore's error for a GCS 503 that outlived its own retries.
    'UNAVAILABLE': ValueError('UNAVAILABLE: Error reading "params.w/0.0": '
                              'HTTP response code: 503'),
}


@pytest.mark.parametrize('kind', TRANSIENT)
def test_a_transient_read_error_is_retried_not_quarantined(
    tmp_path, monkeypatch, caplog, kind):
  _save(tmp_path)
  monkeypatch.setattr(checkpoint, 'RETRY_DELAYS_S', (0.01, 0.02))
  calls = _failing(monkeypatch, TRANSIENT[kind], times=2)
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=10, keep=3)
  with caplog.at_level(logging.WARNING):
    state, step = ckpt.restore_latest_intact(ABSTRACT)
  assert step == 30 and len(calls) == 3
  _assert_equal(state, _state(30))
  assert not os.path.exists(tmp_path / 'damaged')
  warnings = _warnings(caplog)
  assert len(warnings) == 2 and all(
      w.startswith(f'Reading checkpoint step 30 in {tmp_path} failed (')
      for w in warnings), warnings
  ckpt.close()


def test_a_step_failing_after_the_retries_is_damaged_if_storage_answers(
    tmp_path, monkeypatch, caplog):
  _save(tmp_path)
  monkeypatch.setattr(checkpoint, 'RETRY_DELAYS_S', (0.01, 0.02))
  calls = _failing(monkeypatch, TRANSIENT['EIO'], times=3)
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=10, keep=3)
  with caplog.at_level(logging.WARNING):
    state, step = ckpt.restore_latest_intact(ABSTRACT)
  assert step == 20 and len(calls) == 4
  _assert_equal(state, _state(20))
  assert os.listdir(tmp_path / 'damaged') == ['30']
  assert _warnings(caplog)[-1] == (
      f'Checkpoint step 30 in {tmp_path} cannot be restored (Input/output '
      'error, 3 times over 0.03 s, while the storage around it answers); '
      f'moved it to {tmp_path}/damaged/30 and trying step 20.')
  ckpt.close()


def test_storage_that_stays_down_moves_nothing_and_is_one_line(
    tmp_path, monkeypatch):
  _save(tmp_path)
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=10, keep=3)
  monkeypatch.setattr(checkpoint, 'RETRY_DELAYS_S', (0.01,))
  _failing(monkeypatch, TRANSIENT['ESTALE'], times=100)
  path_type = type(epath.Path(str(tmp_path)))
  monkeypatch.setattr(path_type, 'iterdir', lambda self: (_ for _ in ()).throw(
      OSError(errno.ESTALE, os.strerror(errno.ESTALE))))
  with pytest.raises(errors.StorageError) as e:
    ckpt.restore_latest_intact(ABSTRACT)
  assert str(e.value) == (
      f'Cannot read checkpoint step 30 in {tmp_path}: Stale file handle, 2 '
      'times over 0.01 s, and the storage around it does not answer either; '
      'nothing was moved, and a rerun resumes from step 30 once the storage '
      'answers.')
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == ['10', '20', '30']


def test_load_params_retries_a_transient_error(tmp_path, monkeypatch):
  _save(tmp_path)
  monkeypatch.setattr(checkpoint, 'RETRY_DELAYS_S', (0.01,))
  _failing(monkeypatch, TRANSIENT['UNAVAILABLE'], times=1)
  params, step = checkpoint.load_params(str(tmp_path), ABSTRACT['params'],
                                        key='params')
  assert step == 30
  _assert_equal(params, _state(30)['params'])


def test_a_restore_keeps_what_is_written_to_stderr(tmp_path, monkeypatch,
                                                   capfd):
  """Nothing mutes file descriptor 2 while a step is read: a message a
  crashing library writes there (as C++ code does) is kept."""
  _save(tmp_path)
  real = orbax.checkpoint.CheckpointManager.restore

  def restore(self, *args, **kwargs):
    os.write(2, b'F1207 a fatal message from C++\n')
    return real(self, *args, **kwargs)
  monkeypatch.setattr(orbax.checkpoint.CheckpointManager, 'restore', restore)
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=10, keep=3)
  _, step = ckpt.restore_latest_intact(ABSTRACT)
  ckpt.close()
  assert step == 30
  assert 'F1207 a fatal message from C++' in capfd.readouterr().err


def io_error(monkeypatch, prefix, saves):
  """orbax's file writes under `prefix` fail with an I/O error, as a network
  file system's may, during the next `saves` saves; those of the saves
  after pass. Returns the paths that failed."""
  path_type = type(epath.Path(str(prefix)))
  started, failed = [], []
  real_save = orbax.checkpoint.CheckpointManager.save

  def save(self, *args, **kwargs):
    started.append(args)
    return real_save(self, *args, **kwargs)
  monkeypatch.setattr(orbax.checkpoint.CheckpointManager, 'save', save)
  for name in ('write_text', 'write_bytes'):
    real = getattr(path_type, name)

    def write(self, *args, real=real, **kwargs):
      if str(self).startswith(str(prefix)) and len(started) <= saves:
        failed.append(str(self))
        raise OSError(errno.EIO, os.strerror(errno.EIO))
      return real(self, *args, **kwargs)
    monkeypatch.setattr(path_type, name, write)
  return failed


def test_a_save_failing_once_is_tried_again_at_the_next_save(
    tmp_path, monkeypatch, caplog):
  _save(tmp_path, steps=(10, 20))
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=10, keep=3)
  with caplog.at_level(logging.WARNING):
    failed = io_error(monkeypatch, tmp_path / '30', saves=1)
    assert ckpt.save(30, _state(30))  # It fails in the background.
    assert ckpt.save(40, _state(40))
    ckpt.wait()
  assert failed
  assert _warnings(caplog) == [
      f'Saving step 30 to {tmp_path} failed (Input/output error); trying '
      'again at the next save.']
  assert ckpt.latest_step() == 40
  _assert_equal(ckpt.restore(ABSTRACT), _state(40))
  ckpt.close()


def test_a_final_save_is_tried_again_from_the_state_at_hand(
    tmp_path, monkeypatch, caplog):
  _save(tmp_path, steps=(10, 20))
  monkeypatch.setattr(checkpoint, 'RETRY_DELAYS_S', (0.01, 0.02))
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=10, keep=3)
  with caplog.at_level(logging.WARNING):
    failed = io_error(monkeypatch, tmp_path / '30', saves=2)
    ckpt.save_now(30, _state(30))
  assert failed
  assert _warnings(caplog) == [
      f'Saving step 30 to {tmp_path} failed (Input/output error); trying '
      f'again in {delay:g} s.' for delay in (0.01, 0.02)]
  assert ckpt.latest_step() == 30
  _assert_equal(ckpt.restore(ABSTRACT), _state(30))
  ckpt.close()


def test_a_save_that_keeps_failing_ends_in_one_line_for_a_restart(
    tmp_path, monkeypatch):
  _save(tmp_path, steps=(10, 20))
  monkeypatch.setattr(checkpoint, 'RETRY_DELAYS_S', (0.01,))
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=10, keep=3)
  io_error(monkeypatch, tmp_path / '30', saves=100)
  with pytest.raises(errors.StorageUnavailableError) as e:
    ckpt.save_now(30, _state(30))
  assert str(e.value) == (
      f'Cannot save step 30 to {tmp_path}: Input/output error (2 saves in a '
      'row); the newest good checkpoint is step 20, and a rerun resumes from '
      'it.')
  assert e.value.exit_code == errors.RESTART_EXIT_CODE
  ckpt.close()


@pytest.mark.parametrize('error, transient', [
    (ValueError('RESOURCE_EXHAUSTED: Error writing local file "/c/30/d": '
                "[os_error_code=28] No space left on device"), None),
    (ValueError('UNAVAILABLE: Error reading local file "/c/30/d": '
                "[os_error_code=5] Input/output error"), 'Input/output error'),
    (ValueError('RESOURCE_EXHAUSTED: Error writing "gs://b/c/30/d": HTTP '
                'response code: 429'), 'RESOURCE_EXHAUSTED: Error writing '
     '"gs://b/c/30/d": HTTP response code: 429'),
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), None),
    (ValueError('OUT_OF_RANGE: Error reading "params.w/0.0"'), None),
])
def test_what_counts_as_a_passing_storage_fault(error, transient):
  """A full disk is not retried (a person must act), though tensorstore
  reports it with the status of a GCS rate limit; its OS error decides."""
  assert checkpoint._transient(error) == transient  # pylint: disable=protected-access
