"""scikit-learn's 8x8 digits (built in, no download): 10 classes, a fixed
held-out split of 360 images, scored by the digits classifier."""

import functools

import numpy as np

from multistep_cm.datasets import base

# The held-out digits are a fixed random 20% of the 1797 images.
TEST_SIZE = 360


@functools.lru_cache(maxsize=2)
def _load(split):
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  perm = np.random.default_rng(0).permutation(len(d.target))
  idx = perm[:TEST_SIZE] if split == 'test' else perm[TEST_SIZE:]
  x = d.images[idx].astype(np.float32) / 16. * 2. - 1.
  return x[..., None], d.target[idx].astype(np.int32)


def load(split):
  """Digits as float32 images (n, 8, 8, 1) in [-1, 1] and int32 labels."""
  x, y = _load(split)
  return x.copy(), y.copy()


class Digits(base.Dataset):
  """Class-conditional 8x8 digits."""
  scorer = 'digits_classifier'

  def train_batches(self, global_batch, seed, start_step, rows):
    x, y = load('train')
    return base.indexed_batches({'x': x, 'cond': y}, global_batch, rows, seed,
                                start_step)

  def split_batches(self, split, process_index, process_count, local_batch):
    return base.strided_batches(load(split), process_index, process_count,
                                local_batch)

  def num_examples(self, split):
    return len(load(split)[1])
