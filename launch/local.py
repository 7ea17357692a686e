"""A multi-host job on one machine: N processes with M fake CPU devices each,
joined by jax.distributed through a coordinator on localhost. For debugging
multi-host code on a laptop, and for the tests that prove a run on several
processes equals one on a single process.

Needs: the project installed (`pip install -e .`); nothing else.

  python launch/local.py --processes 2 --devices_per_process 4 -- \\
      --config=configs/toy2d.py:smoke --workdir=/tmp/toy2d_2x4

Everything after `--` goes to `python -m multistep_cm.main` (or --module).
Each output line is prefixed with its process, `[1] ...`. SIGTERM or Ctrl-C
is passed on to every process, as a preempted pod's hosts all get it. The
exit code is 0 when every process succeeded; 75 ("rerun to resume") when the
job was preempted and saved, or lost a process: some exited 75 or were killed
by a signal, and none failed otherwise; else the first non-zero one.
`--dry_run` prints the commands.
"""

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

EXIT_RESUME = 75
# After one process fails, the others are stopped once this many seconds
# past the program's heartbeat timeout have passed (they would otherwise wait
# on it in a collective); within the timeout they stop by themselves, naming
# a lost process.
GRACE_S = 20
HEARTBEAT_TIMEOUT_S = 100  # multistep_cm.main's default.


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def commands(processes, devices, module, args, port):
  """(environment changes, argv) of each process."""
  out = []
  for i in range(processes):
    env = {'JAX_COORDINATOR_ADDRESS': f'localhost:{port}',
           'JAX_NUM_PROCESSES': str(processes),
           'JAX_PROCESS_ID': str(i),
           'JAX_PLATFORMS': 'cpu',
           'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
    out.append((env, [sys.executable, '-m', module, *args]))
  return out


def heartbeat_timeout(args):
  """The --heartbeat_timeout_s among the program's arguments, or its
  default."""
  for i, arg in enumerate(args):
    if arg.startswith('--heartbeat_timeout_s='):
      return float(arg.split('=', 1)[1])
    if arg == '--heartbeat_timeout_s' and i + 1 < len(args):
      return float(args[i + 1])
  return HEARTBEAT_TIMEOUT_S


def job_code(codes):
  """The job's exit code from its processes' (negative: killed by that
  signal)."""
  failed = [c for c in codes if c]
  if failed and all(c == EXIT_RESUME or c < 0 for c in failed):
    return EXIT_RESUME
  return next(iter(failed), 0)


def _pump(i, stream, sink):
  for line in iter(stream.readline, ''):
    sink.write(f'[{i}] {line}')
    sink.flush()


def run(processes, devices, module, args):
  """Runs the processes to the end; returns the job's exit code."""
  procs, pumps = [], []
  for i, (env, argv) in enumerate(
      commands(processes, devices, module, args, _free_port())):
    p = subprocess.Popen(argv, env={**os.environ, **env}, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.append(p)
    for stream, sink in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
      t = threading.Thread(target=_pump, args=(i, stream, sink), daemon=True)
      t.start()
      pumps.append(t)

  def forward(signum, frame):
    del frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)
  for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
    signal.signal(s, forward)

  grace_s = heartbeat_timeout(args) + GRACE_S
  failed_at = None
  while any(p.poll() is None for p in procs):
    codes = [p.returncode for p in procs if p.returncode is not None]
    if failed_at is None and any(codes):
      failed_at = time.time()
    if failed_at is not None and time.time() - failed_at > grace_s:
      for p in procs:
        if p.poll() is None:
          p.kill()
    time.sleep(0.1)
  for t in pumps:
    t.join()
  return job_code([p.returncode for p in procs])


def main():
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--processes', type=int, default=2)
  parser.add_argument('--devices_per_process', type=int, default=4)
  parser.add_argument('--module', default='multistep_cm.main',
                      help='the Python module each process runs')
  parser.add_argument('--dry_run', action='store_true',
                      help='print the commands instead of running them')
  parser.add_argument('args', nargs=argparse.REMAINDER,
                      help='-- then the arguments of the module')
  a = parser.parse_args()
  args = a.args[1:] if a.args[:1] == ['--'] else a.args
  if a.processes < 1 or a.devices_per_process < 1:
    parser.error('--processes and --devices_per_process must be positive.')
  if a.dry_run:
    for env, argv in commands(a.processes, a.devices_per_process, a.module,
                              args, 'PORT'):
      print(' '.join([*(f'{k}={shlex.quote(v)}' for k, v in env.items()),
                      *map(shlex.quote, argv)]))
    return 0
  return run(a.processes, a.devices_per_process, a.module, args)


if __name__ == '__main__':
  sys.exit(main())
