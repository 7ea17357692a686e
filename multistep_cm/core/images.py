"""Writing samples: PNG grids, toy2d scatter plots and ADM-layout .npz files."""

import contextlib

from etils import epath
import numpy as np
from PIL import Image

from multistep_cm import errors


@contextlib.contextmanager
def _storage_errors(path):
  """A file that cannot be written (a full disk) as one StorageError line."""
  try:
    yield
  except OSError as e:
    raise errors.StorageError(f'Cannot write {path}: {e.strerror or e}.') from e


def to_uint8(x):
  """[-1, 1] floats to uint8 as (x + 1) * 127.5, rounded: the ADM convention."""
  return np.clip(np.round((np.asarray(x) + 1.) * 127.5), 0, 255).astype(np.uint8)


def grid(images, cols, pad=1, min_side=480):
  """Tiles uint8 NHWC images into one image, scaled up (nearest neighbour) so
  that tiny images such as 8x8 digits stay readable."""
  n, h, w, c = images.shape
  rows = -(-n // cols)
  out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255,
                np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, cols)
    out[pad + r * (h + pad):pad + r * (h + pad) + h,
        pad + col * (w + pad):pad + col * (w + pad) + w] = img
  scale = max(1, min_side // max(out.shape[:2]))
  out = out.repeat(scale, axis=0).repeat(scale, axis=1)
  return out[..., 0] if c == 1 else out


def save_samples_png(path, samples, labels, columns, title=''):
  """A grid of images (one column per class when labels cycle through the
  classes), or a scatter plot for 2-D points."""
  path = epath.Path(path)  # Local or gs://.
  samples = np.asarray(samples)
  with _storage_errors(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    if samples.ndim == 2:
      _scatter(path, samples, labels, title)
      return
    cols = columns if columns and len(samples) % columns == 0 else (
        int(np.ceil(np.sqrt(len(samples)))))
    with path.open('wb') as f:
      Image.fromarray(grid(to_uint8(samples), cols)).save(f, format='PNG')


def _scatter(path, points, labels, title):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from multistep_cm import toy2d  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
  ax.scatter(points[:, 0], points[:, 1], c=labels, cmap='tab10', s=3,
             vmin=0, vmax=9)
  m = toy2d.means()
  ax.scatter(m[:, 0], m[:, 1], marker='x', c='k', s=40, label='true means')
  lim = toy2d.RADIUS + 1.
  ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect='equal', title=title)
  ax.legend(loc='upper right', fontsize=8)
  with path.open('wb') as f:
    fig.savefig(f, format='png', bbox_inches='tight')
  plt.close(fig)


def save_npz(path, samples, labels):
  """ADM layout: `arr_0` uint8 NHWC images (float32 points for 2-D data),
  `arr_1` int labels."""
  samples = np.asarray(samples)
  arr = samples.astype(np.float32) if samples.ndim == 2 else to_uint8(samples)
  with _storage_errors(path), epath.Path(path).open('wb') as f:
    np.savez(f, arr_0=arr, arr_1=np.asarray(labels))
