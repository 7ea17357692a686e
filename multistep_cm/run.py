"""A run resolved once: what every mode builds from its config, built in one
place at the top of the mode and passed down.

  run = run_lib.resolve(config)
  run.dataset, run.condition, run.shape   the dataset's row and what it
                                          conditions on
  run.logsnr_fn                           the noise schedule
  run.network_row, run.model, run.network the network's row, its Linen
                                          module, the plain function
  run.stage                               the stage's row
  run.mesh                                the device mesh
  run.any_steps                           an any-S student's step counts

Each way the config fails to resolve is one ConfigError line. Nothing below
a mode looks the dataset, schedule or network up again
(tests/test_architecture.py).
"""

import dataclasses
import functools
import inspect
from typing import Any, Callable

import jax

from multistep_cm import datasets
from multistep_cm import errors
from multistep_cm import losses
from multistep_cm import models
from multistep_cm import networks
from multistep_cm import schedules
from multistep_cm.core import stages
from multistep_cm.core import state


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
  """A config and what it resolves to; `resolve` builds it."""
  config: Any
  stage: stages.Stage
  dataset: Any  # datasets.base.Dataset
  logsnr_fn: Callable
  network_row: networks.Network
  model: Any  # flax.linen.Module
  mesh: jax.sharding.Mesh
  # The network is given its segment's boundary (an any-S student); False
  # for its teacher's layout.
  boundary: bool = False

  @property
  def any_steps(self):
    """The step counts an any-S student learns (config.any_steps), or ()."""
    return stages.any_steps_of(self.config)

  @property
  def condition(self):
    """What the network is conditioned on: the dataset's `Condition`."""
    return self.dataset.condition

  @property
  def shape(self):
    """Shape of one example: (H, W, C) images, or (C,) points."""
    return self.dataset.shape

  @functools.cached_property
  def network(self):
    """The model as the plain function losses and samplers take."""
    return models.network_fn(self.model)

  def with_model(self, model):
    """The same run with another module of the same network (another
    parameter layout)."""
    return dataclasses.replace(self, model=model)


def resolve(config, devices=None):
  """The Run of `config`: its stage, dataset, schedule, network and mesh
  (over `devices`, default this process's: a target's compile-only devices
  for `--mode=describe --target`)."""
  stage = stages.get(config.stage)
  dataset = datasets.get(config)
  try:
    logsnr_fn = schedules.get_logsnr_fn(**config.schedule)
  except (TypeError, ValueError) as e:
    raise errors.ConfigError(f'config.schedule: {e}') from None
  fields = dict(config.model)
  fields['out_channels'] = config.dataset.channels
  try:
    row = networks.get(fields['name'])
    model = networks.create_model(fields, dataset.condition, logsnr_fn)
  except (TypeError, ValueError) as e:
    raise errors.ConfigError(f'config.model: {e}') from None
  any_steps = stages.any_steps_of(config)
  if any_steps:
    if not stage.any_steps:
      raise errors.ConfigError(
          f'config.any_steps: stage {stage.name!r} trains no any-S student; '
          f'any_steps is for {", ".join(stages.ANY_STEPS)}.')
    try:
      losses.check_any_steps(any_steps, config.get('any_steps_weights', ()))
    except ValueError as e:
      raise errors.ConfigError(f'config.{e}') from None
    if 'boundary' not in inspect.signature(type(model).__call__).parameters:
      raise errors.ConfigError(
          f'config.any_steps: network {fields["name"]!r} takes no boundary '
          'input (an any-S student needs one).')
  return Run(config, stage, dataset, logsnr_fn, row, model,
             state.make_mesh(config, devices), boundary=bool(any_steps))


def of(config_or_run):
  """`config_or_run` if it is already resolved, else its Run: a mode called
  by another that has resolved its config (the command line, a pipeline)
  does not resolve it again."""
  if isinstance(config_or_run, Run):
    return config_or_run
  return resolve(config_or_run)
