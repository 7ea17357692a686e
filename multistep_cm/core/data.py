"""Input pipelines. Each process reads only its own share of the data and
yields numpy batches `{'x': float32, 'label': int32}` of the local batch size;
`sharding.global_batch` assembles the global array.

Built-in data (no download): `digits` (scikit-learn's 8x8 digits, 10 classes,
a fixed held-out split), `captioned_digits` (the same images with captions,
core/captioned_digits.py) and `toy2d`. Through tfds: `imagenet_resized/64x64`,
`imagenet2012` (for 128x128) and `cifar10`. `text`: images with precomputed
caption embeddings in `dataset.text_dir` (core/text_data.py). Images are
scaled to [-1, 1]. Text batches add 'text', 'text_mask' and, if the data has
it, 'pooled'.
"""

import concurrent.futures
import functools
import itertools

import numpy as np

from multistep_cm import toy2d
from multistep_cm.core import errors
from multistep_cm.core import images

# The held-out digits are a fixed random 20% of the 1797 images.
DIGITS_TEST_SIZE = 360
EMBEDDED = ('digits', 'captioned_digits', 'toy2d')
TEXT = ('captioned_digits', 'text')  # Datasets of captioned images.
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


@functools.lru_cache(maxsize=2)
def _epoch_order(n, seed, epoch):
  # The trailing 0 (once the process index) keeps the data order of runs
  # made before the order stopped depending on the topology.
  return np.random.default_rng([seed, epoch, 0]).permutation(n)


def step_indices(n, global_batch, seed, step, rows):
  """Which of `n` examples fill rows `rows` (a slice) of the global batch of
  `step`: epochs over all examples, each in a fresh permutation. A pure
  function of (seed, step), so the global batch is the same whatever the
  number of processes and devices, and a resumed run continues the order."""
  pos = step * global_batch + np.arange(rows.start, rows.stop)
  epoch, offset = np.divmod(pos, n)
  idx = np.empty(len(pos), np.int64)
  for e in np.unique(epoch):
    idx[epoch == e] = _epoch_order(n, seed, int(e))[offset[epoch == e]]
  return idx


def _indexed_batches(arrays, global_batch, rows, seed, start_step):
  """Batches of in-memory arrays (a dict, a row per example), in the order
  of `step_indices`."""
  n = len(next(iter(arrays.values())))
  for step in itertools.count(start_step):
    idx = step_indices(n, global_batch, seed, step, rows)
    yield {k: v[idx] for k, v in arrays.items()}


def _digits_batches(global_batch, rows, seed, start_step):
  x, y = digits('train')
  return _indexed_batches({'x': x, 'label': y}, global_batch, rows, seed,
                          start_step)


def _captioned_digits_batches(global_batch, rows, seed, start_step):
  from multistep_cm.core import captioned_digits  # pylint: disable=g-import-not-at-top
  x, y, texts, _ = captioned_digits.captions('train')
  text, mask, pooled = captioned_digits.DigitsTextEncoder()(texts)
  return _indexed_batches({'x': x, 'label': y, 'text': text,
                           'text_mask': mask, 'pooled': pooled},
                          global_batch, rows, seed, start_step)


def _text_expected(cfg):
  """What a `text` dataset must hold for `cfg`: text_data's expectations."""
  if not cfg.get('text_dir'):
    raise errors.ConfigError("Dataset 'text' reads config.dataset.text_dir: "
                             'set it to a directory written by '
                             'multistep_cm.tools.write_text_data.')
  return dict(image_size=cfg.image_size, channels=cfg.channels,
              text_len=cfg.text_len, text_dim=cfg.text_dim,
              pooled_dim=cfg.pooled_dim)


def _text_dataset(cfg):
  """The `text` dataset of `cfg`, checked against the config's sizes."""
  from multistep_cm.core import text_data  # pylint: disable=g-import-not-at-top
  return text_data.open_dataset(cfg.text_dir, **_text_expected(cfg))


def _text_batches(cfg, global_batch, rows, seed, start_step):
  from multistep_cm.core import text_data  # pylint: disable=g-import-not-at-top
  # Opens and checks the dataset before the first batch is asked for.
  return _prefetched(text_data.train_batches(
      cfg.text_dir, global_batch, seed, start_step, rows,
      **_text_expected(cfg)))


def _toy2d_batches(global_batch, rows, seed, start_step):
  # Every process draws the whole global batch (a few kB) and keeps its rows.
  for step in itertools.count(start_step):
    x, y = toy2d.sample(np.random.default_rng([seed, step, 0]), global_batch)
    yield {'x': x[rows], 'label': y[rows]}


def _tfds_source(cfg, split):
  from multistep_cm.core import tfds_source  # pylint: disable=g-import-not-at-top
  return tfds_source.open_source(TFDS_NAMES[cfg.name], split, cfg.data_dir)


def _prefetched(batches):
  """Reads and decodes the next batch on the host while the devices train on
  this one."""
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    ahead = pool.submit(next, batches)
    while True:
      batch = ahead.result()
      ahead = pool.submit(next, batches)
      yield batch


def _tfds_batches(cfg, split, global_batch, rows, seed, start_step):
  """Random access into the array_record files: each process reads only its
  rows, in the order of `step_indices`, with flips drawn per global row."""
  from multistep_cm.core import tfds_source  # pylint: disable=g-import-not-at-top
  source = _tfds_source(cfg, split)

  def batches():
    for step in itertools.count(start_step):
      idx = step_indices(len(source), global_batch, seed, step, rows)
      flips = ([(seed, step, r) for r in range(rows.start, rows.stop)]
               if cfg.flip else None)
      x, y = tfds_source.load_rows(source, idx, cfg.name, cfg.image_size,
                                   flips)
      yield {'x': x, 'label': y}
  return _prefetched(batches())


def check_known(cfg):
  names = EMBEDDED + tuple(TFDS_NAMES) + ('text',)
  if cfg.name not in names:
    raise errors.ConfigError(
        f'Unknown dataset {cfg.name!r}: expected one of {", ".join(names)}.')


def check_available(cfg):
  """Fails fast, with one clear message, if a tfds dataset is not prepared."""
  check_known(cfg)
  if cfg.name in TFDS_NAMES:
    _tfds_source(cfg, 'train')
  if cfg.name == 'text':
    _text_dataset(cfg)


def train_batches(cfg, global_batch, seed, start_step=0, rows=None):
  """Iterator over this process's rows of the global training batches, from
  the batch of `start_step` on. `rows` (a slice) are the rows of the global
  batch that this process's devices hold (`sharding.process_rows`); default:
  the process's equal share in process order."""
  import jax  # pylint: disable=g-import-not-at-top
  if rows is None:
    pidx, pcount = jax.process_index(), jax.process_count()
    if global_batch % pcount:
      raise errors.ConfigError(f'batch_size {global_batch} is not divisible '
                               f'by the {pcount} processes.')
    local = global_batch // pcount
    rows = slice(pidx * local, (pidx + 1) * local)
  check_known(cfg)  # A tfds source checks itself as it opens.
  if cfg.name == 'digits':
    return _digits_batches(global_batch, rows, seed, start_step)
  if cfg.name == 'captioned_digits':
    return _captioned_digits_batches(global_batch, rows, seed, start_step)
  if cfg.name == 'text':
    return _text_batches(cfg, global_batch, rows, seed, start_step)
  if cfg.name == 'toy2d':
    return _toy2d_batches(global_batch, rows, seed, start_step)
  return _tfds_batches(cfg, 'train', global_batch, rows, seed, start_step)


def one_pass(cfg, split, global_batch):
  """This process's share of a split, once, in order: batches of
  (uint8 images, labels, mask) of the local batch size, the last one padded
  (mask False). Every process yields the same number of batches, as the
  sharded computations they feed require."""
  import jax  # pylint: disable=g-import-not-at-top
  pidx, pcount = jax.process_index(), jax.process_count()
  local_batch = global_batch // pcount
  check_known(cfg)  # A tfds source checks itself as it opens.
  if cfg.name == 'toy2d':
    raise ValueError('toy2d has points, not images.')
  if cfg.name in ('digits', 'captioned_digits'):
    x, y = digits(split)
    n = len(y) // pcount  # The same count on every process.
    x, y = x[pidx::pcount][:n], y[pidx::pcount][:n]
    batches = ((x[i:i + local_batch], y[i:i + local_batch])
               for i in range(0, n, local_batch))
  elif cfg.name == 'text':  # One directory: its examples are the split.
    ds = _text_dataset(cfg)
    idx = np.arange(len(ds) // pcount) * pcount + pidx
    batches = ((r['x'], r['label']) for r in (
        ds.rows(idx[i:i + local_batch]) for i in range(0, len(idx),
                                                          local_batch)))
  else:
    batches = _tfds_pass(cfg, split, local_batch)
  for bx, by in batches:
    pad = local_batch - len(by)
    yield (np.pad(images.to_uint8(bx), ((0, pad),) + ((0, 0),) * 3),
           np.pad(by, (0, pad)), np.arange(local_batch) < len(by))


def num_examples(cfg, split):
  """The size of a split."""
  if cfg.name in ('digits', 'captioned_digits'):
    return len(digits(split)[1])
  if cfg.name == 'text':
    return len(_text_dataset(cfg))
  return len(_tfds_source(cfg, split))


def _tfds_pass(cfg, split, local_batch):
  """This process's examples i * process_count + process_index, the same
  count on every process (it drops fewer examples than there are
  processes)."""
  import jax  # pylint: disable=g-import-not-at-top
  from multistep_cm.core import tfds_source  # pylint: disable=g-import-not-at-top
  source = _tfds_source(cfg, split)
  pcount = jax.process_count()
  idx = np.arange(len(source) // pcount) * pcount + jax.process_index()
  for i in range(0, len(idx), local_batch):
    yield tfds_source.load_rows(source, idx[i:i + local_batch], cfg.name,
                                cfg.image_size)
