"""The toy2d Gaussian mixture (built in): teacher, then an 8-step CD student.

  python -m multistep_cm.main --config=configs/toy2d.py --workdir=/tmp/toy2d

A residual MLP teacher (WORKDIR/teacher, 3000 steps, about 1 minute on a
2-core CPU), a student distilled from it (WORKDIR/cd_s8), and a comparison of
the sliced Wasserstein distance to the true mixture and the mean true
log-density of their samples, next to the same numbers for true samples (the
floor). Arguments as in digits.py: `stage=teacher|cd|ct|pd`, `steps=S`,
`smoke`.
"""

import ml_collections

from multistep_cm.core import config as common


def get_config(arg=None):
  arg = common.parse_embedded_arg(arg)
  c = common.base()
  c.dataset.name = 'toy2d'
  c.dataset.channels = 2
  c.dataset.num_classes = 8
  c.model = ml_collections.ConfigDict(dict(
      name='mlp', width=256, num_blocks=4, emb_dim=128, dropout=0.,
      dtype='float32'))
  c.optim.warmup_steps = 100
  c.optim.ema_decay = 0.999
  c.batch_size = 512
  c.log_every = 250
  c.ckpt_every = 1000
  c.train_eval.num_samples = 2000
  c.train_eval.batch_size = 1000
  c.train_eval.grid_size = 2000  # All the points go in the scatter plot.
  c.evaluate.num_samples = 2000
  c.evaluate.chunk_size = 1000
  c.evaluate.batch_size = 1000
  c.consistency.anneal_steps = 1000

  if common.set_stage(c, arg).distilled:
    c.total_steps = 2000
    c.optim.lr = 2e-4
    c.eval_every = 2000
  else:
    c.total_steps = 3000
    c.optim.lr = 1e-3
    c.eval_every = 1500

  if arg.smoke:
    common.smoke(c, batch_size=64, eval_samples=256, grid_size=256)
  return c
