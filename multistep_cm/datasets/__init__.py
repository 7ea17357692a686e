"""The dataset table: every dataset is a row, a `base.Dataset` built from a
config, and nothing outside this package asks for a dataset by name.

  digits            scikit-learn's 8x8 digits, built in (digits.py)
  captioned_digits  the same images with captions, built in
                    (captioned_digits.py)
  toy2d             a 2-D Gaussian mixture, built in (toy2d.py)
  imagenet64, imagenet128, cifar10
                    tfds datasets read by index (tfds_images.py)
  captioned_images  your captioned images with precomputed embeddings
                    (captioned_images.py, on-disk format text_data.py)

To add a dataset: a `base.Dataset` subclass (its batches, condition,
evaluation labels and scorer), then `register(name, factory)`, here for a
built-in one; a config names it in `config.dataset.name`.
"""

import functools

from multistep_cm import errors
from multistep_cm.datasets import base
from multistep_cm.datasets import captioned_digits
from multistep_cm.datasets import captioned_images
from multistep_cm.datasets import digits
from multistep_cm.datasets import tfds_images
from multistep_cm.datasets import toy2d

DatasetNotPreparedError = errors.DatasetNotPreparedError

# name -> factory(config) -> base.Dataset.
TABLE = {
    'digits': digits.Digits,
    'captioned_digits': captioned_digits.CaptionedDigits,
    'toy2d': toy2d.Toy2d,
    'imagenet64': functools.partial(tfds_images.TfdsImages,
                                    tfds_name='imagenet_resized/64x64'),
    'imagenet128': functools.partial(tfds_images.TfdsImages,
                                     tfds_name='imagenet2012', crop=True),
    'cifar10': functools.partial(tfds_images.TfdsImages, tfds_name='cifar10'),
    'captioned_images': captioned_images.CaptionedImages,
}


def register(name, factory):
  """Adds (or replaces) the row `name`: `factory(config)` builds the
  dataset."""
  TABLE[name] = factory


def get(config):
  """The dataset of a config (ConfigError if its name is not in the
  table)."""
  name = config.dataset.name
  if name not in TABLE:
    raise errors.ConfigError(
        f'Unknown dataset {name!r}: expected one of {", ".join(TABLE)}.')
  return TABLE[name](config)


def check_available(config):
  """Fails fast, with one clear message, if the training data cannot be
  read."""
  get(config).check()


def train_batches(config, global_batch, seed, start_step=0, rows=None):
  """Iterator over this process's rows of the global training batches, from
  the batch of `start_step` on. `rows` (a slice) are the rows of the global
  batch that this process's devices hold (`sharding.process_rows`); default:
  the process's equal share in process order."""
  dataset = get(config)
  rows = base.process_rows(global_batch) if rows is None else rows
  return dataset.train_batches(global_batch, seed, start_step, rows)


def one_pass(config, split, global_batch):
  """This process's share of a split, once, in order (`base.one_pass`)."""
  return base.one_pass(get(config), split, global_batch)


def num_examples(config, split):
  """The size of a split."""
  return get(config).num_examples(split)
