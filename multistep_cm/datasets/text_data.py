"""Text-conditioned image data on disk: images with precomputed text embeddings.

The encoder (T5, CLIP, a token table, ...) runs once, when the data is
written; training reads only arrays. A dataset is a directory holding:

  meta.json      {"format": "multistep_cm.text/1", "num_examples": n,
                  "image_size": S, "channels": C, "text_len": L,
                  "text_dim": D, "pooled_dim": P (0: no pooled vector),
                  "encoder": free-form string naming the encoder}
  images.npy     uint8 (n, S, S, C), square images
  text_emb.npy   float16 or float32 (n, L, D), the encoder's token embeddings
  text_mask.npy  bool (n, L), True at real tokens, False at padding
  pooled.npy     float32 (n, P), only if P > 0
  captions.txt   UTF-8, one caption per line ('\\n'-separated, n lines), line
                 breaks inside a caption replaced by spaces
  labels.npy     int32 (n,), optional: a class per example (the captioned
                 digits' class named in the caption); read as 0 if absent

Arrays are .npy files opened with `np.load(mmap_mode='r')`: each process
reads only the rows it needs, in any order, so the data order is a pure
function of (seed, step) (`base.step_indices`) and a resumed run continues it.
`write` fills a hidden temporary directory and renames it at the end, and
meta.json is the last file written: an interrupted write leaves no directory
that opens as complete.
"""

import itertools
import json
import os
import shutil
import tempfile

import numpy as np

from multistep_cm import errors
from multistep_cm.datasets import base

FORMAT = 'multistep_cm.text/1'
WRITE_HINT = 'write one with `python -m multistep_cm.tools.write_text_data`'


class TextDataError(errors.UserError):
  """A text dataset that is missing, incomplete or not what the config
  expects, or bad input to the writer."""


def _one_line(text):
  return ' '.join(str(text).split())


# The writer.


def _check_batch(out, b, prev):
  """Checks one embed_fn result for `b` captions against the earlier ones
  (`prev`: (L, D, P) or None); returns (emb, mask, pooled or None)."""
  if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
    raise TextDataError('The encoder must return (emb, mask) or (emb, mask, '
                        f'pooled), not {type(out).__name__}.')
  emb, mask = np.asarray(out[0]), np.asarray(out[1])
  pooled = np.asarray(out[2]) if len(out) == 3 else None
  if emb.ndim != 3 or emb.shape[0] != b:
    raise TextDataError(f'The encoder returned embeddings of shape '
                        f'{emb.shape} for {b} captions; expected (b={b}, '
                        'text_len, text_dim).')
  if mask.shape != emb.shape[:2]:
    raise TextDataError(f'The encoder returned a mask of shape {mask.shape} '
                        f'for embeddings of shape {emb.shape}; expected '
                        f'{emb.shape[:2]}.')
  if mask.dtype != bool and not np.isin(mask, (0, 1)).all():
    raise TextDataError('The encoder returned a mask with values other than '
                        '0/1 or True/False.')
  if pooled is not None and (pooled.ndim != 2 or pooled.shape[0] != b):
    raise TextDataError(f'The encoder returned a pooled vector of shape '
                        f'{pooled.shape} for {b} captions; expected (b={b}, '
                        'pooled_dim).')
  if not np.issubdtype(emb.dtype, np.floating):
    raise TextDataError(f'The encoder returned {emb.dtype} embeddings; '
                        'expected floats.')
  got = (*emb.shape[1:], 0 if pooled is None else pooled.shape[1])
  if prev is not None and got != prev:
    raise TextDataError(
        f'The encoder returned (text_len, text_dim, pooled_dim) {got} for '
        f'one batch and {prev} for an earlier one; they must not vary '
        '(pad or truncate to a fixed text_len).')
  return emb, mask.astype(bool), pooled


def _check_image(img, i, first):
  img = np.asarray(img)
  if img.dtype != np.uint8 or img.ndim != 3:
    raise TextDataError(f'Image {i} is {img.dtype} of shape {img.shape}; '
                        'expected uint8 (H, W, C).')
  if img.shape[0] != img.shape[1]:
    raise TextDataError(f'Image {i} is {img.shape[0]}x{img.shape[1]}; '
                        'images must be square (center-crop them).')
  if first is not None and img.shape != first:
    raise TextDataError(f'Image {i} has shape {img.shape}, image 0 '
                        f'{first}; all images must have the same size and '
                        'channels.')
  return img


def write(directory, images, captions, embed_fn, *, encoder='', labels=None,
          batch_size=256):
  """Writes the dataset `directory` (it must not exist, or be empty).

  Args:
    directory: where to write.
    images: uint8 (n, S, S, C) array, or an iterable of uint8 (S, S, C).
    captions: n strings.
    embed_fn: list of str -> (emb (b, L, D), mask (b, L)) or
      (emb, mask, pooled (b, P)), numpy arrays; float16 embeddings are
      stored as float16, others as float32.
    encoder: the free-form name of the encoder, kept in meta.json.
    labels: optional n ints.
    batch_size: captions per embed_fn call.

  Raises:
    TextDataError: bad input; nothing is left at `directory`.
  """
  directory = os.path.abspath(directory)
  captions = [' '.join(str(c).replace('\r', '\n').split('\n'))
              for c in captions]
  n = len(captions)
  if not n:
    raise TextDataError('No examples to write.')
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
      raise TextDataError(f'labels must be n={n} integers, got '
                          f'{labels.dtype} of shape {labels.shape}.')
  if os.path.exists(directory) and (not os.path.isdir(directory) or
                                    os.listdir(directory)):
    raise TextDataError(f'{directory} already exists and is not empty: '
                        'remove it or write elsewhere.')
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(directory)}.tmp-',
                         dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  try:
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0o700 would hide it from others.
    meta = _write_arrays(tmp, iter(images), captions, embed_fn, batch_size)
    with open(os.path.join(tmp, 'captions.txt'), 'w', encoding='utf-8',
              newline='\n') as f:
      f.writelines(c + '\n' for c in captions)
    if labels is not None:
      np.save(os.path.join(tmp, 'labels.npy'), labels.astype(np.int32))
    meta = {'format': FORMAT, 'num_examples': n, **meta, 'encoder': encoder}
    with open(os.path.join(tmp, 'meta.json'), 'w', encoding='utf-8') as f:
      json.dump(meta, f, indent=1)
    if os.path.isdir(directory):
      os.rmdir(directory)  # Empty, checked above.
    os.rename(tmp, directory)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _write_arrays(tmp, images, captions, embed_fn, batch_size):
  """Fills images.npy, text_emb.npy, text_mask.npy and pooled.npy batch by
  batch (memory: one batch); returns their sizes for meta.json."""
  n = len(captions)
  arrays, dims, first = {}, None, None

  def open_array(name, dtype, shape):
    arrays[name] = np.lib.format.open_memmap(
        os.path.join(tmp, f'{name}.npy'), mode='w+', dtype=dtype,
        shape=(n, *shape))

  for start in range(0, n, batch_size):
    batch = captions[start:start + batch_size]
    imgs = list(itertools.islice(images, len(batch)))
    if len(imgs) < len(batch):
      raise TextDataError(f'{start + len(imgs)} images for {n} captions.')
    for i, img in enumerate(imgs):
      img = _check_image(img, start + i, first)
      if first is None:
        first = img.shape
        open_array('images', np.uint8, first)
      arrays['images'][start + i] = img
    emb, mask, pooled = _check_batch(embed_fn(batch), len(batch), dims)
    if dims is None:
      dims = (*emb.shape[1:], 0 if pooled is None else pooled.shape[1])
      open_array('text_emb', np.float16 if emb.dtype == np.float16 else
                 np.float32, emb.shape[1:])
      open_array('text_mask', bool, mask.shape[1:])
      if pooled is not None:
        open_array('pooled', np.float32, pooled.shape[1:])
    # Checked as stored: float32 values past 65504 are inf in float16.
    for name, value in (('text_emb', emb), ('pooled', pooled)):
      if value is not None:
        stored = value.astype(arrays[name].dtype)
        if not np.isfinite(stored).all():
          raise TextDataError(
              f'The encoder returned non-finite {name} values for captions '
              f'{start}..{start + len(batch) - 1} (as '
              f'{arrays[name].dtype}).')
        arrays[name][start:start + len(batch)] = stored
    arrays['text_mask'][start:start + len(batch)] = mask
  if next(images, None) is not None:
    raise TextDataError(f'More images than the {n} captions.')
  for a in arrays.values():
    a.flush()
  return {'image_size': first[0], 'channels': first[2], 'text_len': dims[0],
          'text_dim': dims[1], 'pooled_dim': dims[2]}


# The reader.


class TextDataset:
  """A text dataset opened for random access, checked against what the
  config expects (arguments left None are not checked)."""

  def __init__(self, directory, *, image_size=None, text_len=None,
               text_dim=None, pooled_dim=None, channels=None):
    if '://' in str(directory):
      # Rows are read from memory-mapped .npy files, which a URL cannot be.
      raise TextDataError(
          f'{directory}: a text dataset is memory-mapped, so it must be on a '
          'filesystem, not a URL: copy it to local disk (e.g. `gcloud storage '
          'cp -r`) or mount the bucket (e.g. Cloud Storage FUSE) and give the '
          'mounted path.')
    self.directory = d = os.path.abspath(directory)
    if not os.path.isdir(d):
      raise TextDataError(f'No text dataset at {d}: the directory does not '
                          f'exist; {WRITE_HINT}.')
    try:
      with open(os.path.join(d, 'meta.json'), encoding='utf-8') as f:
        self.meta = meta = json.load(f)
    except FileNotFoundError:
      raise TextDataError(f'{d} has no meta.json: not a complete text '
                          f'dataset (an interrupted write leaves none); '
                          f'{WRITE_HINT}.') from None
    except (ValueError, OSError) as e:
      raise TextDataError(f'{d}/meta.json is unreadable: '
                          f'{_one_line(e)}.') from None
    if not isinstance(meta, dict) or meta.get('format') != FORMAT:
      got = meta.get('format') if isinstance(meta, dict) else None
      raise TextDataError(f'{d}/meta.json has format {got!r}, expected '
                          f'{FORMAT!r}.')
    for key in ('num_examples', 'image_size', 'channels', 'text_len',
                'text_dim', 'pooled_dim'):
      if not isinstance(meta.get(key), int):
        raise TextDataError(f'{d}/meta.json has no integer {key!r}.')
    self.num_examples = n = meta['num_examples']
    self.image_size, self.channels = meta['image_size'], meta['channels']
    self.text_len, self.text_dim = meta['text_len'], meta['text_dim']
    self.pooled_dim = meta['pooled_dim']
    self.encoder = meta.get('encoder', '')
    for key, want in (('image_size', image_size), ('channels', channels),
                      ('text_len', text_len), ('text_dim', text_dim),
                      ('pooled_dim', pooled_dim)):
      if want is not None and meta[key] != want:
        raise TextDataError(f'{key} {meta[key]} in {d}, the config expects '
                            f'{want} (encoder: {self.encoder or "unnamed"}).')
    s, c, l, p = self.image_size, self.channels, self.text_len, self.pooled_dim
    self._images = self._open('images', 'images', (n, s, s, c), (np.uint8,))
    self._emb = self._open('text_emb', 'embeddings', (n, l, self.text_dim),
                           (np.float16, np.float32))
    self._mask = self._open('text_mask', 'embeddings', (n, l), (np.bool_,))
    self._pooled = (self._open('pooled', 'pooled embeddings', (n, p),
                               (np.float32,)) if p else None)
    self._labels = (self._open('labels', 'labels', (n,), (np.int32,))
                    if os.path.exists(os.path.join(d, 'labels.npy')) else None)
    self._captions = None
    try:
      with open(os.path.join(d, 'captions.txt'), 'rb') as f:
        lines = sum(chunk.count(b'\n') for chunk in iter(
            lambda: f.read(1 << 20), b''))
    except FileNotFoundError:
      raise TextDataError(f'{d} is missing captions: no captions.txt; '
                          f'{WRITE_HINT}.') from None
    if lines != n:
      raise TextDataError(f'{d}/captions.txt has {lines} lines, meta.json '
                          f'says {n} examples: the files disagree.')

  def _open(self, name, what, shape, dtypes):
    path = os.path.join(self.directory, f'{name}.npy')
    try:
      a = np.load(path, mmap_mode='r')
    except FileNotFoundError:
      raise TextDataError(f'{self.directory} is missing {what}: no '
                          f'{name}.npy; {WRITE_HINT}.') from None
    except (ValueError, OSError) as e:
      raise TextDataError(f'{path} is unreadable (truncated?): '
                          f'{_one_line(e)}.') from None
    if a.ndim and a.shape[0] != shape[0]:
      raise TextDataError(f'{name}.npy in {self.directory} has {a.shape[0]} '
                          f'rows, meta.json says {shape[0]} examples: the '
                          'files disagree.')
    if a.shape != shape or a.dtype not in dtypes:
      raise TextDataError(
          f'{name}.npy in {self.directory} is {a.dtype} {a.shape}; meta.json '
          f'says {"/".join(np.dtype(t).name for t in dtypes)} {shape}.')
    return a

  def __len__(self):
    return self.num_examples

  @property
  def has_labels(self):
    return self._labels is not None

  def rows(self, idx):
    """Examples `idx` (ints, any order): 'x' float32 images in [-1, 1]
    (uint8 / 127.5 - 1, the inverse of `images.to_uint8`), 'text' float32
    (b, L, D), 'text_mask' bool (b, L), 'pooled' float32 (b, P) if the
    dataset has it, 'label' int32 (b,) (zeros without labels)."""
    idx = np.asarray(idx, np.int64)
    return {'x': self._images[idx].astype(np.float32) / 127.5 - 1.,
            'label': (np.array(self._labels[idx], np.int32)
                      if self._labels is not None
                      else np.zeros(len(idx), np.int32)),
            **self.conditioning(idx)}

  def conditioning(self, idx):
    """What a network is conditioned on for examples `idx`, without reading
    their images: 'text', 'text_mask' and, if present, 'pooled'."""
    idx = np.asarray(idx, np.int64)
    out = {'text': self._emb[idx].astype(np.float32),
           'text_mask': np.array(self._mask[idx], bool)}
    if self._pooled is not None:
      out['pooled'] = np.array(self._pooled[idx], np.float32)
    return out

  def captions(self, idx):
    """The captions of examples `idx`, a list of str."""
    if self._captions is None:
      with open(os.path.join(self.directory, 'captions.txt'),
                encoding='utf-8', newline='\n') as f:
        self._captions = f.read().split('\n')[:-1]
    return [self._captions[i] for i in np.asarray(idx, np.int64).ravel()]


def open_dataset(directory, *, image_size=None, text_len=None, text_dim=None,
                 pooled_dim=None, channels=None):
  """`TextDataset(directory, ...)`: raises TextDataError, in one line, if it
  is missing, incomplete or differs from what is expected."""
  return TextDataset(directory, image_size=image_size, text_len=text_len,
                     text_dim=text_dim, pooled_dim=pooled_dim,
                     channels=channels)


def train_batches(directory, global_batch, seed, start_step=0, rows=None,
                  **expect):
  """Iterator over rows `rows` (a slice; default: all) of the global training
  batches from `start_step` on, in the order of `base.step_indices`: the same
  global batch whatever the number of processes. The dataset is opened and
  checked (`expect`: as `open_dataset`) before this returns."""
  ds = open_dataset(directory, **expect)
  rows = slice(0, global_batch) if rows is None else rows

  def batches():
    for step in itertools.count(start_step):
      yield ds.rows(base.step_indices(len(ds), global_batch, seed, step, rows))
  return batches()
