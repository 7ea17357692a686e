"""Text-to-image at the paper's sizes (its Table 6): a 512x512 pixel-space
UViT conditioned on precomputed caption embeddings, and its guided
multistep CD students.

  python -m multistep_cm.tools.write_text_data --folder=IMAGES \
      --encoder=my_encoders:t5_xxl --image_size=512 --text_len=128 \
      --out=/data/t2i_train
  python -m multistep_cm.main \
      --config=configs/text2image.py:data=/data/t2i_train \
      --workdir=gs://BUCKET/t2i_teacher
  python -m multistep_cm.main \
      --config=configs/text2image.py:cd,steps=8,guidance=3,data=/data/t2i_train,teacher=gs://BUCKET/t2i_teacher \
      --workdir=gs://BUCKET/t2i_cd8_w3
  python -m multistep_cm.main \
      --config=configs/text2image.py:gd,guidance=3,data=/data/t2i_train,teacher=gs://BUCKET/t2i_teacher \
      --workdir=gs://BUCKET/t2i_gd_w3

The network (spec section 7): 3 ResBlocks at each of 128, 256 and 1024
channels (at 512, 256 and 128 pixels), 3 transformer blocks at 2048 (64x64
tokens), 16 middle transformer blocks at 4096 (32x32) with dropout 0.1; the
up path mirrors the down path. Every transformer block cross-attends to the
caption. The paper does not name its text encoder: the defaults are the
widths of T5-XXL's encoder (128 tokens of 4096, no pooled vector);
`text_len=`, `text_dim=` and `pooled_dim=` set others. Interpolated cosine
schedule from noise resolution 32 to 512 with the multiscale loss down to
32x32; students
at the paper's settings: pseudo-Huber delta 1, a fixed 256 teacher steps,
30k steps at batch 2048, one per guidance scale (0.5 and 3 in Table 6).

Memory (docs/targets.md): compiled for one 8-GPU node (`fsdp=8`, XLA's
attention) the step holds about 14 GiB of activations per image per GPU
even with its `dots_saveable` remat, and the largest batch is 2 per H100
and 5 per H200. libtpu refuses 32-64 per chip on v5p-64, v6e-64 and
v5litepod-64; with splash attention a v5p chip holds 8 (70.7 of 95.7 GiB),
a v6e chip 2 and a v5e chip 1. The paper's batch of 2048 would take 1024
H100s, 410 H200s, 256 v5p chips (v5p-512), 1024 v6e chips (4xv6e-256) or
2048 v5e chips (8xv5litepod-256) at those batches. On fewer chips, lower
`--config.batch_size`.

Arguments: `teacher` (default), `cd`, `ct`, `pd` or `gd` (the guidance-
distilled teacher), `steps=S`, `guidance=w`, `data=DIR` (a directory written
by multistep_cm.tools.write_text_data), `teacher=PATH`, `fsdp=N` (the
devices each weight is sharded over, default 16; 8 on one 8-GPU node),
`smoke`.
"""

from multistep_cm.core import config as common

ARGS = {**common.STAGE_ARG}


def get_config(arg=None):
  arg = common.parse_arg(arg, ARGS, stage='teacher', steps=8, guidance=0.,
                         data='', teacher='', text_len=128, text_dim=4096,
                         pooled_dim=0, fsdp=16, smoke=False)
  c = common.base()
  c.dataset.name = 'captioned_images'
  c.dataset.text_dir = arg.data or None
  c.dataset.image_size = 512
  c.dataset.channels = 3
  c.dataset.num_classes = 0
  c.dataset.text_len = arg.text_len
  c.dataset.text_dim = arg.text_dim
  c.dataset.pooled_dim = arg.pooled_dim

  c.schedule.kind = 'interpolated_cosine'
  c.schedule.image_size = 512
  c.schedule.noise_size_low = 32
  c.schedule.noise_size_high = 512
  # Simple diffusion's multiscale loss (Hoogeboom, Heek, Salimans 2023,
  # arXiv 2301.11093, section 3) evaluates the loss at every resolution from
  # 32x32 up to the image's: at 512 px that is 4 levels of 2x2 pooling
  # (256, 128, 64, 32) beside the full one. Here the levels' per-pixel mean
  # errors are averaged with equal weights, as the single-level ImageNet-128
  # setting does; simple diffusion weights its levels by resolution, a
  # choice the paper under reproduction does not state.
  c.loss.multiscale = 4
  c.loss.label_dropout = 0.1  # Caption dropout, for classifier-free guidance.

  c.model.levels = (('res', 128, 3, 0.), ('res', 256, 3, 0.),
                    ('res', 1024, 3, 0.), ('attn', 2048, 3, 0.))
  c.model.mid_channels = 4096
  c.model.mid_blocks = 16
  c.model.mid_dropout = 0.1
  c.model.mlp_ratio = 4
  c.model.head_dim = 128
  c.model.emb_dim = 4096
  c.model.dtype = 'bfloat16'
  c.model.attention = 'auto'
  c.model.scan = True
  c.model.remat = 'dots_saveable'  # Activations at 512x512 dominate memory.
  c.model.norm_float32 = True
  c.mesh.shape = (-1, arg.fsdp)  # FSDP: weights and Adam do not fit a chip.

  c.batch_size = 2048
  c.optim.warmup_steps = 1000
  c.optim.ema_decay = 0.9999
  c.log_every = 100
  c.ckpt_every = 1000
  c.eval_every = 5000
  c.sampler.kind = 'addim'
  c.sampler.steps = 256
  c.sampler.guidance = arg.guidance
  c.train_eval.num_samples = 16  # A grid; FID and CLIP from --mode=evaluate.
  c.train_eval.batch_size = 16
  c.train_eval.grid_size = 16

  c.teacher_checkpoint = arg.teacher or None
  c.consistency.guidance = arg.guidance
  c.consistency.huber_delta = 1.
  c.consistency.anneal_start = c.consistency.anneal_end = 256.
  if common.set_stage(c, arg).distilled:
    c.total_steps = 30_000
    c.optim.lr = 5e-5  # Not in the paper (spec A5).
  else:
    c.total_steps = 500_000  # Not in the paper.
    c.optim.lr = 1e-4

  if arg.smoke:
    c.dataset.image_size = c.schedule.image_size = 16
    c.schedule.noise_size_low, c.schedule.noise_size_high = 8, 16
    c.model.levels = (('res', 16, 1, 0.), ('attn', 32, 1, 0.))
    c.model.remat = 'none'
    c.loss.multiscale = 1  # 16 px: one level.
    common.smoke(c, batch_size=8, eval_samples=8, grid_size=8, steps=2)
  return c
