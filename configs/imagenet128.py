"""Class-conditional UViT on ImageNet 128x128: teacher and students (paper settings).

  python -m multistep_cm.main --config=configs/imagenet128.py:small \
      --workdir=gs://BUCKET/in128_small_teacher

Needs tfds `imagenet2012` prepared under TFDS_DATA_DIR (images are centre
cropped to a square, then area-resized to 128). Derives from imagenet64.py and
adds the 128x128 level: `small` (~410M here, the paper's 397M), `large`
(~1.28B, the paper's 1.25B); the stage arguments are those of imagenet64.py.
Expected (paper Table 1): teachers FID 2.2 with 512 aDDIM steps; 8-step CD
students 2.1 (the paper guides the small model's teacher at a scale it does
not state: try `guidance=`).

Hardware, as the chips' compilers see it (`--mode=describe --target=...`,
docs/targets.md): at batch 2048 the small teacher fits a v5p-64 (64 images
per chip, 71.4 of 95.7 GiB). Elsewhere use more chips or a smaller
`--config.batch_size`: the largest per chip that fit (`--fit`) are 16 on
a v6e, 5 on a v5e, 40 on an H100 and 80 on an H200.
"""

from configs import imagenet64


def get_config(arg=None):
  arg = imagenet64.parse(arg)
  c = imagenet64.build(arg)
  c.dataset.name = 'imagenet128'
  c.dataset.image_size = 128
  c.schedule.image_size = 128
  c.schedule.noise_size_high = 128
  c.loss.multiscale = 1  # Simple diffusion's multiscale loss, one 2x2 level.
  if arg.smoke:
    c.model.levels = (('res', 8, 1, 0.),) + tuple(c.model.levels)
    return c
  if arg.size == 'small':
    # Plus 3 ResBlocks at 128 at the 128x128 level; dropout 0.1 in the middle.
    c.model.levels = (('res', 128, 3, 0.), ('res', 256, 3, 0.),
                      ('attn', 512, 3, 0.))
    c.model.mid_dropout = 0.1
    # The paper uses guidance for this model at a scale it does not state.
  else:
    # x2 channels, dropout 0.1 on all blocks but the 128x128 level.
    c.model.levels = (('res', 256, 3, 0.), ('res', 512, 3, 0.1),
                      ('attn', 1024, 3, 0.1))
  return c
