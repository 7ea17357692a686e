"""The shared base config and the config-argument parser.

Every experiment file derives from `base()` and changes what differs; the
argument after the colon in `--config=configs/X.py:ARG` selects variants.
"""

import ml_collections


def parse_arg(arg, choices=None, **defaults):
  """Parses 'a=1,b,large' into a ConfigDict over `defaults`.

  A bare word is True for a boolean key, or the value of the key whose
  `choices` list it is in (so 'large' means size=large). Anything else is an
  error, so a typo in a variant cannot pass silently.
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


# The embedded datasets' `stage=` argument: `pipeline` (the default) trains the
# teacher, then an S-step CD student; any other stage runs alone.
EMBEDDED_STAGES = {'stage': ('pipeline', 'teacher', 'cd', 'ct', 'pd')}


def parse_embedded_arg(arg):
  return parse_arg(arg, EMBEDDED_STAGES, stage='pipeline', steps=8,
                   smoke=False)


def set_embedded_stage(c, arg):
  c.stage = 'teacher' if arg.stage == 'pipeline' else arg.stage
  c.pipeline = ('teacher', 'cd') if arg.stage == 'pipeline' else ()
  c.student_steps = arg.steps


def base():
  """Defaults shared by every experiment; experiment files override them."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = 'digits'  # digits, toy2d, imagenet64, imagenet128, cifar10.
  c.dataset.image_size = 8  # Side of the (square) images; unused for toy2d.
  c.dataset.channels = 1  # Channels of an image, or dimensions of a point.
  c.dataset.num_classes = 10  # 0 for unconditional data.
  c.dataset.flip = False  # Random horizontal flips (tfds datasets only).
  c.dataset.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS dir.

  c.model = ml_collections.ConfigDict()  # See models.UViTConfig / MLPConfig.
  c.model.name = 'uvit'

  c.schedule = ml_collections.ConfigDict()  # See schedules.get_logsnr_fn.
  c.schedule.kind = 'cosine'
  c.schedule.image_size = 8
  c.schedule.noise_size = 8
  c.schedule.noise_size_low = 8
  c.schedule.noise_size_high = 8
  c.schedule.logsnr_min = -15.
  c.schedule.logsnr_max = 15.

  c.loss = ml_collections.ConfigDict()
  c.loss.label_dropout = 0.1  # Trains the null label for guidance.
  c.loss.multiscale = False  # Simple diffusion's multiscale loss (128x128).

  c.optim = ml_collections.ConfigDict()  # AdamW; spec A5 where unstated.
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 1000
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.
  c.optim.grad_clip = 1.
  c.optim.ema_decay = 0.9999

  # What to train: 'teacher' (diffusion), 'cd' / 'ct' (multistep consistency
  # distillation / training) or 'pd' (one progressive-distillation phase:
  # student_steps from a teacher sampled with twice as many).
  c.stage = 'teacher'
  c.student_steps = 8  # S, the student's sampling steps.
  # Students start from this teacher (a workdir, its checkpoints/ directory or
  # one step directory), for CD, CT and PD alike.
  c.teacher_checkpoint = ml_collections.config_dict.placeholder(str)
  c.teacher_params = 'ema_params'  # Or 'params': the online weights.

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

  # A student stage replaces the teacher's schedule with this one.
  c.student = ml_collections.ConfigDict()
  c.student.total_steps = 200_000
  c.student.lr = 1e-4
  c.student.warmup_steps = 1000
  c.student.eval_every = 10_000

  # Stages the main command runs in turn, each in WORKDIR/<stage> (students
  # distil the teacher trained there), followed by a comparison of the student
  # with the teacher's samplers. Empty: run config.stage alone in WORKDIR.
  c.pipeline = ()
  c.compare = ml_collections.ConfigDict()
  c.compare.teacher_steps = (8, 512)  # aDDIM and DDIM at each.

  c.batch_size = 128  # Global batch, split over all devices and hosts.
  c.total_steps = 1000

  c.mesh = ml_collections.ConfigDict()
  c.mesh.axes = ('data', 'fsdp')
  c.mesh.shape = (-1, 1)  # -1: the remaining devices.

  c.log_every = 100
  c.ckpt_every = 1000
  c.keep_checkpoints = 3
  c.eval_every = 1000

  c.eval = ml_collections.ConfigDict()
  c.eval.sampler = 'addim'  # ddim or addim (analytic variance).
  c.eval.steps = 128
  c.eval.guidance = 0.  # Classifier-free guidance w: (1 + w) cond - w uncond.
  c.eval.num_samples = 1800  # Samples for the metric, labels uniform.
  c.eval.batch_size = 600
  c.eval.grid_size = 100  # Samples in the PNG grid.

  # --mode=evaluate (and FID during training). Empty or negative fields take
  # the stage's own: S-step consistency sampling for a student, eval.sampler
  # at eval.steps for a teacher, eval.guidance.
  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.sampler = ''  # student, ddim or addim.
  c.evaluate.steps = 0
  c.evaluate.guidance = -1.
  c.evaluate.ema = True  # EMA weights, else the online ones.
  c.evaluate.num_samples = 50_000
  c.evaluate.chunk_size = 5_000  # The unit of resumption.
  c.evaluate.batch_size = 500  # Per sampling / Inception call, all devices.
  c.evaluate.seed = 0
  # Image datasets: the converted FID Inception weights (local or gs://; see
  # multistep_cm/convert_inception.py; $MULTISTEP_CM_INCEPTION if empty), the
  # SHA-256 they must have ('' = unchecked), and the reference: an ADM
  # reference batch (VIRTUAL_imagenet64_labeled.npz) or --mode=reference's.
  c.evaluate.inception_weights = ''
  c.evaluate.inception_sha256 = ''
  c.evaluate.reference = ''
  c.evaluate.precision_recall = True  # Needs the reference's arr_0 images.
  # FID during training at every eval_every, on this many samples, when the
  # weights and reference are set (0: off).
  c.evaluate.train_samples = 5_000
  return c
