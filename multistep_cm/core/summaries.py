"""Training scalars, sample grids and the run's config, to a TensorBoard
event file (the scalars to the log too).

The event file is written here, in its record format (length, data, each
with a masked CRC-32C) around hand-encoded `Event` protos: TensorBoard's
writers import TensorFlow, seconds and hundreds of MB at every start of a
run, and do not install everywhere jax does.
"""

import contextlib
import io
import socket
import struct
import time

from absl import logging
from etils import epath
from PIL import Image

from multistep_cm import errors


def _crc32c_table():
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    table.append(crc)
  return table


_CRC32C = _crc32c_table()


def crc32c(data):
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data):
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(data):
  """One record of the event file's (TFRecord) format."""
  length = struct.pack('<Q', len(data))
  return (length + struct.pack('<I', _masked_crc(length)) + data +
          struct.pack('<I', _masked_crc(data)))


def _varint(n):
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number, payload):
  """A length-delimited protobuf field."""
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint_field(number, value):
  return _varint(number << 3) + _varint(value)


def _image_value(tag, png, height, width, channels):
  """A Summary.Value with tag (1) and image (4): height (1), width (2),
  colorspace (3: 1 gray, 2 gray + alpha, 3 RGB, 4 RGBA),
  encoded_image_string (4)."""
  image = (_varint_field(1, height) + _varint_field(2, width) +
           _varint_field(3, channels) + _field(4, png))
  return _field(1, tag.encode()) + _field(4, image)


def _text_value(tag, text):
  """A Summary.Value with tag (1), metadata (9) naming the text plugin
  (plugin_data 1, plugin_name 1), and a scalar string tensor (8): dtype (1)
  DT_STRING = 7, an empty tensor_shape (2), string_val (8)."""
  metadata = _field(1, _field(1, b'text'))
  tensor = _varint_field(1, 7) + _field(2, b'') + _field(8, text.encode())
  return _field(1, tag.encode()) + _field(9, metadata) + _field(8, tensor)


def event(step, *, scalars=None, values=(), file_version=None):
  """An `Event` proto: wall_time = 1 (double), step = 2 (int64),
  file_version = 3 (string), summary = 5, whose values (1) each hold a
  tag (1) and a simple_value (2, float), or are given whole in `values`."""
  out = (b'\x09' + struct.pack('<d', time.time()) +
         b'\x10' + _varint(step & 0xFFFFFFFFFFFFFFFF))
  if file_version is not None:
    out += _field(3, file_version.encode())
  values = [_field(1, tag.encode()) + b'\x15' + struct.pack('<f', float(v))
            for tag, v in (scalars or {}).items()] + list(values)
  if values:
    out += _field(5, b''.join(_field(1, v) for v in values))
  return out


class Writer:
  """Writes scalars to the log and, given a directory, to a new event file
  in it (one per start of a run: TensorBoard reads them together)."""

  def __init__(self, logdir=None):
    self._file = self._path = None
    if logdir is not None:
      path = epath.Path(logdir)
      self._path = path / (f'events.out.tfevents.{time.time():.6f}.'
                           f'{socket.gethostname()}')
      with self._storage_errors():
        path.mkdir(parents=True, exist_ok=True)
        self._file = self._path.open('wb')
        self._file.write(record(event(0, file_version='brain.Event:2')))

  @contextlib.contextmanager
  def _storage_errors(self):
    """A write that fails (a full disk) as one StorageError line; what was
    flushed before it stays readable."""
    try:
      yield
    except OSError as e:
      raise errors.StorageError(
          f'Cannot write the TensorBoard events {self._path}: '
          f'{e.strerror or e}.') from e

  def _write(self, step, **kwargs):
    if self._file is not None:
      with self._storage_errors():
        # Flushed at once: a killed run keeps everything it logged.
        self._file.write(record(event(step, **kwargs)))
        self._file.flush()

  def write_scalars(self, step, scalars):
    logging.info('[%d] %s', step, ', '.join(
        f'{k}={float(v):.6g}' for k, v in scalars.items()))
    self._write(step, scalars=scalars)

  def write_png(self, step, tag, png):
    """A PNG file's bytes as an image (TensorBoard's Images tab)."""
    with Image.open(io.BytesIO(png)) as im:
      width, height = im.size
      channels = {'L': 1, 'LA': 2, 'RGBA': 4}.get(im.mode, 3)
    self._write(step, values=[_image_value(tag, png, height, width,
                                           channels)])

  def write_text(self, step, tag, text):
    """Text (TensorBoard's Text tab renders it as markdown)."""
    self._write(step, values=[_text_value(tag, text)])

  def close(self):
    if self._file is not None:
      file, self._file = self._file, None
      with self._storage_errors():
        file.close()


class NullWriter(Writer):
  """Every process but the first: the first writes for all."""

  def _write(self, step, **kwargs):
    pass

  def write_scalars(self, step, scalars):
    pass

  def write_png(self, step, tag, png):
    pass
