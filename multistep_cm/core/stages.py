"""The stages of the method, in one table: what each trains, from what, and
how it samples.

  teacher  a diffusion model, trained with the v-loss; samples as
           `config.sampler` says
  cd       multistep consistency distillation: Algorithm 1 with the
           teacher's aDDIM step
  ct       multistep consistency training: Algorithm 1 with the forward
           process in place of the teacher
  pd       one phase of progressive distillation (the paper's Table 3
           baseline): S steps from a teacher sampled with 2S; its
           checkpoint teaches the next phase
  gd       guidance distillation (the paper's Table 6 baseline): the
           teacher fine-tuned to give its guided prediction at guidance
           `config.consistency.guidance` in one evaluation; sampled with
           DDIM at `config.sampler.steps`

A distilled stage (cd, ct, pd, gd) starts as the teacher of
`config.teacher_checkpoint` (to train; sampling it needs its checkpoint
only) and is never guided at sampling: its guidance was fixed at
distillation. cd, ct and pd sample with S = `config.student_steps` DDIM
steps (Algorithm 2). cd and ct can instead train one any-S student for all
the step counts of `config.any_steps` (its network told the boundary of its
segment), sampled with any S. `Stage.sampler` is the one place that
resolves how a stage samples, for training-time evaluation, --mode=sample,
--mode=evaluate, the pipeline and the sweep. To add a stage: its loss in
`multistep_cm.losses`, a builder here, a row in `STAGES`.
"""

import dataclasses
from typing import Callable

from absl import logging
from etils import epath

from multistep_cm import errors
from multistep_cm import losses
from multistep_cm import samplers
from multistep_cm import weights


@dataclasses.dataclass(frozen=True)
class Stage:
  """One row of the table. `make_loss(run, network)` (`run`: the resolved
  config, a `multistep_cm.run.Run`) builds the loss a train step
  differentiates, `(params, train state, teacher params or None, batch,
  rng) -> (loss, aux)`; `runs_teacher`: the step evaluates the
  teacher network, so its parameters are kept on the devices."""
  name: str
  make_loss: Callable
  distilled: bool = True  # From a teacher; never guided at sampling.
  runs_teacher: bool = False
  # How it samples: 'student' (S consistency steps, config.student_steps),
  # 'diffusion' (DDIM at config.sampler.steps, unguided) or 'config'
  # (config.sampler, the teacher's).
  sampling: str = 'student'
  # Its checkpoint teaches the next stage of the same kind at half the
  # steps (a chain of progressive-distillation phases).
  chains: bool = False
  # The label of its rows in the reports: (config) -> str.
  label: Callable = lambda config: ''
  # It can train one any-S student for several step counts
  # (config.any_steps) instead of one per S.
  any_steps: bool = False

  def check(self, run, train=True):
    """Raises ConfigError, before anything is written or compiled, for a
    run this stage cannot train (`train`), or sample."""
    config = run.config
    if train and self.distilled and not config.teacher_checkpoint:
      raise errors.ConfigError(
          f'Stage {self.name!r} starts from a teacher: set '
          'config.teacher_checkpoint to its workdir.')
    teacher = config.teacher_checkpoint
    if train and self.distilled and weights.is_npz(teacher):
      fmt = run.network_row.weights
      if fmt is None:
        raise errors.ConfigError(
            f'config.teacher_checkpoint {teacher}: converted weights, but '
            f'config.model {config.model.name!r} is not a network imported '
            'from elsewhere.')
      if not epath.Path(teacher).exists():
        raise errors.ConfigError(f'config.teacher_checkpoint {teacher}: no '
                                 f'such file. {fmt.how_to_get}')
    self.make_loss(run, network=None)  # Builders check their options.
    self.sampler(config)

  def sampler(self, config, kind='', steps=0, guidance=-1., field=None):
    """How this stage samples: its own sampler, or `kind`, `steps` and
    classifier-free `guidance` where given (as in config.evaluate: '', 0 and
    a negative guidance take the stage's own). A distilled stage is never
    guided; asking for guidance is a ConfigError. `field`: the config
    section errors name."""
    any_steps = any_steps_of(config)
    own = {'student': 'student', 'diffusion': 'ddim',
           'config': config.sampler.kind}[self.sampling]
    kind = kind or own
    if kind in STUDENT_SAMPLERS and self.sampling != 'student':
      raise errors.ConfigError(
          f'The student sampler needs a student stage (cd, ct, pd); stage '
          f'{self.name!r} samples as a diffusion model ('
          f'{", ".join(k for k in samplers.KINDS if k not in STUDENT_SAMPLERS)}'
          ').')
    if kind in STUDENT_SAMPLERS:
      # An any-S student's sampler tells the network its boundaries.
      if kind == 'any_student' and not any_steps:
        raise errors.ConfigError(
            f'{field or "config.evaluate"}: the any_student sampler needs an '
            'any-S student (config.any_steps); this one has one S: student.')
      kind = 'any_student' if any_steps else 'student'
    steps = steps or (config.student_steps if kind in STUDENT_SAMPLERS
                      else config.sampler.steps)
    if self.distilled:
      if guidance > 0:
        raise errors.ConfigError(
            f'Stage {self.name!r} cannot be guided at sampling: its guidance '
            'was fixed at distillation (config.consistency.guidance).')
      guidance = 0.
    elif guidance < 0:
      guidance = config.sampler.guidance
    field = field or ('config.student_steps' if kind in STUDENT_SAMPLERS
                      else 'config.sampler')
    spec = sampler_spec(kind, steps, guidance, field=field)
    if kind == 'any_student' and steps not in any_steps:
      untrained_notice(steps, any_steps)
    return spec

  def guidance(self, config, spec):
    """The guidance its samples carry: sampled with it (a teacher), or
    distilled with it."""
    return config.consistency.guidance if self.distilled else spec.guidance

  def run_key(self, config):
    """The stage's name in a pipeline's or sweep's workdir and results."""
    return self.key(config.student_steps, config.consistency.guidance,
                    bool(any_steps_of(config)))

  def key(self, steps=None, guidance=None, any_steps=False):
    """`run_key` of a config with these student steps and guidance (an
    any-S student: one for every S)."""
    if self.sampling == 'diffusion':
      return f'{self.name}_w{guidance:g}'
    if any_steps:
      return f'{self.name}_any'
    return f'{self.name}_s{steps}' if self.distilled else self.name


# The samplers of a student stage: of a student of one S, of an any-S one.
STUDENT_SAMPLERS = ('student', 'any_student')


def any_steps_of(config):
  """The step counts the any-S student of `config` learns
  (config.any_steps), or () for a student of one S (or a config from before
  the field)."""
  return tuple(config.get('any_steps', ()))


# (S, step counts) pairs already noticed: the notice is once per process.
_NOTICED = set()


def untrained_notice(steps, any_steps):
  """One line, once per process and S: an any-S student sampled with an S
  it was not trained for."""
  if (steps, any_steps) not in _NOTICED:
    _NOTICED.add((steps, any_steps))
    logging.warning('S=%d was not among the any-S student\'s trained step '
                    'counts (%s): its boundaries are interpolated.', steps,
                    ', '.join(map(str, any_steps)))


def evaluation_sampler(config):
  """The sampler of config.stage with config.evaluate's overrides: what
  --mode=sample and --mode=evaluate draw with."""
  ev = config.evaluate
  return get(config.stage).sampler(config, ev.sampler, ev.steps, ev.guidance,
                                   field='config.evaluate')


def sampler_spec(kind, steps, guidance=0., field=None):
  """The SamplerSpec, or a ConfigError naming `field` (the config's)."""
  try:
    return samplers.SamplerSpec(kind, steps, guidance)
  except ValueError as e:
    raise errors.ConfigError(f'{field}: {e}' if field else str(e)) from None


def consistency_options(run, mode):
  """The typed options of Algorithm 1, from config.consistency."""
  cc = run.config.consistency
  if cc.target not in ('online', 'ema'):
    raise errors.ConfigError(f'Unknown config.consistency.target {cc.target!r}:'
                             ' expected online or ema.')
  try:
    return losses.ConsistencyOptions(
        mode=mode, anneal_start=cc.anneal_start, anneal_end=cc.anneal_end,
        anneal_steps=cc.anneal_steps, xvar_frac=cc.xvar_frac,
        huber_delta=cc.huber_delta, norm=cc.norm, weighting=cc.weighting,
        guidance=cc.guidance, condition=run.condition,
        steps_weights=tuple(run.config.get('any_steps_weights', ())))
  except ValueError as e:
    raise errors.ConfigError(f'config.consistency: {e}') from None


def _diffusion_loss(run, network):
  config, logsnr, condition = run.config, run.logsnr_fn, run.condition
  # The default config's dropout trains a null label; unconditional data
  # has none to train, and diffusion_loss refuses dropout without one.
  dropout = config.loss.label_dropout if condition.conditional else 0.
  multiscale = int(config.loss.multiscale)
  if multiscale < 0 or (multiscale and not run.dataset.images) or (
      config.dataset.image_size % 2**multiscale):
    raise errors.ConfigError(
        f'config.loss.multiscale is {multiscale}: the number of 2x2-pooled '
        'levels of an image, 0 or more, each halving config.dataset.'
        f'image_size ({config.dataset.image_size}) exactly.')

  def loss_fn(params, train_state, teacher_params, batch, rng):
    del train_state, teacher_params
    return losses.diffusion_loss(
        network, params, batch['x'], condition.from_batch(batch), rng, logsnr,
        dropout, condition, multiscale), {}
  return loss_fn


def _consistency_loss(mode):
  def make(run, network):
    config, logsnr = run.config, run.logsnr_fn
    options = consistency_options(run, mode)
    ema_target = config.consistency.target == 'ema'

    # An any-S student learns every S of config.any_steps at once.
    steps = run.any_steps or config.student_steps

    def loss_fn(params, train_state, teacher_params, batch, rng):
      target = train_state.ema_params if ema_target else None
      return losses.consistency_loss(
          network, params, batch['x'], options.condition.from_batch(batch),
          rng, logsnr, steps, train_state.step, options, target,
          teacher=network, teacher_params=teacher_params)
    return loss_fn
  return make


def _progressive_loss(run, network):
  config, logsnr, condition = run.config, run.logsnr_fn, run.condition
  cc = config.consistency

  def loss_fn(params, train_state, teacher_params, batch, rng):
    del train_state
    return losses.progressive_distillation_loss(
        network, params, network, teacher_params, batch['x'],
        condition.from_batch(batch), rng, logsnr, config.student_steps,
        cc.xvar_frac, cc.guidance, condition), {}
  return loss_fn


def _guidance_distillation_loss(run, network):
  logsnr, condition = run.logsnr_fn, run.condition
  guidance = run.config.consistency.guidance
  if not guidance > 0:
    raise errors.ConfigError(
        "Stage 'gd' distils classifier-free guidance: set "
        'config.consistency.guidance above 0 (the paper: 0.5 and 3).')

  def loss_fn(params, train_state, teacher_params, batch, rng):
    del train_state
    return losses.guidance_distillation_loss(
        network, params, network, teacher_params, batch['x'],
        condition.from_batch(batch), rng, logsnr, guidance, condition), {}
  return loss_fn


def _steps_label(method):
  def label(config):
    any_steps = any_steps_of(config)
    if not any_steps:
      return f'{method}, S={config.student_steps}'
    return (f'{method}, any-S student, S={config.student_steps}' +
            ('' if config.student_steps in any_steps else ' (not trained)'))
  return label


STAGES = {s.name: s for s in (
    Stage('teacher', _diffusion_loss, distilled=False, sampling='config',
          label=lambda config: 'teacher'),
    Stage('cd', _consistency_loss('cd'), runs_teacher=True,
          label=_steps_label('multistep CD'), any_steps=True),
    Stage('ct', _consistency_loss('ct'), label=_steps_label('multistep CT'),
          any_steps=True),
    Stage('pd', _progressive_loss, runs_teacher=True, chains=True,
          label=_steps_label('progressive distillation')),
    Stage('gd', _guidance_distillation_loss, runs_teacher=True,
          sampling='diffusion',
          label=lambda config: ('guidance-distilled teacher, DDIM '
                                f'{config.sampler.steps}')),
)}
NAMES = tuple(STAGES)
ANY_STEPS = tuple(n for n, s in STAGES.items() if s.any_steps)


def get(name):
  if name not in STAGES:
    raise errors.ConfigError(f'Unknown stage {name!r}: expected one of '
                             f'{", ".join(NAMES)}.')
  return STAGES[name]
