"""The 2-D Gaussian mixture (built in): points, not images, with the
mixture's component as class label; scored by distances to the true
mixture."""

import itertools

import numpy as np

from multistep_cm import toy2d
from multistep_cm.datasets import base


class Toy2d(base.Dataset):
  scorer = 'gaussian_mixture'
  images = False

  @property
  def shape(self):
    return (self.cfg.channels,)

  def train_batches(self, global_batch, seed, start_step, rows):
    # Every process draws the whole global batch (a few kB) and keeps its
    # rows.
    for step in itertools.count(start_step):
      x, y = toy2d.sample(np.random.default_rng([seed, step, 0]),
                          global_batch)
      yield {'x': x[rows], 'cond': y[rows]}

  def num_examples(self, split):
    del split
    raise ValueError('toy2d draws fresh points: it has no fixed split.')
