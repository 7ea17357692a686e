"""Text datasets: the format round-trips, bad data ends in one line, the
writer's command line, the batch order, and the captioned digits."""

import json
import os
import re
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from multistep_cm import errors
from multistep_cm.datasets import base
from multistep_cm.datasets import captioned_digits
from multistep_cm.datasets import digits as digits_data
from multistep_cm.datasets import text_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_LEN, TINY_DIM = 5, 6


def tiny_encoder(captions):
  """A test encoder: one token per word (up to TINY_LEN), a vector of the
  word's letters and lengths; pooled: the caption's length in words."""
  emb = np.zeros((len(captions), TINY_LEN, TINY_DIM), np.float32)
  mask = np.zeros((len(captions), TINY_LEN), bool)
  for i, c in enumerate(captions):
    for j, w in enumerate(c.split()[:TINY_LEN]):
      emb[i, j] = [len(w), ord(w[0]), ord(w[-1]), len(c), j, 1.]
      mask[i, j] = True
  pooled = mask.sum(1, keepdims=True).astype(np.float32)
  return emb, mask, pooled


def bad_width_encoder(captions):
  """Returns a mask that does not match the embeddings."""
  return np.zeros((len(captions), 4, 3), np.float32), np.ones((len(captions),
                                                               5), bool)


def _example(n=7, size=4, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  imgs = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
  caps = [f'caption {i} ' + 'word ' * (i % 4) for i in range(n)]
  return imgs, caps, rng.integers(0, 10, n).astype(np.int32)


def _assert_one_line(e, *phrases):
  msg = str(e.value)
  assert isinstance(e.value, errors.UserError)
  assert '\n' not in msg and msg, msg
  for p in phrases:
    assert p in msg, msg


@pytest.mark.parametrize('batch_size', [3, 256])
def test_round_trip(tmp_path, batch_size):
  imgs, caps, labels = _example()
  caps[2] = 'two\nlines'
  out = tmp_path / 'ds'
  text_data.write(out, iter(list(imgs)), caps, tiny_encoder, encoder='tiny',
                  labels=labels, batch_size=batch_size)
  assert sorted(os.listdir(tmp_path)) == ['ds']  # No temporary left.
  ds = text_data.open_dataset(out, image_size=4, text_len=TINY_LEN,
                              text_dim=TINY_DIM, pooled_dim=1)
  assert len(ds) == 7 and ds.encoder == 'tiny'
  idx = np.array([6, 0, 2, 2, 5])
  got = ds.rows(idx)
  emb, mask, pooled = tiny_encoder([caps[i].replace('\n', ' ') for i in idx])
  np.testing.assert_array_equal(
      np.round((got['x'] + 1) * 127.5).astype(np.uint8), imgs[idx])
  assert got['x'].dtype == np.float32 and got['x'].min() >= -1
  assert got['x'].max() <= 1
  np.testing.assert_array_equal(got['text'], emb)
  np.testing.assert_array_equal(got['text_mask'], mask)
  np.testing.assert_array_equal(got['pooled'], pooled)
  np.testing.assert_array_equal(got['label'], labels[idx])
  assert got['text_mask'].dtype == bool and got['label'].dtype == np.int32
  assert ds.captions(idx) == [caps[i].replace('\n', ' ') for i in idx]


def test_without_pooled_and_labels_float16(tmp_path):
  imgs, caps, _ = _example(channels=1)
  f16 = lambda c: (tiny_encoder(c)[0].astype(np.float16), tiny_encoder(c)[1])
  text_data.write(tmp_path / 'ds', imgs, caps, f16)
  assert np.load(tmp_path / 'ds' / 'text_emb.npy').dtype == np.float16
  got = text_data.open_dataset(tmp_path / 'ds', pooled_dim=0).rows([1, 3])
  assert 'pooled' not in got and got['x'].shape == (2, 4, 4, 1)
  np.testing.assert_array_equal(got['label'], [0, 0])
  np.testing.assert_array_equal(got['text'],
                                tiny_encoder([caps[1], caps[3]])[0])


@pytest.fixture
def written(tmp_path):
  imgs, caps, labels = _example()
  text_data.write(tmp_path / 'ds', imgs, caps, tiny_encoder, labels=labels)
  return tmp_path / 'ds'


def test_missing_directory(tmp_path):
  with pytest.raises(text_data.TextDataError) as e:
    text_data.open_dataset(tmp_path / 'nope')
  _assert_one_line(e, 'does not exist', str(tmp_path / 'nope'))


def test_a_bucket_url_says_to_copy_or_mount():
  with pytest.raises(text_data.TextDataError) as e:
    text_data.open_dataset('gs://bucket/captions')
  _assert_one_line(e, 'memory-mapped', 'gs://bucket/captions')


@pytest.mark.parametrize('name,phrase', [
    ('text_emb.npy', 'missing embeddings'), ('text_mask.npy',
                                             'missing embeddings'),
    ('images.npy', 'missing images'), ('pooled.npy', 'missing pooled'),
    ('captions.txt', 'missing captions'), ('meta.json', 'no meta.json')])
def test_missing_file(written, name, phrase):
  os.remove(written / name)
  with pytest.raises(text_data.TextDataError) as e:
    text_data.open_dataset(written)
  _assert_one_line(e, phrase)


@pytest.mark.parametrize('expect,phrase', [
    ({'text_dim': 768}, f'text_dim {TINY_DIM} in '),
    ({'text_dim': 768}, 'the config expects 768'),
    ({'image_size': 64}, 'image_size 4 in '),
    ({'text_len': 77}, f'text_len {TINY_LEN} in '),
    ({'pooled_dim': 0}, 'pooled_dim 1 in ')])
def test_not_what_the_config_expects(written, expect, phrase):
  with pytest.raises(text_data.TextDataError) as e:
    text_data.open_dataset(written, **expect)
  _assert_one_line(e, phrase)


@pytest.mark.parametrize('name', ['images', 'text_emb', 'text_mask', 'pooled',
                                  'labels'])
def test_row_counts_disagree(written, name):
  a = np.load(written / f'{name}.npy')
  np.save(written / f'{name}.npy', a[:-1])
  with pytest.raises(text_data.TextDataError) as e:
    text_data.open_dataset(written)
  _assert_one_line(e, f'{name}.npy', '6 rows', '7 examples', 'disagree')


def test_caption_count_disagrees(written):
  with open(written / 'captions.txt', 'a', encoding='utf-8') as f:
    f.write('one too many\n')
  with pytest.raises(text_data.TextDataError) as e:
    text_data.open_dataset(written)
  _assert_one_line(e, 'captions.txt has 8 lines', 'disagree')


def test_truncated_array(written):
  path = written / 'text_emb.npy'
  path.write_bytes(path.read_bytes()[:-10])
  with pytest.raises(text_data.TextDataError) as e:
    text_data.open_dataset(written)
  _assert_one_line(e, 'text_emb.npy is unreadable')


def test_wrong_embedding_width_in_meta(written):
  meta = json.loads((written / 'meta.json').read_text())
  (written / 'meta.json').write_text(json.dumps(dict(meta, text_dim=512)))
  with pytest.raises(text_data.TextDataError) as e:
    text_data.open_dataset(written)
  _assert_one_line(e, 'text_emb.npy', 'meta.json says')


@pytest.mark.parametrize('embed,imgs,phrase', [
    (bad_width_encoder, None, 'mask of shape (2, 5)'),
    (lambda c: (np.full((len(c), 2, 2), np.nan), np.ones((len(c), 2))), None,
     'non-finite'),
    (lambda c: (np.zeros((len(c), len(c), 2)), np.ones((len(c), len(c)))),
     None, 'must not vary'),
    (tiny_encoder, np.zeros((3, 4, 5, 3), np.uint8), 'must be square'),
    (tiny_encoder, [np.zeros((4, 4, 3), np.uint8)] * 2
     + [np.zeros((4, 4, 1), np.uint8)], 'same size'),
    (tiny_encoder, np.zeros((2, 4, 4, 3), np.uint8), '2 images for 3'),
    (tiny_encoder, np.zeros((3, 4, 4, 3), np.float32), 'expected uint8')])
def test_write_refuses(tmp_path, embed, imgs, phrase):
  caps = ['a b', 'c', 'd e f']
  imgs = np.zeros((3, 4, 4, 3), np.uint8) if imgs is None else imgs
  with pytest.raises(text_data.TextDataError) as e:
    text_data.write(tmp_path / 'ds', iter(imgs), caps, embed, batch_size=2)
  _assert_one_line(e, phrase)
  assert not os.listdir(tmp_path)


def test_train_batches_order_and_process_rows(written):
  ds = text_data.open_dataset(written)
  whole = text_data.train_batches(written, 4, seed=5, start_step=3)
  batches = [next(whole) for _ in range(3)]  # Steps 3..5 cross an epoch.
  resumed = next(text_data.train_batches(written, 4, seed=5, start_step=4))
  for key in batches[1]:
    np.testing.assert_array_equal(resumed[key], batches[1][key])
  expected = ds.rows(base.step_indices(7, 4, 5, 3, slice(0, 4)))
  for key in expected:
    np.testing.assert_array_equal(batches[0][key], expected[key])
  parts = [text_data.train_batches(written, 4, 5, 3, rows=slice(lo, hi))
           for lo, hi in ((0, 1), (1, 4))]
  for b in batches:
    got = [next(p) for p in parts]
    for key in b:
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]),
                                    b[key])
  other_seed = next(text_data.train_batches(written, 4, seed=6, start_step=3))
  assert not np.array_equal(other_seed['label'], batches[0]['label']) or (
      not np.array_equal(other_seed['x'], batches[0]['x']))


def test_train_batches_checks_before_the_first_batch(written):
  with pytest.raises(text_data.TextDataError):
    text_data.train_batches(written, 4, 0, text_dim=1)


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [ROOT, os.path.join(ROOT, 'tests')]))
  return subprocess.run(
      [sys.executable, '-m', 'multistep_cm.tools.write_text_data', *args],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
      check=False)


@pytest.fixture
def folder(tmp_path):
  rng = np.random.default_rng(1)
  d = tmp_path / 'imgs'
  d.mkdir()
  caps = {'b': 'a red square', 'a': 'two\nlines', 'c': 'blue'}
  for name, size in (('b', (12, 9)), ('a', (6, 6)), ('c', (5, 10))):
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
        d / f'{name}.png')
    (d / f'{name}.txt').write_text(caps[name])
  (d / 'notes.md').write_text('not an image')
  return d


def test_cli_folder(folder, tmp_path):
  out = tmp_path / 'out'
  proc = _cli(f'--folder={folder}', f'--out={out}', '--image_size=4',
              '--encoder=test_text_data:tiny_encoder', '--text_len=3',
              '--progress_every=2')
  assert proc.returncode == 0, proc.stderr
  assert '2/3 images' in proc.stderr and '3/3 images' in proc.stderr
  ds = text_data.open_dataset(out, image_size=4, text_len=3,
                              text_dim=TINY_DIM)
  assert ds.captions([0, 1, 2]) == ['two lines', 'a red square', 'blue']
  assert ds.encoder == 'test_text_data:tiny_encoder'
  got = ds.rows([0, 1, 2])
  emb, mask, _ = tiny_encoder(['two lines', 'a red square', 'blue'])
  np.testing.assert_array_equal(got['text'], emb[:, :3])
  np.testing.assert_array_equal(got['text_mask'], mask[:, :3])
  # a.png is 6x6: resized to 4x4 and nothing cropped.
  with Image.open(folder / 'a.png') as img:
    expected = np.asarray(img.resize((4, 4), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(
      np.round((got['x'][0] + 1) * 127.5).astype(np.uint8), expected)


def test_cli_list_pads_text(folder, tmp_path):
  listing = tmp_path / 'list.tsv'
  listing.write_text(f'imgs/a.png\tfirst one\n\n{folder}/c.png\tsecond\n')
  out = tmp_path / 'out'
  proc = _cli(f'--list={listing}', f'--out={out}', '--image_size=3',
              '--channels=1', '--encoder=test_text_data:tiny_encoder',
              '--text_len=9', '--float16')
  assert proc.returncode == 0, proc.stderr
  ds = text_data.open_dataset(out, image_size=3, text_len=9, channels=1)
  got = ds.rows([0, 1])
  assert got['text_mask'].sum(1).tolist() == [2, 1]
  assert not got['text'][:, 5:].any()  # Padding past the encoder's 5.
  assert ds.captions([1]) == ['second']


@pytest.mark.parametrize('setup,args,phrase', [
    ('no caption', [], 'caption missing'),
    ('no image', [], 'image missing'),
    ('bad image', [], 'unreadable image'),
    ('', ['--encoder=no_such_module_x:embed'], 'cannot import'),
    ('', ['--encoder=test_text_data:nothing'], "has no 'nothing'"),
    ('', ['--encoder=test_text_data:bad_width_encoder'], 'mask of shape')])
def test_cli_bad_input(folder, tmp_path, setup, args, phrase):
  listing = tmp_path / 'list.tsv'
  listing.write_text('imgs/a.png\tfirst\nimgs/c.png\tsecond\n')
  source = f'--folder={folder}'
  if setup == 'no caption':
    os.remove(folder / 'b.txt')
  elif setup == 'no image':
    listing.write_text('imgs/a.png\tfirst\nimgs/zzz.png\tsecond\n')
    source = f'--list={listing}'
  elif setup == 'bad image':
    (folder / 'c.png').write_bytes(b'not a png')
  out = tmp_path / 'out'
  proc = _cli(source, f'--out={out}', '--image_size=4',
              *(args or ['--encoder=test_text_data:tiny_encoder']))
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
  assert phrase in lines[0], lines[0]
  assert not out.exists()
  assert sorted(os.listdir(tmp_path)) == ['imgs', 'list.tsv']


# The captioned digits.

NUMBER_WORDS = {'zero': 0, 'one': 1, 'two': 2, 'three': 3, 'four': 4,
                'five': 5, 'six': 6, 'seven': 7, 'eight': 8, 'nine': 9}


def _named_class(caption):
  named = [NUMBER_WORDS.get(w, int(w) if w.isdigit() else None)
           for w in re.findall(r'[a-z0-9]+', caption)]
  named = [c for c in named if c is not None]
  assert len(named) == 1, caption
  return named[0]


@pytest.mark.parametrize('split', ['train', 'test'])
def test_captions_name_the_class_and_a_true_trait(split):
  x, y, caps, traits = captioned_digits.captions(split)
  xd, yd = digits_data.load(split)
  np.testing.assert_array_equal(x, xd)
  np.testing.assert_array_equal(y, yd)
  assert [_named_class(c) for c in caps] == y.tolist()
  for key, values in (('thickness', ('thin', 'thick')),
                      ('slant', ('upright', 'slanted'))):
    # Both values occur, in every class.
    for c in range(10):
      assert set(traits[key][y == c]) == set(values)
  for i, c in enumerate(caps):
    words = set(re.findall(r'[a-z]+', c))
    named = words & {'thin', 'thick', 'upright', 'slanted'}
    assert len(named) == 1, c
    assert named <= {traits['thickness'][i], traits['slant'][i]}, c
  ink = (x[..., 0] + 1).sum((1, 2))
  thick = traits['thickness'] == 'thick'
  for c in range(10):  # Thick digits of a class carry more ink.
    assert ink[(y == c) & thick].min() > ink[(y == c) & ~thick].mean()
  assert len(set(caps)) > 50
  assert captioned_digits.captions(split)[2] == caps  # Deterministic.


def test_prompts_cover_classes_and_traits():
  texts, labels = captioned_digits.prompts(num_per_class=4)
  assert len(texts) == 40 and labels.tolist() == list(range(10)) * 4
  assert [_named_class(t) for t in texts] == labels.tolist()
  for c in range(10):
    words = set(re.findall(r'[a-z]+', ' '.join(texts[c::10])))
    assert {'thin', 'thick', 'upright', 'slanted'} <= words


_ENCODE = ('from multistep_cm.datasets import captioned_digits as c; import sys; '
           "sys.stdout.buffer.write(b''.join(a.tobytes() for a in "
           "c.DigitsTextEncoder()(['a thin seven', 'digit 3, upright'])))")


def test_digits_encoder():
  enc = captioned_digits.DigitsTextEncoder()
  caps = ['a thin seven', 'the number 7, slanted', 'seven thin a', 'zebra',
          '', 'a thick one one one one one one one one']
  emb, mask, pooled = enc(caps)
  assert emb.shape == (6, enc.text_len, enc.text_dim) and emb.dtype == (
      np.float32)
  assert pooled.shape == (6, enc.text_dim) and pooled.dtype == np.float32
  assert mask.dtype == bool
  assert mask.sum(1).tolist() == [3, 5, 3, 1, 0, enc.text_len]
  assert not emb[~mask].any()  # Padding is zero, and masked.
  assert not pooled[4].any()
  # Word order shows in the embeddings, not in the pooled vector.
  assert not np.allclose(emb[0], emb[2])
  np.testing.assert_allclose(pooled[0], pooled[2], rtol=1e-6)
  # Every word the captions use is in the vocabulary ('zebra' is not).
  vocab = set(enc.vocab)
  assert 'zebra' not in vocab
  for c in captioned_digits.captions('test')[2]:
    assert all(t in vocab for t in re.findall(r'[a-z]+|[0-9]|,', c)), c
  # The same numbers in a fresh instance and in a fresh process.
  again = captioned_digits.DigitsTextEncoder()(caps)
  for a, b in zip((emb, mask, pooled), again):
    np.testing.assert_array_equal(a, b)
  proc = subprocess.run([sys.executable, '-c', _ENCODE], cwd=ROOT,
                        env=dict(os.environ, PYTHONPATH=ROOT),
                        capture_output=True, timeout=120, check=True)
  here = captioned_digits.DigitsTextEncoder()(['a thin seven',
                                               'digit 3, upright'])
  assert proc.stdout == b''.join(a.tobytes() for a in here)


def test_write_default(tmp_path):
  captioned_digits.write_default(tmp_path / 'd', 'test')
  enc = captioned_digits.DigitsTextEncoder()
  ds = text_data.open_dataset(tmp_path / 'd', image_size=8, channels=1,
                              text_len=enc.text_len, text_dim=enc.text_dim,
                              pooled_dim=enc.text_dim)
  x, y, caps, _ = captioned_digits.captions('test')
  assert len(ds) == len(y) and ds.encoder == captioned_digits.ENCODER_NAME
  idx = np.arange(0, len(y), 7)
  got = ds.rows(idx)
  np.testing.assert_array_equal(got['label'], y[idx])
  np.testing.assert_allclose(got['x'], x[idx], atol=0.5 / 127.5 + 1e-6)
  assert ds.captions(idx) == [caps[i] for i in idx]
  emb, mask, pooled = enc([caps[i] for i in idx])
  np.testing.assert_array_equal(got['text'], emb)
  np.testing.assert_array_equal(got['text_mask'], mask)
  np.testing.assert_array_equal(got['pooled'], pooled)
