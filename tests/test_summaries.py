"""The TensorBoard event file, read back by TensorBoard's own reader."""

import glob

import numpy as np
from tensorboard.backend.event_processing import event_accumulator

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

