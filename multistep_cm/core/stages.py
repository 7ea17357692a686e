"""The stages of the method, in one table: what each trains, from what, and
how it samples.

  teacher  a diffusion model, trained with the v-loss
  cd       multistep consistency distillation: Algorithm 1 with the
           teacher's aDDIM step
  ct       multistep consistency training: Algorithm 1 with the forward
           process in place of the teacher
  pd       one phase of progressive distillation (the paper's Table 3
           baseline): S steps from a teacher sampled with 2S
  gd       guidance distillation (the paper's Table 6 baseline): the
           teacher fine-tuned to give its guided prediction at guidance
           `config.consistency.guidance` in one evaluation; sampled with
           DDIM at `config.sampler.steps`, unguided

A student (cd, ct, pd, gd) starts as the teacher of
`config.teacher_checkpoint`; cd, ct and pd sample with S =
`config.student_steps` DDIM steps (Algorithm 2), unguided; a teacher samples
as `config.sampler` says. To add a stage: its
loss in `multistep_cm.losses`, a builder here, a row in `STAGES`.
"""

import dataclasses
from typing import Callable

from multistep_cm import losses
from multistep_cm import samplers
from multistep_cm import schedules
from multistep_cm.core import errors


@dataclasses.dataclass(frozen=True)
class Stage:
  """One row of the table. `make_loss(config, network)` builds the loss a
  train step differentiates, `(params, train state, teacher params or None,
  batch, rng) -> (loss, aux)`; `runs_teacher`: the step evaluates the
  teacher network, so its parameters are kept on the devices."""
  name: str
  make_loss: Callable
  student: bool = True
  runs_teacher: bool = False
  # A student that samples as a diffusion model (DDIM, config.sampler.steps)
  # rather than with the S-step consistency sampler.
  diffusion_sampler: bool = False

  def check(self, config):
    """Raises ConfigError, before anything is written or compiled, for a
    config this stage cannot train."""
    if self.student and not config.teacher_checkpoint:
      raise errors.ConfigError(
          f'Stage {self.name!r} starts from a teacher: set '
          'config.teacher_checkpoint to its workdir.')
    self.make_loss(config, network=None)  # Builders check their options.
    self.sampler(config)

  def sampler(self, config):
    """The stage's own sampler: S student steps, or the teacher's."""
    if self.diffusion_sampler:
      return sampler_spec('ddim', config.sampler.steps, field='config.sampler')
    if self.student:
      return sampler_spec('student', config.student_steps,
                          field='config.student_steps')
    return sampler_spec(config.sampler.kind, config.sampler.steps,
                        config.sampler.guidance, field='config.sampler')

  def workdir_name(self, config):
    """The stage's directory in a pipeline's or sweep's workdir."""
    if self.diffusion_sampler:
      return f'{self.name}_w{config.consistency.guidance:g}'
    return f'{self.name}_s{config.student_steps}' if self.student else 'teacher'


def batch_labels(batch):
  """The labels a network takes from a training batch: its caption (the
  dict of `models.text_labels`) if it has one, else its class labels."""
  if 'text' in batch:
    return {k: batch[k] for k in ('text', 'text_mask', 'pooled') if k in batch}
  return batch['label']


def sampler_spec(kind, steps, guidance=0., field=None):
  """The SamplerSpec, or a ConfigError naming `field` (the config's)."""
  try:
    return samplers.SamplerSpec(kind, steps, guidance)
  except ValueError as e:
    raise errors.ConfigError(f'{field}: {e}' if field else str(e)) from None


def consistency_options(config, mode):
  """The typed options of Algorithm 1, from config.consistency."""
  cc = config.consistency
  if cc.target not in ('online', 'ema'):
    raise errors.ConfigError(f'Unknown config.consistency.target {cc.target!r}:'
                             ' expected online or ema.')
  try:
    return losses.ConsistencyOptions(
        mode=mode, anneal_start=cc.anneal_start, anneal_end=cc.anneal_end,
        anneal_steps=cc.anneal_steps, xvar_frac=cc.xvar_frac,
        huber_delta=cc.huber_delta, norm=cc.norm, weighting=cc.weighting,
        guidance=cc.guidance, num_classes=config.dataset.num_classes)
  except ValueError as e:
    raise errors.ConfigError(f'config.consistency: {e}') from None


def _diffusion_loss(config, network):
  logsnr = schedules.get_logsnr_fn(**config.schedule)

  def loss_fn(params, train_state, teacher_params, batch, rng):
    del train_state, teacher_params
    return losses.diffusion_loss(
        network, params, batch['x'], batch_labels(batch), rng, logsnr,
        config.loss.label_dropout, config.dataset.num_classes,
        config.loss.multiscale), {}
  return loss_fn


def _consistency_loss(mode):
  def make(config, network):
    logsnr = schedules.get_logsnr_fn(**config.schedule)
    options = consistency_options(config, mode)
    ema_target = config.consistency.target == 'ema'

    def loss_fn(params, train_state, teacher_params, batch, rng):
      target = train_state.ema_params if ema_target else None
      return losses.consistency_loss(
          network, params, batch['x'], batch_labels(batch), rng, logsnr,
          config.student_steps, train_state.step, options, target,
          teacher=network, teacher_params=teacher_params)
    return loss_fn
  return make


def _progressive_loss(config, network):
  logsnr = schedules.get_logsnr_fn(**config.schedule)
  cc = config.consistency

  def loss_fn(params, train_state, teacher_params, batch, rng):
    del train_state
    return losses.progressive_distillation_loss(
        network, params, network, teacher_params, batch['x'], batch_labels(batch),
        rng, logsnr, config.student_steps, cc.xvar_frac, cc.guidance,
        config.dataset.num_classes), {}
  return loss_fn


def _guidance_distillation_loss(config, network):
  logsnr = schedules.get_logsnr_fn(**config.schedule)
  guidance = config.consistency.guidance
  if not guidance > 0:
    raise errors.ConfigError(
        "Stage 'gd' distils classifier-free guidance: set "
        'config.consistency.guidance above 0 (the paper: 0.5 and 3).')

  def loss_fn(params, train_state, teacher_params, batch, rng):
    del train_state
    return losses.guidance_distillation_loss(
        network, params, network, teacher_params, batch['x'],
        batch_labels(batch), rng, logsnr, guidance,
        config.dataset.num_classes), {}
  return loss_fn


STAGES = {s.name: s for s in (
    Stage('teacher', _diffusion_loss, student=False),
    Stage('cd', _consistency_loss('cd'), runs_teacher=True),
    Stage('ct', _consistency_loss('ct')),
    Stage('pd', _progressive_loss, runs_teacher=True),
    Stage('gd', _guidance_distillation_loss, runs_teacher=True,
          diffusion_sampler=True),
)}
NAMES = tuple(STAGES)


def get(name):
  if name not in STAGES:
    raise errors.ConfigError(f'Unknown stage {name!r}: expected one of '
                             f'{", ".join(NAMES)}.')
  return STAGES[name]
