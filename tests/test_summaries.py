"""The TensorBoard event file, read back by TensorBoard's own reader:
scalars, images and text."""

import errno
import glob
import io
import os

import numpy as np
from PIL import Image
import pytest
from tensorboard.backend.event_processing import event_accumulator

from multistep_cm import errors
from multistep_cm.core import images
from multistep_cm.core import summaries


def _scalars(logdir):
  events = event_accumulator.EventAccumulator(str(logdir))
  events.Reload()
  return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
          for tag in events.Tags()['scalars']}


def test_crc32c_check_value():
  assert summaries.crc32c(b'123456789') == 0xE3069283


def test_tensorboard_reads_what_the_writer_wrote(tmp_path):
  writer = summaries.Writer(tmp_path)
  writer.write_scalars(3, {'train/loss': 0.1, 'eval/fid': np.float64(12.5)})
  writer.write_scalars(2**40, {'train/loss': -7.25})
  writer.close()
  assert _scalars(tmp_path) == {
      'train/loss': [(3, np.float32(0.1)), (2**40, -7.25)],
      'eval/fid': [(3, 12.5)]}
  # The reader checks each record's CRC: a damaged one is dropped.
  path, = glob.glob(str(tmp_path / 'events.out.tfevents.*'))
  data = bytearray(open(path, 'rb').read())
  data[-1] ^= 1
  open(path, 'wb').write(bytes(data))
  assert _scalars(tmp_path) == {'train/loss': [(3, np.float32(0.1))],
                                'eval/fid': [(3, 12.5)]}



def test_tensorboard_reads_images_and_text(tmp_path):
  rng = np.random.default_rng(0)
  pngs = {}
  for tag, shape in (('gray', (5, 7)), ('rgb', (4, 6, 3))):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, np.uint8)).save(buf, 'PNG')
    pngs[tag] = buf.getvalue()
  writer = summaries.Writer(tmp_path)
  writer.write_png(7, 'gray', pngs['gray'])
  writer.write_png(9, 'rgb', pngs['rgb'])
  writer.write_text(0, 'config', '    {"seed": 0}')
  writer.close()
  events = event_accumulator.EventAccumulator(
      str(tmp_path), size_guidance={event_accumulator.TENSORS: 0})
  events.Reload()
  gray, = events.Images('gray')
  rgb, = events.Images('rgb')
  assert (gray.step, gray.height, gray.width) == (7, 5, 7)
  assert (rgb.step, rgb.height, rgb.width) == (9, 4, 6)
  assert gray.encoded_image_string == pngs['gray']
  assert rgb.encoded_image_string == pngs['rgb']
  text, = events.Tensors('config')
  assert text.tensor_proto.string_val == [b'    {"seed": 0}']
  assert events.SummaryMetadata('config').plugin_data.plugin_name == 'text'


def test_a_training_run_shows_its_grids_and_config(digits_teacher):
  """TensorBoard shows each evaluation's grid, the very PNG in samples/, and
  the resolved config, as config.json holds it."""
  _, workdir = digits_teacher
  events = event_accumulator.EventAccumulator(
      workdir, size_guidance={event_accumulator.IMAGES: 0,
                              event_accumulator.TENSORS: 0})
  events.Reload()
  grids = events.Images('samples')
  pngs = sorted(glob.glob(f'{workdir}/samples/step_*.png'))
  assert len(grids) == len(pngs) >= 1
  for grid, png in zip(grids, pngs):
    assert png.endswith(f'step_{grid.step:07d}.png')
    assert grid.encoded_image_string == open(png, 'rb').read()
  text, = events.Tensors('config')
  with open(f'{workdir}/config.json', encoding='utf-8') as f:
    want = f.read()
  assert text.tensor_proto.string_val[0].decode().replace('\n    ', '\n') == (
      '    ' + want)


class _FullDisk:
  """A file whose writes fail as on a full disk."""

  def write(self, data):
    del data
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  flush = close = write


def test_a_full_disk_is_one_line_for_events_and_pictures(tmp_path):
  writer = summaries.Writer(tmp_path)
  writer.write_scalars(1, {'train/loss': 0.5})
  writer._file = _FullDisk()  # pylint: disable=protected-access
  with pytest.raises(errors.StorageError,
                     match=r'Cannot write the TensorBoard events .*'
                           r'events\.out\.tfevents.*: No space left on device'):
    writer.write_scalars(2, {'train/loss': 0.25})
  assert _scalars(tmp_path) == {'train/loss': [(1, 0.5)]}  # Kept.
  blocked = tmp_path / 'file'
  blocked.write_text('')  # A file where the samples' directory should be.
  with pytest.raises(errors.StorageError, match=r'Cannot write .*file/s\.png'):
    images.save_samples_png(blocked / 's.png', np.zeros((2, 8, 8, 1)),
                            np.arange(2), 2)
