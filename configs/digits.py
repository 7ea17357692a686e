"""Scikit-learn's 8x8 digits (built in): the paper's story in minutes.

  python -m multistep_cm.main --config=configs/digits.py --workdir=/tmp/digits

trains the class-conditional diffusion teacher (WORKDIR/teacher; 4000 steps,
about 10 minutes on a 2-core CPU; FD-digits 2.53–2.54 with 128 aDDIM steps), distils
an 8-step student from it with multistep consistency distillation
(WORKDIR/cd_s8), then prints FD-digits, class accuracy and network evaluations
for the student and the teacher's aDDIM and DDIM samplers at 8 and 512 steps
(WORKDIR/comparison.md, side-by-side grids in WORKDIR/comparison.png). Real
held-out digits score FD-digits 4.51 and 98.1% accuracy.

Arguments: `stage=teacher|cd|ct|pd` runs that stage alone in WORKDIR (a
student needs --config.teacher_checkpoint), `steps=S` sets the student's
steps, `any` trains one any-S student for S in {1, 2, 4, 8, 16} instead
(WORKDIR/cd_any; `steps=S` then picks the S it samples with), `smoke`
shrinks everything to run in seconds.
"""

from multistep_cm.core import config as common


def get_config(arg=None):
  arg = common.parse_embedded_arg(arg)
  c = common.base()
  c.dataset.name = 'digits'
  # Sized for a 2-core CPU: ~0.14 s per step at batch 128.
  c.model.levels = (('res', 32, 1, 0.), ('attn', 96, 1, 0.1))
  c.model.mid_channels = 128
  c.model.mid_blocks = 2
  c.model.mid_dropout = 0.1
  c.model.mlp_ratio = 4
  c.model.head_dim = 32
  c.model.emb_dim = 256
  c.model.dtype = 'float32'  # bf16 brings no speed on CPU.
  c.model.attention = 'auto'  # auto, xla or cudnn (models.ATTENTION).
  # Two middle blocks compile fast unscanned; checkpoints keep this layout.
  c.model.scan = False
  c.model.remat = 'none'  # none, full or dots_saveable (models.REMAT).
  c.model.norm_float32 = True  # Norm statistics in float32 (all float32 here).

  c.optim.ema_decay = 0.999
  c.batch_size = 128
  c.log_every = 200
  c.ckpt_every = 500
  c.train_eval.num_samples = 1080  # Three chunks of the held-out size (360).
  c.train_eval.batch_size = 540
  # --mode=evaluate: three chunks of the held-out size, as FD-digits averages.
  c.evaluate.num_samples = 1080
  c.evaluate.chunk_size = 360
  c.evaluate.batch_size = 360
  c.consistency.anneal_steps = 750  # 64 -> 1280 over half the run (A14).

  if common.set_stage(c, arg).distilled:
    # Fine-tuning from the teacher: a lower, constant rate (spec A5).
    c.total_steps = 1500
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 100
    c.eval_every = 1500
  else:
    c.total_steps = 4000
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 200
    c.eval_every = 2000

  if arg.smoke:
    common.smoke(c, batch_size=16, eval_samples=360, grid_size=20)
  return c
