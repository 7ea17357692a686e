"""The container images and launch/xpk.sh, without docker or a cluster: the
Dockerfiles' structure (and hadolint, where installed), what the build
context holds, the script's dry runs, and its real code path against
stand-in xpk and docker commands that record how they were called."""

import fnmatch
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
XPK = ROOT / 'launch' / 'xpk.sh'
DOCKERFILES = {'tpu': ROOT / 'docker' / 'Dockerfile.tpu',
               'gpu': ROOT / 'docker' / 'Dockerfile.gpu'}
DOCKERIGNORE = ROOT / '.dockerignore'
ENTRYPOINT = ['python', '-m', 'multistep_cm.main']

# Settings the script reads: a caller's own values must not leak in.
SETTINGS = ('CLUSTER', 'NAME', 'PROJECT', 'ZONE', 'ACCELERATOR_TYPE',
            'NUM_SLICES', 'IMAGE', 'IMAGE_KIND', 'PLATFORM', 'BUILD_ARGS',
            'CONFIG', 'BUCKET', 'WORKDIR', 'TFDS_DATA_DIR', 'EXTRA_ARGS',
            'MAX_RESTARTS', 'GRACE_S', 'PRIORITY', 'CREATE_ARGS', 'WAIT_S',
            'DRY_RUN')

# ---------------------------------------------------------------- Dockerfiles


def instructions(text):
  """A Dockerfile's instructions as (KEYWORD, arguments), continuation lines
  joined and comments dropped."""
  out, pending = [], ''
  for line in text.splitlines():
    stripped = line.strip()
    if not pending and (not stripped or stripped.startswith('#')):
      continue
    if pending and stripped.startswith('#'):
      continue  # A comment inside a continued instruction.
    if stripped.endswith('\\'):
      pending += stripped[:-1] + ' '
      continue
    full = pending + stripped
    pending = ''
    keyword, _, args = full.partition(' ')
    out.append((keyword.upper(), args.strip()))
  assert not pending, 'the last instruction ends in a continuation'
  return out


def problems(text):
  """What breaks this project's rules for a Dockerfile, as sentences."""
  found = []
  steps = instructions(text)
  args = {}
  for keyword, rest in steps:
    if keyword == 'ARG' and '=' in rest:
      name, _, value = rest.partition('=')
      args[name] = value
  froms = [rest.split()[0] for keyword, rest in steps if keyword == 'FROM']
  if not froms:
    found.append('no FROM')
  for image in froms:
    image = re.sub(r'\$\{?(\w+)\}?', lambda m: args.get(m.group(1), ''),
                   image)
    if '@sha256:' in image:
      continue
    tag = image.rsplit('/', 1)[-1].partition(':')[2]
    if not tag:
      found.append(f'FROM {image} has no tag')
    elif tag == 'latest' or not re.search(r'\d', tag):
      found.append(f'FROM {image}: a tag that names no version')
  for keyword, rest in steps:
    if keyword == 'RUN' and re.search(r'apt-get\s+(-\S+\s+)*install', rest):
      if '--no-install-recommends' not in rest:
        found.append('apt-get install without --no-install-recommends')
      if 'rm -rf /var/lib/apt/lists' not in rest:
        found.append('apt-get install without removing /var/lib/apt/lists')
    if keyword == 'RUN' and re.search(r'tensorflow(?!-datasets)', rest):
      found.append('installs TensorFlow')
  entry = [rest for keyword, rest in steps if keyword == 'ENTRYPOINT']
  if not entry:
    found.append('no ENTRYPOINT')
  else:
    try:
      form = json.loads(entry[-1])
    except json.JSONDecodeError:
      form = None
    if form != ENTRYPOINT:
      found.append(f'ENTRYPOINT is {entry[-1]}, not the exec form of '
                   f'{" ".join(ENTRYPOINT)}')
  return found


GOOD = '''FROM python:3.11.15-slim-trixie
RUN apt-get update \\
    && apt-get install --yes --no-install-recommends git \\
    && rm -rf /var/lib/apt/lists/*
COPY . .
RUN pip install .
ENTRYPOINT ["python", "-m", "multistep_cm.main"]
'''


@pytest.mark.parametrize('change, problem', [
    (None, None),
    (('python:3.11.15-slim-trixie', 'python'), 'has no tag'),
    (('python:3.11.15-slim-trixie', 'python:latest'), 'names no version'),
    (('python:3.11.15-slim-trixie', 'python:slim'), 'names no version'),
    (('--no-install-recommends ', ''), 'without --no-install-recommends'),
    (('\\\n    && rm -rf /var/lib/apt/lists/*', ''), 'removing /var/lib/apt'),
    (('RUN pip install .', 'RUN pip install . tensorflow-cpu'),
     'installs TensorFlow'),
    (('["python", "-m", "multistep_cm.main"]', 'python -m multistep_cm.main'),
     'not the exec form'),
    (('ENTRYPOINT ["python", "-m", "multistep_cm.main"]\n', ''),
     'no ENTRYPOINT'),
])
def test_the_dockerfile_rules_catch_what_they_should(change, problem):
  text = GOOD if change is None else GOOD.replace(*change)
  assert text != GOOD or change is None
  found = problems(text)
  if problem is None:
    assert found == []
  else:
    assert len(found) == 1 and problem in found[0], found


@pytest.mark.parametrize('kind', sorted(DOCKERFILES))
def test_dockerfile_follows_the_rules(kind):
  assert problems(DOCKERFILES[kind].read_text()) == []


@pytest.mark.parametrize('kind', sorted(DOCKERFILES))
def test_dockerfile_installs_the_project_and_its_jax(kind):
  steps = instructions(DOCKERFILES[kind].read_text())
  runs = [rest for keyword, rest in steps if keyword == 'RUN']
  copies = [rest for keyword, rest in steps if keyword == 'COPY']
  # The dependencies from setup.py alone, then the code.
  assert copies[0].split()[:2] == ['setup.py', 'pyproject.toml']
  assert 'COPY . .' in [f'COPY {c}' for c in copies]
  deps = next(r for r in runs if r.startswith('pip install /tmp/deps'))
  extra = '"jax[tpu]' if kind == 'tpu' else '"jax[${JAX_CUDA}]'
  assert extra in deps
  assert any(r.startswith('pip install --no-deps . ') for r in runs)
  keywords = [keyword for keyword, _ in steps]
  assert keywords.index('ENTRYPOINT') > keywords.index('COPY')
  workdir = [rest for keyword, rest in steps if keyword == 'WORKDIR']
  assert workdir == ['/opt/multistep_cm']
  if kind == 'gpu':
    args = dict(rest.split('=', 1) for keyword, rest in steps
                if keyword == 'ARG' and '=' in rest)
    assert args['JAX_CUDA'] in ('cuda12', 'cuda13')


def test_only_the_gpu_image_drops_root():
  users = {kind: [rest for keyword, rest in
                  instructions(path.read_text()) if keyword == 'USER']
           for kind, path in DOCKERFILES.items()}
  assert users['gpu'] and users['gpu'][-1].split(':')[0] not in ('0', 'root')
  # TPU device files belong to root.
  assert users['tpu'] == []


@pytest.mark.skipif(shutil.which('hadolint') is None,
                    reason='hadolint is not installed')
@pytest.mark.parametrize('kind', sorted(DOCKERFILES))
def test_hadolint(kind):
  result = subprocess.run(['hadolint', str(DOCKERFILES[kind])],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr


def _ignored(path, patterns):
  """docker's rule, for the patterns .dockerignore uses here: the last
  pattern that matches the path, or a folder above it, decides."""
  parts = path.split('/')
  ignored = False
  for pattern in patterns:
    negate = pattern.startswith('!')
    pattern = pattern.lstrip('!').rstrip('/')
    for i in range(1, len(parts) + 1):
      prefix = '/'.join(parts[:i])
      if pattern.startswith('**/'):
        hit = fnmatch.fnmatchcase(parts[i - 1], pattern[3:])
      else:
        hit = fnmatch.fnmatchcase(prefix, pattern)
      if hit:
        ignored = not negate
        break
  return ignored


def test_dockerignore_sends_the_code_and_configs_only():
  patterns = [l.strip() for l in DOCKERIGNORE.read_text().splitlines()
              if l.strip() and not l.startswith('#')]
  files = subprocess.run(['git', 'ls-files', '--cached', '--others',
                          '--exclude-standard'], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.split()
  sent = {f for f in files if not _ignored(f, patterns)}
  for needed in ('setup.py', 'pyproject.toml', 'multistep_cm/main.py',
                 'multistep_cm/__init__.py', 'configs/imagenet64.py',
                 'configs/__init__.py'):
    assert needed in sent
  # The package's data files go with it.
  assert any(f.startswith('multistep_cm/evaluation/assets/') for f in sent)
  assert {f.split('/')[0] for f in sent} <= {
      'setup.py', 'pyproject.toml', 'LICENSE', 'multistep_cm', 'configs'}
  for heavy in ('.venv/bin/python', '.git/HEAD', 'tests/conftest.py',
                'build/lib/x.py', 'multistep_cm/__pycache__/main.pyc',
                'multistep_cm.egg-info/PKG-INFO'):
    assert _ignored(heavy, patterns), heavy


# ------------------------------------------------------------------ xpk.sh

# Stand-in xpk and docker: each call is one JSON line in FAKE_DIR/calls, the
# program's name and then its arguments, exactly; exit code $FAKE_EXIT.
FAKE = f'''#!{sys.executable}
import json, os, sys
with open(os.path.join(os.environ['FAKE_DIR'], 'calls'), 'a') as f:
  f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + '\\n')
sys.exit(int(os.environ.get('FAKE_EXIT', '0')))
'''


def _write_exe(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for name in ('xpk', 'docker'):
    _write_exe(bin_dir / name, FAKE)

  class Fake:

    def run(self, *args, **env):
      full = {k: v for k, v in os.environ.items() if k not in SETTINGS}
      full.update(PATH=f'{bin_dir}:{os.environ["PATH"]}',
                  FAKE_DIR=str(tmp_path), **env)
      return subprocess.run(['bash', str(XPK), *args], env=full,
                            capture_output=True, text=True, timeout=30,
                            check=False, cwd=tmp_path)

    def calls(self):
      path = tmp_path / 'calls'
      if not path.exists():
        return []
      return [json.loads(l) for l in path.read_text().splitlines()]

  return Fake()


RUN = dict(CLUSTER='tpu-cluster', IMAGE='us-docker.pkg.dev/p/images/cm:v1',
           BUCKET='bucket')


def _printed(stdout):
  """The commands of a dry run, each as its words."""
  lines = stdout.splitlines()
  assert all(l.startswith('+ ') for l in lines), lines
  return [shlex.split(l[2:]) for l in lines]


def _flags(words):
  return dict(w.split('=', 1) for w in words if w.startswith('--'))


def test_script_parses():
  result = subprocess.run(['bash', '-n', str(XPK)], capture_output=True,
                          text=True, check=False)
  assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which('shellcheck') is None,
                    reason='shellcheck is not installed')
def test_shellcheck():
  # -x: checks the launchers with the common.sh they source.
  result = subprocess.run(['shellcheck', '-x', '-s', 'bash', str(XPK)],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout


def test_header_documents_every_setting():
  text = XPK.read_text()
  header = text[:text.index('\nset -euo pipefail')]
  settings = re.findall(r'^([A-Z_]+)=\$\{\1:-', text, re.MULTILINE)
  settings += re.findall(r'([A-Z_]+)=\$\{\1:-', text[text.index('is_tpu()'):])
  assert set(settings) >= {'CLUSTER', 'IMAGE', 'GRACE_S', 'IMAGE_KIND'}
  for name in set(settings) - {'DRY_RUN'}:
    assert re.search(rf'^#\s+(.*\s)?{name} \[', header, re.MULTILINE), name
  assert set(settings) - {'DRY_RUN'} <= set(SETTINGS)


def test_dry_run_create(fake):
  result = fake.run('create', '--dry-run', NAME='cm64', NUM_SLICES='2',
                    ACCELERATOR_TYPE='v6e-256', CONFIG='configs/imagenet128.py',
                    EXTRA_ARGS='--config.train.steps=10 --mode=train', **RUN)
  assert result.returncode == 0, result.stderr
  ((*cmd, command),) = _printed(result.stdout)
  assert cmd[:3] == ['xpk', 'workload', 'create']
  assert _flags(cmd) == {
      '--cluster': 'tpu-cluster', '--workload': 'cm64',
      '--docker-image': 'us-docker.pkg.dev/p/images/cm:v1',
      '--tpu-type': 'v6e-256', '--num-slices': '2', '--priority': 'medium',
      # Restarted on 75, preempted after saving, on top of xpk's own codes;
      '--max-restarts': '50', '--restart-on-exit-codes': '75',
      # and time to save between SIGTERM and SIGKILL.
      '--termination-grace-period-seconds': '300',
      '--env': 'TFDS_DATA_DIR=gs://bucket/tensorflow_datasets'}
  assert command.startswith('--command=')
  assert shlex.split(command[len('--command='):]) == [
      'exec', *ENTRYPOINT, '--config=configs/imagenet128.py',
      '--workdir=gs://bucket/multistep_cm/cm64', '--config.train.steps=10',
      '--mode=train']
  assert fake.calls() == []


def test_dry_run_create_on_gpus(fake):
  result = fake.run('create', DRY_RUN='1', ACCELERATOR_TYPE='h100-80gb-8',
                    GRACE_S='120', MAX_RESTARTS='5', PROJECT='p', ZONE='z',
                    CREATE_ARGS='--scheduler=gke.io/topology-aware-auto', **RUN)
  assert result.returncode == 0, result.stderr
  (cmd,) = _printed(result.stdout)
  flags = _flags(cmd)
  assert flags['--device-type'] == 'h100-80gb-8' and '--tpu-type' not in flags
  assert flags['--termination-grace-period-seconds'] == '120'
  assert flags['--max-restarts'] == '5'
  assert flags['--project'] == 'p' and flags['--zone'] == 'z'
  assert cmd[-1] == '--scheduler=gke.io/topology-aware-auto'


@pytest.mark.parametrize('sub', ['build', 'create', 'status', 'wait',
                                 'delete'])
def test_any_dry_run_value_runs_nothing(fake, sub):
  result = fake.run(sub, DRY_RUN='true', **RUN)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith('+ ')
  assert fake.calls() == []


def test_dry_run_shows_placeholders_for_missing_settings(fake):
  result = fake.run('create', '--dry-run')
  assert result.returncode == 0, result.stderr
  flags = _flags(_printed(result.stdout)[0])
  assert flags['--cluster'] == '<CLUSTER>'
  assert flags['--docker-image'] == '<IMAGE>'


@pytest.mark.parametrize('sub, env, message', [
    ('create', dict(IMAGE='i:1', BUCKET='b'), 'set CLUSTER: '),
    ('create', dict(CLUSTER='c', BUCKET='b'), 'set IMAGE: '),
    ('create', dict(CLUSTER='c', IMAGE='i:1'), 'set WORKDIR: '),
    ('create', dict(CLUSTER='c', IMAGE='i:1', WORKDIR='gs://b/w'),
     'set TFDS_DATA_DIR: '),
    ('build', {}, 'set IMAGE: '),
    ('delete', {}, 'set CLUSTER: '),
    ('status', {}, 'set CLUSTER: '),
    ('create', dict(RUN, NAME='Cm_64'), "NAME is 'Cm_64'"),
    ('create', dict(RUN, NAME='a' * 41), 'at most 40 characters'),
    ('create', dict(RUN, NUM_SLICES='two'), "NUM_SLICES is 'two'"),
    ('create', dict(RUN, GRACE_S='5m'), "GRACE_S is '5m'"),
    ('build', dict(IMAGE='i:1', IMAGE_KIND='cpu'), "IMAGE_KIND is 'cpu'"),
    ('launch', {}, "unknown subcommand 'launch'"),
    ('--force', {}, 'unknown option --force'),
])
def test_missing_or_bad_settings_are_one_line(fake, sub, env, message):
  result = fake.run(sub, **env)
  assert result.returncode == 1
  (line,) = result.stderr.splitlines()
  assert line.startswith('error: ') and message in line, line
  assert fake.calls() == []


def test_no_subcommand_prints_the_usage(fake):
  result = fake.run()
  assert result.returncode == 2
  assert 'Usage:' in result.stderr and 'GRACE_S [300]' in result.stderr
  result = fake.run('--help')
  assert result.returncode == 0 and 'Usage:' in result.stdout


def test_create_calls_xpk(fake):
  result = fake.run('create', NAME='cm64', EXTRA_ARGS='--mode=train', **RUN)
  assert result.returncode == 0, result.stderr
  assert fake.calls() == [[
      'xpk', 'workload', 'create', '--cluster=tpu-cluster', '--workload=cm64',
      '--docker-image=us-docker.pkg.dev/p/images/cm:v1',
      '--tpu-type=v5litepod-64', '--num-slices=1', '--priority=medium',
      '--max-restarts=50', '--restart-on-exit-codes=75',
      '--termination-grace-period-seconds=300',
      '--env=TFDS_DATA_DIR=gs://bucket/tensorflow_datasets',
      '--command=exec python -m multistep_cm.main '
      '--config=configs/imagenet64.py --workdir=gs://bucket/multistep_cm/cm64 '
      '--mode=train']]
  assert 'warning' not in result.stderr


def test_create_fails_when_xpk_does(fake):
  result = fake.run('create', FAKE_EXIT='1', **RUN)
  assert result.returncode == 1
  assert len(fake.calls()) == 1


def test_untagged_image_is_warned_about(fake):
  result = fake.run('create', **dict(RUN, IMAGE='gcr.io/p/cm'))
  assert result.returncode == 0, result.stderr
  assert 'warning: IMAGE gcr.io/p/cm has no tag of its own' in result.stderr
  result = fake.run('create', **dict(RUN, IMAGE='localhost:5000/cm:latest'))
  assert 'warning' in result.stderr
  result = fake.run('create', **dict(RUN, IMAGE='localhost:5000/cm:v2'))
  assert 'warning' not in result.stderr


@pytest.mark.parametrize('accelerator, kind', [('v5p-128', 'tpu'),
                                               ('tpu7x-128', 'tpu'),
                                               ('b200-8', 'gpu')])
def test_build_builds_and_pushes(fake, accelerator, kind):
  result = fake.run('build', IMAGE='r/cm:v1', ACCELERATOR_TYPE=accelerator,
                    BUILD_ARGS='--build-arg JAX_CUDA=cuda12')
  assert result.returncode == 0, result.stderr
  assert fake.calls() == [
      ['docker', 'build', '--platform=linux/amd64',
       f'--file={DOCKERFILES[kind]}', '--tag=r/cm:v1', '--build-arg',
       'JAX_CUDA=cuda12', str(ROOT)],
      ['docker', 'push', 'r/cm:v1']]


def test_build_does_not_push_a_failed_build(fake):
  result = fake.run('build', IMAGE='r/cm:v1', FAKE_EXIT='1')
  assert result.returncode == 1
  assert [c[:2] for c in fake.calls()] == [['docker', 'build']]


def test_status_and_delete_call_xpk(fake):
  assert fake.run('status', CLUSTER='c', NAME='cm64').returncode == 0
  assert fake.run('delete', CLUSTER='c', NAME='cm64', ZONE='z').returncode == 0
  assert fake.calls() == [
      ['xpk', 'workload', 'list', '--cluster=c', '--filter-by-job=cm64'],
      ['xpk', 'workload', 'delete', '--cluster=c', '--zone=z',
       '--workload=cm64', '--force']]


@pytest.mark.parametrize('code', [0, 124, 125])
def test_wait_exits_with_xpks_code(fake, code):
  result = fake.run('wait', CLUSTER='c', WAIT_S='600', FAKE_EXIT=str(code))
  assert result.returncode == code
  assert fake.calls() == [
      ['xpk', 'workload', 'list', '--cluster=c',
       '--wait-for-job-completion=multistep-cm', '--timeout=600']]


def test_the_command_survives_xpks_wrapper(fake, tmp_path):
  """The --command string as xpk runs it: in a bash wrapper that starts it
  in the background and passes SIGTERM on. Odd characters in the settings
  reach python as they were, and python's exit code 75 after a SIGTERM is
  the container's."""
  config = "configs/my run's.py:smoke"
  result = fake.run('create', CONFIG=config, EXTRA_ARGS='--note=a&b', **RUN)
  assert result.returncode == 0, result.stderr
  command = fake.calls()[0][-1][len('--command='):]
  bin_dir = tmp_path / 'wrapped'
  bin_dir.mkdir()
  # Stand-in python: records its arguments, then waits for SIGTERM and exits
  # 75, as the training program does after saving.
  _write_exe(bin_dir / 'python', f'''#!{sys.executable}
import json, os, signal, sys, time
with open(os.environ['ARGV_FILE'], 'w') as f:
  json.dump(sys.argv[1:], f)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))
time.sleep(30)
sys.exit(3)
''')
  argv_file = tmp_path / 'argv'
  wrapper = ("_term() { kill -TERM $! 2>/dev/null; }; trap _term TERM; "
             f"({command}) & PID=$!; "
             "while kill -0 $PID 2>/dev/null; do sleep 0.1; done; "
             "wait $PID; exit $?")
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}',
             ARGV_FILE=str(argv_file))
  proc = subprocess.Popen(['bash', '-c', wrapper], env=env)
  try:
    deadline = time.monotonic() + 10
    while not (argv_file.exists() and argv_file.read_text()):
      assert time.monotonic() < deadline and proc.poll() is None
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 75
  finally:
    if proc.poll() is None:
      proc.kill()
  assert json.loads(argv_file.read_text()) == [
      '-m', 'multistep_cm.main', f'--config={config}',
      '--workdir=gs://bucket/multistep_cm/multistep-cm', '--note=a&b']
