"""Converts pytorch-fid's FID Inception weights to the `.npz` this project reads.

  python -m multistep_cm.tools.convert_inception \
      --pth=pt_inception-2015-12-05-6726825d.pth --out=inception_fid.npz

Run once, on any machine with torch (`pip install torch`; nothing else of
torch is needed afterwards). The output is byte-for-byte reproducible from the
same input, and its SHA-256 is printed: put it in
config.evaluate.inception_sha256 so that every run checks it.
"""

from etils import epath
import numpy as np

from multistep_cm import weights
from multistep_cm.evaluation import inception
from multistep_cm.tools import converting

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
      raise weights.WeightsError(
          f'Unexpected entry {key!r}: not a pytorch-fid Inception state dict.')
  inception.FORMAT.check(out)
  return out


def convert(pth, out):
  """Returns the SHA-256 of the written .npz."""
  if not epath.Path(pth).exists():
    raise weights.WeightsError(
        f'{pth} does not exist. {inception.FORMAT.how_to_get}')
  converting.check_name_hash(pth)
  arrays = convert_state_dict(converting.read_state_dict(pth))
  return inception.FORMAT.write(out, arrays)


def _flags(parser):
  parser.add_argument('--pth', required=True, help=f'pytorch-fid\'s '
                      f'{SOURCE_NAME} (or a state dict with its names).')


def _run(unused_parser, args):
  return convert(args.pth, args.out), None


def main(argv=None):
  converting.main(
      argv, __doc__, _flags, _run,
      use_with=('evaluate.inception_weights', 'evaluate.inception_sha256'))


if __name__ == '__main__':
  main()
