"""Entry point: python -m multistep_cm.main --config=configs/X.py --workdir=DIR

Kept thin: it parses flags and hands the config to one mode, whose logic
lives in importable modules: `train` (or `pipeline` for a config that lists
several stages), `evaluation.evaluate`, `evaluation.fid` (reference
statistics) and `evaluation.quick` (samples).
"""

import logging as py_logging
import os
import sys

# TensorFlow (behind tfds and the TensorBoard writer) must keep its C++ start-up
# chatter to itself; set before anything imports it. It only decodes and
# resizes images here, so its oneDNN kernels (which announce themselves) bring
# nothing.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and '
                    'samples; a run resumes from the checkpoints it holds.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'evaluate',
                                    'reference'],
                  'train: train and evaluate; sample: write samples of the '
                  'newest checkpoint; evaluate: score N samples of it '
                  '(config.evaluate); reference: FID statistics of the '
                  'dataset\'s train split, written to the workdir.')
flags.DEFINE_integer('num_samples', 100, 'Samples to write in sample mode.')
flags.mark_flags_as_required(['config', 'workdir'])


def _initialize_distributed():
  """Joins the other hosts. Only "no coordinator found" means a single host:
  any other failure is raised, since hosts that each trained alone would
  waste the whole job."""
  try:
    jax.distributed.initialize()
  except ValueError as e:
    if 'coordinator_address' not in str(e):
      raise
    logging.info('Single process: no multi-host environment detected.')


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


def parse_flags(argv):
  """absl's parser, with a mistyped `--config.x.y=` override reported in one
  line (ml_collections raises a bare AttributeError/KeyError for it)."""
  try:
    rest = FLAGS(argv)
    FLAGS.config.keys()  # A config file that failed to load raises here.
    return rest
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  for handler in py_logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  # Imported here so that `--help` and flag errors come back fast.
  # pylint: disable=g-import-not-at-top
  from configs import common
  from multistep_cm import pipeline
  from multistep_cm import train
  from multistep_cm.core import errors
  from multistep_cm.evaluation import evaluate
  from multistep_cm.evaluation import fid
  from multistep_cm.evaluation import quick
  # pylint: enable=g-import-not-at-top
  _initialize_distributed()
  logging.info('Process %d of %d; devices: %s', jax.process_index(),
               jax.process_count(), jax.devices())
  config, workdir = FLAGS.config, FLAGS.workdir
  try:
    if FLAGS.mode == 'train' and config.pipeline.stages:
      pipeline.run(common.StageConfigs.from_flag(FLAGS['config']), workdir)
    elif FLAGS.mode == 'train':
      train.train_and_evaluate(config, workdir)
    elif FLAGS.mode == 'evaluate':
      evaluate.run(config, workdir)
    elif FLAGS.mode == 'reference':
      fid.compute_reference(config, workdir)
    else:
      quick.write_samples(config, workdir, FLAGS.num_samples)
  except errors.UserError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
