"""The shared base config, the config-argument parser, and the configs of an
experiment's stages.

Every experiment file (configs/) derives from `base()` and changes what
differs; the argument after the colon in `--config=configs/X.py:ARG` selects
variants (`parse_arg`). A
config describes one stage: it sets that stage's own schedule (a student's
`total_steps`, `optim.lr`, `eval_every` are set where the student is
configured, never copied in at run time), so every `--config.X` override
does what it says. Commands that run several stages (the pipeline, the
sweep) build each stage's config with `StageConfigs`.
"""

import importlib.util

import ml_collections
from ml_collections import config_flags

from multistep_cm import networks
from multistep_cm.core import stages

# The `stage=` argument. The embedded datasets add `pipeline`, their default:
# the teacher, then an S-step CD student, then the comparison table.
STAGE_ARG = {'stage': stages.NAMES}
PIPELINE_STAGES = ('teacher', 'cd')


def parse_arg(arg, choices=None, **defaults):
  """Parses 'a=1,b,large' into a ConfigDict over `defaults`.

  A bare word is True for a boolean key, or the value of the key whose
  `choices` list it is in (so 'large' means size=large). Anything else is an
  error, so a typo in a variant cannot pass silently. A later item wins over
  an earlier one.
  """
  choices = choices or {}
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, eq, value = item.partition('=')
    owner = [k for k, vals in choices.items() if key in vals]
    if not eq and owner:
      key, value = owner[0], key
    elif key not in defaults:
      words = sorted(defaults) + sorted(v for vs in choices.values() for v in vs)
      raise ValueError(f'Unknown config argument {key!r}; expected one of '
                       f'{", ".join(words)}.')
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() not in ('0', 'false', 'no') if value else True
    else:
      out[key] = kind(value)
    if key in choices and out[key] not in choices[key]:
      raise ValueError(f'Unknown {key} {out[key]!r}; expected one of '
                       f'{", ".join(choices[key])}.')
  return out


def parse_embedded_arg(arg):
  """`stage=pipeline|teacher|cd|ct|pd`, `steps=S`, `any`, `smoke`."""
  return parse_arg(arg, {'stage': ('pipeline',) + stages.NAMES},
                   stage='pipeline', steps=8, any=False, smoke=False)


# The step counts an any-S student learns by default: the sweep's.
ANY_STEPS = (1, 2, 4, 8, 16)


def set_stage(c, arg):
  """Sets the stage the config describes (`pipeline`: its first stage, the
  teacher), the student's steps and, with the argument `any`, the step
  counts of one any-S student (a teacher, the pipeline's first stage,
  ignores it); returns the stage's row of the table."""
  c.stage = PIPELINE_STAGES[0] if arg.stage == 'pipeline' else arg.stage
  c.pipeline.stages = PIPELINE_STAGES if arg.stage == 'pipeline' else ()
  c.student_steps = arg.steps
  stage = stages.get(c.stage)
  if arg.get('any') and stage.distilled:
    if not stage.any_steps:
      raise ValueError(f'Config argument any: stage {stage.name!r} trains '
                       'no any-S student; any is for '
                       f'{", ".join(stages.ANY_STEPS)}.')
    c.any_steps = ANY_STEPS
  return stage


def smoke(c, *, batch_size, eval_samples, grid_size, steps=4):
  """Shrinks a config to run in seconds on a CPU: a tiny model, `steps`
  training steps (a student half as many), a few samples."""
  networks.get(c.model.name).smoke(c.model)
  c.model.dtype = 'float32'
  c.mesh.shape = (-1, 1)
  c.batch_size = batch_size
  c.total_steps = max(1, steps // 2) if stages.get(c.stage).distilled else steps
  c.log_every = c.ckpt_every = 2
  c.eval_every = c.total_steps
  c.sampler.steps = 4
  c.train_eval.num_samples = c.train_eval.batch_size = eval_samples
  c.train_eval.grid_size = grid_size
  c.consistency.anneal_steps = 2
  c.pipeline.teacher_steps = (2, 4)


def base():
  """Defaults shared by every experiment; experiment files override them."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = ''  # A row of the dataset table (multistep_cm/datasets).
  c.dataset.image_size = 8  # Side of the (square) images; unused for points.
  c.dataset.channels = 1  # Channels of an image, or dimensions of a point.
  c.dataset.num_classes = 10  # 0 for unconditional data.
  c.dataset.flip = False  # Random horizontal flips (tfds datasets only).
  c.dataset.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS dir.
  # Captioned images: tokens per caption, the width of their embeddings and
  # of the pooled vector (0: none); the directory of captioned images with
  # precomputed embeddings (multistep_cm/datasets/text_data.py).
  c.dataset.text_len = 0
  c.dataset.text_dim = 0
  c.dataset.pooled_dim = 0
  c.dataset.text_dir = ml_collections.config_dict.placeholder(str)

  # A row of the network table (multistep_cm/networks.py), and its fields.
  c.model = ml_collections.ConfigDict()
  c.model.name = networks.DEFAULT

  c.schedule = ml_collections.ConfigDict()  # See schedules.get_logsnr_fn.
  c.schedule.kind = 'cosine'
  c.schedule.image_size = 8
  c.schedule.noise_size = 8
  c.schedule.noise_size_low = 8
  c.schedule.noise_size_high = 8
  c.schedule.logsnr_min = -15.
  c.schedule.logsnr_max = 15.
  c.schedule.rho = 7.  # The karras schedule's only.

  c.loss = ml_collections.ConfigDict()
  c.loss.label_dropout = 0.1  # Trains the null label for guidance.
  # Levels of simple diffusion's multiscale loss: the v error also after 1,
  # 2, ... 2x2 average pools, all levels averaged (0: off).
  c.loss.multiscale = 0

  c.optim = ml_collections.ConfigDict()  # AdamW; spec A5 where unstated.
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 1000
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.
  c.optim.grad_clip = 1.
  c.optim.ema_decay = 0.9999

  # What to train (multistep_cm/core/stages.py): 'teacher' (diffusion), 'cd'
  # / 'ct' (multistep consistency distillation / training), 'pd' (one
  # progressive-distillation phase: student_steps from a teacher sampled with
  # twice as many) or 'gd' (guidance distillation).
  c.stage = 'teacher'
  c.student_steps = 8  # S, the student's sampling steps.
  # One any-S student (cd, ct) for all of these step counts instead of one
  # student per S: each example draws its S, with these weights (empty:
  # uniform), and the network is told its segment's boundary.
  # student_steps then says which S it samples with.
  c.any_steps = ()
  c.any_steps_weights = ()
  # Distilled stages start from this teacher (a workdir, its checkpoints/
  # directory or one step directory) when they train; sampling one needs
  # its own checkpoint only.
  c.teacher_checkpoint = ml_collections.config_dict.placeholder(str)
  c.teacher_params = 'ema_params'  # Or 'params': the online weights.
  # A teacher_checkpoint ending in .npz is converted weights
  # (tools/convert_adm.py), checked against this SHA-256 unless empty.
  c.teacher_sha256 = ''
  # Converted weights that sampling and evaluation use instead of the
  # workdir's checkpoint: an imported teacher, or a published student.
  c.imported_weights = ''

  c.consistency = ml_collections.ConfigDict()  # Spec section 3 and 8.
  c.consistency.anneal_start = 64.  # Teacher steps N, log-linear from ...
  c.consistency.anneal_end = 1280.  # ... to this ...
  c.consistency.anneal_steps = 100_000  # ... over this many iterations.
  c.consistency.xvar_frac = 0.75  # aDDIM's eta.
  c.consistency.huber_delta = 1e-4
  c.consistency.norm = 'rms'  # A1: rms, sum or elementwise.
  c.consistency.weighting = 'snr_plus_one'  # A2: snr_plus_one or v_space.
  c.consistency.target = 'online'  # A3: online (stop-grad theta) or ema.
  c.consistency.guidance = 0.  # Guidance of the teacher (CD, PD); A9.

  # The main command's stages, each trained in WORKDIR/<stage> (students
  # distil the teacher trained there), then the table comparing the student
  # with the teacher's aDDIM and DDIM samplers at `teacher_steps`. Empty:
  # train config.stage alone in WORKDIR.
  c.pipeline = ml_collections.ConfigDict()
  c.pipeline.stages = ()
  c.pipeline.teacher_steps = (8, 512)
  # Guidance scales (the paper's Table 6): if set, the pipeline trains the
  # teacher, then per scale w a guidance-distilled teacher (gd) and CD
  # students at each of `student_steps`, all from the teacher guided at w, and
  # compares them with the teacher's guided aDDIM at teacher_steps[-1]
  # (WORKDIR/guided.{md,png}).
  c.pipeline.guidance = ()
  c.pipeline.student_steps = (4, 8)
  # The stages trained per guidance scale: a stage sampled with S steps at
  # each of student_steps, others once.
  c.pipeline.guided_stages = ('gd', 'cd')

  c.batch_size = 128  # Global batch, split over all devices and hosts.
  c.total_steps = 1000

  c.mesh = ml_collections.ConfigDict()
  c.mesh.axes = ('data', 'fsdp')
  c.mesh.shape = (-1, 1)  # -1: the remaining devices.

  c.log_every = 100
  # (first, last): a jax profiler trace of training steps first to last, in
  # WORKDIR/profile (TensorBoard's profile plugin, or Perfetto, reads it);
  # () for none.
  c.profile_steps = ()
  c.ckpt_every = 1000
  c.keep_checkpoints = 3
  c.eval_every = 1000

  # How a teacher samples: in training-time evaluation, --mode=sample and by
  # default in --mode=evaluate. A distilled stage is never guided: a student
  # takes its S DDIM steps (Algorithm 2), gd its DDIM steps.
  c.sampler = ml_collections.ConfigDict()
  c.sampler.kind = 'addim'  # ddim, addim (analytic variance) or ddpm.
  c.sampler.steps = 128
  c.sampler.guidance = 0.  # Classifier-free w: (1 + w) cond - w uncond.

  # The quick evaluation: samples scored every eval_every steps of training,
  # and by the pipeline's table and the sweep.
  c.train_eval = ml_collections.ConfigDict()
  c.train_eval.num_samples = 1800  # Labels uniform over the classes.
  c.train_eval.batch_size = 600
  c.train_eval.grid_size = 100  # Samples in the PNG grid.

  # --mode=evaluate and --mode=sample (and FID during training). Empty or
  # negative fields take the stage's own: S-step consistency sampling for a
  # student, config.sampler for a teacher (stages.Stage.sampler).
  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.sampler = ''  # student, ddim, addim or ddpm.
  c.evaluate.steps = 0
  c.evaluate.guidance = -1.
  c.evaluate.ema = True  # EMA weights, else the online ones.
  c.evaluate.num_samples = 50_000
  c.evaluate.chunk_size = 5_000  # The unit of resumption.
  c.evaluate.batch_size = 500  # Per sampling / Inception call, all devices.
  c.evaluate.seed = 0
  # Image datasets: the converted FID Inception weights (local or gs://; see
  # multistep_cm/tools/convert_inception.py; $MULTISTEP_CM_INCEPTION if
  # empty), the SHA-256 they must have ('' = unchecked), and the reference:
  # an ADM reference batch (VIRTUAL_imagenet64_labeled.npz) or
  # --mode=reference's.
  c.evaluate.inception_weights = ''
  c.evaluate.inception_sha256 = ''
  c.evaluate.reference = ''
  c.evaluate.precision_recall = True  # Needs the reference's arr_0 images.
  # FD-DINOv2 beside FID whenever these converted DINOv2 ViT-L/14 weights are
  # set (tools/convert_dinov2.py; SHA-256 '' = unchecked); the reference
  # then needs DINOv2 statistics (--mode=reference's, EDM2's .pkl) or arr_0.
  c.evaluate.dinov2_weights = ''
  c.evaluate.dinov2_sha256 = ''
  # Text-to-image (your captioned images): the evaluation captions, a directory
  # written by multistep_cm.tools.write_text_data with the training encoder
  # (samples cycle through them; '' = the training captions), and the CLIP
  # score's converted weights (tools/convert_clip.py), their SHA-256
  # ('' = unchecked) and the same captions' CLIP tokens (convert_clip
  # --prompts); no CLIP score while clip_weights is ''.
  c.evaluate.prompts = ''
  c.evaluate.clip_weights = ''
  c.evaluate.clip_sha256 = ''
  c.evaluate.clip_tokens = ''
  # FID during training at every eval_every, on this many samples, when the
  # weights and reference are set (0: off).
  c.evaluate.train_samples = 5_000
  c.evaluate.train_dinov2 = False  # FD-DINOv2 too, when dinov2_weights is set.
  return c


class StageConfigs:
  """The configs of an experiment's stages, for commands that run several:
  the experiment file's `get_config` with `stage=NAME` (and `steps=S`) added
  to its argument, then the command line's `--config.*` overrides. Each stage
  runs exactly as its own single-stage command would. `base` is the config as
  given (overrides included)."""

  def __init__(self, get_config, arg='', overrides=None):
    self._get_config, self._arg = get_config, arg or ''
    self._overrides = dict(overrides or {})
    self.base = self._build(self._arg)

  @classmethod
  def from_flag(cls, flag):
    """From a `config_flags.DEFINE_config_file` flag (FLAGS['config'])."""
    path, _, arg = config_flags.get_config_filename(flag).partition(':')
    spec = importlib.util.spec_from_file_location('experiment_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return cls(module.get_config, arg, config_flags.get_override_values(flag))

  def _build(self, arg, changes=None):
    c = self._get_config(arg or None)
    c.update_from_flattened_dict({**self._overrides, **(changes or {})})
    c.lock()
    return c

  def __call__(self, stage, steps=None, changes=None):
    """The config of `stage`, with `steps` student steps when given;
    `changes` (flat 'a.b': value) are what the calling command sets, e.g. the
    pipeline's teacher_checkpoint."""
    items = [self._arg, f'stage={stage}'] + ([f'steps={steps}'] if steps
                                             else [])
    return self._build(','.join(filter(None, items)), changes)
