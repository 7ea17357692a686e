"""Class-conditional UViT on ImageNet 64x64: teacher and students (paper settings).

  python -m multistep_cm.main --config=configs/imagenet64.py:small \
      --workdir=gs://BUCKET/in64_small_teacher
  python -m multistep_cm.main \
      --config=configs/imagenet64.py:small,cd,steps=8,teacher=gs://BUCKET/in64_small_teacher \
      --workdir=gs://BUCKET/in64_small_cd8

Needs tfds `imagenet_resized/64x64` prepared under TFDS_DATA_DIR. Arguments:
`small` (~405M parameters here, the paper's 394M) or `large` (~1.26B, the
paper's 1.23B); `teacher` (default), `cd`, `ct` or `pd`; `steps=S` for the
student (1, 2, 4, 8, 16); `any` (with `cd` or `ct`) for one any-S student of
S in {1, 2, 4, 8, 16}, sampled with `steps=S`; `guidance=w` for a guided CD/PD teacher (one student
per scale); `teacher=PATH` (a teacher workdir); `smoke` for a few CPU steps.
Expected (paper Table 1): teachers FID 1.5 (small) / 1.4 (large) with 512
aDDIM steps; 8-step CD students 1.6 / 1.4, CT 1.5 / 1.5. The teacher's own
training length is not in the paper, so its `total_steps` is our choice.

Hardware, as the chips' compilers see it (`--mode=describe --target=...`,
docs/targets.md): at batch 2048 the small teacher and CD student fit a
v5p-64 (64 images per chip; 54.8 and 55.6 of 95.7 GiB); the large CD
student does too (84.1 GiB), but the large teacher needs
`--config.model.remat=dots_saveable` there (96.3 GiB without, 40.1 with;
without it 56 images per chip fit).
Batch 2048 fits neither 64 v6e nor 64 v5e chips (32 per chip) nor an 8-GPU
node (256 per GPU): use more chips, or a smaller `--config.batch_size`.
The largest per chip that fit (`--fit`; small teacher, small CD, large
teacher, large CD): v6e 24, 24, 16, 16; v5e 8, 6, 8, 8; H100 48, 48, 24,
24; H200 96, 104, 56, 56.

An any-S student (`small,cd,any`; docs/any_steps.md) costs about what a
per-S one does: 5.2M more parameters (409.9M, +1.3 %), on a v5p-64 at batch
2048 a peak of 55.8 GiB per chip against 55.6, the same roofline bound (158
ms per step); on a CPU, at smoke width, 1.01 times the per-S step time
(benchmarks/any_steps.py).
"""

from multistep_cm.core import config as common

ARGS = {'size': ('small', 'large'), **common.STAGE_ARG}


def parse(arg):
  """The argument of this file and of imagenet128.py."""
  return common.parse_arg(arg, ARGS, size='small', stage='teacher', steps=8,
                          any=False, guidance=0., teacher='', smoke=False)


def get_config(arg=None):
  return build(parse(arg))


def build(arg):
  """The config of a parsed argument."""
  c = common.base()
  c.dataset.name = 'imagenet64'
  c.dataset.image_size = 64
  c.dataset.channels = 3
  c.dataset.num_classes = 1000
  c.dataset.flip = True

  # Interpolated cosine from noise resolution 32 to 64 (paper App. A.1).
  c.schedule.kind = 'interpolated_cosine'
  c.schedule.image_size = 64
  c.schedule.noise_size_low = 32
  c.schedule.noise_size_high = 64

  c.model.mlp_ratio = 4
  c.model.head_dim = 64
  c.model.emb_dim = 2048
  c.model.dtype = 'bfloat16'
  # Flash attention: cuDNN's on NVIDIA GPUs, splash on TPUs, XLA's on the
  # CPU; or xla / cudnn / splash.
  c.model.attention = 'auto'
  # The 16 middle blocks as one scan: compile time stops growing with depth.
  # Checkpoints of the unscanned layout load too (models.relayout).
  c.model.scan = True
  # Recompute in the backward pass (full, dots_saveable) to trade time for
  # memory, e.g. for a larger per-device batch.
  c.model.remat = 'none'
  # LayerNorm / GroupNorm statistics in float32 even under bf16 compute.
  c.model.norm_float32 = True
  if arg.size == 'small':
    # 3 ResBlocks at 256, 3 transformer blocks at 512, 16 at 1024; dropout
    # 0.2 in the middle.
    c.model.levels = (('res', 256, 3, 0.), ('attn', 512, 3, 0.))
    c.model.mid_channels = 1024
    c.model.mid_dropout = 0.2
  else:
    # All channels x2, dropout 0.1 on all transformer blocks.
    c.model.levels = (('res', 512, 3, 0.), ('attn', 1024, 3, 0.1))
    c.model.mid_channels = 2048
    c.model.mid_dropout = 0.1
    c.mesh.shape = (-1, 8)  # FSDP: 1.2B parameters + Adam do not fit replicated.
  c.model.mid_blocks = 16

  c.batch_size = 2048
  c.optim.warmup_steps = 1000
  c.optim.ema_decay = 0.9999
  c.loss.label_dropout = 0.1
  c.log_every = 100
  c.ckpt_every = 2000
  c.eval_every = 10_000
  c.sampler.kind = 'addim'
  c.sampler.steps = 512
  c.train_eval.num_samples = 64  # A grid; FID comes from --mode=evaluate.
  c.train_eval.batch_size = 64
  c.train_eval.grid_size = 64

  c.teacher_checkpoint = arg.teacher or None
  c.consistency.guidance = arg.guidance
  if common.set_stage(c, arg).distilled:
    # Students (spec section 7): 200k steps at batch 2048, N annealed 64 ->
    # 1280 over 100k, eta 0.75, delta 1e-4, initialised from the teacher's EMA.
    c.total_steps = 200_000
    c.optim.lr = 5e-5  # Not in the paper; spec A5 suggests 1e-4 to 2e-5.
  else:
    c.total_steps = 500_000  # Not in the paper (teacher length unstated).
    c.optim.lr = 1e-4

  if arg.smoke:
    common.smoke(c, batch_size=8, eval_samples=8, grid_size=8, steps=2)
  return c
