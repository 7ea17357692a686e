"""What can be checked about a run before its workdir is touched: each way to
start it wrongly is one ConfigError (one `error:` line), raised before any
file is written, so a failing start never changes an existing workdir."""

import os

from multistep_cm import errors
from multistep_cm.core import sharding

# Counts and intervals a training run divides by or loops over.
POSITIVE = ('batch_size', 'total_steps', 'log_every', 'ckpt_every',
            'eval_every', 'keep_checkpoints', 'train_eval.num_samples',
            'train_eval.batch_size')


def _get(config, dotted):
  for key in dotted.split('.'):
    config = config[key]
  return config


def check_config(run, train=True):
  """Raises ConfigError for a resolved config (`run.Run`) that cannot run on
  these devices with this data. `train`: also the fields only training
  uses."""
  config, mesh = run.config, run.mesh
  if train:
    for name in POSITIVE:
      value = _get(config, name)
      if not isinstance(value, int) or value < 1:
        raise errors.ConfigError(f'config.{name} is {value!r}: it must be a '
                                 'positive integer.')
  window = tuple(config.get('profile_steps') or ())
  if train and window and not (
      len(window) == 2 and all(isinstance(s, int) for s in window)
      and 1 <= window[0] <= window[1] <= config.total_steps):
    raise errors.ConfigError(
        f'config.profile_steps is {window!r}: expected (first, last) training '
        f'steps, 1 <= first <= last <= total_steps ({config.total_steps}), '
        'or () for no trace.')
  if train and config.batch_size % mesh.size:
    raise errors.ConfigError(
        f'config.batch_size {config.batch_size} does not split over the '
        f'{mesh.size} devices: use a multiple of {mesh.size}.')
  if train:
    try:
      sharding.process_rows(config.batch_size, mesh)
    except ValueError as e:
      raise errors.ConfigError(f'config.mesh: {e}') from None
  guides = max(config.sampler.guidance, config.consistency.guidance,
               config.loss.label_dropout if train else 0.) > 0
  if guides and not run.network_row.has_null(run.model):
    raise errors.ConfigError(
        'config.model has no null class (as OpenAI\'s networks): it can be '
        'neither guided nor trained with label dropout; set '
        'config.model.null_class = True for a network trained here.')
  # Sampling and scoring a checkpoint need no training data, nor a
  # distilled stage's teacher.
  if train:
    run.dataset.check()
  run.stage.check(run, train)


def check_workdir(workdir):
  """Raises ConfigError unless `workdir` is, or can be made, a writable
  directory (local paths; a bucket's permissions show at the first write)."""
  path = str(workdir)
  if '://' in path:
    return
  path = os.path.abspath(path)
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise errors.ConfigError(f'workdir {workdir}: {existing} is a file, not a '
                             'directory.')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise errors.ConfigError(f'workdir {workdir}: {existing} is not writable.')


def check_run(run, workdir, train=True):
  check_config(run, train)
  check_workdir(workdir)
