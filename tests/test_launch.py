"""The cluster launch scripts, without a cluster: their dry runs, and their
real code paths against stand-in gcloud, srun and scontrol commands that
record how they were called and answer from a script of states and exit
codes."""

import importlib.util
import os
import pathlib
import shutil
import signal
import stat
import subprocess
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TPU = ROOT / 'launch' / 'tpu.sh'
XPK = ROOT / 'launch' / 'xpk.sh'
COMMON = ROOT / 'launch' / 'common.sh'
SLURM = ROOT / 'launch' / 'slurm.sbatch'

# Settings the scripts read: a caller's own values must not leak in.
SETTINGS = ('NAME', 'PROJECT', 'ZONE', 'ACCELERATOR_TYPE', 'RUNTIME_VERSION',
            'PROVISIONING', 'CREATE_ARGS', 'REPO', 'BRANCH', 'CONFIG', 'BUCKET',
            'WORKDIR', 'TFDS_DATA_DIR', 'EXTRA_ARGS', 'POLL_S', 'SETTLE_S',
            'LOST_S', 'ATTEMPT', 'DRY_RUN', 'FAKE_EXIT_CODE', 'PYTHON',
            'JAX_LOCAL_DEVICE_IDS', 'CONTAINER_IMAGE', 'CONTAINER_MOUNTS',
            'SRUN_CPUS_PER_TASK', 'MAX_RESTARTS')

# Stand-in gcloud: logs each call; `describe` answers with the next line of
# `states` (ABSENT: gcloud's not-found error); anything else succeeds.
# `tpu-vm ssh` runs the command on stand-in hosts, one bash per host, each with
# its own home directory (host0, host1): the start and the polls run for real,
# and the stand-in program (FAKE_PYTHON) runs detached there. The first start
# of an attempt takes the next line of `run_codes`: the exit codes of the
# hosts' programs (one for all, or one per host), then maybe an event:
#   drop  the start runs, then ssh reports a dropped connection (255);
#   miss  the connection drops before host1 got the start;
#   retry gcloud sends the start twice to every host, at once;
#   gone  the start runs, then no host answers (255) until a TPU is created.
# `create` gives new hosts: empty run directories, every host answering.
FAKE_GCLOUD = r"""#!/bin/bash
echo "$*" >> "$FAKE_DIR/calls"
next() {
  local line
  line=$(head -n 1 "$FAKE_DIR/$1")
  [[ -n $line ]] || { echo "fake gcloud: $1 exhausted" >&2; exit 99; }
  sed -i 1d "$FAKE_DIR/$1"
  echo "$line"
}
on_hosts() {
  local i rc=0 hosts=("$@")
  for i in "${hosts[@]}"; do
    # ssh starts in the home directory.
    (cd "$FAKE_DIR/host$i" && HOME=$PWD FAKE_HOST=$i bash -c "$cmd") ||
      { (( rc )) || rc=$?; }
  done
  return "$rc"
}
case "$*" in
  *'queued-resources describe'*)
    state=$(next states) || exit 99
    if [[ $state == ABSENT ]]; then
      echo "ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: Requested entity was not found." >&2
      exit 1
    fi
    echo "$state" ;;
  *'queued-resources create'*)
    rm -rf "$FAKE_DIR"/host*/multistep_cm_run "$FAKE_DIR/unreachable" ;;
  *'tpu-vm ssh'*)
    for arg; do [[ $arg == --command=* ]] && cmd=${arg#--command=}; done
    [[ $cmd == *'git clone'* ]] && exit 0  # install: nothing to install here
    [[ -e $FAKE_DIR/unreachable ]] && exit 255
    [[ $cmd == *multistep_cm.main* ]] || { on_hosts 0 1; exit; }
    attempt=$(sed -n 's/.*d=\$r\/\([^;]*\);.*/\1/p' <<< "$cmd")
    event=
    if [[ ! -e $FAKE_DIR/codes.$attempt ]]; then
      line=$(next run_codes) || exit 99
    read -r -a words <<< "$line"
      if [[ ${words[-1]} == [a-z]* ]]; then event=${words[-1]}; unset 'words[-1]'; fi
      echo "${words[*]}" > "$FAKE_DIR/codes.$attempt"
    fi
    export FAKE_CODES=$FAKE_DIR/codes.$attempt
    case $event in
      drop) on_hosts 0 1; exit 255 ;;
      miss) on_hosts 0; exit 255 ;;
      retry) on_hosts 0 1 & on_hosts 0 1; wait; exit ;;
      gone) on_hosts 0 1; touch "$FAKE_DIR/unreachable"; exit 255 ;;
      *) on_hosts 0 1 ;;
    esac ;;
esac
"""

# Stand-in training program on each stand-in host: logs that it ran, runs for
# FAKE_RUN_S seconds, and exits with its host's code, or with 75 on SIGTERM.
FAKE_PYTHON = r"""#!/bin/bash
trap 'exit 75' TERM
echo "host$FAKE_HOST $$ $*" >> "$FAKE_DIR/trainings"
sleep "${FAKE_RUN_S:-0.3}" & wait $!
read -r -a codes < "$FAKE_CODES"
exit "${codes[FAKE_HOST]:-${codes[-1]}}"
"""

# Stand-in srun and scontrol: log their calls (srun, with the variable that
# picks each process's GPUs, and in `srun_cpus` the CPUs per task it would
# give); they exit with $SRUN_EXIT and $SCONTROL_EXIT.
FAKE_SRUN = r'''#!/bin/bash
echo "srun $* JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-}" >> "$FAKE_DIR/calls"
echo "${SRUN_CPUS_PER_TASK:-}" > "$FAKE_DIR/srun_cpus"
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
  for name in ('calls', 'states', 'run_codes', 'trainings'):
    (tmp_path / name).write_text('')
  for host in ('host0', 'host1'):
    venv = tmp_path / host / 'multistep_cm' / '.venv' / 'bin'
    venv.mkdir(parents=True)
    _write_exe(venv / 'python', FAKE_PYTHON)

  class Fake:

    def script(self, name, *lines):
      (tmp_path / name).write_text(''.join(f'{l}\n' for l in lines))

    def calls(self):
      return (tmp_path / 'calls').read_text().splitlines()

    def trainings(self):
      """The hosts, in the order their training programs started."""
      return [l.split()[0] for l in
              (tmp_path / 'trainings').read_text().splitlines()]

    def host(self, i):
      return tmp_path / f'host{i}'

    def srun_cpus(self):
      return (tmp_path / 'srun_cpus').read_text().strip()

    @property
    def dir(self):
      return tmp_path

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


@pytest.mark.parametrize('script', [TPU, SLURM, COMMON])
def test_scripts_parse(script):
  result = subprocess.run(['bash', '-n', str(script)], capture_output=True,
                          text=True, check=False)
  assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which('shellcheck') is None,
                    reason='shellcheck is not installed')
@pytest.mark.parametrize('script', [TPU, SLURM, COMMON])
def test_shellcheck(script):
  # -x: checks the launchers with the common.sh they source.
  result = subprocess.run(['shellcheck', '-x', '-s', 'bash', str(script)],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout


@pytest.mark.parametrize('script', [TPU, SLURM])
def test_any_dry_run_value_runs_nothing(fake, script):
  args = ['run'] if script == TPU else []
  result = fake.run(script, *args, DRY_RUN='true', **GS)
  assert result.returncode == 0, result.stderr
  assert 'multistep_cm.main' in result.stdout
  assert fake.calls() == []


@pytest.mark.parametrize('script', [TPU, XPK])
def test_a_launcher_runs_where_it_is_copied_with_common_sh(fake, script):
  """As launch/README.md says: copied elsewhere, a launcher runs as it does
  here only with common.sh beside it, and without it stops in one line."""
  copy = fake.dir / 'elsewhere'
  copy.mkdir()
  shutil.copy(script, copy)
  env = dict(DRY_RUN='1', IMAGE='untagged')  # xpk.sh logs a warning on it.
  alone = fake.run(copy / script.name, 'create', **env)
  assert alone.returncode == 1
  assert alone.stderr == (f'error: {copy}/common.sh is missing: copy '
                          f'launch/common.sh along with {script.name}\n')
  shutil.copy(COMMON, copy)
  copied = fake.run(copy / script.name, 'create', **env)
  assert copied.returncode == 0, copied.stderr
  assert copied.stdout == fake.run(script, 'create', **env).stdout
  # Its log lines and usage are the launcher's, not common.sh's.
  assert f'[{script.name} ' in copied.stderr
  assert (fake.run(copy / script.name, '--help').stdout ==
          fake.run(script, '--help').stdout)


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
                    EXTRA_ARGS='--config.train.steps=10 --mode=train',
                    ATTEMPT='a1', **GS)
  assert result.returncode == 0, result.stderr
  start, poll = result.stdout.splitlines()
  assert '--worker=all' in start and '--worker=all' in poll
  assert 'TFDS_DATA_DIR=gs://bucket/tfds nohup setsid sh -c' in start
  assert ('python -m multistep_cm.main --config=configs/imagenet128.py '
          '--workdir=gs://bucket/runs/cm64 --config.train.steps=10 '
          '--mode=train < /dev/null > "$d/log" 2>&1 &') in start
  assert 'd=$r/a1;' in start
  assert 'd=$HOME/multistep_cm_run/a1;' in poll
  assert 'multistep_cm.main' not in poll
  assert fake.calls() == []


def test_tpu_bucket_sets_the_gs_paths(fake):
  result = fake.run(TPU, 'run', '--dry-run', BUCKET='b', NAME='n')
  assert result.returncode == 0, result.stderr
  assert 'TFDS_DATA_DIR=gs://b/tensorflow_datasets' in result.stdout
  assert '--workdir=gs://b/multistep_cm/n' in result.stdout


def test_tpu_dry_run_babysit_shows_one_round(fake):
  result = fake.run(TPU, 'babysit', '--dry-run', **GS)
  assert result.returncode == 0, result.stderr
  steps = [l.split()[5] if 'tpu-vm' not in l else _ssh_verb(l)
           for l in result.stdout.splitlines()]
  assert steps == ['describe', 'create', 'describe', 'install', 'start',
                   'poll']
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


def _ssh_verb(call):
  if 'git clone' in call:
    return 'install'
  return 'start' if 'multistep_cm.main' in call else 'poll'


def _verbs(calls):
  """gcloud calls as create / describe / delete / install / start / poll,
  a series of polls as one."""
  out = []
  for call in calls:
    if 'tpu-vm ssh' in call:
      verb = _ssh_verb(call)
    else:
      verb = call.split()[3]  # compute tpus queued-resources VERB
    if not (verb == 'poll' and out and out[-1] == 'poll'):
      out.append(verb)
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
      'ACTIVE',  # Round 2: the same TPU, run again: the hosts stop answering
      gone,      # and the TPU is gone;
      gone,      # still gone after SETTLE_S.
      gone,      # Round 3: (delete,) create,
      'ACTIVE')  # install on the new hosts, run: done (0).
  fake.script('run_codes', 75, '0 gone', 0)
  result = fake.run(TPU, 'babysit', **GS)
  assert result.returncode == 0, result.stderr
  assert _verbs(fake.calls()) == [
      'describe', 'create', 'describe', 'install', 'start', 'poll',
      'describe', 'start', 'poll', 'describe', 'describe',
      'describe', *(['delete'] if gone != 'ABSENT' else []), 'create',
      'describe', 'install', 'start', 'poll']
  assert 'preempted after saving' in result.stderr
  assert 'the run finished' in result.stderr


def test_tpu_babysit_stops_on_a_real_failure(fake):
  fake.script('states', 'ACTIVE', 'ACTIVE')
  fake.script('run_codes', 3)
  result = fake.run(TPU, 'babysit', **GS)
  assert result.returncode == 3
  assert _verbs(fake.calls()) == ['describe', 'install', 'start', 'poll',
                                  'describe']
  errors = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert errors == ['error: the run failed with exit code 3 on an ACTIVE '
                    'TPU; not restarting']


def test_tpu_babysit_waits_out_a_deletion(fake):
  fake.script('states', 'DELETING', 'ABSENT', 'ACTIVE')
  fake.script('run_codes', 0)
  result = fake.run(TPU, 'babysit', **GS)
  assert result.returncode == 0, result.stderr
  assert _verbs(fake.calls()) == ['describe', 'describe', 'create', 'describe',
                                  'install', 'start', 'poll']


@pytest.mark.parametrize('codes, exit_code', [
    ('0', 0), ('75', 75), ('0 3', 3), ('75 1', 75), ('3 75', 3),
    # A process killed (137), the others stopping with 75; the coordinator's
    # process killed, jax aborting the others (134).
    ('137 75', 75), ('137 134', 75), ('139 1', 139)])
def test_tpu_run_reports_the_jobs_exit_code(fake, codes, exit_code):
  fake.script('run_codes', codes)
  result = fake.run(TPU, 'run', **GS)
  assert result.returncode == exit_code, result.stderr
  assert _verbs(fake.calls()) == ['start', 'poll']
  assert fake.trainings() == ['host0', 'host1']
  # The program ran detached, into a log and an exit code on its host.
  (run_dir,) = (fake.host(1) / 'multistep_cm_run').iterdir()
  assert (run_dir / 'exit_code').read_text().split() == [codes.split()[-1]]
  assert (run_dir / 'log').exists()


def test_tpu_run_outlives_a_dropped_connection(fake):
  # The ssh that started the run drops (255) while the programs go on.
  fake.script('run_codes', '0 drop')
  result = fake.run(TPU, 'run', **GS)
  assert result.returncode == 0, result.stderr
  assert 'the start ended with exit code 255' in result.stderr
  assert _verbs(fake.calls()) == ['start', 'poll']  # Not started again.
  assert fake.trainings() == ['host0', 'host1']


def test_tpu_run_starts_where_the_start_did_not_reach(fake):
  # host1 never got the start: it is sent again, which host0 ignores.
  fake.script('run_codes', '0 miss')
  result = fake.run(TPU, 'run', LOST_S='30', **GS)
  assert result.returncode == 0, result.stderr
  assert _verbs(fake.calls()) == ['start', 'poll', 'start', 'poll']
  assert fake.trainings() == ['host0', 'host1']
  assert 'already started' in result.stdout


def test_tpu_run_a_retried_start_starts_once(fake):
  # gcloud sends the start twice to every host, at the same time.
  fake.script('run_codes', '0 retry')
  result = fake.run(TPU, 'run', **GS)
  assert result.returncode == 0, result.stderr
  assert sorted(fake.trainings()) == ['host0', 'host1']
  assert result.stdout.count('already started') == 2


def test_tpu_run_same_attempt_again_does_not_rerun(fake):
  fake.script('run_codes', '3')
  assert fake.run(TPU, 'run', ATTEMPT='a1', **GS).returncode == 3
  # Following the same attempt again reports how it ended.
  result = fake.run(TPU, 'run', ATTEMPT='a1', **GS)
  assert result.returncode == 3
  assert fake.trainings() == ['host0', 'host1']


def test_tpu_run_refuses_to_start_beside_a_running_attempt(fake):
  old = fake.host(0) / 'multistep_cm_run' / 'old'
  old.mkdir(parents=True)
  # Stands in for the wrapper of an older attempt, still running.
  proc = subprocess.Popen(['sh', '-c', 'sleep 30; :', str(old)])
  try:
    (old / 'pid').write_text(f'{proc.pid}\n')
    fake.script('run_codes', '0')
    result = fake.run(TPU, 'run', **GS)
  finally:
    proc.kill()
    proc.wait()
  assert result.returncode == 1, result.stderr
  assert 'which still runs: old' in result.stdout
  assert fake.trainings() == ['host1']


def test_tpu_run_records_the_exit_code_of_a_sigterm(fake):
  # A preempted VM sends SIGTERM to every process: the wrapper must outlive
  # the program to record its 75.
  fake.script('run_codes', '0')
  env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
  env.update(PATH=f'{fake.dir / "bin"}:{os.environ["PATH"]}',
             FAKE_DIR=str(fake.dir), POLL_S='0', FAKE_RUN_S='20',
             ATTEMPT='a1', **GS)
  run = subprocess.Popen(['bash', str(TPU), 'run'], env=env, cwd=fake.dir,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
  try:
    pids = [fake.host(i) / 'multistep_cm_run' / 'a1' / 'pid' for i in (0, 1)]
    deadline = time.monotonic() + 10
    # Both programs have started, and set their handlers.
    while len(fake.trainings()) < 2:
      assert time.monotonic() < deadline and run.poll() is None
      time.sleep(0.05)
    for pid in pids:
      # The wrapper leads its own session, as setsid made it.
      os.killpg(int(pid.read_text()), signal.SIGTERM)
    _, stderr = run.communicate(timeout=20)
  finally:
    if run.poll() is None:
      run.kill()
  assert run.returncode == 75, stderr
  assert 'exit codes 75 75' in stderr


def test_tpu_run_a_vanished_program_counts_as_lost(fake):
  fake.script('run_codes', '0')
  # A run directory without an exit code, whose wrapper is gone.
  gone = fake.host(0) / 'multistep_cm_run' / 'a1'
  gone.mkdir(parents=True)
  (gone / 'pid').write_text('999999\n')
  result = fake.run(TPU, 'run', ATTEMPT='a1', **GS)
  assert result.returncode == 255
  assert fake.trainings() == ['host1']


def test_tpu_run_unreachable_hosts_on_an_active_tpu(fake):
  fake.script('run_codes', '0 gone')
  fake.script('states', 'ACTIVE')
  result = fake.run(TPU, 'run', LOST_S='0', **GS)
  assert result.returncode == 255
  assert 'no answer from every host' in result.stderr


def test_tpu_babysit_a_preempted_run_resumes(fake):
  # Preempted after saving (75) on one host, the others stopped with it.
  fake.script('states', 'ACTIVE', 'ACTIVE')
  fake.script('run_codes', '75', '0')
  result = fake.run(TPU, 'babysit', **GS)
  assert result.returncode == 0, result.stderr
  assert _verbs(fake.calls()) == ['describe', 'install', 'start', 'poll',
                                  'describe', 'start', 'poll']
  assert 'preempted after saving' in result.stderr
  assert fake.trainings() == ['host0', 'host1'] * 2


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
                          (1, False, 1), (137, True, 0), (134, True, 0)])
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


def test_slurm_a_recurring_kill_is_requeued_at_most_max_restarts_times(fake):
  run = lambda count: fake.run(SLURM, WORKDIR='/shared/run', SRUN_EXIT='137',
                               SLURM_JOB_ID='7', MAX_RESTARTS='3',
                               SLURM_RESTART_COUNT=str(count))
  assert run(2).returncode == 0
  assert fake.calls()[-1] == 'scontrol requeue 7'
  result = run(3)
  assert result.returncode == 137
  assert 'after 3 restarts (MAX_RESTARTS)' in result.stderr
  assert fake.calls()[-1].startswith('srun ')


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



@pytest.mark.parametrize('sbatch_cpus, srun_cpus, expected', [
    ('8', None, '8'),   # sbatch's --cpus-per-task reaches srun,
    (None, None, ''),   # nothing when sbatch was not given one,
    ('8', '4', '4'),    # and a caller's own choice wins.
])
def test_slurm_srun_gets_the_cpus_per_task(fake, sbatch_cpus, srun_cpus,
                                           expected):
  env = dict(WORKDIR='/shared/run', SLURM_JOB_ID='1')
  if sbatch_cpus:
    env['SLURM_CPUS_PER_TASK'] = sbatch_cpus
  if srun_cpus:
    env['SRUN_CPUS_PER_TASK'] = srun_cpus
  result = fake.run(SLURM, **env)
  assert result.returncode == 0, result.stderr
  assert fake.srun_cpus() == expected


def test_slurm_in_a_container(fake):
  workdir = fake.dir / 'runs' / 'cm64'
  result = fake.run(SLURM, WORKDIR=str(workdir), SLURM_JOB_ID='1',
                    SLURM_SUBMIT_DIR=str(ROOT), TFDS_DATA_DIR='/shared/tfds',
                    CONTAINER_IMAGE='nvcr.io#nvidia/jax:25.04-py3',
                    CONTAINER_MOUNTS='/shared/venv:/shared/venv')
  assert result.returncode == 0, result.stderr
  (call,) = fake.calls()
  args = call.split()
  assert args[1:4] == [
      '--container-image=nvcr.io#nvidia/jax:25.04-py3',
      f'--container-mounts={ROOT}:{ROOT},{workdir}:{workdir},'
      '/shared/tfds:/shared/tfds,/shared/venv:/shared/venv',
      f'--container-workdir={ROOT}']
  assert args[4:7] == ['python', '-m', 'multistep_cm.main']
  assert workdir.is_dir()  # A missing mount source stops the container.


def test_slurm_container_skips_remote_data_and_dry_runs(fake):
  result = fake.run(SLURM, DRY_RUN='1', WORKDIR='run',
                    TFDS_DATA_DIR='gs://bucket/tfds', CONTAINER_IMAGE='jax.sqsh')
  assert result.returncode == 0, result.stderr
  mkdir, srun = result.stdout.splitlines()
  assert mkdir == '+ mkdir -p run'
  cwd = fake.dir
  assert (f'--container-mounts={cwd}:{cwd},{cwd}/run:{cwd}/run '
          f'--container-workdir={cwd} python') in srun
  assert 'gs://' not in srun
  assert fake.calls() == []
  assert not (cwd / 'run').exists()


def test_slurm_no_container_flags_without_an_image(fake):
  result = fake.run(SLURM, WORKDIR='/shared/run', SLURM_JOB_ID='1')
  assert result.returncode == 0, result.stderr
  assert '--container' not in fake.calls()[0]


def _local():
  spec = importlib.util.spec_from_file_location(
      'local_launch', ROOT / 'launch' / 'local.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('codes, exit_code', [
    ([0, 0], 0), ([75, 75], 75), ([0, 3], 3), ([1, 75], 1),
    # A process killed, the other stopping with 75 (or killed by local.py);
    # the coordinator's process killed, jax aborting the other.
    ([-9, 75], 75), ([-9, -9], 75), ([-9, -6], 75), ([1, -9], 1)])
def test_local_jobs_exit_code(codes, exit_code):
  assert _local().job_code(codes) == exit_code


def test_local_waits_out_the_programs_heartbeat_timeout():
  local = _local()
  assert local.heartbeat_timeout(['--config=c']) == 100
  assert local.heartbeat_timeout(['--heartbeat_timeout_s=7']) == 7
  assert local.heartbeat_timeout(['--heartbeat_timeout_s', '8.5']) == 8.5
