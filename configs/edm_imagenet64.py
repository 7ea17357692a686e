"""OpenAI's class-conditional ImageNet-64 EDM teacher (the ADM U-Net),
imported, and multistep students distilled from it.

  python -m multistep_cm.tools.convert_adm --openai=edm_imagenet64_ema.pt \
      --preset=openai_imagenet64 --out=edm_imagenet64.npz
  python -m multistep_cm.main --mode=evaluate \
      --config=configs/edm_imagenet64.py:teacher=edm_imagenet64.npz \
      --workdir=/tmp/edm64_teacher
  python -m multistep_cm.main \
      --config=configs/edm_imagenet64.py:cd,steps=4,teacher=edm_imagenet64.npz \
      --workdir=/tmp/edm64_cd_s4

Arguments: `teacher` (default), `cd`, `ct` or `pd`; `steps=S` (1, 2, 4, 8);
`any` (with `cd` or `ct`): one any-S student of S in {1, 2, 4, 8, 16};
`teacher=PATH.npz`, the converted teacher: students start from it and
distil it; the `teacher` stage samples and evaluates it; `student=PATH.npz`,
a converted OpenAI CD/CT student (e.g. openai/diffusers-cd_imagenet64_l2),
sampled and evaluated as S steps of its consistency-model form; `smoke` for
a few CPU steps at a tiny width.

The teacher is sampled as EDM samples it: sigma from 80 to 0.002, uniform
in sigma^(1/7) (the `karras` schedule), its input c_in x and time input
250 ln sigma (OpenAI's code). Students follow the paper where its settings
transfer (200k steps at batch 2048, N annealed 64 -> 1280 over 100k steps,
aDDIM teacher steps with eta 0.75, pseudo-Huber delta 1e-4, EMA 0.9999,
initialised from the teacher). Where they do not: the learning rate is
OpenAI's for CD on this teacher, 8e-6 (the paper's is unstated for its own
teachers); no dropout (OpenAI's CD/CT students use none; the teacher was
trained with 0.1); no horizontal flips (EDM trained this teacher without).

An any-S student (`cd,any`; docs/any_steps.md) adds 1.0M parameters
beside the U-Net (296.9M); on a v5p-64 at batch 2048 its step compiles to
the per-S student's peak, 18.98 GiB per chip, and roofline bound, 147 ms;
on a CPU, at smoke width, 0.99 times the per-S step time.
"""

import math

import ml_collections

from configs import imagenet64
from multistep_cm.core import config as common

SIGMA_MIN, SIGMA_MAX = 0.002, 80.  # EDM's sampling range.


def get_config(arg=None):
  arg = common.parse_arg(arg, common.STAGE_ARG, stage='teacher', steps=8,
                         any=False, teacher='', student='', smoke=False)
  c = imagenet64.build(imagenet64.parse(
      f'{arg.stage},steps={arg.steps}' + (',smoke' if arg.smoke else '') +
      (',any' if arg.any else '')))
  c.dataset.flip = False
  c.loss.label_dropout = 0.  # The network has no null class to train.

  c.schedule.kind = 'karras'
  c.schedule.logsnr_min = -2. * math.log(SIGMA_MAX)
  c.schedule.logsnr_max = -2. * math.log(SIGMA_MIN)
  c.schedule.rho = 7.

  # adm.ADMConfig's fields: OpenAI's ImageNet-64 models (what
  # tools/convert_adm.py writes with --preset=openai_imagenet64).
  c.model = ml_collections.ConfigDict(dict(
      name='adm', image_size=64, model_channels=192,
      channel_mult=(1, 2, 3, 4), num_res_blocks=3,
      attention_resolutions=(32, 16, 8), num_head_channels=64, num_heads=1,
      null_class=False, dropout=0., resblock_updown=True,
      use_scale_shift_norm=True, dtype='bfloat16', norm_float32=True,
      remat='none', attention='auto',
      preconditioning='edm', time_input='openai'))

  if arg.stage == 'teacher':
    c.imported_weights = arg.teacher
  else:
    c.teacher_checkpoint = arg.teacher or None
    c.optim.lr = 8e-6
  if arg.student:
    c.imported_weights = arg.student
    c.model.preconditioning = 'consistency'

  if arg.smoke:
    c.model.model_channels = 32
    c.model.channel_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = (32,)
    c.model.num_head_channels = 32
    c.model.dtype = 'float32'
  return c
