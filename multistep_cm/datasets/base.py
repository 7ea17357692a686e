"""What every dataset is: the interface of a row of the dataset table, and
the pieces its rows share (the data order, in-memory batches, prefetching,
the padded reference pass).

A dataset yields training batches `{'x': float32, 'cond': its condition}`
(`conditioning.KEY`) of this process's rows of each step's global batch; the
examples of step k are a pure function of (seed, k), so the global batch is
the same whatever the number of processes and devices, and a resumed run
continues the order. Images are scaled to [-1, 1].
"""

import concurrent.futures
import functools
import itertools

import jax
import numpy as np

from multistep_cm import conditioning
from multistep_cm import errors
from multistep_cm.core import images


DatasetNotPreparedError = errors.DatasetNotPreparedError


class Dataset:
  """One row of the dataset table, built from a whole config (its
  `config.dataset` section, and `config.evaluate` for what evaluation reads).

  Subclasses set `scorer` (a row of `evaluation.scoring.SCORERS`) and
  override what differs: `train_batches`, `split_batches` and
  `num_examples` for the data, `condition`, `eval_labels` and
  `eval_cond` for what samples are drawn for.
  """
  scorer = 'inception'
  images = True  # uint8 images (grids, FID); False: points (toy2d).

  def __init__(self, config):
    self.config = config
    self.cfg = config.dataset

  # What an example is.

  @property
  def condition(self):
    """What the network is conditioned on: class labels if the config has
    classes, else nothing."""
    k = self.cfg.num_classes
    return conditioning.ClassLabels(k) if k else conditioning.UNCONDITIONAL

  @property
  def shape(self):
    """The shape of one example."""
    s = self.cfg.image_size
    return (s, s, self.cfg.channels)

  def check(self):
    """Raises a UserError, in one line, if the training data cannot be read
    (before anything is written)."""

  # Training.

  def train_batches(self, global_batch, seed, start_step, rows):
    """Iterator over rows `rows` (a slice) of the global batches of steps
    `start_step`, `start_step + 1`, ...: dicts with 'x' and 'cond'."""
    raise NotImplementedError

  # One pass over a split, for reference statistics.

  def split_batches(self, split, process_index, process_count, local_batch):
    """This process's examples of `split` in batches of `local_batch`, as
    (float images in [-1, 1], int labels), every process the same count."""
    del split, process_index, process_count, local_batch
    raise errors.ConfigError(f'Dataset {self.cfg.name!r} has no images for '
                             'FID statistics.')

  def num_examples(self, split):
    """The size of `split`."""
    raise NotImplementedError

  # Evaluation.

  def eval_labels(self, n):
    """What sample i is drawn for and scored against, int32 (n,): its class,
    cycling through the classes (one grid column per class); zeros without
    classes."""
    k = self.cfg.num_classes
    return (np.arange(n) % k if k else np.zeros(n)).astype(np.int32)

  def eval_cond(self, labels):
    """The condition value (`cond`) the network is given for samples of
    `labels` (from `eval_labels`), numpy arrays."""
    return labels

  @property
  def grid_columns(self):
    """Columns of a sample grid (0: a square grid)."""
    return self.cfg.num_classes

  @property
  def label_description(self):
    """What `eval_labels` means, for protocol.json (whose text an
    interrupted evaluation must find unchanged to resume)."""
    return ('sample i has class i mod num_classes (uniform; 50 per class '
            'for 50k ImageNet samples)')

  def notes(self, grid_size):
    """Markdown under a report's table, saying what its grids show."""
    del grid_size
    return ''


def process_rows(global_batch):
  """This process's equal share of the global batch, in process order."""
  pidx, pcount = jax.process_index(), jax.process_count()
  if global_batch % pcount:
    raise errors.ConfigError(f'batch_size {global_batch} is not divisible '
                             f'by the {pcount} processes.')
  local = global_batch // pcount
  return slice(pidx * local, (pidx + 1) * local)


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


def indexed_batches(arrays, global_batch, rows, seed, start_step):
  """Batches of in-memory arrays (a dict, a row per example, values may be
  dicts of arrays), in the order of `step_indices`."""
  n = len(jax.tree.leaves(arrays)[0])
  for step in itertools.count(start_step):
    idx = step_indices(n, global_batch, seed, step, rows)
    yield jax.tree.map(lambda v, idx=idx: v[idx], arrays)


def prefetched(batches):
  """Reads and decodes the next batch on the host while the devices train on
  this one."""
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    ahead = pool.submit(next, batches)
    while True:
      batch = ahead.result()
      ahead = pool.submit(next, batches)
      yield batch


def one_pass(dataset, split, global_batch):
  """This process's share of a split, once, in order: batches of
  (uint8 images, labels, mask) of the local batch size, padding masked out.
  Every example is in exactly one process's share (`split_share`), and
  every process yields the same number of batches, as the sharded
  computations they feed require: one whose share is a row shorter pads."""
  pidx, pcount = jax.process_index(), jax.process_count()
  local_batch = global_batch // pcount
  share = -(-dataset.num_examples(split) // pcount)  # The longest share.
  batches = iter(dataset.split_batches(split, pidx, pcount, local_batch))
  for _ in range(-(-share // local_batch)):
    bx, by = next(batches, (None, None))
    if by is None:  # A shorter share, already over.
      bx, by = np.zeros((0,) + dataset.shape), np.zeros(0, np.int32)
    pad = local_batch - len(by)
    yield (np.pad(images.to_uint8(bx), ((0, pad),) + ((0, 0),) * 3),
           np.pad(by, (0, pad)), np.arange(local_batch) < len(by))


def split_share(n, process_index, process_count):
  """The examples of a split of `n` that are this process's share for
  statistics over the whole split: i * process_count + process_index, every
  example in exactly one share (they differ in length by at most one)."""
  return np.arange(process_index, n, process_count)


def strided_batches(arrays, process_index, process_count, local_batch):
  """This process's share (`split_share`) of in-memory arrays, in batches
  of `local_batch`."""
  idx = split_share(len(arrays[0]), process_index, process_count)
  for i in range(0, len(idx), local_batch):
    yield tuple(a[idx[i:i + local_batch]] for a in arrays)
