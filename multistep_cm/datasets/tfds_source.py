"""Random-access reading of prepared tfds datasets, without tf.data: any
example can be read by its index, so the data order can be a pure function of
(seed, step) that a resumed or resized run continues exactly.

Datasets must be prepared in the array_record format. With tfds 4.9.10 the
data source decodes without TensorFlow: tfds parses the tf.Example with its
own protobuf copy and decodes images with OpenCV if installed, else PIL
(`features.deserialize_example_np`). This module uses that decoder as it is,
so the training loop never imports TensorFlow. JPEGs decoded so differ from
TF's decode by a few uint8 levels: reference statistics must use this path.
"""

import concurrent.futures
import functools
import os

import numpy as np

from multistep_cm import errors

_FORMAT = 'array_record'


def _root(data_dir):
  # As tfds resolves it, but read at each call, not once at import.
  return os.path.expanduser(data_dir or os.environ.get('TFDS_DATA_DIR')
                            or '~/tensorflow_datasets')


def open_source(name, split, data_dir=None):
  """A random-access source over split `split` of the prepared tfds dataset
  `name`: len(), and [i] gives a dict with 'image' (uint8 HxWxC) and 'label'.
  Raises DatasetNotPreparedError, in one line, if it is not prepared in
  `data_dir` (default: TFDS_DATA_DIR, else ~/tensorflow_datasets) as
  array_record."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  root = _root(data_dir)
  # In tfds 4.9.10 the `tfds` command imports apache_beam at start, hence the
  # Python form too.
  build = (f'`tfds build {name} --data_dir={root} --file_format={_FORMAT}` or '
           f'in Python `tfds.builder({name!r}, data_dir={root!r}, '
           f'file_format={_FORMAT!r}).download_and_prepare()` (building '
           "needs TensorFlow: pip install -e '.[tfds]')")
  try:
    # A name without builder code is read from its files in `root`.
    builder = tfds.builder(name, data_dir=root)
  except tfds.core.registered.DatasetNotFoundError:
    builder = None
  if builder is None or not builder.is_prepared():
    where = builder.data_dir if builder else os.path.join(root, name)
    hint = (', after placing its source files in the manual dir'
            if getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None) else '')
    raise errors.DatasetNotPreparedError(
        f'Dataset {name!r} is not prepared in {where}. Prepare it with '
        f'{build}{hint}; or point TFDS_DATA_DIR (or config.dataset.data_dir) '
        'at the directory that holds it.')
  formats = sorted(f.value for f in builder.info.available_file_formats())
  if _FORMAT not in formats:
    # tfds refuses to prepare another format over a prepared one.
    raise errors.DatasetNotPreparedError(
        f'Dataset {name!r} in {builder.data_dir} is prepared as '
        f'{", ".join(formats) or "an unknown format"}, but random access needs '
        f'{_FORMAT}: convert it in place with `tfds convert_format '
        f'--dataset_version_dir={builder.data_dir} --out_file_format={_FORMAT}`'
        f', or delete {builder.data_dir} and prepare it again with {build}.')
  return builder.as_data_source(split=split, file_format=_FORMAT)


@functools.lru_cache(maxsize=256)
def _area_taps(n, n_out):
  # Output pixel j is the mean of input [j, j + 1) * n / n_out, partly covered
  # pixels weighted by the covered fraction: tf.image.resize's 'area'. A box
  # filter such as PIL's would take or drop a partly covered pixel whole.
  scale = n / n_out
  lo = np.arange(n_out) * scale
  taps = np.arange(int(np.ceil(scale)) + 1)[:, None]
  idx = np.floor(lo).astype(np.int64) + taps
  cover = np.minimum(lo + scale, idx + 1) - np.maximum(lo, idx)
  # Taps past the last pixel have no cover; clipping keeps them in range.
  return np.minimum(idx, n - 1), np.clip(cover, 0, None) / scale


def _area_resize(x, n_out):
  """Area resize of axis 0 of `x` to `n_out`, in float64."""
  # A few taps per output pixel, not a matrix product: BLAS's own threads
  # would fight the decode threads.
  idx, wts = _area_taps(len(x), n_out)
  return sum(w[:, None, None] * x[i] for i, w in zip(idx, wts))


def preprocess(image_size, image, crop=False):
  """uint8 HxWxC -> float32 (image_size, image_size, C) in [-1, 1]. With
  `crop` (imagenet2012 at 128), a centre square crop and an area resize;
  without, the images must be stored at their size."""
  image = np.asarray(image)
  if crop:
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = image[top:top + side, left:left + side]
    x = _area_resize(_area_resize(x, image_size).swapaxes(0, 1), image_size)
    x = x.swapaxes(0, 1).astype(np.float32)
  elif image.shape[:2] != (image_size, image_size):
    raise ValueError(f'Images are {image.shape[0]}x{image.shape[1]}, '
                     f'not the configured {image_size}x{image_size}.')
  else:
    x = image.astype(np.float32)
  return x / 127.5 - 1.


def flip(seed):
  """Whether the row with flip seed `seed` (an int, or a sequence of
  non-negative ints) is flipped: a pure function of the seed alone."""
  return bool(np.random.SeedSequence(seed).generate_state(1)[0] & 1)


@functools.lru_cache(maxsize=1)
def _pool():
  # Threads suffice: PIL decoding and numpy resizing release the GIL.
  return concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1))


def load_rows(source, indices, image_size, flip_seeds=None, crop=False):
  """The examples `indices` of `source`, in that order: float32 images
  (len(indices), image_size, image_size, C) in [-1, 1] and int32 labels.
  Row r is mirrored left-right when `flip(flip_seeds[r])`; derive each seed
  from (seed, step, global row) so that every topology flips the same rows."""
  if not len(indices):
    raise ValueError('load_rows needs at least one index.')
  if flip_seeds is not None and len(flip_seeds) != len(indices):
    raise ValueError(f'{len(flip_seeds)} flip seeds for {len(indices)} rows.')

  def row(r):
    ex = source[int(indices[r])]
    x = preprocess(image_size, ex['image'], crop)
    if flip_seeds is not None and flip(flip_seeds[r]):
      x = x[:, ::-1]
    return x, ex['label']

  rows = list(_pool().map(row, range(len(indices))))
  return (np.stack([x for x, _ in rows]),
          np.array([y for _, y in rows], np.int32))
