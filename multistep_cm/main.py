"""Entry point: python -m multistep_cm.main --config=configs/X.py --workdir=DIR

Kept thin: it parses flags and hands the config to one mode, whose logic
lives in importable modules: `train` (or `pipeline` for a config that lists
several stages), `evaluation.evaluate`, `evaluation.fid` (reference
statistics), `evaluation.quick` (samples), `export` (the sampler as a
portable program) and `describe` (the config, without running it).
"""

import logging as py_logging
import os
import sys

# Nothing here imports TensorFlow; where it is installed (to build tfds
# datasets) and a library pulls it in, it must keep its C++ start-up chatter
# to itself; set before anything imports it. --mode=describe counts XLA's
# warnings, which this level would hide (read before the flags are parsed).
_DESCRIBE = any(a == '--mode=describe' or (a, b) == ('--mode', 'describe')
                for a, b in zip(sys.argv, sys.argv[1:] + ['']))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1' if _DESCRIBE else '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from multistep_cm import errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and '
                    'samples; a run resumes from the checkpoints it holds.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'evaluate',
                                    'reference', 'export', 'describe'],
                  'train: train and evaluate; sample: write samples of the '
                  'newest checkpoint; evaluate: score N samples of it '
                  '(config.evaluate); reference: FID statistics of the '
                  'dataset\'s train split, written to the workdir; export: '
                  'its sampler as a jax.export program with its weights, '
                  'for multistep_cm/exported.py; describe: print the '
                  'config\'s variants, fields, parameter count and train-step '
                  'memory per device, then exit (needs no --workdir).')
flags.DEFINE_integer('num_samples', 100, 'Samples to write in sample mode.')
flags.DEFINE_string('target', None, 'With --mode=describe: compile for this '
                    'TPU slice or GPU node instead of this host (v5p-64, '
                    'v6e-64, v5litepod-64, v4-32, 2xv5p-64, 8xh100, 8xh200, '
                    '8xb200, 8xa100; `python -m multistep_cm.targets` lists '
                    'them) and say whether it fits and how fast it can be.')
flags.DEFINE_bool('fit', False, 'With --mode=describe --target: also find the '
                  'largest per-device batch whose train step fits.')
flags.DEFINE_bool('fit_remat', False, 'As --fit, with each remat policy of the '
                  'network (none, dots_saveable, full) in turn.')
flags.mark_flags_as_required(['config'])
flags.register_multi_flags_validator(
    ['mode', 'workdir'], lambda f: f['mode'] == 'describe' or f['workdir'],
    message='--workdir is required (except with --mode=describe).')
flags.register_multi_flags_validator(
    ['mode', 'target', 'fit', 'fit_remat'],
    lambda f: f['mode'] == 'describe' or not (
        f['target'] or f['fit'] or f['fit_remat']),
    message='--target, --fit and --fit_remat go with --mode=describe.')


flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, '
                    'for a multi-host job on a cluster jax does not detect '
                    '(Cloud TPU, GKE, Kubernetes, Slurm and Open MPI are '
                    'detected); default $JAX_COORDINATOR_ADDRESS.')
flags.DEFINE_integer('num_processes', None, 'Processes in the job (with '
                     '--coordinator_address); default $JAX_NUM_PROCESSES.')
flags.DEFINE_integer('process_id', None, 'This process, 0 to num_processes-1 '
                     '(with --coordinator_address); default $JAX_PROCESS_ID.')
flags.DEFINE_float('heartbeat_timeout_s', 100, 'In a multi-host job: when a '
                   'process has not been heard from for this long (killed, '
                   'its host lost), the others stop, naming it and the newest '
                   'checkpoint, with exit code 75 (restart to resume).',
                   lower_bound=1)

# The explicit multi-host settings: (flag, environment variable).
EXPLICIT = (('coordinator_address', 'JAX_COORDINATOR_ADDRESS'),
            ('num_processes', 'JAX_NUM_PROCESSES'),
            ('process_id', 'JAX_PROCESS_ID'))


def _explicit_settings():
  """The multi-host settings given by flag or environment variable (a flag
  wins), as `jax.distributed.initialize` arguments: {} when none is."""
  values = {}
  for name, env in EXPLICIT:
    value = FLAGS[name].value
    value = os.environ.get(env) if value is None else value
    if value is not None:
      values[name] = value
  for name in ('num_processes', 'process_id'):
    if name in values:
      try:
        values[name] = int(values[name])
      except ValueError:
        raise errors.ConfigError(f'--{name} is {values[name]!r}, not an '
                                 'integer.') from None
  return values


def _initialize_distributed():
  """Joins the other processes of a multi-host job, as jax does: the
  settings given explicitly, the rest detected from the cluster (Cloud TPU,
  GKE, Kubernetes, Slurm, Open MPI), so `JAX_COORDINATOR_ADDRESS` alone
  works where the cluster gives process count and id. Only "nothing given,
  nothing detected" means a single process: any other failure is raised,
  since hosts that each trained alone would waste the whole job."""
  from multistep_cm.core import liveness  # pylint: disable=g-import-not-at-top
  explicit = _explicit_settings()
  try:
    jax.distributed.initialize(**explicit, heartbeat_timeout_seconds=round(
        liveness.JAX_TIMEOUT_FACTOR * FLAGS.heartbeat_timeout_s))
  except ValueError as e:
    if not explicit and 'coordinator_address' in str(e):
      return  # Nothing given, no cluster: one process.
    missing = [f'--{n} (${env})' for n, env in EXPLICIT if n not in explicit]
    if missing and 'defined' in str(e):
      given = ', '.join(f'--{n}' for n in explicit)
      raise errors.ConfigError(
          f'a multi-host start with {given} needs the rest from the cluster, '
          'and jax detected none (it detects Cloud TPU, GKE, Kubernetes, '
          f'Slurm and Open MPI): give {", ".join(missing)} too.') from None
    raise errors.UserError(f'jax.distributed.initialize({explicit}) failed: '
                           f'{str(e).strip().splitlines()[0]}') from None
  except Exception as e:  # pylint: disable=broad-except
    raise errors.UserError(
        f'jax.distributed.initialize({explicit}) failed: '
        f'{str(e).strip().splitlines()[0]}') from None


def _log_start(mesh):
  """One line per process: who it is, its devices, the mesh."""
  local = jax.local_devices()
  logging.info(
      'Process %d of %d: %d local %s devices of %d; mesh %s.',
      jax.process_index(), jax.process_count(), len(local),
      local[0].platform, jax.device_count(), dict(mesh.shape))
  if jax.process_index() > 0:
    # Process 0 prints the run's progress and metrics; the others, only
    # what goes wrong.
    logging.set_verbosity(logging.WARNING)


class _QuietLibraries(py_logging.Filter):
  """Drops INFO lines of orbax and jax: one orbax save logs ~30 of them,
  which would bury the progress lines. Warnings and errors pass."""

  def filter(self, record):
    noisy = ('/orbax/', '/jax/')
    return record.levelno >= py_logging.WARNING or not any(
        n in record.pathname for n in noisy)


def _innermost_message(e):
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  return str(e.args[0] if e.args else e)


# absl's help flags (`-?` is --help's short name).
_HELP_FLAGS = ('help', 'helpshort', 'helpfull', 'helpxml', '?')


def parse_flags(argv):
  """absl's parser, with a mistyped `--config.x.y=` override reported in one
  line (ml_collections raises a bare AttributeError/KeyError for it)."""
  try:
    rest = FLAGS(argv)
    FLAGS.config.keys()  # A config file that failed to load raises here.
    return rest
  except SystemExit:
    # absl's help flags print the help, then exit 1: help that was asked for
    # and given is a success.
    if any(a.lstrip('-').split('=')[0] in _HELP_FLAGS for a in argv[1:]):
      sys.exit(0)
    raise
  except OSError as e:  # The config file is missing or unreadable.
    sys.exit(f'error: cannot load --config: {str(e).splitlines()[-1].strip()}')
  except flags.Error as e:
    # A config file that raises is reported with its traceback in the
    # message; its last line is the error itself.
    msg = str(e).strip().splitlines()[-1]
    sys.exit(f'error: {msg} Pass --helpshort to see the flags.')
  except (AttributeError, KeyError) as e:
    msg = ' '.join(_innermost_message(e).split())
    overrides = [a for a in argv if a.startswith('--config.')]
    sys.exit(f'error: no such config field ({msg}) in {" ".join(overrides)}')


def _run_mode(config, workdir):
  # pylint: disable=g-import-not-at-top
  from multistep_cm import export_writer
  from multistep_cm import pipeline
  from multistep_cm import run as run_lib
  from multistep_cm import train
  from multistep_cm.core import config as config_lib
  from multistep_cm.core import state
  from multistep_cm.core import validation
  from multistep_cm.evaluation import evaluate
  from multistep_cm.evaluation import fid
  from multistep_cm.evaluation import quick
  # pylint: enable=g-import-not-at-top
  if FLAGS.mode == 'train' and config.pipeline.stages:
    _log_start(state.make_mesh(config))
    # Each stage's config is resolved there, from the same flags.
    pipeline.run(config_lib.StageConfigs.from_flag(FLAGS['config']), workdir)
    return
  run = run_lib.resolve(config)
  _log_start(run.mesh)
  if FLAGS.mode == 'train':
    train.train_and_evaluate(run, workdir)
    return
  validation.check_run(run, workdir, train=False)
  if FLAGS.mode == 'evaluate':
    evaluate.run(run, workdir)
  elif FLAGS.mode == 'reference':
    fid.compute_reference(run, workdir)
  elif FLAGS.mode == 'export':
    export_writer.run(run, workdir)
  else:
    quick.write_samples(run, workdir, FLAGS.num_samples)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  for handler in py_logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  # Imported here so that `--help` and flag errors come back fast.
  # pylint: disable=g-import-not-at-top
  from multistep_cm.core import liveness
  from multistep_cm.core import preemption
  from multistep_cm.core import storage
  # pylint: enable=g-import-not-at-top
  storage.configure()
  config, workdir = FLAGS.config, FLAGS.workdir
  if FLAGS.mode == 'describe':
    from multistep_cm import describe  # pylint: disable=g-import-not-at-top
    try:
      describe.run(config, config_flags.get_config_filename(FLAGS['config']),
                   FLAGS.target, FLAGS.fit, FLAGS.fit_remat)
    except errors.UserError as e:
      sys.exit(f'error: {e}')
    return
  try:
    _initialize_distributed()
    with liveness.Watch(workdir, FLAGS.heartbeat_timeout_s):
      _run_mode(config, workdir)
  except errors.UserError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    if jax.distributed.is_initialized():
      # The others stop on this process's word (liveness.Watch); jax's
      # shutdown at exit would wait for them, then abort from C++ over the
      # line above.
      sys.stdout.flush()
      os._exit(e.exit_code)  # pylint: disable=protected-access
    sys.exit(e.exit_code)
  except preemption.Preempted as e:
    print(e, file=sys.stderr, flush=True)
    sys.exit(preemption.EXIT_CODE)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
