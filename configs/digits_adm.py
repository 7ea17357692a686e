"""The digits quickstart with a small ADM U-Net (multistep_cm/adm.py) in
place of the UViT: the network of the imported ImageNet teacher, trained
here as a teacher in EDM's form and distilled.

  python -m multistep_cm.main --config=configs/digits_adm.py --workdir=/tmp/digits_adm

Arguments as configs/digits.py. The network sees EDM's time input ln(sigma)/4
and preconditioning (sigma_data 0.5), has a null class for guidance, and
otherwise keeps the digits schedule, optimiser and lengths, so its table
compares with the UViT's.
"""

import ml_collections

from configs import digits
from multistep_cm.core import config as common


def get_config(arg=None):
  c = digits.get_config(arg)
  smoke = common.parse_embedded_arg(arg).smoke
  # 0.83M parameters (the digits UViT has 1.34M): 32 and 64 channels at 8x8
  # and 4x4, one block per level, attention at 4x4.
  c.model = ml_collections.ConfigDict(dict(
      name='adm', image_size=8, model_channels=32, channel_mult=(1, 2),
      num_res_blocks=1, attention_resolutions=(4,), num_head_channels=32,
      num_heads=1, null_class=True, dropout=0. if smoke else 0.1,
      resblock_updown=True,
      use_scale_shift_norm=True, dtype='float32', norm_float32=True,
      remat='none', attention='auto', preconditioning='edm',
      time_input='edm'))
  return c
