"""Multi-host runs with real processes on localhost (launch/local.py), and
preemption: a run on 2 processes x 4 CPU devices equals one on 1 x 8, its
checkpoint continues on other topologies, SIGTERM saves and exits 75.

Tolerance: the processes compute the same global batches; the parameters then
differ only by the order of floating-point reductions (gradients summed over
4 + 4 devices, not 8; and the in-process runs of this suite compile with
`jax_disable_most_optimizations`, conftest.py): 3.7e-7 of the largest
parameter after 6 steps, measured between two command-line runs. RTOL 1e-4
leaves room; different data, or two steps fewer, changes them by ~1.
"""

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from configs import toy2d
from multistep_cm import train
from multistep_cm import errors
from multistep_cm import run as run_lib
from multistep_cm.core import liveness
from multistep_cm.core import preemption
from multistep_cm.core import state as state_lib
from multistep_cm.evaluation import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'configs/toy2d.py:smoke,stage=teacher'
RTOL = 1e-4


def _config(total_steps, **overrides):
  c = toy2d.get_config('smoke,stage=teacher')
  c.total_steps = total_steps
  c.update_from_flattened_dict(overrides)
  return c


def _launch(processes, devices, *args, timeout=300):
  """launch/local.py's job: (exit code, stdout + stderr)."""
  proc = subprocess.run(
      [sys.executable, 'launch/local.py', f'--processes={processes}',
       f'--devices_per_process={devices}', '--', *args],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
      text=True, timeout=timeout, check=False)
  return proc.returncode, proc.stdout + proc.stderr


def _params(workdir, key='params'):
  run = run_lib.resolve(_config(1))
  params, _, step = state_lib.load_params(run, workdir, key)
  return params, step


def _assert_close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert np.abs(x - y).max() <= RTOL * np.abs(y).max(), (
        np.abs(x - y).max() / np.abs(y).max())


def test_coordinator_address_alone_with_a_detected_cluster(tmp_path):
  """jax's own convention: JAX_COORDINATOR_ADDRESS given, the process count
  and id detected from the cluster (here a stand-in Slurm step: jax reads
  SLURM_NTASKS and SLURM_PROCID)."""
  port = 20000 + os.getpid() % 20000
  procs = []
  for i in range(2):
    env = {k: v for k, v in os.environ.items()
           if k not in ('JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
               JAX_COORDINATOR_ADDRESS=f'localhost:{port}',
               XLA_FLAGS='--xla_force_host_platform_device_count=4',
               SLURM_JOB_ID='7', SLURM_STEP_NODELIST='localhost',
               SLURM_NTASKS='2', SLURM_PROCID=str(i), SLURM_LOCALID=str(i))
    procs.append(subprocess.Popen(
        [sys.executable, '-m', 'multistep_cm.main', f'--config={CONFIG}',
         f'--workdir={tmp_path}', '--config.total_steps=2'], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, out[-3000:]
    assert f'Process {i} of 2: 4 local cpu devices of 8' in out, out[-3000:]


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('two_processes'))
  code, out = _launch(2, 4, f'--config={CONFIG}', f'--workdir={workdir}',
                      '--config.total_steps=4')
  assert code == 0, out
  return workdir, out


def test_two_processes_equal_one(two_process_run, tmp_path):
  workdir, out = two_process_run
  for i in range(2):
    assert re.search(rf'\[{i}\] .*Process {i} of 2: 4 local cpu devices of '
                     r"8; mesh \{'data': 8, 'fsdp': 1\}", out), out
  # Only process 0 prints progress and metrics.
  assert re.search(r'\[0\] .*Step 4/4', out)
  assert not re.search(r'\[1\] .*(Step \d|train/loss)', out)
  # Written once: one set of steps, one config, one event file.
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  assert len([f for f in os.listdir(workdir) if f.startswith('events')]) == 1
  assert os.path.exists(os.path.join(workdir, 'config.json'))

  state, _ = train.train_and_evaluate(_config(4), str(tmp_path / 'one'))
  params, step = _params(workdir)
  assert step == 4
  _assert_close(params, state.params)
  ema, _ = _params(workdir, 'ema_params')
  _assert_close(ema, state.ema_params)


def test_resumes_on_other_topologies(two_process_run, tmp_path):
  """The 2 x 4 checkpoint of step 4 continues to step 6 on 1, 2 and 8
  devices in one process and on a (2, 4) mesh: all equal a 6-step run."""
  workdir, _ = two_process_run
  straight, _ = train.train_and_evaluate(_config(6), str(tmp_path / 'one'))
  copies = {}
  for name in ('1', '2', '8', 'mesh'):
    copies[name] = str(tmp_path / name)
    shutil.copytree(workdir, copies[name])
  for devices in ('1', '2'):
    code, out = _launch(1, int(devices), f'--config={CONFIG}',
                        f'--workdir={copies[devices]}',
                        '--config.total_steps=6')
    assert code == 0, out
    assert 'Resuming from the checkpoint of step 4.' in out
  train.train_and_evaluate(_config(6), copies['8'])
  train.train_and_evaluate(_config(6, **{'mesh.shape': (2, 4)}),
                           copies['mesh'])
  for name, directory in copies.items():
    params, step = _params(directory)
    assert step == 6, name
    _assert_close(params, straight.params)


def test_evaluate_on_two_processes_writes_what_one_writes(two_process_run,
                                                          tmp_path):
  workdir, _ = two_process_run
  overrides = {'evaluate.num_samples': 96, 'evaluate.chunk_size': 48,
               'evaluate.batch_size': 48}
  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  shutil.copytree(workdir, one)
  shutil.copytree(workdir, two)
  record = evaluate.run(_config(4, **overrides), one)
  code, out = _launch(2, 4, f'--config={CONFIG}', f'--workdir={two}',
                      '--mode=evaluate',
                      *(f'--config.{k}={v}' for k, v in overrides.items()))
  assert code == 0, out
  rel = os.path.relpath(record['samples_npz'], one)
  with np.load(record['samples_npz']) as a, np.load(os.path.join(two, rel)) as b:
    assert sorted(a) == sorted(b)
    np.testing.assert_array_equal(a['arr_1'], b['arr_1'])  # The labels.
    assert a['arr_0'].shape == (96, 2)
    np.testing.assert_allclose(a['arr_0'], b['arr_0'], rtol=RTOL, atol=RTOL)


def _preempt(argv, workdir, wait_for=r'Step 20/'):
  """Starts `argv`, sends SIGTERM once its output matches `wait_for`;
  (exit code, output, seconds from the signal to the exit)."""
  proc = subprocess.Popen(argv, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if re.search(wait_for, line):
      break
  sent = time.time()
  proc.send_signal(signal.SIGTERM)
  lines += proc.stdout.readlines()
  code = proc.wait(timeout=60)
  del workdir
  return code, ''.join(lines), time.time() - sent


LONG = ('--config.total_steps=100000', '--config.eval_every=100000',
        '--config.log_every=10', '--config.ckpt_every=1000')


@pytest.mark.parametrize('processes', [1, 2])
def test_sigterm_saves_the_step_and_a_rerun_resumes(processes, tmp_path):
  workdir = str(tmp_path / 'run')
  if processes == 1:
    argv = [sys.executable, '-m', 'multistep_cm.main']
  else:
    argv = [sys.executable, 'launch/local.py', '--processes=2',
            '--devices_per_process=4', '--']
  argv += [f'--config={CONFIG}', f'--workdir={workdir}', *LONG]
  code, out, seconds = _preempt(argv, workdir)
  assert code == preemption.EXIT_CODE, out
  assert seconds < 30
  said = re.findall(r'preempted at step (\d+), saved; rerun to resume', out)
  assert len(said) == processes and len(set(said)) == 1, out  # One step.
  step = int(said[0])
  assert step >= 20
  assert str(step) in os.listdir(os.path.join(workdir, 'checkpoints'))
  # The rerun resumes there.
  assert (f'Resuming from the checkpoint of step {step}.'
          in _rerun(workdir, step))


def _rerun(workdir, step):
  """A short single-process rerun, to two steps past `step`: its stderr."""
  rerun = subprocess.run(
      [sys.executable, '-m', 'multistep_cm.main', f'--config={CONFIG}',
       f'--workdir={workdir}', f'--config.total_steps={step + 2}',
       '--config.eval_every=100000'],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
      text=True, timeout=300, check=False)
  assert rerun.returncode == 0, rerun.stderr
  return rerun.stderr


def test_a_killed_process_stops_the_other_with_75_and_a_rerun_resumes(
    tmp_path):
  """kill -9 of process 1: process 0 names it and the newest checkpoint in
  one line within the heartbeat timeout, and exits 75 (jax alone would abort
  it from C++, 2 timeouts later)."""
  workdir, timeout_s = str(tmp_path / 'run'), 5
  port = 20000 + (os.getpid() + 7) % 20000
  procs = []
  for i in range(2):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
               JAX_COORDINATOR_ADDRESS=f'localhost:{port}',
               JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(i),
               XLA_FLAGS='--xla_force_host_platform_device_count=2')
    procs.append(subprocess.Popen(
        [sys.executable, '-m', 'multistep_cm.main', f'--config={CONFIG}',
         f'--workdir={workdir}', *LONG[:3], '--config.ckpt_every=20',
         f'--heartbeat_timeout_s={timeout_s}'],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True))
  first = os.path.join(workdir, 'checkpoints', '20', 'commit_success.txt')
  started = time.time()
  while not os.path.exists(first) and procs[1].poll() is None:
    assert time.time() - started < 240, 'no checkpoint of step 20'
    time.sleep(0.1)
  procs[1].kill()
  killed = time.time()
  code = procs[0].wait(timeout=120)
  seconds = time.time() - killed
  err = procs[0].stderr.read()
  procs[1].communicate()
  assert code == preemption.EXIT_CODE, err[-3000:]
  assert timeout_s - 1 < seconds < timeout_s + 10, err[-3000:]
  said = re.findall(
      r'^error: process 1 of 2 stopped answering \d+ s ago \(killed, or its '
      r'host lost\); the newest checkpoint is step (\d+) in (\S+): restart '
      r'the job to resume from it \(exit 75\)\.$', err, re.M)
  assert said, err[-3000:]
  step, directory = int(said[0][0]), said[0][1]
  assert directory == os.path.join(workdir, 'checkpoints')
  assert step >= 20
  assert 'Check failure stack trace' not in err  # Not jax's abort.
  assert (f'Resuming from the checkpoint of step {step}.'
          in _rerun(workdir, step))


@pytest.fixture(params=['module', 'attribute'])
def jax_without_its_client(request, monkeypatch):
  """A jax whose distributed client moved: jax._src.distributed gone, or
  without global_state."""
  # pylint: disable=protected-access
  if request.param == 'module':
    monkeypatch.delattr(jax._src, 'distributed')
    monkeypatch.setitem(sys.modules, 'jax._src.distributed', None)
  else:
    monkeypatch.delattr(jax._src.distributed, 'global_state')


def test_a_jax_without_the_client_stops_a_multi_host_run_in_one_line(
    jax_without_its_client, monkeypatch, tmp_path):
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  with pytest.raises(errors.UserError) as e:
    with liveness.Watch(str(tmp_path)):
      pass
  message = str(e.value)
  assert '\n' not in message
  assert message.startswith("multi-host liveness needs jax's distributed "
                            'client (jax._src.distributed.global_state.'
                            f'client), which jax {jax.__version__} does not '
                            'have: ')
  assert 'liveness' not in [t.name for t in threading.enumerate()]


def test_a_jax_without_the_client_imports_and_runs_one_process(
    jax_without_its_client, tmp_path):
  """liveness.py loaded afresh where the client cannot be found: a
  single-process run never needs it."""
  spec = importlib.util.spec_from_file_location('fresh_liveness',
                                                liveness.__file__)
  fresh = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(fresh)
  ran = []
  with fresh.Watch(str(tmp_path)):
    ran.append(jax.process_count())
  assert ran == [1]


# Put first on process 1's PYTHONPATH: its share of step 40's arrays fails
# to write, as one host's storage (a mount, a network path) fails while the
# others' is fine; process 0 writes its share and waits in orbax's commit.
ONE_HOST_FAILS_AT_40 = '''
import errno
import os
import re

if os.environ.get('JAX_PROCESS_ID') == '1':
  import orbax.checkpoint as ocp
  _real = ocp.type_handlers.ArrayHandler.serialize

  async def _serialize(self, values, infos, args=None):
    if any(re.search(r'/40(\\.orbax|/)', str(i.parent_dir)) for i in infos):
      raise OSError(errno.EIO, os.strerror(errno.EIO))
    return await _real(self, values, infos, args)
  ocp.type_handlers.ArrayHandler.serialize = _serialize
'''


def test_one_hosts_storage_failing_stops_the_job_for_a_restart(tmp_path):
  """Process 1 cannot save step 40: it says so, process 0 names it and the
  newest good step (20), both stop at the next save (60) within the
  heartbeat timeout, the launcher exits 75 (restart), and a rerun resumes
  from step 20."""
  site = tmp_path / 'site'
  site.mkdir()
  (site / 'sitecustomize.py').write_text(ONE_HOST_FAILS_AT_40)
  workdir = str(tmp_path / 'run')
  proc = subprocess.run(
      [sys.executable, 'launch/local.py', '--processes=2',
       '--devices_per_process=2', '--', f'--config={CONFIG}',
       f'--workdir={workdir}', *LONG[:3], '--config.ckpt_every=20',
       '--heartbeat_timeout_s=5'],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=f'{site}{os.pathsep}{ROOT}'),
      capture_output=True, text=True, timeout=300, check=False)
  out = proc.stdout + proc.stderr
  assert proc.returncode == preemption.EXIT_CODE, out[-3000:]
  checkpoints = os.path.join(workdir, 'checkpoints')
  assert (f'[1] error: Cannot save step 40 to {checkpoints}: Input/output '
          'error; the newest good checkpoint is step 20, and a rerun resumes '
          'from it.\n') in out, out[-3000:]
  assert ('[0] error: process 1 of 2 failed to reach its storage (its log '
          f'says why); the newest checkpoint is step 20 in {checkpoints}: '
          'restart the job to resume from it (exit 75).\n') in out, out[-3000:]
  assert 'Traceback' not in out and 'Check failure' not in out, out[-3000:]
  assert 'Resuming from the checkpoint of step 20.' in _rerun(workdir, 20)
