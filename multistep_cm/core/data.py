"""Input pipelines. Each process reads only its own share of the data and
yields numpy batches `{'x': float32, 'label': int32}` of the local batch size;
`sharding.global_batch` assembles the global array.

Built-in data (no download): `digits` (scikit-learn's 8x8 digits, 10 classes,
a fixed held-out split) and `toy2d`. Through tfds: `imagenet_resized/64x64`,
`imagenet2012` (for 128x128) and `cifar10`. Images are scaled to [-1, 1].
"""

import os

import numpy as np

from multistep_cm import toy2d
from multistep_cm.core import errors
from multistep_cm.core import images

# The held-out digits are a fixed random 20% of the 1797 images.
DIGITS_TEST_SIZE = 360
EMBEDDED = ('digits', 'toy2d')
TFDS_NAMES = {'imagenet64': 'imagenet_resized/64x64',
              'imagenet128': 'imagenet2012', 'cifar10': 'cifar10'}


class DatasetNotPreparedError(errors.UserError):
  """A tfds dataset that is not prepared where the run looks for it."""


def digits(split):
  """Digits as float32 images (n, 8, 8, 1) in [-1, 1] and int32 labels."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  perm = np.random.default_rng(0).permutation(len(d.target))
  idx = perm[:DIGITS_TEST_SIZE] if split == 'test' else perm[DIGITS_TEST_SIZE:]
  x = d.images[idx].astype(np.float32) / 16. * 2. - 1.
  return x[..., None], d.target[idx].astype(np.int32)


def _digits_batches(local_batch, seed, start_step, pidx, pcount):
  """Epochs over this process's share in a fresh permutation each; the batch
  of a step depends only on (seed, step), so a resumed run sees the same data."""
  x, y = digits('train')
  share = np.arange(pidx, len(y), pcount)
  step = start_step
  while True:
    pos = step * local_batch + np.arange(local_batch)
    epoch, offset = pos // len(share), pos % len(share)
    idx = np.empty(local_batch, np.int64)
    for e in np.unique(epoch):
      perm = np.random.default_rng([seed, int(e), pidx]).permutation(share)
      idx[epoch == e] = perm[offset[epoch == e]]
    yield {'x': x[idx], 'label': y[idx]}
    step += 1


def _toy2d_batches(local_batch, seed, start_step, pidx):
  step = start_step
  while True:
    x, y = toy2d.sample(np.random.default_rng([seed, step, pidx]), local_batch)
    yield {'x': x, 'label': y}
    step += 1


def _tfds_builder(name, data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    where = data_dir or os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets')
    hint = (' (ImageNet needs the ILSVRC2012 tars in the manual dir first)'
            if name == 'imagenet2012' else '')
    raise DatasetNotPreparedError(
        f'Dataset {name!r} is not prepared in {where}{hint}. Prepare it with '
        f'`tfds build {name} --data_dir={where}`, or point TFDS_DATA_DIR (or '
        'config.dataset.data_dir) at the directory that holds it.')
  return builder


def _preprocess(kind, image_size):
  """Returns a tf function from a tfds example to a float image in [-1, 1]."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def fn(ex):
    img = ex['image']
    if kind == 'imagenet128':
      # Centre square crop, then area resize: area averaging is the
      # anti-aliased downsampling used for ImageNet at low resolution.
      h, w = tf.shape(img)[0], tf.shape(img)[1]
      side = tf.minimum(h, w)
      img = tf.image.crop_to_bounding_box(img, (h - side) // 2, (w - side) // 2,
                                          side, side)
      img = tf.image.resize(img, (image_size, image_size), method='area')
    img = tf.cast(img, tf.float32) / 127.5 - 1.
    return img, tf.cast(ex['label'], tf.int32)
  return fn


def _tfds_batches(cfg, split, local_batch, seed, start_step):
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')  # TF must not take accelerator memory.
  builder = _tfds_builder(TFDS_NAMES[cfg.name], cfg.data_dir)
  # tf.data iterators cannot be checkpointed; a resumed run reseeds with its
  # start step so it does not replay the data it already saw.
  run_seed = seed + 1_000_003 * start_step + jax.process_index()
  split = tfds.split_for_jax_process(split, drop_remainder=True)
  ds = builder.as_dataset(split=split, shuffle_files=True,
                          read_config=tfds.ReadConfig(shuffle_seed=run_seed))
  ds = ds.map(_preprocess(cfg.name, cfg.image_size), tf.data.AUTOTUNE)
  ds = ds.repeat().shuffle(10_000, seed=run_seed)
  if cfg.flip:
    ds = ds.enumerate().map(
        lambda i, ex: (tf.image.stateless_random_flip_left_right(
            ex[0], tf.stack([tf.cast(run_seed, tf.int64), i])), ex[1]),
        tf.data.AUTOTUNE)
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  for x, y in tfds.as_numpy(ds):
    yield {'x': x, 'label': y}


def check_available(cfg):
  """Fails fast, with one clear message, if a tfds dataset is not prepared."""
  if cfg.name not in EMBEDDED + tuple(TFDS_NAMES):
    raise errors.ConfigError(
        f'Unknown dataset {cfg.name!r}: expected one of '
        f'{", ".join(EMBEDDED + tuple(TFDS_NAMES))}.')
  if cfg.name in TFDS_NAMES:
    _tfds_builder(TFDS_NAMES[cfg.name], cfg.data_dir)


def train_batches(cfg, global_batch, seed, start_step=0):
  """Iterator over this process's share of the training batches."""
  import jax  # pylint: disable=g-import-not-at-top
  pidx, pcount = jax.process_index(), jax.process_count()
  if global_batch % pcount:
    raise ValueError(f'batch_size {global_batch} is not divisible by the '
                     f'{pcount} processes.')
  local_batch = global_batch // pcount
  check_available(cfg)
  if cfg.name == 'digits':
    return _digits_batches(local_batch, seed, start_step, pidx, pcount)
  if cfg.name == 'toy2d':
    return _toy2d_batches(local_batch, seed, start_step, pidx)
  return _tfds_batches(cfg, 'train', local_batch, seed, start_step)


def one_pass(cfg, split, global_batch):
  """This process's share of a split, once, in order: batches of
  (uint8 images, labels, mask) of the local batch size, the last one padded
  (mask False). Every process yields the same number of batches, as the
  sharded computations they feed require."""
  import jax  # pylint: disable=g-import-not-at-top
  pidx, pcount = jax.process_index(), jax.process_count()
  local_batch = global_batch // pcount
  check_available(cfg)
  if cfg.name == 'toy2d':
    raise ValueError('toy2d has points, not images.')
  if cfg.name == 'digits':
    x, y = digits(split)
    n = len(y) // pcount  # The same count on every process.
    x, y = x[pidx::pcount][:n], y[pidx::pcount][:n]
    batches = ((x[i:i + local_batch], y[i:i + local_batch])
               for i in range(0, n, local_batch))
  else:
    batches = _tfds_pass(cfg, split, local_batch)
  for bx, by in batches:
    pad = local_batch - len(by)
    yield (np.pad(images.to_uint8(bx), ((0, pad),) + ((0, 0),) * 3),
           np.pad(by, (0, pad)), np.arange(local_batch) < len(by))


def num_examples(cfg, split):
  """The size of a split, or None where the dataset's metadata lacks it."""
  if cfg.name == 'digits':
    return len(digits(split)[1])
  try:
    return _tfds_builder(TFDS_NAMES[cfg.name], cfg.data_dir).info.splits[
        split].num_examples
  except KeyError:
    return None


def _tfds_pass(cfg, split, local_batch):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  builder = _tfds_builder(TFDS_NAMES[cfg.name], cfg.data_dir)
  # drop_remainder gives every process the same count; it drops fewer
  # examples than there are processes.
  ds = builder.as_dataset(split=tfds.split_for_jax_process(
      split, drop_remainder=True), shuffle_files=False)
  ds = ds.map(_preprocess(cfg.name, cfg.image_size), tf.data.AUTOTUNE)
  ds = ds.batch(local_batch).prefetch(tf.data.AUTOTUNE)
  yield from tfds.as_numpy(ds)
