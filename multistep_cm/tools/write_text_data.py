"""Writes captioned images as a text dataset (the format of
`multistep_cm.datasets.text_data`), embedding the captions once.

Images come from a folder (each name.png|jpg|jpeg with its caption in name.txt
next to it) or a list file (lines `path<TAB>caption`, paths relative to the
list's folder). They are resized (shorter side) and center-cropped to
--image_size. --encoder=module.path:name names a function (or a class, made
with no arguments) taking a list of str and returning numpy (emb (b, L, D),
mask (b, L)) or (emb, mask, pooled (b, P)); --text_len pads or truncates L.

  python -m multistep_cm.tools.write_text_data --folder=~/photos \\
      --out=~/data/photos64 --image_size=64 --text_len=77 \\
      --encoder=my_project.t5_embed:embed --float16

  # The captioned digits with their shipped encoder:
  python -m multistep_cm.tools.write_text_data --list=digits.tsv \\
      --out=/tmp/d --image_size=8 --channels=1 \\
      --encoder=multistep_cm.datasets.captioned_digits:DigitsTextEncoder

Bad input ends in one `error:` line (exit status 2), leaving nothing at --out.
"""

import argparse
import importlib
import os
import sys

import numpy as np
from PIL import Image

from multistep_cm.datasets import text_data

EXTENSIONS = ('.png', '.jpg', '.jpeg')
Error = text_data.TextDataError


def _read_folder(folder):
  if not os.path.isdir(folder):
    raise Error(f'--folder {folder} is not a directory.')
  pairs = []
  for name in sorted(os.listdir(folder)):
    stem, ext = os.path.splitext(name)
    if ext.lower() not in EXTENSIONS:
      continue
    caption = os.path.join(folder, stem + '.txt')
    if not os.path.isfile(caption):
      raise Error(f'caption missing: {caption} (every image in --folder '
                  'needs name.txt next to it).')
    with open(caption, encoding='utf-8') as f:
      pairs.append((os.path.join(folder, name), f.read().strip()))
  if not pairs:
    raise Error(f'no .png/.jpg/.jpeg images in {folder}.')
  return pairs


def _read_list(path):
  try:
    with open(path, encoding='utf-8') as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise Error(f'cannot read --list {path}: {e.strerror}.') from None
  pairs = []
  for i, line in enumerate(lines, 1):
    if not line.strip():
      continue
    if '\t' not in line:
      raise Error(f'{path} line {i}: expected path<TAB>caption.')
    image, caption = line.split('\t', 1)
    pairs.append((os.path.join(os.path.dirname(path), image.strip()),
                  caption.strip()))
  if not pairs:
    raise Error(f'--list {path} has no lines.')
  return pairs


def load_image(path, size, channels):
  """uint8 (size, size, channels): the shorter side resized to `size` (box
  halvings first, then bicubic, as ADM does), then center-cropped."""
  try:
    with Image.open(path) as img:
      img.load()
      img = img.convert('RGB' if channels == 3 else 'L')
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise Error(f'unreadable image {path}: {" ".join(str(e).split())}'
                ) from None
  while min(img.size) >= 2 * size:
    img = img.resize(tuple(s // 2 for s in img.size), Image.Resampling.BOX)
  scale = size / min(img.size)
  img = img.resize(tuple(max(size, round(s * scale)) for s in img.size),
                   Image.Resampling.BICUBIC)
  a = np.asarray(img, np.uint8).reshape(img.size[1], img.size[0], channels)
  top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
  return a[top:top + size, left:left + size]


def load_encoder(spec, text_len):
  """The embedding function `module.path:name`, its outputs padded or
  truncated to `text_len` (if set)."""
  module, sep, name = spec.partition(':')
  if not sep or not module or not name:
    raise Error(f'--encoder {spec!r}: expected module.path:function_name.')
  try:
    fn = getattr(importlib.import_module(module), name)
  except ImportError as e:
    raise Error(f'--encoder {spec!r}: cannot import {module}: {e}.') from None
  except AttributeError:
    raise Error(f'--encoder {spec!r}: {module} has no {name!r}.') from None
  if isinstance(fn, type):
    fn = fn()
  if not callable(fn):
    raise Error(f'--encoder {spec!r} is not callable.')
  if not text_len:
    return fn

  def embed(captions):
    out = fn(captions)
    if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
      return out  # text_data.write names the problem.
    emb, mask = np.asarray(out[0]), np.asarray(out[1])
    if emb.ndim == 3 and mask.shape == emb.shape[:2]:
      pad = max(0, text_len - emb.shape[1])
      emb = np.pad(emb[:, :text_len], ((0, 0), (0, pad), (0, 0)))
      mask = np.pad(mask[:, :text_len], ((0, 0), (0, pad)))
    return (emb, mask, *out[2:])
  return embed


def _progress(images, every, total):
  for i, img in enumerate(images, 1):
    yield img
    if every and (i % every == 0 or i == total):
      print(f'{i}/{total} images', file=sys.stderr, flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n', 1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--folder', help='name.png|jpg|jpeg + name.txt pairs')
  source.add_argument('--list', help='a file of path<TAB>caption lines')
  parser.add_argument('--out', required=True, help='the dataset directory')
  parser.add_argument('--image_size', type=int, required=True)
  parser.add_argument('--channels', type=int, choices=(1, 3), default=3)
  parser.add_argument('--encoder', required=True,
                      help='module.path:function_name')
  parser.add_argument('--encoder_name', default=None,
                      help="meta.json's encoder string (default: --encoder)")
  parser.add_argument('--text_len', type=int, default=0,
                      help='pad or truncate the embeddings to this length')
  parser.add_argument('--float16', action='store_true',
                      help='store the embeddings as float16')
  parser.add_argument('--batch_size', type=int, default=256)
  parser.add_argument('--progress_every', type=int, default=1000)
  args = parser.parse_args(argv)
  try:
    if args.image_size < 1 or args.batch_size < 1 or args.text_len < 0:
      raise Error('--image_size and --batch_size must be positive, '
                  '--text_len not negative.')
    out = os.path.expanduser(args.out)
    pairs = (_read_folder(os.path.expanduser(args.folder)) if args.folder
             else _read_list(os.path.expanduser(args.list)))
    for path, _ in pairs:  # All before the first slow step.
      if not os.path.isfile(path):
        raise Error(f'image missing: {path}.')
    embed = load_encoder(args.encoder, args.text_len)
    if args.float16:
      embed = _as_float16(embed)
    images = (load_image(p, args.image_size, args.channels) for p, _ in pairs)
    text_data.write(out, _progress(images, args.progress_every, len(pairs)),
                    [c for _, c in pairs], embed,
                    encoder=args.encoder_name or args.encoder,
                    batch_size=args.batch_size)
  except text_data.TextDataError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    return 2
  print(f'wrote {len(pairs)} examples to {out}', file=sys.stderr)
  return 0


def _as_float16(fn):
  def embed(captions):
    out = fn(captions)
    if isinstance(out, (tuple, list)) and len(out) in (2, 3):
      return (np.asarray(out[0]).astype(np.float16), *out[1:])
    return out
  return embed


if __name__ == '__main__':
  sys.exit(main())
