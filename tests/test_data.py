import itertools

import numpy as np
import pytest
import scipy.stats

from configs import digits
from configs import imagenet64
from configs import toy2d as toy2d_config
from multistep_cm import datasets
from multistep_cm import toy2d
from multistep_cm.datasets import digits as digits_data


def test_digits_split():
  xtr, ytr = digits_data.load('train')
  xte, yte = digits_data.load('test')
  assert xtr.shape == (1797 - 360, 8, 8, 1) and xte.shape == (360, 8, 8, 1)
  assert xtr.min() >= -1 and xtr.max() <= 1 and xtr.dtype == np.float32
  assert set(np.unique(ytr)) == set(range(10)) == set(np.unique(yte))
  # No held-out image appears in the train split.
  train_rows = {r.tobytes() for r in xtr.reshape(len(xtr), -1)}
  overlap = sum(r.tobytes() in train_rows for r in xte.reshape(len(xte), -1))
  assert overlap <= 2  # A couple of digits are pixel-identical duplicates.


def test_digits_batches_resume():
  it = datasets.train_batches(digits.get_config(), 32, seed=0)
  first = list(itertools.islice(it, 100))
  resumed = next(datasets.train_batches(digits.get_config(), 32, seed=0,
                                    start_step=57))
  np.testing.assert_array_equal(resumed['x'], first[57]['x'])
  # One epoch covers every training image exactly once.
  n = 1797 - 360
  seen = np.concatenate([b['x'].reshape(32, -1) for b in first])[:n]
  assert len({r.tobytes() for r in seen}) >= n - 5


@pytest.mark.parametrize('name', ['digits', 'toy2d'])
@pytest.mark.parametrize('bounds', [(0, 8), (0, 4, 8), (0, 4, 5, 8),
                                    (0, 8, 16, 24, 32)])
def test_global_batch_is_the_same_on_every_topology(name, bounds):
  """Processes holding rows [bounds[i], bounds[i + 1]) of a global batch
  read, together, exactly the batch one process reads: at every step, across
  an epoch boundary of digits (1437 examples) too."""
  cfg = (digits if name == 'digits' else toy2d_config).get_config()
  batch = bounds[-1]
  whole = datasets.train_batches(cfg, batch, seed=3, start_step=178)
  parts = [datasets.train_batches(cfg, batch, seed=3, start_step=178,
                              rows=slice(lo, hi))
           for lo, hi in zip(bounds, bounds[1:])]
  for _ in range(3):
    expected = next(whole)
    got = [next(p) for p in parts]
    for key in ('x', 'cond'):
      np.testing.assert_array_equal(
          np.concatenate([g[key] for g in got]), expected[key])


def test_toy2d_density_is_the_mixture():
  x, _ = toy2d.sample(np.random.default_rng(0), 50)
  comps = [scipy.stats.multivariate_normal(m, toy2d.STD**2)
           for m in toy2d.means()]
  expected = np.log(np.mean([c.pdf(x) for c in comps], axis=0))
  np.testing.assert_allclose(toy2d.log_density(x), expected, rtol=1e-6)


def test_missing_tfds_dataset(tmp_path):
  cfg = imagenet64.get_config('small')
  cfg.dataset.data_dir = str(tmp_path)
  with pytest.raises(datasets.DatasetNotPreparedError,
                     match=r'tfds build imagenet_resized/64x64.*TFDS_DATA_DIR'):
    datasets.check_available(cfg)


def test_unknown_dataset():
  cfg = imagenet64.get_config('small')
  cfg.dataset.name = 'imagenet65'
  with pytest.raises(ValueError, match='Unknown dataset'):
    datasets.check_available(cfg)


def test_one_pass_covers_the_split_once():
  from multistep_cm.core import images  # pylint: disable=g-import-not-at-top
  cfg = digits.get_config()
  x, y = digits_data.load('train')
  batches = list(datasets.one_pass(cfg, 'train', 400))
  assert [len(b[0]) for b in batches] == [400] * 4  # The last one padded.
  got = np.concatenate([b[0][b[2]] for b in batches])
  np.testing.assert_array_equal(got, images.to_uint8(x))
  np.testing.assert_array_equal(np.concatenate([b[1][b[2]] for b in batches]),
                                y)
  assert datasets.num_examples(cfg, 'train') == len(y) == 1437


@pytest.mark.parametrize('processes', [2, 3, 7])
def test_one_pass_covers_the_split_once_on_any_process_count(processes,
                                                             monkeypatch):
  """Reference statistics see every example exactly once whatever the
  number of processes (1437 is none of their multiples), and every process
  feeds the same number of batches to the sharded computation."""
  from multistep_cm.core import images  # pylint: disable=g-import-not-at-top
  from multistep_cm.datasets import base  # pylint: disable=g-import-not-at-top
  cfg = digits.get_config()
  x, y = digits_data.load('train')
  monkeypatch.setattr(base.jax, 'process_count', lambda: processes)
  shares = []
  for p in range(processes):
    monkeypatch.setattr(base.jax, 'process_index', lambda p=p: p)
    shares.append(list(datasets.one_pass(cfg, 'train', 70 * processes)))
  assert len({len(s) for s in shares}) == 1
  assert {len(b[0]) for s in shares for b in s} == {70}
  # Example i * processes + p is process p's: interleave the shares back.
  rows = [np.concatenate([b[0][b[2]] for b in s]) for s in shares]
  labels = [np.concatenate([b[1][b[2]] for b in s]) for s in shares]
  order = np.concatenate([np.arange(p, len(y), processes)
                          for p in range(processes)])
  np.testing.assert_array_equal(np.concatenate(rows),
                                images.to_uint8(x)[order])
  np.testing.assert_array_equal(np.concatenate(labels), y[order])
