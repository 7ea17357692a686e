"""Random-access tfds reading, on a tiny dataset built on the fly in
array_record (and in tfrecord, for the error) in a temporary directory, and
on a copy of it on gs:// (the tests' GCS emulator: tests/gcs.py)."""

import functools
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import imagenet128
from multistep_cm import datasets
from multistep_cm import errors
from multistep_cm.datasets import tfds_images
from multistep_cm.datasets import tfds_source

NAME = 'msc_tiny_images'
NUM_CLASSES = 5
_rng = np.random.default_rng(0)
# Odd sizes, so that crops and resizes are not trivial.
IMAGES = [_rng.integers(0, 256, (_rng.integers(5, 15), _rng.integers(5, 15), 3),
                        dtype=np.uint8) for _ in range(30)]
LABELS = _rng.integers(0, NUM_CLASSES, len(IMAGES))


# skip_registration: the test can be imported twice in one process, and
# open_source finds an unregistered name through its files in data_dir.
class MscTinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    features = tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3)),
        'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        # tfds writes examples in a hashed-key order: the id says which one.
        'id': tfds.features.Scalar(np.int64)})
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i, (x, y) in enumerate(zip(IMAGES, LABELS)):
      yield i, {'image': x, 'label': y, 'id': i}


def _build(root, file_format):
  builder = MscTinyImages(data_dir=str(root), file_format=file_format)
  builder.download_and_prepare()
  return builder


@pytest.fixture(scope='module')
def array_record_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('array_record')
  _build(root, 'array_record')
  return str(root)


@pytest.fixture(scope='module')
def source(array_record_dir):
  return tfds_source.open_source(NAME, 'train', array_record_dir)


def test_open_source_returns_the_written_examples(source):
  assert len(source) == len(IMAGES)
  ids = [int(source[i]['id']) for i in range(len(source))]
  assert sorted(ids) == list(range(len(IMAGES)))
  for i in np.random.default_rng(1).choice(len(source), 8, replace=False):
    ex = source[int(i)]
    assert ex['image'].dtype == np.uint8
    np.testing.assert_array_equal(ex['image'], IMAGES[ex['id']])
    assert int(ex['label']) == LABELS[ex['id']]


def _error_message(name, data_dir):
  with pytest.raises(datasets.DatasetNotPreparedError) as e:
    tfds_source.open_source(name, 'train', data_dir)
  assert isinstance(e.value, errors.UserError)
  msg = str(e.value)
  assert '\n' not in msg
  return msg


def test_not_prepared_names_the_directory_and_the_build_command(
    tmp_path, monkeypatch):
  msg = _error_message(NAME, str(tmp_path))
  assert str(tmp_path / NAME) in msg
  assert (f'`tfds build {NAME} --data_dir={tmp_path} '
          '--file_format=array_record`') in msg
  # Building, unlike reading, needs TensorFlow: an extra of its own.
  assert "needs TensorFlow: pip install -e '.[tfds]'" in msg
  assert (f"`tfds.builder('{NAME}', data_dir='{tmp_path}', "
          "file_format='array_record').download_and_prepare()`") in msg
  # A dataset with builder code: it names the versioned directory.
  assert str(tmp_path / 'cifar10' / '3.0.2') in _error_message('cifar10',
                                                               str(tmp_path))
  # No data_dir: TFDS_DATA_DIR, read at the call.
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'env'))
  assert f'--data_dir={tmp_path / "env"} ' in _error_message(NAME, None)
  monkeypatch.delenv('TFDS_DATA_DIR')
  home = os.path.expanduser('~/tensorflow_datasets')
  assert f'--data_dir={home} ' in _error_message('msc_not_there_at_all', None)


def test_tfrecord_only_says_to_convert_or_rebuild(tmp_path):
  builder = _build(tmp_path, 'tfrecord')
  msg = _error_message(NAME, str(tmp_path))
  assert 'prepared as tfrecord' in msg
  assert (f'`tfds convert_format --dataset_version_dir={builder.data_dir} '
          '--out_file_format=array_record`') in msg
  assert f'delete {builder.data_dir} and prepare it again with' in msg
  assert f'`tfds build {NAME} --data_dir={tmp_path} ' in msg
  # The advice holds: a fresh array_record build there can be read.
  shutil.rmtree(builder.data_dir)
  _build(tmp_path, 'array_record')
  assert len(tfds_source.open_source(NAME, 'train', str(tmp_path))) == len(
      IMAGES)


@pytest.mark.parametrize('shape,size', [
    ((37, 53, 3), 16),     # Non-integer ratios, odd crop offsets.
    ((211, 300, 3), 128),
    ((97, 96, 3), 32),     # Exactly 3x after the crop: a block mean.
    ((50, 70, 3), 64),     # Upscaling: ImageNet has a few small images.
    ((129, 128, 3), 128),
])
def test_preprocess_matches_tf_area_resize(shape, size):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  img = np.random.default_rng(sum(shape)).integers(0, 256, shape, np.uint8)
  ours = tfds_source.preprocess(size, img, crop=True)
  # The tf.data preprocessing this module replaced: centre square crop, then
  # tf's area resize.
  h, w = shape[:2]
  side = min(h, w)
  crop = img[(h - side) // 2:(h - side) // 2 + side,
             (w - side) // 2:(w - side) // 2 + side]
  ref = tf.image.resize(tf.constant(crop), (size, size), method='area')
  ref = ref / 127.5 - 1.
  assert ours.shape == (size, size, 3) and ours.dtype == np.float32
  # The same area weights, summed in another order: at most 3.6e-7 measured
  # here and on 46 more sizes up to 2000x1500 (float32 rounding; one uint8
  # level is 7.8e-3).
  np.testing.assert_allclose(ours, ref.numpy(), rtol=0, atol=2e-6)


def test_preprocess_scales_stored_sizes_and_checks_them():
  img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
  x = tfds_source.preprocess(32, img)
  np.testing.assert_array_equal(x, img.astype(np.float32) / 127.5 - 1.)
  assert x.min() >= -1 and x.max() <= 1
  with pytest.raises(ValueError, match='32x32, not the configured 64x64'):
    tfds_source.preprocess(64, img)


def test_flip_is_a_fixed_function_of_the_seed():
  # Pinned: a changed rule would change the data of resumed runs.
  assert [int(tfds_source.flip(s)) for s in range(16)] == [
      0, 1, 1, 1, 0, 1, 0, 0, 1, 0, 1, 1, 1, 1, 0, 0]
  assert tfds_source.flip((7, 3, 5)) == tfds_source.flip([7, 3, 5])
  share = np.mean([tfds_source.flip((0, 0, r)) for r in range(2000)])
  assert 0.45 < share < 0.55


def test_load_rows_order_and_flips(source):
  indices = np.array([5, 0, 5, 17, 3, 29, 11, 2])
  seeds = [(42, 7, r) for r in range(len(indices))]
  flips = [tfds_source.flip(s) for s in seeds]
  assert any(flips) and not all(flips)
  x, y = tfds_source.load_rows(source, indices, 8, crop=True)
  xf, yf = tfds_source.load_rows(source, indices, 8, seeds, crop=True)
  assert x.shape == (len(indices), 8, 8, 3) and x.dtype == np.float32
  assert y.dtype == np.int32
  np.testing.assert_array_equal(y, [source[int(i)]['label'] for i in indices])
  np.testing.assert_array_equal(yf, y)
  for r, i in enumerate(indices):
    want = tfds_source.preprocess(8, source[int(i)]['image'], crop=True)
    np.testing.assert_array_equal(x[r], want)
    np.testing.assert_array_equal(xf[r], want[:, ::-1] if flips[r] else want)
  # Rows read in two parts (two processes) make the same batch.
  parts = [tfds_source.load_rows(source, indices[s], 8, seeds[s], crop=True)
           for s in (slice(0, 3), slice(3, 8))]
  np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), xf)
  with pytest.raises(ValueError, match='3 flip seeds for 8 rows'):
    tfds_source.load_rows(source, indices, 8, seeds[:3], crop=True)
  with pytest.raises(ValueError, match='at least one index'):
    tfds_source.load_rows(source, [], 8, crop=True)


def test_reads_without_tensorflow(array_record_dir, source):
  # Hides TensorFlow as if it were not installed. `sys.modules['tensorflow'] =
  # None` does not do: tfds takes a 'tensorflow' key as TF being loaded, and
  # fails at import.
  script = textwrap.dedent(f"""
      import sys

      class HideTF:
        def __init__(self, finder):
          self.finder = finder
        def find_spec(self, name, path=None, target=None):
          if name.partition('.')[0] == 'tensorflow':
            return None
          return self.finder.find_spec(name, path, target)
        def invalidate_caches(self):
          getattr(self.finder, 'invalidate_caches', lambda: None)()

      sys.meta_path[:] = [HideTF(f) for f in sys.meta_path]
      import numpy as np
      from multistep_cm.datasets import tfds_source
      src = tfds_source.open_source({NAME!r}, 'train', {array_record_dir!r})
      x, y = tfds_source.load_rows(src, [4, 1, 9], 8, [1, 2, 3], crop=True)
      assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'
      np.savez(sys.argv[1], x=x, y=y)
  """)
  out = os.path.join(array_record_dir, 'no_tf.npz')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, '-c', script, out], cwd=root,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, 'PYTHONPATH': os.pathsep.join(
                            [root, os.environ.get('PYTHONPATH', '')])},
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(out)
  x, y = tfds_source.load_rows(source, [4, 1, 9], 8, [1, 2, 3], crop=True)
  np.testing.assert_array_equal(got['x'], x)
  np.testing.assert_array_equal(got['y'], y)


def test_reads_a_dataset_on_gs(array_record_dir, gcs_bucket, monkeypatch):
  """The prepared dataset copied to gs:// (as `tfds build --data_dir=gs://`
  leaves it) and read through the dataset table, with the data dir given as
  users give it (config.dataset.data_dir, or TFDS_DATA_DIR): the same
  examples as the local read. tfds reads the metadata through etils.epath
  (gcsfs); array_record reads the records itself (riegeli's GcsReader, on
  google-cloud-cpp)."""
  remote = gcs_bucket.upload(
      array_record_dir, 'tfds', keep=lambda rel: rel.startswith(NAME + os.sep))
  monkeypatch.setitem(datasets.TABLE, 'msc_tiny', functools.partial(
      tfds_images.TfdsImages, tfds_name=NAME, crop=True))

  def read(data_dir):
    config = imagenet128.get_config('smoke')
    config.dataset.name, config.dataset.image_size = 'msc_tiny', 8
    config.dataset.num_classes, config.dataset.data_dir = NUM_CLASSES, data_dir
    datasets.check_available(config)
    batches = datasets.train_batches(config, 8, seed=3, start_step=2,
                                     rows=slice(0, 8))
    train = [next(batches) for _ in range(2)]
    return train, list(datasets.one_pass(config, 'train', 8))

  def read_gs(data_dir):
    gcs_bucket.proxy.reset()
    got = read(data_dir)
    agents = {r['agent'].split('/')[0] for r in gcs_bucket.proxy.requests}
    assert agents == {'python-gcsfs', 'gl-cpp'}, agents
    return got

  local = read(array_record_dir)
  on_gs = read_gs(remote)
  monkeypatch.setenv('TFDS_DATA_DIR', remote)
  from_env = read_gs(None)
  for got in (on_gs, from_env):
    for a, b in zip(local[0], got[0]):
      np.testing.assert_array_equal(a['x'], b['x'])
      np.testing.assert_array_equal(a['cond'], b['cond'])
    assert len(got[1]) == len(local[1]) == 4
    for a, b in zip(local[1], got[1]):
      for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
  # Not prepared there: the one line names the gs:// directory.
  msg = _error_message(NAME, gcs_bucket.path('elsewhere'))
  assert f'{gcs_bucket.path("elsewhere", NAME)}' in msg
  assert f'--data_dir={gcs_bucket.path("elsewhere")} ' in msg
