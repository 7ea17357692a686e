"""The cluster launch scripts, without a cluster: their dry runs, and their
real code paths against stand-in gcloud, srun and scontrol commands that
record how they were called and answer from a script of states and exit
codes."""

import os
import pathlib
import shutil
import stat
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TPU = ROOT / 'launch' / 'tpu.sh'
SLURM = ROOT / 'launch' / 'slurm.sbatch'

# Settings the scripts read: a caller's own values must not leak in.
SETTINGS = ('NAME', 'PROJECT', 'ZONE', 'ACCELERATOR_TYPE', 'RUNTIME_VERSION',
            'PROVISIONING', 'CREATE_ARGS', 'REPO', 'BRANCH', 'CONFIG', 'BUCKET',
            'WORKDIR', 'TFDS_DATA_DIR', 'EXTRA_ARGS', 'POLL_S', 'SETTLE_S',
            'DRY_RUN', 'FAKE_EXIT_CODE', 'PYTHON', 'JAX_LOCAL_DEVICE_IDS')

# Stand-in gcloud: logs each call; `describe` answers with the next line of
# `states` (ABSENT: gcloud's not-found error), the training command exits with
# the next line of `run_codes`; anything else succeeds.
FAKE_GCLOUD = r'''#!/bin/bash
echo "$*" >> "$FAKE_DIR/calls"
next() {
  local line
  line=$(head -n 1 "$FAKE_DIR/$1")
  [[ -n $line ]] || { echo "fake gcloud: $1 exhausted" >&2; exit 99; }
  sed -i 1d "$FAKE_DIR/$1"
  echo "$line"
}
case "$*" in
  *'queued-resources describe'*)
    state=$(next states) || exit 99
    if [[ $state == ABSENT ]]; then
      echo "ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: Requested entity was not found." >&2
      exit 1
    fi
    echo "$state" ;;
  *multistep_cm.main*)
    code=$(next run_codes) || exit 99
    exit "$code" ;;
esac
'''

# Stand-in srun and scontrol: log their calls (srun, with the variable that
# picks each process's GPUs); they exit with $SRUN_EXIT and $SCONTROL_EXIT.
FAKE_SRUN = r'''#!/bin/bash
echo "srun $* JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-}" >> "$FAKE_DIR/calls"
exit "${SRUN_EXIT:-0}"
'''
FAKE_SCONTROL = r'''#!/bin/bash
echo "scontrol $*" >> "$FAKE_DIR/calls"
exit "${SCONTROL_EXIT:-0}"
'''


def _write_exe(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake(tmp_path):
  """Stand-in cluster commands first on PATH; `.run(script, *args, **env)`
  runs a launch script with them; `.calls()` lists what they were asked."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  _write_exe(bin_dir / 'gcloud', FAKE_GCLOUD)
  _write_exe(bin_dir / 'srun', FAKE_SRUN)
  _write_exe(bin_dir / 'scontrol', FAKE_SCONTROL)
  for name in ('calls', 'states', 'run_codes'):
    (tmp_path / name).write_text('')

  class Fake:

    def script(self, name, *lines):
      (tmp_path / name).write_text(''.join(f'{l}\n' for l in lines))

    def calls(self):
      return (tmp_path / 'calls').read_text().splitlines()

    def run(self, script, *args, **env):
      full = {k: v for k, v in os.environ.items()
              if k not in SETTINGS and not k.startswith('SLURM_')}
      full.update(PATH=f'{bin_dir}:{os.environ["PATH"]}',
                  FAKE_DIR=str(tmp_path), POLL_S='0', SETTLE_S='0', **env)
      return subprocess.run(['bash', str(script), *args], env=full,
                            capture_output=True, text=True, timeout=30,
                            check=False, cwd=tmp_path)

  return Fake()


GS = dict(REPO='https://example.com/multistep_cm.git',
          WORKDIR='gs://bucket/runs/cm64', TFDS_DATA_DIR='gs://bucket/tfds')


@pytest.mark.parametrize('script', [TPU, SLURM])
def test_scripts_parse(script):
  result = subprocess.run(['bash', '-n', str(script)], capture_output=True,
                          text=True, check=False)
  assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which('shellcheck') is None,
                    reason='shellcheck is not installed')
@pytest.mark.parametrize('script', [TPU, SLURM])
def test_shellcheck(script):
  result = subprocess.run(['shellcheck', '-s', 'bash', str(script)],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout


@pytest.mark.parametrize('script', [TPU, SLURM])
def test_any_dry_run_value_runs_nothing(fake, script):
  args = ['run'] if script == TPU else []
  result = fake.run(script, *args, DRY_RUN='true', **GS)
  assert result.returncode == 0, result.stderr
  assert 'multistep_cm.main' in result.stdout
  assert fake.calls() == []


# ------------------------------------------------------------------ tpu.sh


def test_tpu_dry_run_create(fake):
  result = fake.run(TPU, 'create', '--dry-run', NAME='cm64',
                    ZONE='europe-west4-b', ACCELERATOR_TYPE='v5litepod-64')
  assert result.returncode == 0, result.stderr
  create, describe = result.stdout.splitlines()
  assert create.startswith(
      '+ gcloud compute tpus queued-resources create cm64 ')
  for piece in ('--zone=europe-west4-b', '--node-id=cm64',
                '--accelerator-type=v5litepod-64',
                '--runtime-version=v2-alpha-tpuv5-lite', '--spot'):
    assert piece in create.split()
  assert 'queued-resources describe cm64' in describe
  assert fake.calls() == []  # A dry run runs nothing.


def test_tpu_best_effort_uses_the_alpha_track(fake):
  result = fake.run(TPU, 'create', DRY_RUN='1', PROVISIONING='best-effort')
  assert result.returncode == 0, result.stderr
  create = result.stdout.splitlines()[0]
  assert create.startswith('+ gcloud alpha compute tpus queued-resources create')
  assert '--best-effort' in create and '--spot' not in create


def test_tpu_dry_run_install(fake):
  result = fake.run(TPU, 'install', '--dry-run', BRANCH='v1.0', **GS)
  assert result.returncode == 0, result.stderr
  (line,) = result.stdout.splitlines()
  assert line.startswith('+ gcloud compute tpus tpu-vm ssh multistep-cm ')
  assert '--worker=all' in line
  for piece in ('git clone -q https://example.com/multistep_cm.git',
                'git fetch -q origin v1.0', '-e .', 'jax[tpu]'):
    assert piece in line
  assert fake.calls() == []


def test_tpu_dry_run_run(fake):
  result = fake.run(TPU, 'run', DRY_RUN='1', CONFIG='configs/imagenet128.py',
                    EXTRA_ARGS='--config.train.steps=10 --mode=train', **GS)
  assert result.returncode == 0, result.stderr
  (line,) = result.stdout.splitlines()
  assert '--worker=all' in line
  assert 'export TFDS_DATA_DIR=gs://bucket/tfds &&' in line
  assert ('python -m multistep_cm.main --config=configs/imagenet128.py '
          '--workdir=gs://bucket/runs/cm64 --config.train.steps=10 '
          '--mode=train') in line
  assert fake.calls() == []


def test_tpu_bucket_sets_the_gs_paths(fake):
  result = fake.run(TPU, 'run', '--dry-run', BUCKET='b', NAME='n')
  assert result.returncode == 0, result.stderr
  assert 'TFDS_DATA_DIR=gs://b/tensorflow_datasets' in result.stdout
  assert '--workdir=gs://b/multistep_cm/n' in result.stdout


def test_tpu_dry_run_babysit_shows_one_round(fake):
  result = fake.run(TPU, 'babysit', '--dry-run', **GS)
  assert result.returncode == 0, result.stderr
  steps = [l.split()[5] if 'tpu-vm' not in l else
           ('install' if 'git clone' in l else 'run')
           for l in result.stdout.splitlines()]
  assert steps == ['describe', 'create', 'describe', 'install', 'run']
  assert 'one round shown' in result.stderr
  assert fake.calls() == []


def test_tpu_dry_run_delete(fake):
  result = fake.run(TPU, 'delete', '--dry-run', NAME='cm64')
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == [
      '+', 'gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'cm64',
      '--zone=us-west4-a', '--force', '--quiet']


def test_tpu_unknown_subcommand_and_missing_settings(fake):
  result = fake.run(TPU, 'launch')
  assert result.returncode == 1 and 'unknown subcommand' in result.stderr
  # The babysitter checks its settings before it creates anything.
  result = fake.run(TPU, 'babysit', REPO=GS['REPO'])
  assert result.returncode == 1
  assert 'set WORKDIR' in result.stderr
  assert fake.calls() == []


def _verbs(calls):
  """gcloud calls as create / describe / delete / install / run."""
  out = []
  for call in calls:
    if 'tpu-vm ssh' in call:
      out.append('run' if 'multistep_cm.main' in call else 'install')
    else:
      out.append(call.split()[3])  # compute tpus queued-resources VERB
  return out


def test_tpu_create_waits_until_active(fake):
  fake.script('states', 'WAITING_FOR_RESOURCES', 'PROVISIONING', 'ACTIVE')
  result = fake.run(TPU, 'create')
  assert result.returncode == 0, result.stderr
  assert _verbs(fake.calls()) == ['create', 'describe', 'describe', 'describe']


def test_tpu_create_fails_when_the_request_fails(fake):
  fake.script('states', 'WAITING_FOR_RESOURCES', 'FAILED', 'FAILED')
  result = fake.run(TPU, 'create')
  assert result.returncode == 1
  assert 'FAILED, not ACTIVE' in result.stderr


@pytest.mark.parametrize('gone', ['SUSPENDED', 'ABSENT'])
def test_tpu_babysit_outlives_preemptions(fake, gone):
  fake.script(
      'states',
      'ABSENT',  # Round 1: no TPU yet, so create it,
      'ACTIVE',  # wait for it, install, run: preempted after saving (75).
      'ACTIVE',  # Round 2: the same TPU, run again: its ssh drops (255),
      gone,      # and the TPU is gone.
      gone,      # Round 3: (delete,) create,
      'ACTIVE')  # install on the new hosts, run: done (0).
  fake.script('run_codes', 75, 255, 0)
  result = fake.run(TPU, 'babysit', **GS)
  assert result.returncode == 0, result.stderr
  assert _verbs(fake.calls()) == [
      'describe', 'create', 'describe', 'install', 'run',
      'describe', 'run', 'describe',
      'describe', *(['delete'] if gone != 'ABSENT' else []), 'create',
      'describe', 'install', 'run']
  assert 'preempted after saving' in result.stderr
  assert 'the run finished' in result.stderr


def test_tpu_babysit_stops_on_a_real_failure(fake):
  fake.script('states', 'ACTIVE', 'ACTIVE')
  fake.script('run_codes', 3)
  result = fake.run(TPU, 'babysit', **GS)
  assert result.returncode == 3
  assert _verbs(fake.calls()) == ['describe', 'install', 'run', 'describe']
  errors = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert errors == ['error: the run failed with exit code 3 on an ACTIVE '
                    'TPU; not restarting']


def test_tpu_babysit_waits_out_a_deletion(fake):
  fake.script('states', 'DELETING', 'ABSENT', 'ACTIVE')
  fake.script('run_codes', 0)
  result = fake.run(TPU, 'babysit', **GS)
  assert result.returncode == 0, result.stderr
  assert _verbs(fake.calls()) == ['describe', 'describe', 'create', 'describe',
                                  'install', 'run']

def test_tpu_run_passes_the_exit_code_on(fake):
  fake.script('run_codes', 75)
  result = fake.run(TPU, 'run', **GS)
  assert result.returncode == 75


# ------------------------------------------------------------ slurm.sbatch


def test_slurm_header_asks_for_requeue_and_an_early_signal():
  directives = [l.split()[1] for l in SLURM.read_text().splitlines()
                if l.startswith('#SBATCH')]
  assert '--requeue' in directives
  assert '--signal=TERM@120' in directives
  assert '--open-mode=append' in directives


def test_slurm_dry_run(fake):
  result = fake.run(SLURM, DRY_RUN='1', CONFIG='configs/toy2d.py:smoke',
                    WORKDIR='/shared/run', EXTRA_ARGS='--mode=train')
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [
      '+ srun python -m multistep_cm.main --config=configs/toy2d.py:smoke '
      '--workdir=/shared/run --mode=train']
  assert fake.calls() == []


@pytest.mark.parametrize('code, requeued, exit_code',
                         [(0, False, 0), (75, True, 0), (3, False, 3),
                          (1, False, 1)])
def test_slurm_dry_run_exit_codes(fake, code, requeued, exit_code):
  result = fake.run(SLURM, DRY_RUN='1', WORKDIR='/shared/run',
                    FAKE_EXIT_CODE=str(code))
  assert result.returncode == exit_code, result.stderr
  assert ('+ scontrol requeue JOBID' in result.stdout) == requeued
  assert fake.calls() == []


@pytest.mark.parametrize('code, requeued', [(0, False), (75, True),
                                            (3, False)])
def test_slurm_in_a_job(fake, code, requeued):
  result = fake.run(SLURM, WORKDIR='/shared/run', SRUN_EXIT=str(code),
                    SLURM_JOB_ID='4242', SLURM_SUBMIT_DIR=str(ROOT),
                    SLURM_NTASKS_PER_NODE='8', SLURM_GPUS_ON_NODE='8')
  assert result.returncode == (0 if code in (0, 75) else code), result.stderr
  calls = fake.calls()
  assert calls[0].startswith(
      'srun python -m multistep_cm.main --config=configs/imagenet64.py '
      '--workdir=/shared/run')
  # One process per GPU: jax picks each process's GPU itself.
  assert calls[0].endswith('JAX_LOCAL_DEVICE_IDS=')
  assert calls[1:] == (['scontrol requeue 4242'] if requeued else [])


def test_slurm_failed_requeue_keeps_the_exit_code(fake):
  result = fake.run(SLURM, WORKDIR='/shared/run', SRUN_EXIT='75',
                    SCONTROL_EXIT='1', SLURM_JOB_ID='7')
  assert result.returncode == 75
  assert 'the requeue failed' in result.stderr


def test_slurm_one_process_per_node_gets_every_gpu(fake):
  result = fake.run(SLURM, WORKDIR='/shared/run', SLURM_JOB_ID='1',
                    SLURM_NTASKS_PER_NODE='1', SLURM_GPUS_ON_NODE='4')
  assert result.returncode == 0, result.stderr
  assert fake.calls()[0].endswith('JAX_LOCAL_DEVICE_IDS=0,1,2,3')


def test_slurm_outside_a_job(fake):
  result = fake.run(SLURM, WORKDIR='/shared/run')
  assert result.returncode == 1
  assert 'not inside a Slurm job' in result.stderr
  result = fake.run(SLURM, DRY_RUN='1')
  assert result.returncode == 1 and 'set WORKDIR' in result.stderr
  assert fake.calls() == []

