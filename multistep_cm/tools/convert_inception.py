"""Converts pytorch-fid's FID Inception weights to the `.npz` this project reads.

  python -m multistep_cm.tools.convert_inception \
      --pth=pt_inception-2015-12-05-6726825d.pth --out=inception_fid.npz

Run once, on any machine with torch (`pip install torch`; nothing else of
torch is needed afterwards). The output is byte-for-byte reproducible from the
same input, and its SHA-256 is printed: put it in
config.evaluate.inception_sha256 so that every run checks it.
"""

import argparse
import hashlib
import io
import re
import sys
import zipfile

from etils import epath
import numpy as np

from multistep_cm.evaluation import inception

# pytorch-fid's file name ends in the first 8 hex digits of its SHA-256
# (torch.hub's convention).
SOURCE_NAME = 'pt_inception-2015-12-05-6726825d.pth'
_BN = {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean',
       'running_var': 'var'}


def convert_state_dict(state_dict):
  """pytorch-fid names and layouts -> this network's: OIHW conv kernels to
  HWIO, batch norm to scale/bias/mean/var, fc (1008, 2048) to (2048, 1008)."""
  out = {}
  for key, value in state_dict.items():
    value = np.asarray(value, np.float32)
    parts = key.split('.')
    if parts[-1] == 'num_batches_tracked':
      continue  # Training bookkeeping.
    if key == 'fc.bias':
      continue  # The Inception Score uses the logits without the bias.
    if key == 'fc.weight':
      out['fc'] = value.T
    elif parts[-2:] == ['conv', 'weight']:
      out['/'.join(parts[:-1] + ['kernel'])] = value.transpose(2, 3, 1, 0)
    elif parts[-2] == 'bn' and parts[-1] in _BN:
      out['/'.join(parts[:-1] + [_BN[parts[-1]]])] = value
    else:
      raise inception.InceptionWeightsError(
          f'Unexpected entry {key!r}: not a pytorch-fid Inception state dict.')
  inception.check_arrays(out, 'The state dict')
  return out


def write_npz(path, arrays):
  """np.savez with fixed member timestamps and order, so the same weights
  always give the same bytes (and SHA-256)."""
  with epath.Path(path).open('wb') as raw, zipfile.ZipFile(
      raw, 'w', zipfile.ZIP_STORED) as zf:
    for name in sorted(arrays):
      buf = io.BytesIO()
      np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]),
                                allow_pickle=False)
      zf.writestr(zipfile.ZipInfo(name + '.npy', (1980, 1, 1, 0, 0, 0)),
                  buf.getvalue())


def sha256_of(path):
  h = hashlib.sha256()
  with epath.Path(path).open('rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def check_name_hash(path):
  """torch.hub's check: a file named '...-<hex>.pth' must have a SHA-256 that
  starts with <hex>."""
  m = re.search(r'-([0-9a-f]{8,})\.pth?$', epath.Path(path).name)
  if m and not sha256_of(path).startswith(m.group(1)):
    raise inception.InceptionWeightsError(
        f'{path}: SHA-256 does not start with {m.group(1)}, as its name '
        'promises: the download is incomplete or damaged.')


def convert(pth, out):
  """Returns the SHA-256 of the written .npz."""
  if not epath.Path(pth).exists():
    raise inception.InceptionWeightsError(
        f'{pth} does not exist. {inception.HOW_TO_GET}')
  check_name_hash(pth)
  arrays = convert_state_dict(
      read_state_dict(pth, inception.InceptionWeightsError))
  epath.Path(out).parent.mkdir(parents=True, exist_ok=True)
  write_npz(out, arrays)
  return sha256_of(out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--pth', required=True, help=f'pytorch-fid\'s '
                      f'{SOURCE_NAME} (or a state dict with its names).')
  parser.add_argument('--out', required=True, help='The .npz to write.')
  args = parser.parse_args(argv)
  try:
    digest = convert(args.pth, args.out)
  except inception.InceptionWeightsError as e:
    sys.exit(f'error: {e}')
  print(f'wrote {args.out}\nSHA-256 {digest}\nUse it with '
        f'--config.evaluate.inception_weights={args.out} '
        f'--config.evaluate.inception_sha256={digest}')


def read_state_dict(path, error):
  """{name: float32 array} of a .safetensors or torch-saved state dict, read
  as tensors only (`torch.load(weights_only=True)`: no pickled code runs);
  anything else is one `error` line."""
  path = epath.Path(path)
  if not path.exists():
    raise error(f'{path} does not exist.')
  blob = path.read_bytes()
  try:
    if path.name.endswith('.safetensors'):
      from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
      try:
        return {k: np.asarray(v, np.float32)
                for k, v in st_numpy.load(blob).items()}
      except KeyError:  # bfloat16, which numpy lacks: torch reads it.
        from safetensors import torch as st_torch  # pylint: disable=g-import-not-at-top
        return {k: v.float().numpy() for k, v in st_torch.load(blob).items()}
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise error(
        f'Reading {path} needs `pip install {e.name.split(".")[0]}`.'
    ) from None
  except Exception as e:  # pylint: disable=broad-except
    # safetensors' errors are of its own (Rust) types.
    raise error(f'{path}: not a safetensors file ({e}).') from None
  try:
    state = torch.load(io.BytesIO(blob), map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    # Other bytes fail in many ways (UnpicklingError, KeyError, EOFError...).
    raise error(
        f'{path}: not a torch state dict ({type(e).__name__}: '
        f'{str(e).splitlines()[0] if str(e) else ""}).') from None
  if not isinstance(state, dict):
    raise error(f'{path}: not a state dict (a dict of tensors) but '
                f'a {type(state).__name__}.')
  for key, value in state.items():
    if not isinstance(value, torch.Tensor):
      raise error(f'{path}: not a state dict: {key!r} is a '
                  f'{type(value).__name__}, not a tensor.')
  return {k: v.float().numpy() for k, v in state.items()}


if __name__ == '__main__':
  main()
