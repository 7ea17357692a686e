"""Captioned digits: the built-in text-to-image data (no download).

Each 8x8 scikit-learn digit (the splits of `digits.load`) gets a caption that
names its class and one trait measured on the image:
  thickness: 'thick' if its total ink exceeds the median of its class (in the
    train split), else 'thin';
  slant: 'slanted' if it leans further right (ink shear x/y) than the median
    of its class, else 'upright'.
The template is drawn per example from a fixed seed, e.g. "a thin seven",
"the number 7, slanted", "digit seven, upright".

`DigitsTextEncoder` embeds such captions without a download: a fixed
vocabulary, a token table and a sinusoidal position signal drawn from fixed
numpy seeds, in float32.

As a dataset (`CaptionedDigits`), the network is conditioned on the captions
alone; samples are drawn for the evaluation prompts (`prompts`), a grid
column per class, and scored by the digits classifier against the class
each prompt names and by the trait it names, measured on the sample as the
captions measure the training images.
"""

import functools
import re

import numpy as np

from multistep_cm import conditioning
from multistep_cm.core import images as images_lib
from multistep_cm.datasets import base
from multistep_cm.datasets import digits
from multistep_cm.datasets import text_data

ENCODER_NAME = 'digits-token-table/1'
NUM_CLASSES = 10
WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven',
         'eight', 'nine')
TRAITS = {'thickness': ('thin', 'thick'), 'slant': ('upright', 'slanted')}
# (template, the trait it names): {w} the class as a word, {d} as a numeral.
TEMPLATES = (
    ('a {t} {w}', 'thickness'),
    ('a {t} {d}', 'thickness'),
    ('the number {w}, {t}', 'thickness'),
    ('a {w}, {t}', 'slant'),
    ('the number {d}, {t}', 'slant'),
    ('digit {w}, {t}', 'slant'),
)
_TOKEN = re.compile(r'[a-z]+|[0-9]|[^\sa-z0-9]')


def _measure(x):
  """Total ink and rightward shear of images in [-1, 1], (n, 8, 8, 1)."""
  ink = (x[..., 0] + 1.) / 2.
  # A blank sample has no centre of mass: its shear is 0, not NaN.
  mass = np.maximum(ink.sum((1, 2)), 1e-6)
  rows, cols = np.mgrid[:x.shape[1], :x.shape[2]]
  up = -rows.astype(np.float64)  # y grows upwards, as a reader sees it.
  mean = lambda v: (ink * v).sum((1, 2)) / mass
  dx = cols - mean(cols)[:, None, None]
  dy = up - mean(up)[:, None, None]
  # A digit leaning right has its top to the right: x grows with y.
  shear = mean(dx * dy) / mean(dy * dy)
  return mass, shear


@functools.lru_cache(maxsize=1)
def _class_medians():
  x, y = digits.load('train')
  mass, shear = _measure(x)
  return (np.array([np.median(mass[y == c]) for c in range(NUM_CLASSES)]),
          np.array([np.median(shear[y == c]) for c in range(NUM_CLASSES)]))


def captions(split):
  """(images float32 (n, 8, 8, 1) in [-1, 1], labels int32 (n,), captions,
  traits {'thickness': str array, 'slant': str array}) of split 'train' or
  'test'."""
  x, y = digits.load(split)
  traits = measure_traits(x, y)
  pick = np.random.default_rng([17, split == 'test']).integers(
      len(TEMPLATES), size=len(y))
  texts = []
  for i, (label, k) in enumerate(zip(y, pick)):
    template, trait = TEMPLATES[k]
    texts.append(template.format(w=WORDS[label], d=label,
                                 t=traits[trait][i]))
  return x, y, texts, traits


def measure_traits(x, y):
  """{'thickness': 'thin'/'thick', 'slant': 'upright'/'slanted'} per image
  (float32 (n, 8, 8, 1) in [-1, 1]) of class `y`, against the medians of
  its class in the train split."""
  mass_median, shear_median = _class_medians()
  mass, shear = _measure(x)
  return {'thickness': np.where(mass > mass_median[y], 'thick', 'thin'),
          'slant': np.where(shear > shear_median[y], 'slanted', 'upright')}


def _prompt_combos():
  """(template, trait value) of the prompts, in the order they cycle: every
  four name all four trait values; 12 are all the combinations."""
  by_trait = {trait: [t for t, named in TEMPLATES if named == trait]
              for trait in TRAITS}
  return [(by_trait[trait][(k + v) % len(by_trait[trait])], values[v])
          for k in range(3) for v in range(2)
          for trait, values in TRAITS.items()]


def prompt_traits(n):
  """(trait, value) named by each of the first `n` evaluation prompts (in
  the order of `prompts`): two str arrays."""
  combos = _prompt_combos()
  named = dict(TEMPLATES)
  rows = [combos[(i // NUM_CLASSES) % len(combos)] for i in range(n)]
  return (np.array([named[t] for t, _ in rows]),
          np.array([v for _, v in rows]))


def prompts(num_per_class=4):
  """Evaluation prompts and the class each names (int32): prompt i names
  class i % 10 (a grid column per class); each class cycles through every
  (template, trait value), all four trait values in each run of four."""
  combos = _prompt_combos()
  texts, labels = [], []
  for j in range(num_per_class):
    template, value = combos[j % len(combos)]
    for c in range(NUM_CLASSES):
      texts.append(template.format(w=WORDS[c], d=c, t=value))
      labels.append(c)
  return texts, np.array(labels, np.int32)


def vocabulary():
  """Every token the templates produce, after '<pad>' (0) and '<unk>' (1)."""
  words = set(WORDS) | {str(c) for c in range(NUM_CLASSES)}
  words |= {v for values in TRAITS.values() for v in values}
  for template, _ in TEMPLATES:
    words |= set(_TOKEN.findall(template.format(w='', d='', t='')))
  return ('<pad>', '<unk>') + tuple(sorted(words))


class DigitsTextEncoder:
  """captions -> (emb float32 (b, L, D), mask bool (b, L), pooled float32
  (b, D)): a token's row of a fixed random table plus a sinusoidal position
  signal, zero at padding; pooled is the mean token row (no positions) over
  real tokens. Unknown words map to '<unk>', long captions are truncated, an
  empty caption is all padding (pooled 0)."""

  def __init__(self, text_len=8, text_dim=32):
    self.text_len, self.text_dim = text_len, text_dim
    self.vocab = vocabulary()
    self.ids = {w: i for i, w in enumerate(self.vocab)}
    rng = np.random.default_rng(20240617)
    table = rng.standard_normal((len(self.vocab), text_dim)) / np.sqrt(
        text_dim)
    table[0] = 0.
    self.table = table.astype(np.float32)
    pos = np.arange(text_len)[:, None]
    freq = 10000. ** (-np.arange(0, text_dim, 2) / text_dim)
    signal = np.zeros((text_len, text_dim))
    signal[:, 0::2] = np.sin(pos * freq)
    signal[:, 1::2] = np.cos(pos * freq)[:, :text_dim // 2]
    # Smaller than the tokens, so the word still dominates its position.
    self.positions = (0.3 / np.sqrt(text_dim) * signal).astype(np.float32)

  def tokenize(self, caption):
    """Token ids, int32 (L,), 0-padded."""
    words = _TOKEN.findall(caption.lower())[:self.text_len]
    ids = np.zeros(self.text_len, np.int32)
    ids[:len(words)] = [self.ids.get(w, 1) for w in words]
    return ids

  def __call__(self, captions):
    tokens = np.array([self.tokenize(c) for c in captions], np.int32).reshape(
        -1, self.text_len)
    mask = tokens > 0
    rows = self.table[tokens]
    emb = (rows + self.positions) * mask[..., None]
    count = np.maximum(mask.sum(1, keepdims=True), 1).astype(np.float32)
    pooled = rows.sum(1) / count
    return emb.astype(np.float32), mask, pooled.astype(np.float32)


def write_default(directory, split='train'):
  """Writes the captioned digits of `split` in the text_data format, with
  the DigitsTextEncoder and the labels."""
  x, y, texts, _ = captions(split)
  text_data.write(directory, images_lib.to_uint8(x), texts,
                  DigitsTextEncoder(), encoder=ENCODER_NAME, labels=y)


class CaptionedDigits(base.Dataset):
  """The digits conditioned on their captions (no class labels), embedded
  by `DigitsTextEncoder`; evaluated on the prompts, 10 classes."""
  scorer = 'digit_captions'

  @property
  def condition(self):
    return conditioning.Captions(self.cfg.text_len, self.cfg.text_dim,
                                 self.cfg.pooled_dim)

  def _encode(self, texts):
    encoder = DigitsTextEncoder(self.cfg.text_len, self.cfg.text_dim)
    return self.condition.make(*encoder(texts))

  def train_batches(self, global_batch, seed, start_step, rows):
    x, _, texts, _ = captions('train')
    return base.indexed_batches({'x': x, 'cond': self._encode(texts)},
                                global_batch, rows, seed, start_step)

  def split_batches(self, split, process_index, process_count, local_batch):
    return base.strided_batches(digits.load(split), process_index,
                                process_count, local_batch)

  def num_examples(self, split):
    return len(digits.load(split)[1])

  def eval_labels(self, n):
    """The class each evaluation prompt names: i mod 10."""
    return (np.arange(n) % NUM_CLASSES).astype(np.int32)

  def eval_cond(self, labels):
    """The encoded evaluation prompts that name the classes `labels`."""
    texts, named = prompts(-(-len(labels) // NUM_CLASSES))
    if not (named[:len(labels)] == labels).all():
      raise ValueError('Captioned digits are sampled for the prompts in '
                       'order: labels must be eval_labels(n).')
    return self._encode(texts[:len(labels)])

  @property
  def grid_columns(self):
    return NUM_CLASSES

  @property
  def label_description(self):
    return ('sample i is drawn for evaluation prompt i, which names class '
            'i mod 10 and a trait (captioned_digits.prompts)')

  def notes(self, grid_size):
    per_class = grid_size // NUM_CLASSES
    texts, _ = prompts(per_class)
    lines = ['', 'Grids: column c is digit c; row j shows prompt j of its '
             'class, e.g. for the 7s:', '']
    lines += [f'{j}. "{texts[10 * j + 7]}"' for j in range(per_class)]
    return '\n'.join(lines) + '\n'
