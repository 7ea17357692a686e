"""Captioned digits (built in): the text-to-image path on a CPU.

  python -m multistep_cm.main --config=configs/captioned_digits.py \
      --workdir=/tmp/captioned_digits

trains a caption-conditioned teacher (1800 steps), then for guidance 0.5 and
3 a guidance-distilled teacher (300 steps) and 4- and 8-step CD students (300
steps each), and writes the Table-6-shaped comparison WORKDIR/guided.md with
its grids (guided.png): 24 minutes on a 2-core CPU; at w = 3 the students
score FD-digits 38.3 / 38.5 against the guidance-distilled teacher's 41.2,
every sample of the digit its prompt names.

The digits network of configs/digits.py conditioned on captions instead of
class labels ("a thin seven", "the number 7, slanted";
multistep_cm/datasets/captioned_digits.py),
embedded by a small fixed token table (8 tokens of width 32 and a pooled
vector; nothing downloaded), with 10 % caption dropout for classifier-free
guidance. Students follow the paper's text-to-image settings: pseudo-Huber
delta 1 and a fixed 256 teacher steps (no annealing), distilled from the
teacher guided at `guidance=w` (one student per scale). Samples are scored
by FD-digits, by the digits classifier's agreement with the class each
prompt names, and by the agreement of each sample's measured thickness or
slant with the trait its prompt names. The guided table also has the
teacher's guided ancestral (DDPM) sampler, Table 6's teacher row.

Arguments: those of configs/digits.py (`stage=` including `gd`, `steps=S`,
`any`, `smoke`) and `guidance=w` (a single stage's guidance scale).
"""

from configs import digits
from multistep_cm.core import config as common
from multistep_cm.core import stages


def get_config(arg=None):
  arg = common.parse_arg(arg, {'stage': ('pipeline',) + stages.NAMES},
                         stage='pipeline', steps=8, any=False, guidance=0.,
                         smoke=False)
  c = digits.get_config(f'stage={arg.stage},steps={arg.steps}' +
                        (',smoke' if arg.smoke else '') +
                        (',any' if arg.any else ''))
  c.dataset.name = 'captioned_digits'
  c.dataset.num_classes = 0  # Conditioned on captions alone.
  c.dataset.text_len = 8
  c.dataset.text_dim = 32
  c.dataset.pooled_dim = 32
  c.loss.label_dropout = 0.1  # Caption dropout: trains the null caption.
  c.consistency.guidance = arg.guidance
  # Spec section 7, text-to-image: delta 1, N fixed at 256.
  c.consistency.huber_delta = 1.
  c.consistency.anneal_start = c.consistency.anneal_end = 256.
  # The teacher's own samples and the guidance-distilled teacher's DDIM: 256
  # steps, as Table 6's baselines.
  c.sampler.steps = 256
  c.sampler.guidance = arg.guidance
  # Sized so the pipeline (a teacher, two guidance-distilled teachers and
  # four students) runs in about 25 minutes on a 2-core CPU.
  if arg.smoke:
    pass  # configs/digits.py shrank it.
  elif arg.stage in ('teacher', 'pipeline'):
    c.total_steps = c.eval_every = 1800
  else:
    c.total_steps = c.eval_every = 300
  if arg.stage == 'pipeline':
    # Table 6 in small: per scale, a guidance-distilled teacher and 4- and
    # 8-step CD students, against the teacher's guided 256-step aDDIM.
    c.pipeline.stages = ('teacher',)
    c.pipeline.guidance = (0.5, 3.)
    c.pipeline.student_steps = (4, 8)
    c.pipeline.teacher_steps = (256,)
  if arg.smoke:
    c.sampler.steps = 4
    c.pipeline.teacher_steps = (4,)
  return c
